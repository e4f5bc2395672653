"""Triton backward of 2-simplicial attention (trilinear form): docs/math.md, Gradients and Virtual rows.

Virtual rows. The plan (``ops/plan.py``) names the smaller window ``s`` (size ``ws``) and the larger ``b``
(size ``wb``); the op is symmetric under swapping ``(k1, v1, w1)`` with ``(k2, v2, w2)``.
For query ``i`` (head ``h``) and small-window offset ``t`` in ``[0, ws)``, ``l = i - t``:

    z_r   = q_i * k_s[l]                      (virtual query of row r = (i, h, t))
    dO'_r = dO_i * v_s[l]                     (virtual output gradient)
    logit[r, j] = scale * <z_r, k_b[j]>,  i - wb < j <= i
    P[r, j]  = exp(logit[r, j] - Lse_i)       (Lse_i from the forward: one softmax per query)
    dP[r, j] = <dO'_r, v_b[j]>
    dS[r, j] = P[r, j] * (dP[r, j] - Delta_i),   Delta_i = <dO_i, O_i>

This is a flash-attention backward over virtual rows, whose per-row terms reduce back:

    dk_b[j] = scale * sum_r dS[r, j] z_r          dv_b[j] = sum_r P[r, j] dO'_r
    dz_r    = scale * sum_j dS[r, j] k_b[j]       acc_r   = sum_j P[r, j] v_b[j]
    dq_i    = sum_t dz_(i,t) * k_s[i - t]
    dk_s[l] = sum_{i - t = l} dz_(i,t) * q_i      dv_s[l] = sum_{i - t = l} acc_(i,t) * dO_i

(sums over the query heads of a kv group included, for GQA/MQA).

Two kernels, each the only writer of what it owns, so the result is deterministic (no atomics);
on the GPU they run concurrently when the keys kernel has many programs (``_launch``):

- ``_bwd_big_keys``: one program per (block of BN big-window keys, batch, kv head); it walks every
  virtual row that sees its keys (all query heads of the group, all offsets) and keeps dk_b, dv_b
  in registers: 4 matrix products per (row, key). Its row tiles (position x offset chunk) form
  one flat loop, so Triton pipelines the next tile's loads under the current tile's products.
- ``_bwd_rows``: one program per (super-block of NB query positions, batch, block of BH query
  heads); it walks its rows in tiles of BI positions x BH heads x BT offsets, runs each tile over
  its big window (4 matrix products per (row, key): logits, dP, dz, acc), then writes dq_i whole
  and adds dk_s / dv_s into its own slice of a partial buffer ``[.., NB + ws - 1, D]`` (fp32).
  A tile's rows reach BI + BT - 1 small keys; the skewed sum ``sum_{i - t = l}`` is a product
  with a 0/1 matrix. The partial slices of neighbouring programs overlap by ws - 1 keys and the
  head blocks of a group all touch the same keys: torch adds them afterwards, in a fixed order.

In both kernels only (tile, key block) pairs on a window's edge compute the window mask; pairs
wholly inside every row's window run unmasked (keys kernel: separate loops, a ``MASK`` constexpr;
rows kernel: one loop, a runtime flag): rows outside the problem (past S, l < 0, padding heads)
load q = dO = 0 and lse = +inf, so P = dS = 0 there. Delta_i = <dO_i, O_i> comes from a small
kernel of its own (``_delta``) before the two.

Extra memory: Delta ``[B, Hq, S]`` and the partial buffers, about
``(1 + (ws - 1) / NB) * B * S * Hq / BH * (D + Dv)`` fp32 values: O(B * S * H * D).

Precision: products in the input dtype (bf16/fp16) with fp32 accumulation; fp32 inputs use
tf32 tensor cores only when ``allow_tf32`` (``torch.backends.cuda.matmul.allow_tf32`` at the
op level), else IEEE fp32 products. The logits are ``qk_scale * <z, k_b>`` in log2 units with
z = q * k_s (``triton_fwd.z_scaling``: the sign of the scale rides on z) and the scale applied
in the exp2 argument (one FFMA); that argument is clamped at 0 (P <= 1), so no input overflows
it. z is rounded once to the input dtype for the tensor cores, exactly as in the forward (fp16
needs |q_d k_s,d| < 65504): with bf16 inputs and logits of size ~1e4
(inputs x30) that moves logits by ~10, so P (forward and backward alike) is only roughly right
there, though finite. The rows kernel's 0/1-matrix sums run in bf16 on the GPU: one product
(each term rounded to bf16, like z) for bf16 inputs, hi + lo parts (~16 bits) for fp16/fp32.
fp16: P and dS are rounded to fp16 for the products (as in
FlashAttention), so gradients past fp16's range overflow. Measured errors and speed: docs/kernels.md.

Deterministic: same inputs give bitwise the same gradients (no atomics; every sum has a fixed
order). On CPU tensors the kernels run under the Triton interpreter (whatever TRITON_INTERPRET
said when this module was imported).
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
import triton
import triton.language as tl

from .plan import Plan, make_plan
from .triton_fwd import _SUM, _pow2, z_scaling


@triton.jit
def _delta(DO, O, DELTA, sdob, sdos, sdoh, sob, sos, soh, S, HQ,
           DV: tl.constexpr, DV_PAD: tl.constexpr, BS: tl.constexpr):
    """Delta_i = <dO_i, O_i> in fp32 for BS positions of one (batch, head): ``DELTA [B, Hq, S]``.
    (tl.reduce with triton_fwd's combine function, which the interpreter can run.)"""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    ii = pid_s * BS + tl.arange(0, BS)
    ee = tl.arange(0, DV_PAD)
    m = (ii < S)[:, None] & (ee < DV)[None, :]
    do = tl.load(DO + b * sdob + ii[:, None] * sdos + h * sdoh + ee[None, :], mask=m, other=0.0)
    o = tl.load(O + b * sob + ii[:, None] * sos + h * soh + ee[None, :], mask=m, other=0.0)
    dlt = tl.reduce(do.to(tl.float32) * o.to(tl.float32), 1, _SUM)
    tl.store(DELTA + pid_bh * S + ii, dlt, mask=ii < S)


@triton.jit
def _row_inputs(Q, KS, VS, DO, LSE, DELTA, b, g, ii, hq, l, rvalid,
                sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                S, HQ, dd, ee, dmask, emask, NEG_Z: tl.constexpr):
    """A rows-kernel tile's per-row inputs: z = q_i * k_s[l] (-z if NEG_Z; logits in log2
    units are qk_scale * <z, k_b>, triton_fwd.z_scaling), dO' = dO_i * v_s[l] (both rounded once
    to the input dtype: packed 16-bit multiplies), Lse_i * log2(e) and Delta_i.
    Rows outside the problem get q = dO = 0 and lse = inf, so P = dS = 0 there."""
    q = tl.load(Q + b * sqb + ii[:, None] * sqs + hq[:, None] * sqh + dd[None, :],
                mask=rvalid[:, None] & dmask[None, :], other=0.0)
    ks = tl.load(KS + b * sksb + l[:, None] * skss + g * sksh + dd[None, :],
                 mask=rvalid[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + b * sdob + ii[:, None] * sdos + hq[:, None] * sdoh + ee[None, :],
                 mask=rvalid[:, None] & emask[None, :], other=0.0)
    vs = tl.load(VS + b * svsb + l[:, None] * svss + g * svsh + ee[None, :],
                 mask=rvalid[:, None] & emask[None, :], other=0.0)
    lse2 = tl.load(LSE + (b * HQ + hq) * S + ii, mask=rvalid, other=float("inf")) * 1.4426950408889634
    dlt = tl.load(DELTA + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0)
    if NEG_Z:
        ks = -ks
    z = (q.to(tl.float32) * ks.to(tl.float32)).to(Q.dtype.element_ty)
    dop = (do.to(tl.float32) * vs.to(tl.float32)).to(Q.dtype.element_ty)
    return z, dop, lse2, dlt


@triton.jit
def _in_window(i, j, WB):
    """Key j in the big window of query position i: 0 <= i - j < wb, as one unsigned compare.
    ``tl.cast``, not ``WB.to``: Triton passes an integer argument equal to 1 as a constant."""
    return (i - j).to(tl.uint32) < tl.cast(WB, tl.uint32)


@triton.jit
def _tile_at(it, j0, n_t, BI: tl.constexpr, BT: tl.constexpr):
    """Position and offset chunk of the keys kernel's flat tile index ``it``. (Divisions even
    when n_t = 1: a division-free form for that case made the compiler spill more.)"""
    return j0 + (it // n_t) * BI, (it % n_t) * BT


@triton.jit
def _keys_inputs(Q, KS, VS, DO, LSE, DELTA, b, g, h0, i0, t0,
                 sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                 S, HQ, G, WS, dd, ee, dmask, emask,
                 BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, NEG_Z: tl.constexpr):
    """The keys kernel's tile inputs (rows r = (p, hh, tt), offset fastest) from compact loads:
    q, dO once per (position, head) ``[BI, BH, D]``, k_s, v_s once per (position, offset)
    ``[BI, BT, D]``, broadcast into z = q * k_s and dO' = dO * v_s ``[BI * BH * BT, D]`` (rounded
    once to the input dtype, as in the forward). Loading every row's q, k_s, dO, v_s instead
    would read each q, dO row BT times and each k_s, v_s row BH times; the compact loads also
    need smaller staging buffers, which leaves room for a third pipeline stage (docs/kernels.md).
    Lse and Delta per (position, head). Rows of offsets that do not exist (l < 0, t >= ws) get
    k_s = v_s = 0, so z = dO' = 0 and they add nothing to dk_b, dv_b; rows of positions or
    heads that do not exist get lse = inf (P = 0)."""
    BM: tl.constexpr = BI * BH * BT
    p = tl.arange(0, BI)
    hh = tl.arange(0, BH)
    tt = tl.arange(0, BT)
    ii = i0 + p
    hq = g * G + h0 + hh
    qok = (ii[:, None] < S) & ((h0 + hh)[None, :] < G)                       # [BI, BH]
    l = ii[:, None] - t0 - tt[None, :]                                         # [BI, BT]
    lok = (l >= 0) & ((t0 + tt)[None, :] < WS) & (ii[:, None] < S)
    q = tl.load(Q + b * sqb + ii[:, None, None] * sqs + hq[None, :, None] * sqh + dd[None, None, :],
                mask=qok[:, :, None] & dmask[None, None, :], other=0.0)
    do = tl.load(DO + b * sdob + ii[:, None, None] * sdos + hq[None, :, None] * sdoh + ee[None, None, :],
                 mask=qok[:, :, None] & emask[None, None, :], other=0.0)
    ks = tl.load(KS + b * sksb + l[:, :, None] * skss + g * sksh + dd[None, None, :],
                 mask=lok[:, :, None] & dmask[None, None, :], other=0.0)
    vs = tl.load(VS + b * svsb + l[:, :, None] * svss + g * svsh + ee[None, None, :],
                 mask=lok[:, :, None] & emask[None, None, :], other=0.0)
    if NEG_Z:
        ks = -ks
    z = (q.to(tl.float32)[:, :, None, :] * ks.to(tl.float32)[:, None, :, :]).to(Q.dtype.element_ty)
    dop = (do.to(tl.float32)[:, :, None, :] * vs.to(tl.float32)[:, None, :, :]).to(Q.dtype.element_ty)
    z = tl.reshape(z, [BM, z.shape[3]])
    dop = tl.reshape(dop, [BM, dop.shape[3]])
    lse2 = tl.load(LSE + (b * HQ + hq[None, :]) * S + ii[:, None], mask=qok, other=float("inf")) * 1.4426950408889634
    dlt = tl.load(DELTA + (b * HQ + hq[None, :]) * S + ii[:, None], mask=qok, other=0.0)
    lse2 = tl.reshape(tl.broadcast_to(lse2[:, :, None], [BI, BH, BT]), [BM])
    dlt = tl.reshape(tl.broadcast_to(dlt[:, :, None], [BI, BH, BT]), [BM])
    return z, dop, lse2, dlt


@triton.jit
def _keys_tile(Q, KS, VS, DO, LSE, DELTA, kb, vb, dk, dv, b, g, h0, i0, t0, jj, r,
               sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
               S, HQ, G, WS, WB, qk_scale, dd, ee, dmask, emask,
               BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr, NEG_Z: tl.constexpr):
    """One row tile (positions i0 + p, heads h0 + hh, offsets t0 + tt; r = (p, hh, tt), offset
    fastest) against the program's key block: dk_b += dS^T z, dv_b += P^T dO'. MASK: keys
    outside a row's window are skipped; without it every key must be in every row's window."""
    ii = i0 + r // (BT * BH)
    z, dop, lse2, dlt = _keys_inputs(Q, KS, VS, DO, LSE, DELTA, b, g, h0, i0, t0,
                                     sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                     S, HQ, G, WS, dd, ee, dmask, emask, BI, BH, BT, NEG_Z)
    # S^T = k_b z^T;  P^T = exp2(qk_scale S^T - Lse_i log2 e), zero outside the windows
    # (clamped at 0: P <= 1 exactly, so rounding can never overflow exp2)
    sT = tl.dot(kb, tl.trans(z), input_precision=PRECISION)
    pT = tl.math.exp2(tl.minimum(sT * qk_scale - lse2[None, :], 0.0))
    if MASK:
        # rows outside the problem need no mask (lse = inf gives P = 0), nor keys past S
        # (never stored)
        pT = tl.where(_in_window(ii[None, :], jj[:, None], WB), pT, 0.0)
    # dP^T = v_b dO'^T;  dS^T = P^T * (dP^T - Delta_i)
    dpT = tl.dot(vb, tl.trans(dop), input_precision=PRECISION)
    dsT = pT * (dpT - dlt[None, :])
    # dv_b += P^T dO';  dk_b += dS^T z
    dv += tl.dot(pT.to(kb.dtype), dop, input_precision=PRECISION)
    dk += tl.dot(dsT.to(kb.dtype), z, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_big_keys(
    Q, KS, VS, KB, VB, DO, LSE, DELTA, DKB, DVB,
    sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh,
    skbb, skbs, skbh, svbb, svbs, svbh, sdob, sdos, sdoh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    S, HQ, HKV, G, WS, WB, qk_scale, dk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr, NEG_Z: tl.constexpr,
):
    """dk_b, dv_b for keys [j0, j0 + BN) of one (batch, kv head): every virtual row that sees
    them (positions j0 <= i < j0 + BN - 1 + wb, all heads of the group, all offsets)."""
    pid_j = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    j0 = pid_j * BN
    jj = j0 + tl.arange(0, BN)
    jvalid = jj < S
    dd = tl.arange(0, D_PAD)
    ee = tl.arange(0, DV_PAD)
    dmask = dd < D
    emask = ee < DV

    kb = tl.load(KB + b * skbb + jj[:, None] * skbs + g * skbh + dd[None, :],
                 mask=jvalid[:, None] & dmask[None, :], other=0.0)
    vb = tl.load(VB + b * svbb + jj[:, None] * svbs + g * svbh + ee[None, :],
                 mask=jvalid[:, None] & emask[None, :], other=0.0)
    dk = tl.full([BN, D_PAD], 0.0, tl.float32)
    dv = tl.full([BN, DV_PAD], 0.0, tl.float32)

    # virtual row r of a tile = (position p, head hh, offset tt), offset fastest
    r = tl.arange(0, BI * BH * BT)
    i_hi = tl.minimum(S, j0 + BN - 1 + WB)
    # Tiles m = 0 .. m_end - 1 of positions i0 = j0 + m BI, each with n_t chunks of offsets,
    # walked as one flat loop per range (the innermost loop is the one Triton pipelines).
    # Tiles m in [m_a, m_c) see every key of the block at every position (i0 >= j0 + BN - 1
    # and i0 + BI - 1 - wb < j0): they run unmasked (rows outside the problem have z = dO' = 0
    # and lse = inf, so P = dS = 0 there; keys past S are never stored).
    n_t = (WS + BT - 1) // BT
    m_end = (i_hi - j0 + BI - 1) // BI
    m_a = tl.minimum((BN - 1 + BI - 1) // BI, m_end)
    m_c = tl.maximum(tl.minimum(WB // BI, m_end), m_a)
    for h0 in range(0, G, BH):
        for it in range(0, m_a * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(Q, KS, VS, DO, LSE, DELTA, kb, vb, dk, dv, b, g, h0, i0, t0, jj, r,
                                sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                S, HQ, G, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, True, PRECISION, NEG_Z)
        for it in range(m_a * n_t, m_c * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(Q, KS, VS, DO, LSE, DELTA, kb, vb, dk, dv, b, g, h0, i0, t0, jj, r,
                                sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                S, HQ, G, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, False, PRECISION, NEG_Z)
        for it in range(m_c * n_t, m_end * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(Q, KS, VS, DO, LSE, DELTA, kb, vb, dk, dv, b, g, h0, i0, t0, jj, r,
                                sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                S, HQ, G, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, True, PRECISION, NEG_Z)

    # dk_b = scale * sum dS (q * k_s) = |scale| * sum dS z  (z carries the sign of scale)
    dk = dk * dk_scale
    tl.store(DKB + b * sdkb + jj[:, None] * sdks + g * sdkh + dd[None, :],
             dk.to(DKB.dtype.element_ty), mask=jvalid[:, None] & dmask[None, :])
    tl.store(DVB + b * sdvb + jj[:, None] * sdvs + g * sdvh + ee[None, :],
             dv.to(DVB.dtype.element_ty), mask=jvalid[:, None] & emask[None, :])


@triton.jit
def _rows_block(z, dop, dz, acc, KB, VB, b, g, skbb, skbs, skbh, svbb, svbs, svbh,
                j0, masked, ii, lse2, dlt, S, WB, qk_scale, dd, ee, dmask, emask,
                BN: tl.constexpr, PRECISION: tl.constexpr):
    """One key block [j0, j0 + BN) of a row tile: dz += dS k_b (unscaled), acc += P v_b.
    ``masked`` (a runtime flag, so that every block of the tile runs in one pipelined loop):
    keys outside [0, S) or outside a row's window are dropped; without it every key of the
    block must be in every row's window. Keys are loaded at indices clamped into [0, S)."""
    jj = j0 + tl.arange(0, BN)
    jl = tl.minimum(tl.maximum(jj, 0), S - 1)
    kb = tl.load(KB + b * skbb + jl[:, None] * skbs + g * skbh + dd[None, :], mask=dmask[None, :], other=0.0)
    vb = tl.load(VB + b * svbb + jl[:, None] * svbs + g * svbh + ee[None, :], mask=emask[None, :], other=0.0)
    # P = exp2(qk_scale z k_b^T - Lse_i log2 e) inside both windows, else 0
    # (clamped at 0: P <= 1 exactly, so rounding can never overflow exp2)
    s = tl.dot(z, tl.trans(kb), input_precision=PRECISION)
    p = tl.math.exp2(tl.minimum(s * qk_scale - lse2[:, None], 0.0))
    if masked:
        # keys before the sequence start (loaded at a clamped index) are moved past every
        # window first; rows outside the problem need no mask (lse = inf gives P = dS = 0)
        jw = tl.where(jj >= 0, jj, S + WB)
        p = tl.where(_in_window(ii[:, None], jw[None, :], WB), p, 0.0)
    # dP = dO' v_b^T;  dS = P * (dP - Delta_i)
    dp = tl.dot(dop, tl.trans(vb), input_precision=PRECISION)
    ds = p * (dp - dlt[:, None])
    # dz += dS k_b (scale applied by the caller);  acc += P v_b
    dz += tl.dot(ds.to(z.dtype), kb, input_precision=PRECISION)
    acc += tl.dot(p.to(z.dtype), vb, input_precision=PRECISION)
    return dz, acc


@triton.jit
def _bwd_rows(
    Q, KS, VS, KB, VB, DO, LSE, DELTA, DQ, DKS_PART, DVS_PART,
    sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh,
    skbb, skbs, skbh, svbb, svbs, svbh, sdob, sdos, sdoh,
    sdqb, sdqs, sdqh,
    S, HQ, HKV, G, NHB, NP, NB, WS, WB, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, LB: tl.constexpr, QB: tl.constexpr,
    PRECISION: tl.constexpr, ONEHOT_BF16: tl.constexpr, SPLIT: tl.constexpr,
    NEG_Z: tl.constexpr,
):
    """dq for positions [I0, I0 + NB) and heads of one head block; dk_s, dv_s partial sums."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (HKV * NHB)
    hb = pid_bh % (HKV * NHB)
    g = hb // NHB                          # kv head
    h0 = (hb % NHB) * BH                   # first head of the block, inside the group
    I0 = pid_p * NB
    dd = tl.arange(0, D_PAD)
    ee = tl.arange(0, DV_PAD)
    dmask = dd < D
    emask = ee < DV

    BM: tl.constexpr = BI * BH * BT
    r = tl.arange(0, BM)
    tt = r % BT
    hh = (r // BT) % BH
    pp = r // (BT * BH)
    hq = g * G + h0 + hh
    hvalid = (h0 + hh) < G
    # dq rows of a tile: (position, head) = r // BT, QB of them (padded to 16 for tl.dot)
    rq = tl.arange(0, QB)
    hq_q = g * G + h0 + rq % BH
    hvalid_q = ((h0 + rq % BH) < G) & (rq < BI * BH)
    # small keys of a tile: l = i0 - t0 - (BT - 1) + l_local, l_local in [0, BI + BT - 1)
    lloc = tl.arange(0, LB)
    LSLOT = NB + WS - 1                    # slice: small keys l in [I0 - ws + 1, I0 + NB)
    part = (((b * HKV * NHB + hb) * NP + pid_p) * LSLOT).to(tl.int64)
    pk = DKS_PART + part * D_PAD
    pv = DVS_PART + part * DV_PAD

    i_end = tl.minimum(I0 + NB, S)
    for i0 in range(I0, i_end, BI):
        ii = i0 + pp
        dq = tl.full([QB, D_PAD], 0.0, tl.float32)
        j_lo = tl.maximum(i0 - WB + 1, 0)
        j_hi = tl.minimum(i0 + BI, S)
        for t0 in range(0, WS, BT):
            t = t0 + tt
            l = ii - t
            rvalid = hvalid & (ii < S) & (t < WS) & (l >= 0)
            # built once per tile, used against every key block of the big window. Tiles of one
            # position (GQA) take the keys kernel's compact loads, with which the rows kernel's
            # loop spills about half as much; for tiles of several positions the broadcast z
            # goes to shared memory by 16-bit stores, so they keep the per-row loads
            if BI == 1:
                z, dop, lse2, dlt = _keys_inputs(Q, KS, VS, DO, LSE, DELTA, b, g, h0, i0, t0,
                                                 sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                                 S, HQ, G, WS, dd, ee, dmask, emask, BI, BH, BT, NEG_Z)
            else:
                z, dop, lse2, dlt = _row_inputs(Q, KS, VS, DO, LSE, DELTA, b, g, ii, hq, l, rvalid,
                                                sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh, sdob, sdos, sdoh,
                                                S, HQ, dd, ee, dmask, emask, NEG_Z)
            if BI > 1:
                # z, dO' pass through a select on rvalid: a no-op on the values (rows outside the
                # problem are zero already), but it keeps the compiler from converting q, k_s,
                # dO, v_s to the MMA operand layout one by one and holding z, dO' in registers
                # across the key loop, where they spilled; z, dO' then stay in shared memory and
                # are read per key block. That is faster for tiles of several positions (MHA) and
                # slower for one-position tiles (GQA), which keep z in registers
                z = tl.where(rvalid[:, None], z, 0.0)
                dop = tl.where(rvalid[:, None], dop, 0.0)
            dz = tl.full([BM, D_PAD], 0.0, tl.float32)
            acc = tl.full([BM, DV_PAD], 0.0, tl.float32)
            # Key blocks are anchored at the right end j_hi of the tile's keys: block k holds
            # [j_hi - (k + 1) BN, j_hi - k BN). Keys in [max(i0 + BI - wb, 0), i0 + 1) are in
            # the window of every position of the tile: blocks k_first <= k < k_int lie wholly
            # inside and run unmasked (rows outside the problem have z = dO' = 0 and lse = inf,
            # so P = dS = 0 there); the right edge (BI - 1 keys past i0) and the left remainder
            # are masked.
            int_lo = tl.maximum(i0 + BI - WB, 0)
            k_first = (tl.maximum(j_hi - i0 - 1, 0) + BN - 1) // BN
            k_int = tl.maximum((j_hi - int_lo) // BN, k_first)
            n_blk = (j_hi - j_lo + BN - 1) // BN
            # one loop for all three kinds, the mask a runtime flag: Triton pipelines each loop
            # separately (a loop per kind waits for each one's first loads in full)
            for k in range(0, n_blk):
                dz, acc = _rows_block(z, dop, dz, acc, KB, VB, b, g, skbb, skbs, skbh, svbb, svbs, svbh,
                                      j_hi - (k + 1) * BN, (k < k_first) | (k >= k_int), ii, lse2, dlt,
                                      S, WB, qk_scale, dd, ee, dmask, emask, BN, PRECISION)
            dz = dz * scale
            # Reductions over rows, one at a time to keep few [BM, D] tensors live; q, k_s, dO
            # are loaded again (L1/L2 hits; ".ca" keeps the compiler from merging these loads
            # with the ones above and holding q, k_s, dO in registers across the key loop):
            #   dk_s[l] += sum_{i-t=l} dz * q_i;  dv_s[l] += sum_{i-t=l} acc * dO_i   (skewed)
            #   dq_i    += sum_t dz_(i,t) * k_s[i - t]    (rows of one (position, head) are BT apart)
            # Each is a product with a 0/1 matrix (exact weights, fp32 accumulation). On the GPU:
            # one bf16 product for bf16 inputs (the terms rounded to bf16, an error of the size
            # of z's rounding), two (hi + lo parts, ~16 mantissa bits) with SPLIT for fp16/fp32;
            # the interpreter gets bf16 dots wrong, so there it is one IEEE fp32 product.
            # dv_s goes first so that acc is dead before dk_s, dq need dz.
            # The slots of this tile's small keys l = i0 - t0 - (BT - 1) + l_local in this
            # program's slice are l - I0 + ws - 1; the read-modify-writes follow a barrier that
            # orders them after the previous tile's stores (made by other threads, maybe).
            slot = i0 - t0 - (BT - 1) + lloc - I0 + WS - 1
            lglob = i0 - t0 - (BT - 1) + lloc
            smask = (lloc < BI + BT - 1) & (lglob >= 0) & (lglob < S) & (slot >= 0) & (slot < LSLOT)
            # 0/1 matrices built here from this tile's indices (not hoisted, so not held in
            # registers across the key loop): row r -> its small key's slot, its (position, head)
            onehot = lglob[:, None] == l[None, :]                                # [LB, BM]
            onehot_q = ((i0 + rq // BH)[:, None] == ii[None, :]) & ((rq % BH)[:, None] == hh[None, :])
            tl.debug_barrier()
            do = tl.load(DO + b * sdob + ii[:, None] * sdos + hq[:, None] * sdoh + ee[None, :],
                         mask=rvalid[:, None] & emask[None, :], other=0.0, cache_modifier=".ca")
            ev = acc * do.to(tl.float32)
            if ONEHOT_BF16:
                oh = onehot.to(tl.bfloat16)
                ev_hi = ev.to(tl.bfloat16)
                part_v = tl.dot(oh, ev_hi)
                if SPLIT:
                    part_v += tl.dot(oh, (ev - ev_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                part_v = tl.dot(onehot.to(tl.float32), ev, input_precision="ieee")
            old_v = tl.load(pv + slot[:, None] * DV_PAD + ee[None, :], mask=smask[:, None], other=0.0)
            tl.store(pv + slot[:, None] * DV_PAD + ee[None, :], old_v + part_v, mask=smask[:, None])
            q = tl.load(Q + b * sqb + ii[:, None] * sqs + hq[:, None] * sqh + dd[None, :],
                        mask=rvalid[:, None] & dmask[None, :], other=0.0, cache_modifier=".ca")
            ek = dz * q.to(tl.float32)
            if ONEHOT_BF16:
                ek_hi = ek.to(tl.bfloat16)
                part_k = tl.dot(oh, ek_hi)
                if SPLIT:
                    part_k += tl.dot(oh, (ek - ek_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                part_k = tl.dot(onehot.to(tl.float32), ek, input_precision="ieee")
            old_k = tl.load(pk + slot[:, None] * D_PAD + dd[None, :], mask=smask[:, None], other=0.0)
            tl.store(pk + slot[:, None] * D_PAD + dd[None, :], old_k + part_k, mask=smask[:, None])
            ks = tl.load(KS + b * sksb + l[:, None] * skss + g * sksh + dd[None, :],
                         mask=rvalid[:, None] & dmask[None, :], other=0.0, cache_modifier=".ca")
            eq = dz * ks.to(tl.float32)
            if ONEHOT_BF16:
                ohq = onehot_q.to(tl.bfloat16)
                eq_hi = eq.to(tl.bfloat16)
                dq += tl.dot(ohq, eq_hi)
                if SPLIT:
                    dq += tl.dot(ohq, (eq - eq_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                dq += tl.dot(onehot_q.to(tl.float32), eq, input_precision="ieee")
        iq = i0 + rq // BH
        tl.store(DQ + b * sdqb + iq[:, None] * sdqs + hq_q[:, None] * sdqh + dd[None, :],
                 dq.to(DQ.dtype.element_ty), mask=(hvalid_q & (iq < S))[:, None] & dmask[None, :])


_INTERPRETED = {}


def _kernel(fn, device: torch.device):
    """The jitted kernel on CUDA; on CPU the same source under the Triton interpreter, with the
    jitted helpers it calls (``_keys_tile``, ``_keys_inputs``, ``_rows_block``, ``_row_inputs``) interpreted too
    (in a copy of the module's globals, so the compiled path in the same process is untouched)."""
    if device.type == "cuda":
        return fn
    from triton.runtime.interpreter import InterpretedFunction
    if fn not in _INTERPRETED:
        # every jitted function of the module, rebuilt over one shared copy of its globals, so
        # helpers called from helpers are interpreted too
        env = dict(fn.fn.__globals__)
        for name, v in fn.fn.__globals__.items():
            if isinstance(v, triton.runtime.JITFunction):
                env[name] = InterpretedFunction(
                    types.FunctionType(v.fn.__code__, env, v.fn.__name__, v.fn.__defaults__, v.fn.__closure__))
        _INTERPRETED[fn] = env[fn.fn.__name__]
    return _INTERPRETED[fn]


def _config(device: torch.device, ws: int, G: int, D: int, DV: int, elt: int, shrink: int = 0):
    """Tile sizes. Rows kernel: BM = BI * BH * BT rows (positions x heads x offsets) against
    BN keys (32 for 16-bit D = 128: the smaller S and dP tiles leave registers for dz and acc).
    Keys kernel: KBN keys against KBI * KBH * KBT rows (positions x heads x offsets).
    Wider rows (fp32, head dims past 128) get smaller tiles; ``shrink`` halves them again."""
    if device.type == "cuda":
        row_bytes = max(_pow2(D), _pow2(DV)) * elt
        bm, bn = (128, 64) if row_bytes <= 256 else (64, 32) if row_bytes <= 512 else (32, 16)
        bm, bn = max(16, bm >> shrink), max(16, bn >> shrink)
        warps, stages, nb_min = (8 if bm == 128 else 4), 2, 64
        kbn, kbm = 2 * bn, bm // 2      # keys kernel: 64 rows x 128 keys measured best
        bn = max(16, bn // 2)           # rows kernel: 32-key blocks (fewer live registers) measured best
        # keys kernel: with its compact tile inputs (_keys_inputs) a third stage fits, and it
        # hides the loads of the next tiles: -16% on gqa64, -10% on mha (16-bit, D <= 128)
        deep = row_bytes <= 256 and shrink == 0
        k_stages = 3 if deep else 2
    else:
        bm, bn, warps, stages, nb_min = 16, 16, 4, 1, 16
        kbn, kbm, k_stages, deep = 16, 16, 1, False
    bt = min(_pow2(ws), bm)
    bh = min(_pow2(G), bm // bt)
    bi = bm // (bt * bh)
    if deep and bi > 1 and bt > 16 and _pow2(bi + bt - 1) > bt:
        # a tile of several positions reaches bi + bt - 1 small keys: halving the offsets per
        # tile (twice the positions) keeps that within bt rows instead of 2 bt, which halves
        # the 0/1 products of the dk_s / dv_s sums (MHA: 35 -> 23 keys, 64 -> 32 rows)
        bt, bi = bt // 2, bi * 2
    if deep and bi > 1:
        # rows kernel, tiles of several positions (z, dO' in shared memory, see _bwd_rows): a
        # third stage of key blocks; single-position tiles (GQA) hold z, dO' in registers and
        # were slower with it
        stages = 3
    # keys kernel: at most 16 offsets per tile (more positions or heads instead), faster than
    # 32 on both GQA and MHA; heads per tile: a power of two that divides G, so that no tile
    # row is a padding head. Wide rows (the determinant form's 256-wide head) keep up to 32
    # offsets, and the rows kernel its tiles: both rules made that case slower.
    kbt = min(_pow2(ws), kbm, 16 if deep else kbm)
    kbh = min(G & -G, kbm // kbt)
    return dict(BI=bi, BH=bh, BT=bt, BN=bn, NB_MIN=nb_min, num_warps=warps, num_stages=stages,
                KBI=kbm // (kbt * kbh), KBH=kbh, KBT=kbt, KBN=kbn, k_warps=warps, k_stages=k_stages)


_SHRINK = {}     # (dtype, D, Dv, precision) -> how often the tiles had to be halved to fit


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def two_simplicial_bwd(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, allow_tf32, config=None):
    """Gradients ``(dq, dk1, dv1, dk2, dv2)`` of the trilinear 2-simplicial attention.

    do, out ``[B, S, Hq, Dv]``; q ``[B, S, Hq, D]``; k1, k2 ``[B, S, Hkv, D]``; v1, v2
    ``[B, S, Hkv, Dv]``; lse ``[B, Hq, S]`` float32 (natural log) from the forward.
    Gradients come back in the inputs' dtypes and shapes. ``config`` overrides keys of
    :func:`_config` (tile sizes, stages) and ``concurrent`` (run the two kernels on two streams,
    see ``_launch``): for benchmarks and tests. The window roles come from
    :func:`~twosimplicial.ops.plan.make_plan`, as in the forward."""
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, allow_tf32)
    dq, dks, dvs, dkb, dvb = canonical_bwd(plan, do, q, *plan.split(k1, v1, k2, v2), out, lse, scale, config)
    return (dq, *plan.merge(dks, dvs, dkb, dvb))


def canonical_bwd(plan: Plan, do, q, ks, vs, kb, vb, out, lse, scale, config=None):
    """:func:`two_simplicial_bwd` on the canonical problem (``(ks, vs)`` over the small window
    ``plan.ws``, ``(kb, vb)`` over the big window ``plan.wb``): ``(dq, dks, dvs, dkb, dvb)``."""
    B, S, HQ, D, DV, G, ws, wb = plan.B, plan.S, plan.Hq, plan.D, plan.Dv, plan.G, plan.ws, plan.wb
    if plan.empty:
        return tuple(torch.zeros_like(x) for x in (q, ks, vs, kb, vb))
    q, ks, vs, kb, vb, do, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, ks, vs, kb, vb, do, out))
    lse = lse.float().contiguous()
    # Delta_i = <dO_i, O_i>, [B, Hq, S] fp32
    delta = torch.empty(B, HQ, S, device=q.device, dtype=torch.float32)
    bs = 64 if q.device.type == "cuda" else 16
    _kernel(_delta, q.device)[(triton.cdiv(S, bs), B * HQ)](
        do, out, delta, *_strides(do), *_strides(out), S, HQ, DV=DV, DV_PAD=max(16, _pow2(DV)), BS=bs,
        num_warps=4)
    key = (q.dtype, D, DV, plan.precision)
    while True:
        cfg = _config(q.device, ws, G, D, DV, q.element_size(), _SHRINK.get(key, 0))
        cfg.update(config or {})
        try:
            dq, dkb, dvb, dks_part, dvs_part, NB = _launch(do, q, ks, vs, kb, vb, lse, delta, ws, wb,
                                                          scale, plan.precision, cfg)
            break
        except triton.runtime.errors.OutOfResources:
            # shared memory: halve the tiles (fp32 IEEE products and wide heads need it)
            if config or _SHRINK.get(key, 0) >= 3:
                raise
            _SHRINK[key] = _SHRINK.get(key, 0) + 1

    dks = _gather_slices(dks_part, NB, ws, S)[..., :D].to(ks.dtype)
    dvs = _gather_slices(dvs_part, NB, ws, S)[..., :DV].to(vs.dtype)
    return dq, dks, dvs, dkb.view_as(kb), dvb.view_as(vb)


def _launch(do, q, ks, vs, kb, vb, lse, delta, ws, wb, scale, precision, cfg):
    B, S, HQ, D = q.shape
    HKV, DV = ks.shape[2], vs.shape[3]
    G = HQ // HKV
    BI, BH, BT, BN = cfg["BI"], cfg["BH"], cfg["BT"], cfg["BN"]
    D_PAD, DV_PAD = max(16, _pow2(D)), max(16, _pow2(DV))
    LB = max(16, _pow2(BI + BT - 1))
    neg_z, qk_scale = z_scaling(scale)        # the forward's rounding of z, so P is recomputed exactly
    kw = dict(D=D, DV=DV, D_PAD=D_PAD, DV_PAD=DV_PAD, PRECISION=precision, NEG_Z=neg_z)
    common = (*_strides(q), *_strides(ks), *_strides(vs), *_strides(kb), *_strides(vb), *_strides(do))

    # rows kernel: NB positions per program, a multiple of BI and >= ws - 1 so that a slice
    # overlaps only its left neighbour's
    NB = BI * triton.cdiv(max(cfg["NB_MIN"], ws - 1), BI)
    NP = triton.cdiv(S, NB)
    NHB = triton.cdiv(G, BH)
    LSLOT = NB + ws - 1
    dkb = torch.empty_like(kb)
    dvb = torch.empty_like(vb)
    dq = torch.empty_like(q)
    dks_part = torch.zeros(B, HKV, NHB, NP, LSLOT, D_PAD, device=q.device, dtype=torch.float32)
    dvs_part = torch.zeros(B, HKV, NHB, NP, LSLOT, DV_PAD, device=q.device, dtype=torch.float32)
    on_gpu = q.device.type == "cuda"

    # The two kernels share no outputs. When the keys kernel has many programs (two or more
    # per SM), it runs on a side stream of high priority, launched first, and the rows
    # kernel's programs fill the SMs its last wave leaves idle (faster on MHA). With few long
    # programs (GQA-64: 128 programs, about one per SM) running them together was slower, so
    # they run in turn (docs/kernels.md, Two streams).
    # The caller's stream waits for the side stream before this returns.
    keys_grid = (triton.cdiv(S, cfg["KBN"]), B * HKV)
    concurrent = on_gpu and cfg.get("concurrent", keys_grid[0] * keys_grid[1] >= 2 * _sm_count(q.device))
    main = torch.cuda.current_stream(q.device) if concurrent else None
    side = _side_stream(q.device) if concurrent else None
    if side is not None:
        side.wait_stream(main)
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            _kernel(_bwd_big_keys, q.device)[keys_grid](
                q, ks, vs, kb, vb, do, lse, delta, dkb, dvb, *common, *_strides(dkb), *_strides(dvb),
                S, HQ, HKV, G, ws, wb, qk_scale, abs(float(scale)), BI=cfg["KBI"], BH=cfg["KBH"], BT=cfg["KBT"],
                BN=cfg["KBN"], num_warps=cfg["k_warps"], num_stages=cfg["k_stages"], **kw)
        _kernel(_bwd_rows, q.device)[(NP, B * HKV * NHB)](
            q, ks, vs, kb, vb, do, lse, delta, dq, dks_part, dvs_part, *common, *_strides(dq),
            S, HQ, HKV, G, NHB, NP, NB, ws, wb, qk_scale, float(scale), LB=LB,
            QB=max(16, BI * BH), ONEHOT_BF16=on_gpu, SPLIT=q.dtype != torch.bfloat16, BI=BI, BH=BH, BT=BT, BN=BN,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **kw)
    finally:
        if side is not None:
            main.wait_stream(side)
    return dq, dkb, dvb, dks_part, dvs_part, NB


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The keys kernel's stream on ``device`` (high priority, made once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-1)
    return _SIDE_STREAMS[idx]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gather_slices(part, NB: int, ws: int, S: int):
    """Sum the rows kernel's slices ``part [B, Hkv, NHB, NP, NB + ws - 1, X]`` into ``[B, S, Hkv, X]``.

    Slot ``s`` of program ``p`` holds small key ``l = p * NB - (ws - 1) + s``: its last NB slots
    are its own positions, its first ws - 1 (<= NB) spill into program p - 1's."""
    B, HKV, NHB, NP, _, X = part.shape
    own = part[:, :, :, :, ws - 1:, :].sum(2)              # [B, Hkv, NP, NB, X]
    if ws > 1:
        spill = part[:, :, :, 1:, : ws - 1, :].sum(2)      # [B, Hkv, NP - 1, ws - 1, X]
        own[:, :, :-1, NB - (ws - 1):, :] += spill
    return own.reshape(B, HKV, NP * NB, X)[:, :, :S].transpose(1, 2)

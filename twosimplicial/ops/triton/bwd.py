"""Triton backward of 2-simplicial attention (trilinear form): docs/math.md, Gradients and Virtual rows.
Names: the vocabulary of ``common.py`` (shared with the forward).

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
on the GPU they run concurrently when the keys kernel has many programs (``_launch``). Both
launch their longest programs first: the block of keys or positions is the slow part of the
grid, the keys kernel's first blocks (rows up to wb past them) and the rows kernel's last
positions (full windows) first, so the short programs near a sequence's ends fill the last wave:

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
  head blocks of a group all touch the same keys: ``_sum_slices`` adds them afterwards, in a
  fixed order, into dk_s and dv_s.

``config={"ws": {...}}`` runs a warp-specialised Gluon prototype of the keys kernel in its place
(``bwd_ws.py``, not dispatched: docs/kernels.md, The warp-specialised keys kernel).

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
z = q * k_s (``common.z_scaling``: the sign of the scale rides on z) and the scale applied
in the exp2 argument (one FFMA); that argument is clamped at 0 (P <= 1), so no input overflows
it. z is rounded once to the input dtype for the tensor cores, exactly as in the forward (fp16
needs |q_d k_s,d| < 65504): with bf16 inputs and logits of size ~1e4
(inputs x30) that moves logits by ~10, so P (forward and backward alike) is only roughly right
there, though finite. The rows kernel's 0/1-matrix sums run in bf16 on the GPU: one product
(each term rounded to bf16, like z) for bf16 inputs, hi + lo parts (~16 bits) for fp16/fp32.
fp16: P and dS are rounded to fp16 for the products (as in
FlashAttention), so gradients past fp16's range overflow. Measured errors and speed: docs/kernels.md.

Deterministic: same inputs give bitwise the same gradients (no atomics; every sum has a fixed
order). On CPU tensors the kernels run under the Triton interpreter (``common.kernel``, as the
forward's).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..plan import Plan, make_plan
from .common import (chunk_columns, dks_from_sums, form_code, kernel, max_combine, pack_rows, padded, pow2,
                     seq_block, sm_count, strides, sum_combine, z_operands, z_scaling)


@triton.jit
def _delta(DO, O, LSE, DELTA, LSE_B, sdo, so, S, HQ,
           DV: tl.constexpr, DV_PAD: tl.constexpr, BS: tl.constexpr):
    """Delta_i = <dO_i, O_i> in fp32 for BS positions of one (batch, head): ``DELTA [B, Hq, S]``,
    and the backward's log-sum-exp ``LSE_B``: the forward's, but +inf for the rows it marked
    (docs/kernels.md, Non-finite inputs): an output row that is not finite while its lse is
    finite was marked for a non-finite value in its window, and carries no gradient: lse = inf
    gives it P = 0, so dS = 0 (the values are finite in the backward), and Delta = 0.
    (tl.reduce with common's combine function, which the interpreter can run.)"""
    pid_bh, b, h, ii = seq_block(S, HQ, BS)
    ee = tl.arange(0, DV_PAD)
    m = (ii < S)[:, None] & (ee < DV)[None, :]
    do = tl.load(DO + b * sdo[0] + ii[:, None] * sdo[1] + h * sdo[2] + ee[None, :], mask=m, other=0.0)
    o = tl.load(O + b * so[0] + ii[:, None] * so[1] + h * so[2] + ee[None, :], mask=m, other=0.0)
    lse = tl.load(LSE + pid_bh * S + ii, mask=ii < S, other=0.0)
    o_bad = tl.reduce(tl.where(tl.abs(o.to(tl.float32)) < float("inf"), 0, 1), 1, max_combine) > 0
    marked = o_bad & (tl.abs(lse) < float("inf"))
    dlt = tl.reduce(do.to(tl.float32) * o.to(tl.float32), 1, sum_combine)
    tl.store(DELTA + pid_bh * S + ii, tl.where(marked, 0.0, dlt), mask=ii < S)
    tl.store(LSE_B + pid_bh * S + ii, tl.where(marked, float("inf"), lse), mask=ii < S)


@triton.jit
def _row_inputs(ROW_IN, ROW_STRIDES, b, hk, ii, hq, l, rvalid, S, HQ, dd, ee, dmask, emask, NEG_Z: tl.constexpr,
                FORM: tl.constexpr, D: tl.constexpr):
    """A rows-kernel tile's per-row inputs: z = q_i * k_s[l] (-z if NEG_Z; the determinant form:
    a * b - c * e from its operands, which Q and KS then hold, common.z_operands; logits in log2
    units are qk_scale * <z, k_b>, common.z_scaling), dO' = dO_i * v_s[l] (both rounded once to
    the input dtype: packed 16-bit multiplies), Lse_i * log2(e) and Delta_i.
    Rows outside the problem get q = dO = 0 and lse = inf, so P = dS = 0 there."""
    Q, KS, VS, DO, LSE, DELTA = ROW_IN
    sq, sks, svs, sdo = ROW_STRIDES
    rdm = rvalid[:, None] & dmask[None, :]
    if FORM == 0:
        q = tl.load(Q + b * sq[0] + ii[:, None] * sq[1] + hq[:, None] * sq[2] + dd[None, :], mask=rdm, other=0.0)
        ks = tl.load(KS + b * sks[0] + l[:, None] * sks[1] + hk * sks[2] + dd[None, :], mask=rdm, other=0.0)
    else:                       # the determinant form: z = a * b - c * e (common.z_operands)
        qz_ptr = Q + b * sq[0] + ii[:, None] * sq[1] + hq[:, None] * sq[2] + dd[None, :]
        ksz_ptr = KS + b * sks[0] + l[:, None] * sks[1] + hk * sks[2] + dd[None, :]
        za = tl.load(ksz_ptr, mask=rdm, other=0.0).to(tl.float32)
        zb = tl.load(qz_ptr, mask=rdm, other=0.0).to(tl.float32)
        zc = tl.load(ksz_ptr + D, mask=rdm, other=0.0).to(tl.float32)
        ze = tl.load(qz_ptr + D, mask=rdm, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo[0] + ii[:, None] * sdo[1] + hq[:, None] * sdo[2] + ee[None, :],
                 mask=rvalid[:, None] & emask[None, :], other=0.0)
    vs = tl.load(VS + b * svs[0] + l[:, None] * svs[1] + hk * svs[2] + ee[None, :],
                 mask=rvalid[:, None] & emask[None, :], other=0.0)
    lse2 = tl.load(LSE + (b * HQ + hq) * S + ii, mask=rvalid, other=float("inf")) * 1.4426950408889634
    dlt = tl.load(DELTA + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0)
    if FORM == 0:
        if NEG_Z:
            ks = -ks
        z = (q.to(tl.float32) * ks.to(tl.float32)).to(Q.dtype.element_ty)
    else:
        z = (za * zb - zc * ze).to(Q.dtype.element_ty)
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
def _keys_inputs(ROW_IN, ROW_STRIDES, b, hk, h0, i0, t0, S, HQ, GQA, WS, dd, ee, dmask, emask,
                 BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, NEG_Z: tl.constexpr,
                 FORM: tl.constexpr, D: tl.constexpr):
    """The keys kernel's tile inputs (rows r = (p, hh, tt), offset fastest) from compact loads:
    q, dO once per (position, head) ``[BI, BH, D]``, k_s, v_s once per (position, offset)
    ``[BI, BT, D]``, broadcast into z = q * k_s and dO' = dO * v_s ``[BI * BH * BT, D]`` (rounded
    once to the input dtype, as in the forward; the determinant form: z = a * b - c * e from its
    operands, common.z_operands). Loading every row's q, k_s, dO, v_s instead
    would read each q, dO row BT times and each k_s, v_s row BH times; the compact loads also
    need smaller staging buffers, which leaves room for a third pipeline stage (docs/kernels.md).
    Lse and Delta per (position, head). Rows of offsets that do not exist (l < 0, t >= ws) get
    k_s = v_s = 0, so z = dO' = 0 and they add nothing to dk_b, dv_b; rows of positions or
    heads that do not exist get lse = inf (P = 0)."""
    Q, KS, VS, DO, LSE, DELTA = ROW_IN
    sq, sks, svs, sdo = ROW_STRIDES
    BM: tl.constexpr = BI * BH * BT
    p = tl.arange(0, BI)
    hh = tl.arange(0, BH)
    tt = tl.arange(0, BT)
    ii = i0 + p
    hq = hk * GQA + h0 + hh
    qok = (ii[:, None] < S) & ((h0 + hh)[None, :] < GQA)                       # [BI, BH]
    l = ii[:, None] - t0 - tt[None, :]                                         # [BI, BT]
    lok = (l >= 0) & ((t0 + tt)[None, :] < WS) & (ii[:, None] < S)
    if FORM == 0:
        q = tl.load(Q + b * sq[0] + ii[:, None, None] * sq[1] + hq[None, :, None] * sq[2] + dd[None, None, :],
                    mask=qok[:, :, None] & dmask[None, None, :], other=0.0)
    else:                       # the determinant form: z = a * b - c * e (common.z_operands)
        qm = qok[:, :, None] & dmask[None, None, :]
        km = lok[:, :, None] & dmask[None, None, :]
        qz_ptr = Q + b * sq[0] + ii[:, None, None] * sq[1] + hq[None, :, None] * sq[2] + dd[None, None, :]
        ksz_ptr = KS + b * sks[0] + l[:, :, None] * sks[1] + hk * sks[2] + dd[None, None, :]
        zb = tl.load(qz_ptr, mask=qm, other=0.0).to(tl.float32)
        ze = tl.load(qz_ptr + D, mask=qm, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo[0] + ii[:, None, None] * sdo[1] + hq[None, :, None] * sdo[2] + ee[None, None, :],
                 mask=qok[:, :, None] & emask[None, None, :], other=0.0)
    if FORM == 0:
        ks = tl.load(KS + b * sks[0] + l[:, :, None] * sks[1] + hk * sks[2] + dd[None, None, :],
                     mask=lok[:, :, None] & dmask[None, None, :], other=0.0)
    else:
        za = tl.load(ksz_ptr, mask=km, other=0.0).to(tl.float32)
        zc = tl.load(ksz_ptr + D, mask=km, other=0.0).to(tl.float32)
    vs = tl.load(VS + b * svs[0] + l[:, :, None] * svs[1] + hk * svs[2] + ee[None, None, :],
                 mask=lok[:, :, None] & emask[None, None, :], other=0.0)
    if FORM == 0:
        if NEG_Z:
            ks = -ks
        z = (q.to(tl.float32)[:, :, None, :] * ks.to(tl.float32)[:, None, :, :]).to(Q.dtype.element_ty)
    else:
        z = (za[:, None, :, :] * zb[:, :, None, :] - zc[:, None, :, :] * ze[:, :, None, :]).to(Q.dtype.element_ty)
    dop = (do.to(tl.float32)[:, :, None, :] * vs.to(tl.float32)[:, None, :, :]).to(Q.dtype.element_ty)
    z = tl.reshape(z, [BM, z.shape[3]])
    dop = tl.reshape(dop, [BM, dop.shape[3]])
    lse2 = tl.load(LSE + (b * HQ + hq[None, :]) * S + ii[:, None], mask=qok, other=float("inf")) * 1.4426950408889634
    dlt = tl.load(DELTA + (b * HQ + hq[None, :]) * S + ii[:, None], mask=qok, other=0.0)
    lse2 = tl.reshape(tl.broadcast_to(lse2[:, :, None], [BI, BH, BT]), [BM])
    dlt = tl.reshape(tl.broadcast_to(dlt[:, :, None], [BI, BH, BT]), [BM])
    return z, dop, lse2, dlt


@triton.jit
def _keys_tile(ROW_IN, ROW_STRIDES, kb, vb, dk, dv, b, hk, h0, i0, t0, jj, r,
               S, HQ, GQA, WS, WB, qk_scale, dd, ee, dmask, emask,
               BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr, NEG_Z: tl.constexpr, FORM: tl.constexpr, D: tl.constexpr):
    """One row tile (positions i0 + p, heads h0 + hh, offsets t0 + tt; r = (p, hh, tt), offset
    fastest) against the program's key block: dk_b += dS^T z, dv_b += P^T dO'. MASK: keys
    outside a row's window are skipped; without it every key must be in every row's window."""
    ii = i0 + r // (BT * BH)
    z, dop, lse2, dlt = _keys_inputs(ROW_IN, ROW_STRIDES, b, hk, h0, i0, t0, S, HQ, GQA, WS, dd, ee, dmask, emask,
                                     BI, BH, BT, NEG_Z, FORM, D)
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
    sq, sks, svs, skb, svb, sdo, sdk, sdv,
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr, NEG_Z: tl.constexpr, FORM: tl.constexpr,
):
    """dk_b, dv_b for keys [j0, j0 + BN) of one (batch, kv head): every virtual row that sees
    them (positions j0 <= i < j0 + BN - 1 + wb, all heads of the group, all offsets)."""
    pid_j = tl.program_id(1)     # key blocks the slow axis: blocks near the sequence end (fewer rows) run last
    pid_bg = tl.program_id(0)
    b = pid_bg // HKV
    hk = pid_bg % HKV
    j0 = pid_j * BN
    jj = j0 + tl.arange(0, BN)
    jvalid = jj < S
    dd = tl.arange(0, D_PAD)
    ee = tl.arange(0, DV_PAD)
    dmask = dd < D
    emask = ee < DV

    kb = tl.load(KB + b * skb[0] + jj[:, None] * skb[1] + hk * skb[2] + dd[None, :],
                 mask=jvalid[:, None] & dmask[None, :], other=0.0)
    vb = tl.load(VB + b * svb[0] + jj[:, None] * svb[1] + hk * svb[2] + ee[None, :],
                 mask=jvalid[:, None] & emask[None, :], other=0.0)
    dk = tl.full([BN, D_PAD], 0.0, tl.float32)
    dv = tl.full([BN, DV_PAD], 0.0, tl.float32)
    ROW_IN, ROW_STRIDES = (Q, KS, VS, DO, LSE, DELTA), (sq, sks, svs, sdo)     # what the rows read

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
    for h0 in range(0, GQA, BH):
        for it in range(0, m_a * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(ROW_IN, ROW_STRIDES, kb, vb, dk, dv, b, hk, h0, i0, t0, jj, r,
                                S, HQ, GQA, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, True, PRECISION, NEG_Z, FORM, D)
        for it in range(m_a * n_t, m_c * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(ROW_IN, ROW_STRIDES, kb, vb, dk, dv, b, hk, h0, i0, t0, jj, r,
                                S, HQ, GQA, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, False, PRECISION, NEG_Z, FORM, D)
        for it in range(m_c * n_t, m_end * n_t):
            i0, t0 = _tile_at(it, j0, n_t, BI, BT)
            dk, dv = _keys_tile(ROW_IN, ROW_STRIDES, kb, vb, dk, dv, b, hk, h0, i0, t0, jj, r,
                                S, HQ, GQA, WS, WB, qk_scale, dd, ee, dmask, emask, BI, BH, BT, True, PRECISION, NEG_Z, FORM, D)

    # dk_b = scale * sum dS (q * k_s) = |scale| * sum dS z  (z carries the sign of scale)
    dk = dk * dk_scale
    tl.store(DKB + b * sdk[0] + jj[:, None] * sdk[1] + hk * sdk[2] + dd[None, :],
             dk.to(DKB.dtype.element_ty), mask=jvalid[:, None] & dmask[None, :])
    tl.store(DVB + b * sdv[0] + jj[:, None] * sdv[1] + hk * sdv[2] + ee[None, :],
             dv.to(DVB.dtype.element_ty), mask=jvalid[:, None] & emask[None, :])


@triton.jit
def _rows_block(z, dop, dz, acc, KB, VB, b, hk, skb, svb,
                j0, masked, ii, lse2, dlt, S, WB, qk_scale, dd, ee, dmask, emask,
                BN: tl.constexpr, PRECISION: tl.constexpr):
    """One key block [j0, j0 + BN) of a row tile: dz += dS k_b (unscaled), acc += P v_b.
    ``masked`` (a runtime flag, so that every block of the tile runs in one pipelined loop):
    keys outside [0, S) or outside a row's window are dropped; without it every key of the
    block must be in every row's window. Keys are loaded at indices clamped into [0, S)."""
    jj = j0 + tl.arange(0, BN)
    jl = tl.minimum(tl.maximum(jj, 0), S - 1)
    kb = tl.load(KB + b * skb[0] + jl[:, None] * skb[1] + hk * skb[2] + dd[None, :], mask=dmask[None, :], other=0.0)
    vb = tl.load(VB + b * svb[0] + jl[:, None] * svb[1] + hk * svb[2] + ee[None, :], mask=emask[None, :], other=0.0)
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
def _onehot_sum(acc, onehot, x, ONEHOT_BF16: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + onehot @ x``: rows of ``x`` summed as a 0/1 matrix selects them, fp32 accumulation.
    ONEHOT_BF16 (GPU): bf16 products, one (x rounded to bf16) or, with SPLIT, two of x's hi and
    lo bf16 parts (~16 mantissa bits); else (the interpreter gets bf16 dots wrong) one IEEE fp32
    product."""
    if ONEHOT_BF16:
        oh = onehot.to(tl.bfloat16)
        x_hi = x.to(tl.bfloat16)
        acc += tl.dot(oh, x_hi)
        if SPLIT:
            acc += tl.dot(oh, (x - x_hi.to(tl.float32)).to(tl.bfloat16))
    else:
        acc += tl.dot(onehot.to(tl.float32), x, input_precision="ieee")
    return acc


@triton.jit
def _slice_add(PART, slot, smask, xx, onehot, x, X_PAD: tl.constexpr, ROW: tl.constexpr, ONEHOT_BF16: tl.constexpr,
               SPLIT: tl.constexpr):
    """A tile's skewed sum ``onehot @ x`` (``X_PAD`` columns) added into the program's slice of a
    partial buffer (rows ``slot`` of ``ROW`` values from PART, where ``smask``)."""
    part = _onehot_sum(tl.full([onehot.shape[0], X_PAD], 0.0, tl.float32), onehot, x, ONEHOT_BF16, SPLIT)
    old = tl.load(PART + slot[:, None] * ROW + xx[None, :], mask=smask[:, None], other=0.0)
    tl.store(PART + slot[:, None] * ROW + xx[None, :], old + part, mask=smask[:, None])


@triton.jit
def _bwd_rows(
    Q, KS, VS, KB, VB, DO, LSE, DELTA, DQ, DKS_PART, DVS_PART,
    sq, sks, svs, skb, svb, sdo, sdq,
    S, HQ, HKV, GQA, NHB, NP, NB, WS, WB, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, LB: tl.constexpr, NQ_PAD: tl.constexpr,
    PRECISION: tl.constexpr, ONEHOT_BF16: tl.constexpr, SPLIT: tl.constexpr, DKS_ROW: tl.constexpr,
    NEG_Z: tl.constexpr, FORM: tl.constexpr,
):
    """dq for positions [I0, I0 + NB) and heads of one head block; dk_s, dv_s partial sums."""
    # one grid axis, positions the slow part and the last (longest windows) first
    n_bh = tl.num_programs(0) // NP
    pid_p = NP - 1 - tl.program_id(0) // n_bh
    pid_bh = tl.program_id(0) % n_bh
    b = pid_bh // (HKV * NHB)
    hb = pid_bh % (HKV * NHB)
    hk = hb // NHB                          # kv head
    h0 = (hb % NHB) * BH                   # first head of the block, inside the group
    I0 = pid_p * NB
    dd = tl.arange(0, D_PAD)
    ee = tl.arange(0, DV_PAD)
    dmask = dd < D
    emask = ee < DV

    ROW_IN, ROW_STRIDES = (Q, KS, VS, DO, LSE, DELTA), (sq, sks, svs, sdo)     # what the rows read

    BM: tl.constexpr = BI * BH * BT
    r = tl.arange(0, BM)
    tt = r % BT
    hh = (r // BT) % BH
    pp = r // (BT * BH)
    hq = hk * GQA + h0 + hh
    hvalid = (h0 + hh) < GQA
    # dq rows of a tile: (position, head) = r // BT, NQ_PAD of them (padded to 16 for tl.dot)
    rq = tl.arange(0, NQ_PAD)
    hq_q = hk * GQA + h0 + rq % BH
    hvalid_q = ((h0 + rq % BH) < GQA) & (rq < BI * BH)
    # small keys of a tile: l = i0 - t0 - (BT - 1) + l_local, l_local in [0, BI + BT - 1)
    lloc = tl.arange(0, LB)
    LSLOT = NB + WS - 1                    # slice: small keys l in [I0 - ws + 1, I0 + NB)
    part = (((b * HKV * NHB + hb) * NP + pid_p) * LSLOT).to(tl.int64)
    pk = DKS_PART + part * DKS_ROW        # DKS_ROW: 2 D_PAD for the determinant form's X, Y (below)
    pv = DVS_PART + part * DV_PAD

    i_end = tl.minimum(I0 + NB, S)
    for i0 in range(I0, i_end, BI):
        ii = i0 + pp
        dq = tl.full([NQ_PAD, D_PAD], 0.0, tl.float32)
        if FORM != 0:
            dq_v = tl.full([NQ_PAD, D_PAD], 0.0, tl.float32)
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
                z, dop, lse2, dlt = _keys_inputs(ROW_IN, ROW_STRIDES, b, hk, h0, i0, t0, S, HQ, GQA, WS,
                                                 dd, ee, dmask, emask, BI, BH, BT, NEG_Z, FORM, D)
            else:
                z, dop, lse2, dlt = _row_inputs(ROW_IN, ROW_STRIDES, b, hk, ii, hq, l, rvalid, S, HQ,
                                                dd, ee, dmask, emask, NEG_Z, FORM, D)
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
                dz, acc = _rows_block(z, dop, dz, acc, KB, VB, b, hk, skb, svb,
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
            do = tl.load(DO + b * sdo[0] + ii[:, None] * sdo[1] + hq[:, None] * sdo[2] + ee[None, :],
                         mask=rvalid[:, None] & emask[None, :], other=0.0, cache_modifier=".ca")
            _slice_add(pv, slot, smask, ee, onehot, acc * do.to(tl.float32), DV_PAD, DV_PAD, ONEHOT_BF16, SPLIT)
            if FORM == 0:
                q = tl.load(Q + b * sq[0] + ii[:, None] * sq[1] + hq[:, None] * sq[2] + dd[None, :],
                            mask=rvalid[:, None] & dmask[None, :], other=0.0, cache_modifier=".ca")
                _slice_add(pk, slot, smask, dd, onehot, dz * q.to(tl.float32), D_PAD, DKS_ROW, ONEHOT_BF16, SPLIT)
                ks = tl.load(KS + b * sks[0] + l[:, None] * sks[1] + hk * sks[2] + dd[None, :],
                             mask=rvalid[:, None] & dmask[None, :], other=0.0, cache_modifier=".ca")
                dq = _onehot_sum(dq, onehot_q, dz * ks.to(tl.float32), ONEHOT_BF16, SPLIT)
            else:
                # the determinant form: dk_s += sgn (q x dz), dq += sgn (dz x k_s) per 3-chunk,
                # the plain products on the leftover dims (<z, dz> = sgn q . (dz x k_s) = sgn
                # k_s . (q x dz)), from z's operands (Q = [b, e] = [q[pv], q[nx]], KS = [a, c] =
                # s sgn [k_s[nx], k_s[pv]] on the chunk dims, common.z_operands; s = -1 for
                # NEG_Z). Per row dk_s = sgn (e dz[pv] - b dz[nx]) and dq = s (dz[nx] c - dz[pv] a);
                # the column permutations move past the sums (pv pv = nx in a 3-cycle), so the
                # tile sums only same-column products:
                #   X = sum b dz, Y = sum e dz  -> dk_s = sgn (X[pv] - Y[nx])   (on the host)
                #   U = sum dz a, V = sum dz c  -> dq   = s (U[nx] - V[pv])     (once per tile of
                #                                                              positions, below)
                # (leftover dims: dk_s = X, dq = s U; Y = V = 0 there)
                q_ptr = Q + b * sq[0] + ii[:, None] * sq[1] + hq[:, None] * sq[2] + dd[None, :]
                ks_ptr = KS + b * sks[0] + l[:, None] * sks[1] + hk * sks[2] + dd[None, :]
                rdm = rvalid[:, None] & dmask[None, :]
                zb = tl.load(q_ptr, mask=rdm, other=0.0, cache_modifier=".ca").to(tl.float32)
                _slice_add(pk, slot, smask, dd, onehot, zb * dz, D_PAD, DKS_ROW, ONEHOT_BF16, SPLIT)
                ze = tl.load(q_ptr + D, mask=rdm, other=0.0, cache_modifier=".ca").to(tl.float32)
                _slice_add(pk + D_PAD, slot, smask, dd, onehot, ze * dz, D_PAD, DKS_ROW, ONEHOT_BF16, SPLIT)
                za = tl.load(ks_ptr, mask=rdm, other=0.0, cache_modifier=".ca").to(tl.float32)
                dq = _onehot_sum(dq, onehot_q, dz * za, ONEHOT_BF16, SPLIT)
                zc = tl.load(ks_ptr + D, mask=rdm, other=0.0, cache_modifier=".ca").to(tl.float32)
                dq_v = _onehot_sum(dq_v, onehot_q, dz * zc, ONEHOT_BF16, SPLIT)
        if FORM != 0:
            # dq = s (U[nx] - V[pv]) on the chunk dims, s U on the leftover ones (dq holds U)
            c_nx, c_pv, in_c3 = chunk_columns(dd, D)
            s_z: tl.constexpr = -1.0 if NEG_Z else 1.0
            u_nx = tl.gather(dq, tl.broadcast_to(c_nx[None, :], [NQ_PAD, D_PAD]), 1)
            v_pv = tl.gather(dq_v, tl.broadcast_to(c_pv[None, :], [NQ_PAD, D_PAD]), 1)
            dq = s_z * tl.where(in_c3[None, :], u_nx - v_pv, dq)
        iq = i0 + rq // BH
        tl.store(DQ + b * sdq[0] + iq[:, None] * sdq[1] + hq_q[:, None] * sdq[2] + dd[None, :],
                 dq.to(DQ.dtype.element_ty), mask=(hvalid_q & (iq < S))[:, None] & dmask[None, :])


def bwd_config(device: torch.device, ws: int, gqa: int, D: int, DV: int, elt: int, shrink: int = 0):
    """Tile sizes. Rows kernel: BM = BI * BH * BT rows (positions x heads x offsets) against
    BN keys (32 for 16-bit D = 128: the smaller S and dP tiles leave registers for dz and acc).
    Keys kernel: KBN keys against KBI * KBH * KBT rows (positions x heads x offsets).
    Wider rows (fp32, head dims past 128) get smaller tiles; ``shrink`` halves them again."""
    if device.type == "cuda":
        row_bytes = max(pow2(D), pow2(DV)) * elt
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
    bi, bh, bt = pack_rows(bm, gqa, ws)
    while deep and bh == 1 and bt > 16:
        # tiles of one head (MHA, or a group whose heads do not fit beside the offsets) take at
        # most 16 offsets, the rest positions: a tile of bi positions reaches bi + bt - 1 small
        # keys, so fewer offsets keep the 0/1 products of the dk_s / dv_s sums small (ws 32:
        # 35 -> 23 keys), and a wide small window no longer makes one-position tiles that load
        # every key block for a single position (ws 128: 1 x 128 -> 8 x 16, backward 1.9x faster)
        bt, bi = bt // 2, bi * 2
    if deep and bi > 1:
        # rows kernel, tiles of several positions (z, dO' in shared memory, see _bwd_rows): a
        # third stage of key blocks; single-position tiles (GQA) hold z, dO' in registers and
        # were slower with it
        stages = 3
    # keys kernel: at most 16 offsets per tile (more positions or heads instead), faster than
    # 32 on both GQA and MHA; heads per tile: a power of two that divides gqa, so that no tile
    # row is a padding head. Wide rows (the determinant form's 256-wide head) keep up to 32
    # offsets, and the rows kernel its tiles: both rules made that case slower.
    kbt = min(pow2(ws), kbm, 16 if deep else kbm)
    kbh = min(gqa & -gqa, kbm // kbt)
    return dict(BI=bi, BH=bh, BT=bt, BN=bn, NB_MIN=nb_min, num_warps=warps, num_stages=stages,
                KBI=kbm // (kbt * kbh), KBH=kbh, KBT=kbt, KBN=kbn, k_warps=warps, k_stages=k_stages)


_SHRINK = {}     # (dtype, D, Dv, precision) -> how often the tiles had to be halved to fit


def two_simplicial_bwd(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, allow_tf32, config=None, form="trilinear"):
    """Gradients ``(dq, dk1, dv1, dk2, dv2)`` of 2-simplicial attention in ``form``
    (``"trilinear"`` or ``"determinant"``, as in the forward).

    do, out ``[B, S, Hq, Dv]``; q ``[B, S, Hq, D]``; k1, k2 ``[B, S, Hkv, D]``; v1, v2
    ``[B, S, Hkv, Dv]`` as the forward computed with them (finite: the values
    ``two_simplicial_fwd(..., keep_values=True)`` returns); lse ``[B, Hq, S]`` float32 (natural
    log) from the forward.
    Gradients come back in the inputs' dtypes and shapes. ``config`` overrides keys of
    :func:`bwd_config` (tile sizes, stages), ``concurrent`` (run the two kernels on two streams,
    see ``_launch``) and ``ws`` (a dict of :func:`.bwd_ws.keys_ws`'s knobs: the warp-specialised
    Gluon keys kernel in place of the Triton one): for benchmarks and tests. The window roles come from
    :func:`~twosimplicial.ops.plan.make_plan`, as in the forward."""
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, allow_tf32)
    dq, dks, dvs, dkb, dvb = canonical_bwd(plan, do, q, *plan.split(k1, v1, k2, v2), out, lse, scale, config, form)
    return (dq, *plan.merge(dks, dvs, dkb, dvb))


def canonical_bwd(plan: Plan, do, q, ks, vs, kb, vb, out, lse, scale, config=None, form="trilinear"):
    """:func:`two_simplicial_bwd` on the canonical problem (``(ks, vs)`` over the small window
    ``plan.ws``, ``(kb, vb)`` over the big window ``plan.wb``): ``(dq, dks, dvs, dkb, dvb)``."""
    B, S, HQ, D, DV, ws, wb = plan.B, plan.S, plan.Hq, plan.D, plan.Dv, plan.ws, plan.wb
    if plan.empty:
        return tuple(torch.zeros_like(x) for x in (q, ks, vs, kb, vb))
    q, ks, vs, kb, vb, do, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, ks, vs, kb, vb, do, out))
    lse = lse.float().contiguous()
    # Delta_i = <dO_i, O_i>, [B, Hq, S] fp32, and lse with the marked rows at +inf (see _delta)
    delta = torch.empty(B, HQ, S, device=q.device, dtype=torch.float32)
    lse_b = torch.empty_like(lse)
    bs = 64 if q.device.type == "cuda" else 16
    kernel(_delta, q.device)[(triton.cdiv(S, bs) * B * HQ,)](
        do, out, lse, delta, lse_b, strides(do), strides(out), S, HQ, DV=DV, DV_PAD=padded(DV), BS=bs,
        num_warps=4)
    lse = lse_b
    form_id = form_code(form, plan.swap)
    dq = torch.empty_like(q)
    if form_id:   # the determinant form: the kernels read z's operands in place of q, k_s (z_operands)
        q, ks = z_operands(q, ks, form_id, z_scaling(scale)[0])
    if (config or {}).get("ws") is not None:   # the warp-specialised Gluon keys kernel (bwd_ws.py), with its own knobs
        from . import bwd_ws
        if not bwd_ws.supports(plan, form, q, ks, vs, kb, vb, do):
            raise ValueError(f"config['ws']: the warp-specialised keys kernel takes {bwd_ws.SCOPE}; got "
                             f"{form} {q.dtype} on {q.device.type}, D {D}, Dv {DV}, S {S}")
    key = (q.dtype, D, DV, plan.precision)
    while True:
        cfg = bwd_config(q.device, ws, plan.gqa, D, DV, q.element_size(), _SHRINK.get(key, 0))
        cfg.update(config or {})
        try:
            dkb, dvb, dks_part, dvs_part, NB = _launch(do, q, ks, vs, kb, vb, lse, delta, dq, ws, wb,
                                                      scale, plan.precision, cfg, form_id)
            break
        except triton.runtime.errors.OutOfResources:
            # shared memory: halve the tiles (fp32 IEEE products and wide heads need it)
            if config or _SHRINK.get(key, 0) >= 3:
                raise
            _SHRINK[key] = _SHRINK.get(key, 0) + 1

    if form_id:       # two sums per column (X, Y), combined here
        half = dks_part.shape[-1] // 2
        dks = _gather_slices(dks_part, NB, ws, S, 2 * half, torch.float32)
        dks = dks_from_sums(dks[..., :D], dks[..., half:half + D], form_id).to(ks.dtype)
    else:
        dks = _gather_slices(dks_part, NB, ws, S, D, ks.dtype)
    dvs = _gather_slices(dvs_part, NB, ws, S, DV, vs.dtype)
    return dq, dks, dvs, dkb.view_as(kb), dvb.view_as(vb)


def _launch(do, q, ks, vs, kb, vb, lse, delta, dq, ws, wb, scale, precision, cfg, form_id=0):
    """Both backward kernels into ``dq`` (``[B, S, Hq, D]``) and new ``dkb``, ``dvb`` and partial
    buffers; ``q``, ``ks`` are what the kernels read (z's operands for the determinant form)."""
    B, S, HQ, D = dq.shape
    HKV, DV = ks.shape[2], vs.shape[3]
    # keys kernel: key blocks on the grid's second axis (a one-axis grid's index arithmetic made
    # this kernel, at the edge of its registers, spill), so S is bounded by CUDA's 65535 there
    keys_grid = (B * HKV, triton.cdiv(S, cfg["KBN"]))
    if keys_grid[1] > 65535:
        raise ValueError(f"the Triton backward takes sequences of at most {65535 * cfg['KBN']} positions "
                         f"(65535 blocks of {cfg['KBN']} keys), got S = {S}; use backend='torch'")
    GQA = HQ // HKV
    BI, BH, BT, BN = cfg["BI"], cfg["BH"], cfg["BT"], cfg["BN"]
    D_PAD, DV_PAD = padded(D), padded(DV)
    LB = max(16, pow2(BI + BT - 1))
    neg_z, qk_scale = z_scaling(scale)        # the forward's rounding of z, so P is recomputed exactly
    kw = dict(D=D, DV=DV, D_PAD=D_PAD, DV_PAD=DV_PAD, PRECISION=precision, NEG_Z=neg_z, FORM=form_id)
    ins = (q, ks, vs, kb, vb, do, lse, delta)                       # both kernels' inputs, then
    ins_strides = tuple(strides(x) for x in (q, ks, vs, kb, vb, do))  # their outputs, strides alike

    # rows kernel: NB positions per program, a multiple of BI and >= ws - 1 so that a slice
    # overlaps only its left neighbour's
    NB = BI * triton.cdiv(max(cfg["NB_MIN"], ws - 1), BI)
    NP = triton.cdiv(S, NB)
    NHB = triton.cdiv(GQA, BH)
    LSLOT = NB + ws - 1
    dkb = torch.empty_like(kb)
    dvb = torch.empty_like(vb)
    # the determinant form's rows carry two sums per column (X, Y: _bwd_rows), combined by canonical_bwd
    dks_part = torch.zeros(B, HKV, NHB, NP, LSLOT, 2 * D_PAD if form_id else D_PAD, device=q.device,
                           dtype=torch.float32)
    dvs_part = torch.zeros(B, HKV, NHB, NP, LSLOT, DV_PAD, device=q.device, dtype=torch.float32)
    on_gpu = q.device.type == "cuda"

    # The two kernels share no outputs. When the keys kernel has many programs (1.5 or more
    # per SM), it runs on a side stream of high priority, launched first, and the rows
    # kernel's programs fill the SMs its last wave leaves idle (faster on MHA and at B16 S1024
    # H2: 256 programs). With few long programs (GQA-64: 128 programs, about one per SM)
    # running them together was slower, so they run in turn (docs/kernels.md, Two streams).
    # The caller's stream waits for the side stream before this returns.
    concurrent = on_gpu and cfg.get("concurrent", 2 * keys_grid[0] * keys_grid[1] >= 3 * sm_count(q.device))
    main = torch.cuda.current_stream(q.device) if concurrent else None
    side = _side_stream(q.device) if concurrent else None
    if side is not None:
        side.wait_stream(main)
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if cfg.get("ws") is not None:
                from .bwd_ws import keys_ws
                keys_ws(q, ks, vs, kb, vb, do, lse, delta, dkb, dvb, ws, wb, scale, (cfg["KBI"], cfg["KBH"], cfg["KBT"]),
                        **cfg["ws"])
            else:
                kernel(_bwd_big_keys, q.device)[keys_grid](
                    *ins, dkb, dvb, *ins_strides, strides(dkb), strides(dvb),
                    S, HQ, HKV, GQA, ws, wb, qk_scale, abs(float(scale)), BI=cfg["KBI"], BH=cfg["KBH"], BT=cfg["KBT"],
                    BN=cfg["KBN"], num_warps=cfg["k_warps"], num_stages=cfg["k_stages"], **kw)
        kernel(_bwd_rows, q.device)[(B * HKV * NHB * NP,)](
            *ins, dq, dks_part, dvs_part, *ins_strides, strides(dq),
            S, HQ, HKV, GQA, NHB, NP, NB, ws, wb, qk_scale, float(scale), LB=LB,
            NQ_PAD=padded(BI * BH), ONEHOT_BF16=on_gpu, SPLIT=q.dtype != torch.bfloat16, DKS_ROW=dks_part.shape[-1],
            BI=BI, BH=BH, BT=BT, BN=BN,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **kw)
    finally:
        if side is not None:
            main.wait_stream(side)
    return dkb, dvb, dks_part, dvs_part, NB


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The keys kernel's stream on ``device`` (high priority, made once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-1)
    return _SIDE_STREAMS[idx]


@triton.jit
def _sum_slices(PART, OUT, so, S, HKV, NHB, NP, NB, WS, X: tl.constexpr, X_PAD: tl.constexpr,
                ROW: tl.constexpr, BL: tl.constexpr):
    """``OUT[b, l, hk, :X]`` for BL small keys ``l`` of one (batch, kv head): the rows kernel's
    partial rows of key l summed over the head blocks, in OUT's dtype. Key l = p NB + n is slot
    ws - 1 + n of program p; the last ws - 1 keys of a block are also slots n - (NB - ws + 1) of
    program p + 1, whose rows reach back ws - 1 keys (``_bwd_rows``). A fixed order: deterministic."""
    _, b, hk, ll = seq_block(S, HKV, BL)
    xx = tl.arange(0, X_PAD)
    LSLOT = NB + WS - 1                       # slots of a program's slice (as in _bwd_rows)
    p = ll // NB
    n = ll % NB
    m = (ll < S)[:, None] & (xx < X)[None, :]
    spill = m & ((n >= NB - (WS - 1)) & (p + 1 < NP))[:, None]
    acc = tl.full([BL, X_PAD], 0.0, tl.float32)
    for h in range(NHB):
        prog = ((b * HKV + hk) * NHB + h).to(tl.int64) * NP + p          # program p of head block h
        own = prog * LSLOT + WS - 1 + n
        nxt = (prog + 1) * LSLOT + n - (NB - (WS - 1))
        acc += tl.load(PART + own[:, None] * ROW + xx[None, :], mask=m, other=0.0)
        acc += tl.load(PART + nxt[:, None] * ROW + xx[None, :], mask=spill, other=0.0)
    tl.store(OUT + b * so[0] + ll[:, None] * so[1] + hk * so[2] + xx[None, :], acc.to(OUT.dtype.element_ty), mask=m)


def _gather_slices(part, NB: int, ws: int, S: int, cols: int, dtype: torch.dtype):
    """The rows kernel's slices ``part [B, Hkv, NHB, NP, NB + ws - 1, ROW]`` summed per small
    key into a new ``[B, S, Hkv, cols]`` tensor of ``dtype`` (one pass, ``_sum_slices``)."""
    B, HKV, NHB, NP, _, ROW = part.shape
    out = torch.empty(B, S, HKV, cols, device=part.device, dtype=dtype)
    bl = max(16, min(64, 8192 // padded(cols)))      # keys per program: at most 8192 fp32 sums in registers
    kernel(_sum_slices, part.device)[(B * HKV * triton.cdiv(S, bl),)](
        part, out, strides(out), S, HKV, NHB, NP, NB, ws, X=cols, X_PAD=padded(cols), ROW=ROW, BL=bl,
        num_warps=4)
    return out

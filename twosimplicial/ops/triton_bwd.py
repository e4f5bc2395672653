"""Triton backward of 2-simplicial attention (trilinear form), SPEC §2-§3.

Virtual rows (SPEC §3). Name the smaller window ``s`` (size ``ws``) and the larger ``b``
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

Two kernels, each the only writer of what it owns, so the result is deterministic (no atomics):

- ``_bwd_big_keys``: one program per (block of BN big-window keys, batch, kv head); it walks every
  virtual row that sees its keys (all query heads of the group, all offsets) and keeps dk_b, dv_b
  in registers: 4 matrix products per (row, key).
- ``_bwd_rows``: one program per (super-block of NB query positions, batch, block of BH query
  heads); it walks its rows in tiles of BI positions x BH heads x BT offsets, runs each tile over
  its big window (4 matrix products per (row, key): logits, dP, dz, acc), then writes dq_i whole
  and adds dk_s / dv_s into its own slice of a partial buffer ``[.., NB + ws - 1, D]`` (fp32).
  A tile's rows reach BI + BT - 1 small keys; the skewed sum ``sum_{i - t = l}`` is a product
  with a 0/1 matrix. The partial slices of neighbouring programs overlap by ws - 1 keys and the
  head blocks of a group all touch the same keys: torch adds them afterwards, in a fixed order.

Extra memory: Delta ``[B, Hq, S]`` and the partial buffers, about
``(1 + (ws - 1) / NB) * B * S * Hq / BH * (D + Dv)`` fp32 values: O(B * S * H * D).

Precision: products in the input dtype (bf16/fp16) with fp32 accumulation; fp32 inputs use
tf32 tensor cores only when ``allow_tf32`` (``torch.backends.cuda.matmul.allow_tf32`` at the
op level), else IEEE fp32 products. scale * log2(e) is folded into z so the kernels use exp2;
its argument is clamped at 0 (P <= 1), so no input overflows it. z = q * k_s is rounded to the
input dtype for the tensor cores, as in the forward: with bf16 inputs and logits of size ~1e4
(inputs x30) that moves logits by ~10, so P (forward and backward alike) is only roughly right
there, though finite. fp16: P and dS are rounded to fp16 for the products (as in
FlashAttention), so gradients past fp16's range overflow. Measured errors and speed: benchmarks/NOTES.md, "Backward".

Deterministic: same inputs give bitwise the same gradients (no atomics; every sum has a fixed
order). On CPU tensors the kernels run under the Triton interpreter (whatever TRITON_INTERPRET
said when this module was imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _bwd_big_keys(
    Q, KS, VS, KB, VB, DO, LSE, DELTA, DKB, DVB,
    sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh,
    skbb, skbs, skbh, svbb, svbs, svbh, sdob, sdos, sdoh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    S, HQ, HKV, G, WS, WB, qk_scale, dk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr,
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
    tt = r % BT
    hh = (r // BT) % BH
    pp = r // (BT * BH)
    i_hi = tl.minimum(S, j0 + BN - 1 + WB)
    for h0 in range(0, G, BH):
        hq = g * G + h0 + hh
        for i0 in range(j0, i_hi, BI):
            ii = i0 + pp
            for t0 in range(0, WS, BT):
                t = t0 + tt
                l = ii - t
                rvalid = ((h0 + hh) < G) & (ii < S) & (t < WS) & (l >= 0)
                q = tl.load(Q + b * sqb + ii[:, None] * sqs + hq[:, None] * sqh + dd[None, :],
                            mask=rvalid[:, None] & dmask[None, :], other=0.0)
                ks = tl.load(KS + b * sksb + l[:, None] * skss + g * sksh + dd[None, :],
                             mask=rvalid[:, None] & dmask[None, :], other=0.0)
                do = tl.load(DO + b * sdob + ii[:, None] * sdos + hq[:, None] * sdoh + ee[None, :],
                             mask=rvalid[:, None] & emask[None, :], other=0.0)
                vs = tl.load(VS + b * svsb + l[:, None] * svss + g * svsh + ee[None, :],
                             mask=rvalid[:, None] & emask[None, :], other=0.0)
                lse2 = tl.load(LSE + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0) * 1.4426950408889634
                dlt = tl.load(DELTA + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0)
                # z = q_i * k_s[l] * scale * log2(e) (logits in log2 units); dO' = dO_i * v_s[l]
                z = (q.to(tl.float32) * ks.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)
                dop = (do.to(tl.float32) * vs.to(tl.float32)).to(Q.dtype.element_ty)
                # S^T = k_b z^T;  P^T = exp2(S^T - Lse_i log2 e), zero outside the windows
                # (clamped at 0: P <= 1 exactly, so rounding can never overflow exp2)
                sT = tl.dot(kb, tl.trans(z), input_precision=PRECISION)
                valid = (rvalid[None, :] & jvalid[:, None] & (jj[:, None] <= ii[None, :])
                         & (jj[:, None] > ii[None, :] - WB))
                pT = tl.where(valid, tl.math.exp2(tl.minimum(sT - lse2[None, :], 0.0)), 0.0)
                # dP^T = v_b dO'^T;  dS^T = P^T * (dP^T - Delta_i)
                dpT = tl.dot(vb, tl.trans(dop), input_precision=PRECISION)
                dsT = pT * (dpT - dlt[None, :])
                # dv_b += P^T dO';  dk_b += dS^T z
                dv += tl.dot(pT.to(Q.dtype.element_ty), dop, input_precision=PRECISION)
                dk += tl.dot(dsT.to(Q.dtype.element_ty), z, input_precision=PRECISION)

    # dk_b = scale * sum dS z_unscaled = scale / (scale * log2 e) * sum dS z = ln2 * dk
    dk = dk * dk_scale
    tl.store(DKB + b * sdkb + jj[:, None] * sdks + g * sdkh + dd[None, :],
             dk.to(DKB.dtype.element_ty), mask=jvalid[:, None] & dmask[None, :])
    tl.store(DVB + b * sdvb + jj[:, None] * sdvs + g * sdvh + ee[None, :],
             dv.to(DVB.dtype.element_ty), mask=jvalid[:, None] & emask[None, :])


@triton.jit
def _bwd_rows(
    Q, KS, VS, KB, VB, DO, LSE, DELTA, DQ, DKS_PART, DVS_PART,
    sqb, sqs, sqh, sksb, skss, sksh, svsb, svss, svsh,
    skbb, skbs, skbh, svbb, svbs, svbh, sdob, sdos, sdoh,
    sdqb, sdqs, sdqh,
    S, HQ, HKV, G, NHB, NP, NB, WS, WB, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, LB: tl.constexpr, QB: tl.constexpr,
    PRECISION: tl.constexpr, ONEHOT_BF16: tl.constexpr, DQ_SUM: tl.constexpr,
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
    onehot_q = rq[:, None] == (r // BT)[None, :]                                 # [QB, BM]
    hq_q = g * G + h0 + rq % BH
    hvalid_q = ((h0 + rq % BH) < G) & (rq < BI * BH)
    # small key slot of row r inside a tile: l_local = p - t_local + BT - 1 in [0, BI + BT - 1)
    lloc = tl.arange(0, LB)
    onehot = lloc[:, None] == (pp - tt + BT - 1)[None, :]                      # [LB, BM]
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
            q = tl.load(Q + b * sqb + ii[:, None] * sqs + hq[:, None] * sqh + dd[None, :],
                        mask=rvalid[:, None] & dmask[None, :], other=0.0)
            ks = tl.load(KS + b * sksb + l[:, None] * skss + g * sksh + dd[None, :],
                         mask=rvalid[:, None] & dmask[None, :], other=0.0)
            do = tl.load(DO + b * sdob + ii[:, None] * sdos + hq[:, None] * sdoh + ee[None, :],
                         mask=rvalid[:, None] & emask[None, :], other=0.0)
            vs = tl.load(VS + b * svsb + l[:, None] * svss + g * svsh + ee[None, :],
                         mask=rvalid[:, None] & emask[None, :], other=0.0)
            lse2 = tl.load(LSE + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0) * 1.4426950408889634
            dlt = tl.load(DELTA + (b * HQ + hq) * S + ii, mask=rvalid, other=0.0)
            # z = q_i * k_s[l] * scale * log2(e); dO' = dO_i * v_s[l]: built once per tile,
            # used against every key block of the big window
            z = (q.to(tl.float32) * ks.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)
            dop = (do.to(tl.float32) * vs.to(tl.float32)).to(Q.dtype.element_ty)
            dz = tl.full([BM, D_PAD], 0.0, tl.float32)
            acc = tl.full([BM, DV_PAD], 0.0, tl.float32)
            for j0 in range(j_lo, j_hi, BN):
                jj = j0 + tl.arange(0, BN)
                kb = tl.load(KB + b * skbb + jj[:, None] * skbs + g * skbh + dd[None, :],
                             mask=(jj < S)[:, None] & dmask[None, :], other=0.0)
                vb = tl.load(VB + b * svbb + jj[:, None] * svbs + g * svbh + ee[None, :],
                             mask=(jj < S)[:, None] & emask[None, :], other=0.0)
                # P = exp2(z k_b^T - Lse_i log2 e) inside both windows, else 0
                # (clamped at 0: P <= 1 exactly, so rounding can never overflow exp2)
                s = tl.dot(z, tl.trans(kb), input_precision=PRECISION)
                valid = (rvalid[:, None] & (jj[None, :] <= ii[:, None])
                         & (jj[None, :] > ii[:, None] - WB))
                p = tl.where(valid, tl.math.exp2(tl.minimum(s - lse2[:, None], 0.0)), 0.0)
                # dP = dO' v_b^T;  dS = P * (dP - Delta_i)
                dp = tl.dot(dop, tl.trans(vb), input_precision=PRECISION)
                ds = p * (dp - dlt[:, None])
                # dz += dS k_b (scale applied below);  acc += P v_b
                dz += tl.dot(ds.to(Q.dtype.element_ty), kb, input_precision=PRECISION)
                acc += tl.dot(p.to(Q.dtype.element_ty), vb, input_precision=PRECISION)
            dz = dz * scale
            # dq_i += sum_t dz_(i,t) * k_s[i - t]  (rows of one (position, head) are BT apart);
            # dk_s[l] += sum_{i-t=l} dz * q_i;  dv_s[l] += sum_{i-t=l} acc * dO_i.
            # Each sum over rows is a product with a 0/1 matrix (the dk_s/dv_s one is skewed).
            # On the GPU: two bf16 products (hi + lo parts, ~16 mantissa bits, exact 0/1
            # weights, fp32 accumulation); the interpreter gets bf16 dots wrong, so there it
            # is one IEEE fp32 product.
            eq = dz * ks.to(tl.float32)
            ek = dz * q.to(tl.float32)
            ev = acc * do.to(tl.float32)
            if DQ_SUM:
                # compiled only (the interpreter path never takes it): a plain sum over BT
                dq += tl.sum(tl.reshape(eq, [QB, BT, D_PAD]), axis=1)
            elif ONEHOT_BF16:
                ohq = onehot_q.to(tl.bfloat16)
                eq_hi = eq.to(tl.bfloat16)
                dq += tl.dot(ohq, eq_hi) + tl.dot(ohq, (eq - eq_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                dq += tl.dot(onehot_q.to(tl.float32), eq, input_precision="ieee")
            if ONEHOT_BF16:
                oh = onehot.to(tl.bfloat16)
                ek_hi = ek.to(tl.bfloat16)
                pk_t = tl.dot(oh, ek_hi) + tl.dot(oh, (ek - ek_hi.to(tl.float32)).to(tl.bfloat16))
                ev_hi = ev.to(tl.bfloat16)
                pv_t = tl.dot(oh, ev_hi) + tl.dot(oh, (ev - ev_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                oh = onehot.to(tl.float32)
                pk_t = tl.dot(oh, ek, input_precision="ieee")
                pv_t = tl.dot(oh, ev, input_precision="ieee")
            # slot of small key l = i0 - t0 - (BT - 1) + l_local is l - I0 + ws - 1
            slot = i0 - t0 - (BT - 1) + lloc - I0 + WS - 1
            lglob = i0 - t0 - (BT - 1) + lloc
            smask = (lloc < BI + BT - 1) & (lglob >= 0) & (lglob < S) & (slot >= 0) & (slot < LSLOT)
            # read-modify-write of this program's own slice; the barrier orders it after the
            # previous tile's store (other threads of this program may have written these keys)
            tl.debug_barrier()
            ok = tl.load(pk + slot[:, None] * D_PAD + dd[None, :], mask=smask[:, None], other=0.0)
            tl.store(pk + slot[:, None] * D_PAD + dd[None, :], ok + pk_t, mask=smask[:, None])
            ov = tl.load(pv + slot[:, None] * DV_PAD + ee[None, :], mask=smask[:, None], other=0.0)
            tl.store(pv + slot[:, None] * DV_PAD + ee[None, :], ov + pv_t, mask=smask[:, None])
        iq = i0 + rq // BH
        tl.store(DQ + b * sdqb + iq[:, None] * sdqs + hq_q[:, None] * sdqh + dd[None, :],
                 dq.to(DQ.dtype.element_ty), mask=(hvalid_q & (iq < S))[:, None] & dmask[None, :])


_INTERPRETED = {}


def _kernel(fn, device: torch.device):
    """The jitted kernel on CUDA; on CPU the same source under the Triton interpreter."""
    if device.type == "cuda":
        return fn
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(fn, InterpretedFunction):
        if fn not in _INTERPRETED:
            _INTERPRETED[fn] = InterpretedFunction(fn.fn)
        fn = _INTERPRETED[fn]
    return fn


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(device: torch.device, ws: int, G: int, D: int, DV: int, elt: int, shrink: int = 0):
    """Tile sizes. Rows kernel: BM = BI * BH * BT rows (positions x heads x offsets) against
    BN keys. Keys kernel: KBN keys against KBH * KBT rows (heads x offsets of one small key).
    Wider rows (fp32, head dims past 128) get smaller tiles; ``shrink`` halves them again."""
    if device.type == "cuda":
        row_bytes = max(_pow2(D), _pow2(DV)) * elt
        bm, bn = (128, 64) if row_bytes <= 256 else (64, 32) if row_bytes <= 512 else (32, 16)
        bm, bn = max(16, bm >> shrink), max(16, bn >> shrink)
        warps, stages, nb_min = (8 if bm == 128 else 4), 2, 64
        kbn, kbm = 2 * bn, bm // 2      # keys kernel: 64 rows x 128 keys measured best
    else:
        bm, bn, warps, stages, nb_min = 16, 16, 4, 1, 16
        kbn, kbm = 16, 16
    bt = min(_pow2(ws), bm)
    bh = min(_pow2(G), bm // bt)
    bi = bm // (bt * bh)
    kbt = min(_pow2(ws), kbm)
    kbh = min(_pow2(G), kbm // kbt)
    return dict(BI=bi, BH=bh, BT=bt, BN=bn, NB_MIN=nb_min, num_warps=warps, num_stages=stages,
                KBI=kbm // (kbt * kbh), KBH=kbh, KBT=kbt, KBN=kbn, k_warps=warps, k_stages=stages,
                DQ_SUM=device.type == "cuda" and bh == 1)


_SHRINK = {}     # (dtype, D, Dv, precision) -> how often the tiles had to be halved to fit


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def two_simplicial_bwd(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, allow_tf32, config=None):
    """Gradients ``(dq, dk1, dv1, dk2, dv2)`` of the trilinear 2-simplicial attention.

    do, out ``[B, S, Hq, Dv]``; q ``[B, S, Hq, D]``; k1, k2 ``[B, S, Hkv, D]``; v1, v2
    ``[B, S, Hkv, Dv]``; lse ``[B, Hq, S]`` float32 (natural log) from the forward.
    Gradients come back in the inputs' dtypes and shapes. ``config`` overrides tile sizes
    (benchmarks only)."""
    B, S, HQ, D = q.shape
    HKV, DV = k1.shape[2], v1.shape[3]
    G = HQ // HKV
    if B * S * HQ == 0:
        return tuple(torch.zeros_like(x) for x in (q, k1, v1, k2, v2))
    # the smaller window plays the small role (virtual rows); the op is symmetric
    w1e, w2e = min(int(w1), S), min(int(w2), S)
    swap = w1e > w2e
    ks, vs, kb, vb = (k2, v2, k1, v1) if swap else (k1, v1, k2, v2)
    ws, wb = (w2e, w1e) if swap else (w1e, w2e)
    q, ks, vs, kb, vb, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, ks, vs, kb, vb, do))
    lse = lse.float().contiguous()
    # Delta_i = <dO_i, O_i>, [B, Hq, S] fp32
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if q.dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "ieee"
    else:
        precision = "tf32"                 # ignored by tl.dot for 16-bit inputs
    key = (q.dtype, D, DV, precision)
    while True:
        cfg = _config(q.device, ws, G, D, DV, q.element_size(), _SHRINK.get(key, 0))
        cfg.update(config or {})
        try:
            dq, dkb, dvb, dks_part, dvs_part, NB = _launch(do, q, ks, vs, kb, vb, lse, delta, ws, wb,
                                                          scale, precision, cfg)
            break
        except triton.runtime.errors.OutOfResources:
            # shared memory: halve the tiles (fp32 IEEE products and wide heads need it)
            if config or _SHRINK.get(key, 0) >= 3:
                raise
            _SHRINK[key] = _SHRINK.get(key, 0) + 1

    dks = _gather_slices(dks_part, NB, ws, S)[..., :D].to(ks.dtype)
    dvs = _gather_slices(dvs_part, NB, ws, S)[..., :DV].to(vs.dtype)
    dkb, dvb = dkb.view_as(kb), dvb.view_as(vb)
    if swap:
        return dq, dkb, dvb, dks, dvs
    return dq, dks, dvs, dkb, dvb


def _launch(do, q, ks, vs, kb, vb, lse, delta, ws, wb, scale, precision, cfg):
    B, S, HQ, D = q.shape
    HKV, DV = ks.shape[2], vs.shape[3]
    G = HQ // HKV
    BI, BH, BT, BN = cfg["BI"], cfg["BH"], cfg["BT"], cfg["BN"]
    D_PAD, DV_PAD = max(16, _pow2(D)), max(16, _pow2(DV))
    LB = max(16, _pow2(BI + BT - 1))
    qk_scale = float(scale) * LOG2E
    kw = dict(D=D, DV=DV, D_PAD=D_PAD, DV_PAD=DV_PAD, PRECISION=precision)
    common = (*_strides(q), *_strides(ks), *_strides(vs), *_strides(kb), *_strides(vb), *_strides(do))

    dkb = torch.empty_like(kb)
    dvb = torch.empty_like(vb)
    grid = (triton.cdiv(S, cfg["KBN"]), B * HKV)
    _kernel(_bwd_big_keys, q.device)[grid](
        q, ks, vs, kb, vb, do, lse, delta, dkb, dvb, *common, *_strides(dkb), *_strides(dvb),
        S, HQ, HKV, G, ws, wb, qk_scale, LN2, BI=cfg["KBI"], BH=cfg["KBH"], BT=cfg["KBT"], BN=cfg["KBN"],
        num_warps=cfg["k_warps"], num_stages=cfg["k_stages"], **kw)

    # rows kernel: NB positions per program, a multiple of BI and >= ws - 1 so that a slice
    # overlaps only its left neighbour's
    NB = BI * triton.cdiv(max(cfg["NB_MIN"], ws - 1), BI)
    NP = triton.cdiv(S, NB)
    NHB = triton.cdiv(G, BH)
    LSLOT = NB + ws - 1
    dq = torch.empty_like(q)
    dks_part = torch.zeros(B, HKV, NHB, NP, LSLOT, D_PAD, device=q.device, dtype=torch.float32)
    dvs_part = torch.zeros(B, HKV, NHB, NP, LSLOT, DV_PAD, device=q.device, dtype=torch.float32)
    grid = (NP, B * HKV * NHB)
    on_gpu = q.device.type == "cuda"
    dq_sum = on_gpu and cfg["DQ_SUM"]
    _kernel(_bwd_rows, q.device)[grid](
        q, ks, vs, kb, vb, do, lse, delta, dq, dks_part, dvs_part, *common, *_strides(dq),
        S, HQ, HKV, G, NHB, NP, NB, ws, wb, qk_scale, float(scale), LB=LB,
        QB=BI * BH if dq_sum else max(16, BI * BH), ONEHOT_BF16=on_gpu, DQ_SUM=dq_sum, BI=BI, BH=BH, BT=BT, BN=BN,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **kw)
    return dq, dkb, dvb, dks_part, dvs_part, NB


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

"""Triton forward kernel for 2-simplicial (trilinear) attention: virtual rows (docs/math.md, Virtual rows).

Names: the vocabulary of ``common.py`` (shared with the backward). Notation (docs/math.md, The
operation): per batch ``b`` and query head ``hq`` (kv head ``hk = hq // GQA``)::

    logit[i, j, k] = scale * sum_d q[i,d] k1[j,d] k2[k,d],   i - w1 < j <= i,  i - w2 < k <= i
    out[i]         = sum_{j,k} softmax_{(j,k)}(logit[i])[j,k] * (v1[j] * v2[k])

The operation is symmetric under swapping ``(k1, v1, w1)`` with ``(k2, v2, w2)``; the plan
(``ops/plan.py``) names the *small* window ``s`` (size ``ws``) and the *big* one ``b`` (size ``wb >= ws``).
For a query ``i`` and an offset ``t in [0, ws)`` with ``l = i - t`` the *virtual query*

    z[i,t] = q_i * k_s[l]                                                        (1)

turns the logits into an ordinary dot product over the big window, in base 2:

    logit[i, j, l] * log2 e = qk_scale * <z[i,t], k_b[j]>,   qk_scale = |scale| log2 e

(``-z`` for a negative scale, :func:`~.common.z_scaling`), so each virtual row ``(i, t)`` is one
row of flash attention over ``k_b, v_b`` that keeps the running ``(m, l, acc)`` of online softmax
(exp2 form). The ``ws`` rows of one query are then merged the way split-KV decoding merges its
splits:

    M = max_t m_t;   L = sum_t 2^(m_t - M) l_t
    out_i = sum_t 2^(m_t - M) (v_s[i-t] * acc_t) / L;   lse_i = (M + log2 L) * ln 2   (2)

Tiling. One program owns a tile of ``BM = BI * BH * BT`` virtual rows:
``BI`` consecutive query positions x ``BH`` query heads of one kv group x ``BT`` offsets,
row ``r = (p * BH + h) * BT + t``. Every row of the tile reads the same ``k_b, v_b`` rows
(the big window of positions ``i0 .. i0+BI-1``), so a key block loaded once feeds all
``BM`` rows and almost nothing is masked: with the default 64 rows and ws = 32, GQA-64
packs 2 heads x 32 offsets (BI = 1), plain MHA 2 positions x 32 offsets (docs/kernels.md has a
figure of the tile). When ``ws > BT`` the program walks the offsets
in chunks of ``BT`` and folds each chunk into the running ``(M, L, out)`` of (2); nothing is
written to memory but ``out`` and ``lse`` (no split buffers, no atomics: deterministic).

Key blocks are anchored at ``hi = i0 + 1``, one past the tile's first position, and walk
left: block ``k`` covers ``[hi - (k+1) BN, hi - k BN)``. Every such key is ``<= i0``,
so no block needs a causal mask; blocks inside every row's window (keys ``>= i0 + BI - wb``
and ``>= 0``) run with no mask at all, and only the left edge of the window (the keys that
positions ``p > 0`` no longer see, or the sequence start) is masked: one block per tile when
``wb`` is a multiple of ``BN``, none when ``BI = 1``. The tile's right edge, keys
``i0 + 1 .. i0 + BI - 1`` (key ``i0 + e`` seen by positions ``p >= e``), is done apart: for
``BI = 2`` (MHA with 32 offsets: one key, half the rows) as one more key folded into the
online softmax, its logit ``<z_r, k_b[i0 + 1]>`` from one small tensor-core product before the
loop, which costs less than a masked narrow block; for ``BI > 2`` by masked narrow blocks of
``BN2`` keys.

Loads. On the GPU the key blocks come through the copy engine (TMA): one descriptor per
tensor over the 3-D view ``[B, S, Hkv * D]`` with ``[1, BN, D]`` blocks, whose rows outside
``[0, S)`` read as zeros (then masked), so the loop computes no addresses (docs/kernels.md,
Loads). Tensors the copy engine cannot read (head dim not a power of two >= 16, heads not
packed, not 16-byte aligned) take pointer loads with indices clamped into the sequence.

Numerics: fp32 accumulation; masked logits are -inf but the running max starts at a finite
-1e30, so a row that sees only masked keys gets ``p = 2^-inf = 0`` rather than NaN, and
rows that do not exist (offset past ``i`` or ``ws``, head or position out of range) are
dropped from (2) by ``where`` with max -1e30 and zero weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import Plan, make_plan
from .common import (form_code, kernel, max_combine, pack_rows, padded, pow2, strides, sum_combine, z_operands,
                     z_scaling)


@triton.jit
def _clean_rows(V, C, F, sv, S, HKV, N_ROWS, DV: tl.constexpr, DV_PAD: tl.constexpr, BR: tl.constexpr):
    """Rows ``r = (b * S + i) * HKV + h`` in ``[BR * pid, BR * (pid + 1))`` of one value tensor:
    ``C`` (contiguous) gets the row with its non-finite entries as 0, ``F[b, h, i]`` 1 where the
    row held one (else 0)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < N_ROWS
    r64 = r.to(tl.int64)
    h = r64 % HKV
    i = (r64 // HKV) % S
    b = r64 // (HKV * S)
    ee = tl.arange(0, DV_PAD)
    m = ok[:, None] & (ee < DV)[None, :]
    x = tl.load(V + b[:, None] * sv[0] + i[:, None] * sv[1] + h[:, None] * sv[2] + ee[None, :], mask=m, other=0.0)
    finite = tl.abs(x) < float("inf")              # False for NaN and for both infinities
    tl.store(C + r64[:, None] * DV + ee[None, :], tl.where(finite, x, 0.0).to(C.dtype.element_ty), mask=m)
    bad = tl.reduce(tl.where(finite, 0, 1), 1, max_combine)
    tl.store(F + (b * HKV + h) * S + i, bad.to(tl.int8), mask=ok)


@triton.jit
def _clean_values_kernel(V1, V2, C1, C2, F, sv1, sv2, S, HKV, N_ROWS,
                         DV: tl.constexpr, DV_PAD: tl.constexpr, BR: tl.constexpr):
    """:func:`_clean_rows` of v1 (program axis 1 = 0: ``F[0]``) or v2 (1: ``F[1]``); ``F`` is
    ``[2, B, HKV, S]`` int8."""
    if tl.program_id(1) == 0:
        _clean_rows(V1, C1, F, sv1, S, HKV, N_ROWS, DV, DV_PAD, BR)
    else:
        _clean_rows(V2, C2, F + N_ROWS, sv2, S, HKV, N_ROWS, DV, DV_PAD, BR)


@triton.jit
def _window_holds(CNT, b, hk, HKV, S, i, W, ok):
    """Whether the window ``(i - W, i]`` of each position ``i`` holds a flagged position, from
    ``CNT [B, HKV, S]``, the flags' running count along the sequence (:func:`clean_values`)."""
    base = CNT + (b * HKV + hk) * S
    upto_i = tl.load(base + i, mask=ok, other=0)
    upto_i_minus_w = tl.load(base + i - W, mask=ok & (i >= W), other=0)
    return upto_i > upto_i_minus_w


@triton.jit
def _two_simplicial_fwd_kernel(
    Q, KS, VS, KB, VB, KB_DESC, VB_DESC, KB_DESC2, VB_DESC2, O, LSE, CNT_S, CNT_B,
    sq, sks, svs, skb, svb, so, slse,
    S, HKV, GQA, NHB, WS, WB, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BN: tl.constexpr, BN2: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr,
    PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr, PREFETCH_VS: tl.constexpr, INT64_IDX: tl.constexpr,
    USE_TMA: tl.constexpr, EDGE_DOT: tl.constexpr, NEG_Z: tl.constexpr, FORM: tl.constexpr,
):
    EVEN_D: tl.constexpr = D == D_PAD
    EVEN_DV: tl.constexpr = DV == DV_PAD
    BM: tl.constexpr = BI * BH * BT
    NQ: tl.constexpr = BI * BH                       # distinct queries (position, head) per tile
    NARROW: tl.constexpr = BI > 1 and not EDGE_DOT   # right-edge keys by narrow masked blocks
    # one grid axis (no 65535 limit on B * HKV): (position block, head block) fastest, then (batch, kv head)
    n_ph = ((S + BI - 1) // BI) * NHB
    pid = tl.program_id(0) % n_ph
    pid_bh = tl.program_id(0) // n_ph
    hblk = pid % NHB                                 # head block fastest: neighbours share k_b in L2
    pblk = pid // NHB
    b32 = pid_bh // HKV
    b = b32.to(tl.int64)
    hk = pid_bh % HKV
    i0 = pblk * BI
    if INT64_IDX:                                  # position * stride may pass 2^31 (huge S * H * D)
        i0 = i0.to(tl.int64)

    # ---- virtual rows r = (p * BH + h) * BT + t ----------------------------------------------
    r = tl.arange(0, BM)
    tt = r % BT
    hh = (r // BT) % BH
    ii = i0 + r // (BH * BT)                         # query position of each row
    hg = hblk * BH + hh                              # head index inside the kv group
    qok = (ii < S) & (hg < GQA)
    hq = hk * GQA + hg                               # query head

    dd = tl.arange(0, D_PAD)
    ee = tl.arange(0, DV_PAD)
    dmask = dd < D
    emask = ee < DV

    q_row_ptr = Q + b * sq[0] + ii[:, None] * sq[1] + hq[:, None] * sq[2] + dd[None, :]
    ks_base = KS + b * sks[0] + hk * sks[2]
    vs_base = VS + b * svs[0] + hk * svs[2]
    kb_base = KB + b * skb[0] + hk * skb[2]
    vb_base = VB + b * svb[0] + hk * svb[2]

    # ---- key blocks of the big window, anchored at hi = i0 + 1 ---------------------------------
    # Keys j <= i0 are causal for every row of the tile, so blocks walking left from hi need no
    # causal mask. Keys in [full_lo, i0] are in every row's window (no mask at all); the blocks
    # past full_lo (the window's left edge for positions p > 0, or the sequence start) are masked.
    # The tile's right edge, keys i0 + 1 .. i0 + BI - 1 (key i0 + e is seen by positions p >= e),
    # is done apart: for BI == 2 (one key, seen by half the rows) folded into the online softmax
    # before and after the loop (EDGE_DOT), otherwise by masked narrow blocks of BN2 keys.
    hi = i0 + 1
    lo = tl.maximum(i0 - WB + 1, 0)                  # first key of position i0's window
    full_lo = tl.maximum(i0 + BI - WB, 0)            # keys in [full_lo, i0] are in every row's window
    n_blk = (hi - lo + BN - 1) // BN
    n_full = tl.minimum(tl.maximum(hi - full_lo, 0) // BN, n_blk)
    n_right = (tl.minimum(BI - 1, S - hi) + BN2 - 1) // BN2   # narrow right-edge blocks
    j_min = tl.maximum(ii - WB, -1)                  # left edge of each row's window: keys j > j_min

    # running merge (2) per query, in base 2
    M_q = tl.full([NQ], -1.0e30, tl.float32)
    L_q = tl.full([NQ], 0.0, tl.float32)
    O_q = tl.full([NQ, DV_PAD], 0.0, tl.float32)

    if EDGE_DOT:                                   # BI == 2: the one right-edge key i0 + 1, rows of p = 1
        # k_b[i0 + 1] as 16 identical rows (the smallest N of a tensor-core product), at an index
        # clamped into the sequence (sees_e drops the key when i0 + 1 = S); v_b[i0 + 1] is read
        # as a [1, D] row where it is used (a 2-D row broadcasts over the tile's rows without a
        # layout conversion; 1-D vectors went through shared memory: -6% on mha)
        j_e = i0 + 1
        j_e_ld = tl.minimum(j_e, S - 1)
        kb_e_ptr = kb_base + j_e_ld * skb[1] + dd[None, :] + tl.full([16, 1], 0, tl.int32)
        if EVEN_D:
            kb_e = tl.load(kb_e_ptr)
        else:
            kb_e = tl.load(kb_e_ptr, mask=dmask[None, :], other=0.0)
        sees_e = (ii == j_e) & (j_e < S)

    if ONE_CHUNK:                                  # ws <= BT: a constant trip count lets the compiler
        n_chunk = 1                                # drop the chunk loop (and its registers) entirely
    else:
        n_chunk = (tl.minimum(WS, i0 + BI) + BT - 1) // BT  # offsets t > i never exist
    for c in range(0, n_chunk):
        t = c * BT + tt
        l = ii - t                                   # small-window key position
        rvalid = qok & (t < WS) & (l >= 0)
        # q is re-read per chunk (from cache) rather than kept live: fewer registers in the hot loop
        q_rows = tl.load(q_row_ptr, mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ks_rows = tl.load(ks_base + l[:, None] * sks[1] + dd[None, :],
                          mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if FORM != 0:            # Q, KS hold the determinant form's operands [b, e], [a, c] (z_operands)
            q_e = tl.load(q_row_ptr + D, mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            ks_c = tl.load(ks_base + l[:, None] * sks[1] + D + dd[None, :],
                           mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        vs_row_ptr = vs_base + l[:, None] * svs[1] + ee[None, :]
        if PREFETCH_VS:
            # issued with q and k_s, so that the tile waits for one memory latency before its first
            # key block, not two (v_s goes to the MMA layout before the loop); held until the merge
            vs_rows = tl.load(vs_row_ptr, mask=rvalid[:, None] & emask[None, :], other=0.0).to(tl.float32)
        # (1): virtual query z = q * k_s, one rounding to the input dtype (a packed 16-bit
        # multiply); a negative scale is carried as -z, so qk_scale = |scale| log2(e) > 0 (see
        # z_scaling). The determinant form: z = a * b - c * e = sgn * (k_s x q) per 3-chunk, its
        # signs already in a, c (common.z_operands)
        if FORM == 0:
            if NEG_Z:
                ks_rows = -ks_rows
            z = (ks_rows * q_rows).to(KB.dtype.element_ty)
        else:
            z = (ks_rows * q_rows - ks_c * q_e).to(KB.dtype.element_ty)
        if EDGE_DOT:
            # s_e[r] = <z_r, k_b[i0 + 1]> (same rounded z) by a [BM, 16] tensor-core product
            # (16 equal columns), not a row reduction of z * k_b[i0 + 1]: shorter before the first
            # key block, and with z used by two products of different widths Triton builds z
            # in the MMA operand layout once, in registers, instead of re-reading it from shared
            # memory in every key block (docs/kernels.md, The right-edge key)
            s_e = tl.where(sees_e, tl.reduce(tl.dot(z, tl.trans(kb_e), input_precision=PRECISION), 1, max_combine), -1.0e30)
            # the right-edge key's logit and weight enter the running (m, l) first (m = qk_scale
            # s_e, l = 1 for the rows that see it), so that only its value needs adding after
            # the loop, without rescaling acc; its value is not put into acc here because the
            # compiler then reduces the merge (2) by shuffles, which is slower
            m_i = tl.where(sees_e, s_e * qk_scale, -1.0e30)
            l_i = tl.where(sees_e, 1.0, 0.0)
        else:
            m_i = tl.full([BM], -1.0e30, tl.float32)
            l_i = tl.full([BM], 0.0, tl.float32)
        acc = tl.full([BM, DV_PAD], 0.0, tl.float32)
        # stage 0: blocks k = 0 .. n_blk-1, [hi - (k+1) BN, hi - k BN), masked only from
        # n_full on (the left edge), in one loop so that Triton pipelines the edge block's loads
        # with the others (Triton pipelines each loop apart: a loop of its own would wait for its
        # first block's loads in full);
        # stage 1: the right edge [hi, hi + BI - 1) in narrow blocks of BN2 keys, masked.
        for stage in tl.static_range(2):
            if stage == 0:
                k_end = n_blk
            else:
                k_end = n_right if NARROW else 0
            for kb_i in range(0, k_end):
                if stage == 1:
                    j0 = hi + kb_i * BN2
                    j = j0 + tl.arange(0, BN2)
                else:
                    j0 = hi - (kb_i + 1) * BN
                    j = j0 + tl.arange(0, BN)
                if USE_TMA:
                    # the copy engine fetches the block of batch b, head hk (3-D view [B, S, Hkv*D]);
                    # rows outside [0, S) come back as zeros and are masked below
                    if stage == 1:
                        k_blk = tl.reshape(KB_DESC2.load([b32, j0.to(tl.int32), hk * D]), [BN2, D_PAD])
                        v_blk = tl.reshape(VB_DESC2.load([b32, j0.to(tl.int32), hk * DV]), [BN2, DV_PAD])
                    else:
                        k_blk = tl.reshape(KB_DESC.load([b32, j0.to(tl.int32), hk * D]), [BN, D_PAD])
                        v_blk = tl.reshape(VB_DESC.load([b32, j0.to(tl.int32), hk * DV]), [BN, DV_PAD])
                else:
                    j_ld = tl.minimum(tl.maximum(j, 0), S - 1)     # clamped; the mask drops repeats
                    if EVEN_D:
                        k_blk = tl.load(kb_base + j_ld[:, None] * skb[1] + dd[None, :])
                    else:
                        k_blk = tl.load(kb_base + j_ld[:, None] * skb[1] + dd[None, :], mask=dmask[None, :],
                                        other=0.0)
                    if EVEN_DV:
                        v_blk = tl.load(vb_base + j_ld[:, None] * svb[1] + ee[None, :])
                    else:
                        v_blk = tl.load(vb_base + j_ld[:, None] * svb[1] + ee[None, :], mask=emask[None, :],
                                        other=0.0)
                # s[r, j] = <z_r, k_b[j]>, so logit * log2(e) = qk_scale * s
                s = tl.dot(z, tl.trans(k_blk), input_precision=PRECISION)
                if stage == 0:
                    if kb_i >= n_full:             # left edge: j > i - wb and j >= 0 (j <= i0 <= i holds)
                        s = tl.where(j[None, :] > j_min[:, None], s, float("-inf"))
                else:                              # right edge: causal, and inside the window
                    s = tl.where((j[None, :] <= ii[:, None]) & (j[None, :] > j_min[:, None]), s,
                                 float("-inf"))
                # online softmax (base 2, qk_scale > 0 so max commutes with it):
                # m' = max(m, qk_scale max_j s); acc = acc 2^(m-m') + 2^(qk_scale s - m') v_b
                m_new = tl.maximum(m_i, tl.reduce(s, 1, max_combine) * qk_scale)
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                l_i = l_i * alpha + tl.reduce(p, 1, sum_combine)
                acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk, input_precision=PRECISION)
                m_i = m_new
        if EDGE_DOT:                               # the right-edge key's value: weight 2^(qk_scale s_e - m)
            p_e = tl.where(sees_e, tl.math.exp2(s_e * qk_scale - m_i), 0.0)
            if EVEN_DV:
                vb_e = tl.load(vb_base + j_e_ld * svb[1] + ee[None, :]).to(tl.float32)
            else:
                vb_e = tl.load(vb_base + j_e_ld * svb[1] + ee[None, :], mask=emask[None, :], other=0.0).to(tl.float32)
            acc = acc + p_e[:, None] * vb_e

        # (2) for this chunk: y_r = v_s[l] * acc_r, merged over the BT offsets of each query
        if not PREFETCH_VS:
            vs_rows = tl.load(vs_row_ptr, mask=rvalid[:, None] & emask[None, :], other=0.0).to(tl.float32)
        m_r = tl.where(rvalid, m_i, -1.0e30)
        l_sum = tl.where(rvalid, l_i, 0.0)
        m3 = tl.reshape(m_r, [NQ, BT])
        m_c = tl.reduce(m3, 1, max_combine)          # max over the chunk's offsets
        a3 = tl.math.exp2(m3 - m_c[:, None])
        L_c = tl.reduce(a3 * tl.reshape(l_sum, [NQ, BT]), 1, sum_combine)
        # rows that do not exist get weight 0, and their y is dropped by a select, not a product:
        # their acc is not finite when a key of the block is (z = 0 there: 0 * inf = nan), and
        # 0 * nan = nan would reach the query's real rows. (v_b reaches the kernel with its
        # non-finite entries as 0: clean_values.)
        a_r = tl.where(rvalid, tl.reshape(a3, [BM]), 0.0)
        y = tl.where(rvalid[:, None], acc * vs_rows * a_r[:, None], 0.0)
        O_c = tl.reduce(tl.reshape(y, [NQ, BT, DV_PAD]), 1, sum_combine)
        # fold into the running merge across chunks
        M_new = tl.maximum(M_q, m_c)
        a_old = tl.math.exp2(M_q - M_new)
        a_new = tl.math.exp2(m_c - M_new)
        L_q = L_q * a_old + L_c * a_new
        O_q = O_q * a_old[:, None] + O_c * a_new[:, None]
        M_q = M_new

    # ---- epilogue: out = O / L, lse = (M + log2 L) ln 2 ----------------------------------------
    qq = tl.arange(0, NQ)
    i_q = i0 + qq // BH
    hl_q = hblk * BH + qq % BH
    ok_q = (i_q < S) & (hl_q < GQA)
    h_q = hk * GQA + hl_q
    L_safe = tl.where(L_q > 0.0, L_q, 1.0)
    o = O_q / L_safe[:, None]
    # a query whose window holds a non-finite value gets NaN in its whole row (the kernel
    # computed with the values cleaned: docs/kernels.md, Non-finite inputs)
    holds = _window_holds(CNT_S, b, hk, HKV, S, i_q, WS, ok_q) | _window_holds(CNT_B, b, hk, HKV, S, i_q, WB, ok_q)
    o = tl.where(holds[:, None], float("nan"), o)
    tl.store(O + b * so[0] + i_q[:, None] * so[1] + h_q[:, None] * so[2] + ee[None, :],
             o.to(O.dtype.element_ty), mask=ok_q[:, None] & emask[None, :])
    lse = (M_q + tl.math.log2(L_safe)) * 0.6931471805599453
    tl.store(LSE + b * slse[0] + h_q * slse[1] + i_q, lse, mask=ok_q)


# Design switches of the kernel (docs/kernels.md, Launch configuration), for A/B tests of the
# choices they name and for tests; not launch knobs: ``config`` of :func:`two_simplicial_fwd`
# takes them beside the knobs of :func:`fwd_config`.
SWITCHES = ("prefetch_vs", "tma", "edge_dot", "int64_idx", "maxnreg", "ws")


def fwd_config(gqa: int, ws: int, D: int, Dv: int, interpret: bool, block_m: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               block_t: int | None = None) -> dict:
    """Launch configuration: ``BI, BH, BT`` (:func:`~.common.pack_rows` of ``block_m`` rows, at
    most ``block_t`` offsets), ``BN`` (``block_n``), warps, stages, and the design switches at
    their defaults. The defaults were chosen by measurement on Hopper (docs/kernels.md, Launch
    configuration): 64 rows and 4 warps (one warpgroup) beat 128 rows and 8 warps, because two
    such programs fit on an SM and overlap one's softmax with the other's matrix products. A
    small window wider than the tile (ws > BT) makes the kernel loop over offset chunks, which
    costs registers (spills), so tiles grow to 128 rows to hold up to 128 offsets at once, still
    with 4 warps (and 2 stages, which fit): 8 warps were 21% slower at windows 128x128, and tiles
    of several positions x 16 offsets (``block_t``) no faster. The interpreter gets tiny tiles."""
    if interpret:
        dflt = (16, 16, 1, 1)
    elif max(D, Dv) > 128:
        dflt = (64, 32, 4, 2)
    elif ws > 64:
        dflt = (128, 64, 4, 2)
    else:
        dflt = (64, 64, 4, 3)
    BI, BH, BT = pack_rows(block_m or dflt[0], gqa, min(ws, block_t or ws))
    return dict(BN=block_n or dflt[1], BI=BI, BH=BH, BT=BT, num_warps=num_warps or dflt[2],
                num_stages=num_stages or dflt[3], prefetch_vs=not interpret and max(D, Dv) <= 128,
                tma=not interpret, edge_dot=True, int64_idx=False, maxnreg=None, ws=None)


def _kv_desc(t: torch.Tensor, rows: int):
    """A copy-engine (TMA) descriptor for ``[rows, D]`` blocks of one (batch, kv head) of ``t``
    ``[B, S, Hkv, D]``, through the 3-D view ``[B, S, Hkv * D]``; None where the copy engine
    cannot read the tensor (D not a power of two >= 16, heads not packed, unaligned)."""
    B, S, H, D = t.shape
    es = t.element_size()
    if (D < 16 or D & (D - 1) or (H > 1 and t.stride(2) != D) or t.data_ptr() % 16
            or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], [1, rows, D])


def clean_values(v1, v2):
    """``(c1, c2, counts)``: copies of ``v1``, ``v2`` ``[B, S, Hkv, Dv]`` (contiguous) with their
    non-finite entries as 0, and ``counts [2, B, Hkv, S]`` int32, for each of the two the number
    of positions up to each position whose value row holds a non-finite entry. One kernel
    launch for both tensors, and one cumulative sum (docs/kernels.md, Non-finite inputs)."""
    v1, v2 = (v if v.stride(-1) == 1 else v.contiguous() for v in (v1, v2))
    B, S, Hkv, Dv = v1.shape
    c1, c2 = torch.empty_like(v1, memory_format=torch.contiguous_format), torch.empty_like(v2, memory_format=torch.contiguous_format)
    flags = torch.empty((2, B, Hkv, S), dtype=torch.int8, device=v1.device)
    n_rows = B * S * Hkv
    if n_rows:
        br = 32 if v1.device.type == "cuda" else 16
        kernel(_clean_values_kernel, v1.device)[(triton.cdiv(n_rows, br), 2)](
            v1, v2, c1, c2, flags, strides(v1), strides(v2), S, Hkv, n_rows, DV=Dv, DV_PAD=padded(Dv), BR=br,
            num_warps=4)
    return c1, c2, flags.cumsum(-1, dtype=torch.int32)


def two_simplicial_fwd(q, k1, v1, k2, v2, w1: int, w2: int, scale: float, allow_tf32: bool, config: dict | None = None,
                       form: str = "trilinear", keep_values: bool = False):
    """Forward of 2-simplicial attention in ``form``, ``"trilinear"`` or ``"determinant"``
    (at head dim D: docs/kernels.md, The determinant form at head dim D).

    q ``[B, S, Hq, D]``; k1, k2 ``[B, S, Hkv, D]``; v1, v2 ``[B, S, Hkv, Dv]`` (any strides;
    a non-unit last stride is made contiguous). Returns ``(out [B, S, Hq, Dv] in q.dtype,
    lse [B, Hq, S] float32)``, and with ``keep_values`` also the values the kernel computed with
    (:func:`clean_values`: non-finite entries as 0), which the backward takes. An output row whose
    window holds a non-finite value is NaN (docs/kernels.md, Non-finite inputs). fp32 inputs use
    tf32 tensor cores only when ``allow_tf32``. ``config`` overrides the default launch
    configuration, for tuning (the knobs of :func:`fwd_config`: block_m, block_n, num_warps,
    num_stages, block_t) and for A/B tests and tests (the :data:`SWITCHES`; ``ws``, a dict of
    :func:`.fwd_ws.canonical_fwd_ws`'s knobs, runs the warp-specialised prototype). The window roles come from
    :func:`~twosimplicial.ops.plan.make_plan`, as in the backward.
    """
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, allow_tf32)
    c1, c2, counts = clean_values(v1, v2)
    out, lse = canonical_fwd(plan, q, *plan.split(k1, c1, k2, c2), plan.roles(counts[0], counts[1]), scale,
                             config, form)
    return (out, lse, c1, c2) if keep_values else (out, lse)


def canonical_fwd(plan: Plan, q, ks, vs, kb, vb, counts, scale: float, config: dict | None = None,
                  form: str = "trilinear"):
    """:func:`two_simplicial_fwd` on the canonical problem: ``(ks, vs)`` over the small window
    ``plan.ws``, ``(kb, vb)`` over the big window ``plan.wb`` (values finite), ``counts`` the
    running counts of non-finite value rows ``[B, Hkv, S]`` of the two, in the same roles."""
    B, S, Hq, Hkv, D, Dv, ws, wb = plan.B, plan.S, plan.Hq, plan.Hkv, plan.D, plan.Dv, plan.ws, plan.wb
    q, kb, vb, ks, vs = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, kb, vb, ks, vs))
    out = torch.empty((B, S, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    if plan.empty:
        return out, lse
    knobs = {k: v for k, v in (config or {}).items() if k not in SWITCHES}
    cfg = fwd_config(plan.gqa, ws, D, Dv, q.device.type != "cuda", **knobs)
    cfg.update({k: v for k, v in (config or {}).items() if k in SWITCHES and v is not None})
    if cfg["ws"] is not None:   # the warp-specialised Gluon prototype (fwd_ws.py), with its own knobs
        from . import fwd_ws
        if not fwd_ws.supports(plan, form, q, ks, vs, kb, vb):
            raise ValueError(f"config['ws']: the warp-specialised forward takes {fwd_ws.SCOPE}; got "
                             f"{form} form, {q.dtype} on {q.device.type}, D={D}, Dv={Dv}, gqa={plan.gqa}, ws={ws}")
        return fwd_ws.canonical_fwd_ws(plan, q, ks, vs, kb, vb, counts, scale, **cfg["ws"])
    BI, BH, BT, BN = cfg["BI"], cfg["BH"], cfg["BT"], cfg["BN"]
    NHB = triton.cdiv(plan.gqa, BH)
    grid = (triton.cdiv(S, BI) * NHB * B * Hkv,)
    BN2 = min(BN, max(16, pow2(BI - 1)))
    # (the narrow pair is built even when unused: the kernel body that reads it is compiled anyway)
    descs = [_kv_desc(t, n) for n in (BN, BN2) for t in (kb, vb)] if cfg["tma"] else [None]
    use_tma = all(d is not None for d in descs)
    neg_z, qk_scale = z_scaling(scale)
    form_id = form_code(form, plan.swap)
    if form_id:                 # the kernel reads z's operands in place of q, k_s (common.z_operands)
        q, ks = z_operands(q, ks, form_id, neg_z)
    kernel(_two_simplicial_fwd_kernel, q.device)[grid](
        q, ks, vs, kb, vb, *(descs if use_tma else (kb, vb, kb, vb)), out, lse, *counts,
        strides(q), strides(ks), strides(vs), strides(kb), strides(vb), strides(out), (lse.stride(0), lse.stride(1)),
        S, Hkv, plan.gqa, NHB, ws, wb, qk_scale,
        D=D, DV=Dv, D_PAD=padded(D), DV_PAD=padded(Dv), BN=BN, BN2=BN2, BI=BI, BH=BH, BT=BT,
        PRECISION=plan.precision, ONE_CHUNK=ws <= BT, PREFETCH_VS=bool(cfg["prefetch_vs"]),
        INT64_IDX=bool(cfg["int64_idx"]) or max(t.stride(1) * S for t in (q, ks, vs, kb, vb, out)) >= 2 ** 31,
        USE_TMA=use_tma, EDGE_DOT=BI == 2 and bool(cfg["edge_dot"]), NEG_Z=neg_z, FORM=form_id,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}),
    )
    return out, lse

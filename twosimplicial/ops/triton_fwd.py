"""Triton forward kernel for 2-simplicial (trilinear) attention: virtual rows (docs/math.md, Virtual rows).

Notation (docs/math.md, The operation). Per batch ``b`` and query head ``h`` (kv head ``hk = h // G_kv``)::

    logit[i, j, k] = scale * sum_d q[i,d] k1[j,d] k2[k,d],   i - w1 < j <= i,  i - w2 < k <= i
    out[i]         = sum_{j,k} softmax_{(j,k)}(logit[i])[j,k] * (v1[j] * v2[k])

The operation is symmetric under swapping ``(k1, v1, w1)`` with ``(k2, v2, w2)``; the plan
(``ops/plan.py``) names the *small* window ``s`` (size ``ws``) and the *big* one ``b`` (size ``wb >= ws``).
For a query ``i`` and an offset ``t in [0, ws)`` with ``l = i - t`` the *virtual query*

    z[i,t] = q_i * k_s[l]                                                        (1)

turns the logits into an ordinary dot product over the big window, in base 2:

    logit[i, j, l] * log2 e = qk_scale * <z[i,t], k_b[j]>,   qk_scale = |scale| log2 e

(``-z`` for a negative scale, :func:`z_scaling`), so each virtual row ``(i, t)`` is one row of
flash attention over ``k_b, v_b`` that keeps the running ``(m, l, acc)`` of online softmax
(exp2 form). The ``ws`` rows of one query are then merged the way split-KV decoding merges its
splits:

    M = max_t m_t;   L = sum_t 2^(m_t - M) l_t
    out_i = sum_t 2^(m_t - M) (v_s[i-t] * acc_t) / L;   lse_i = (M + log2 L) * ln 2   (2)

Tiling. One program owns a tile of ``BLOCK_M = P * G * T`` virtual rows:
``P`` consecutive query positions x ``G`` query heads of one kv group x ``T`` offsets,
row ``r = ((p * G) + g) * T + t``. Every row of the tile reads the same ``k_b, v_b`` rows
(the big window of positions ``i0 .. i0+P-1``), so a key block loaded once feeds all
``BLOCK_M`` rows and almost nothing is masked: with the default 64 rows and ws = 32, GQA-64
packs 2 heads x 32 offsets (P = 1), plain MHA 2 positions x 32 offsets (docs/kernels.md has a
figure of the tile). When ``ws > T`` the program walks the offsets
in chunks of ``T`` and folds each chunk into the running ``(M, L, out)`` of (2); nothing is
written to memory but ``out`` and ``lse`` (no split buffers, no atomics: deterministic).

Key blocks are anchored at ``hi = i0 + 1``, one past the tile's first position, and walk
left: block ``k`` covers ``[hi - (k+1) BLOCK_N, hi - k BLOCK_N)``. Every such key is ``<= i0``,
so no block needs a causal mask; blocks inside every row's window (keys ``>= i0 + P - wb``
and ``>= 0``) run with no mask at all, and only the left edge of the window (the keys that
positions ``p > 0`` no longer see, or the sequence start) is masked: one block per tile when
``wb`` is a multiple of ``BLOCK_N``, none when ``P = 1``. The tile's right edge, keys
``i0 + 1 .. i0 + P - 1`` (key ``i0 + e`` seen by positions ``p >= e``), is done apart: for
``P = 2`` (MHA with 32 offsets: one key, half the rows) as one more key folded into the
online softmax, its logit ``<z_r, k_b[i0 + 1]>`` from one small tensor-core product before the
loop, which costs less than a masked narrow block; for ``P > 2`` by masked narrow blocks of
``BLOCK_N2`` keys.

Loads. On the GPU the key blocks come through the copy engine (TMA): one descriptor per
tensor over the 3-D view ``[B, S, Hkv * D]`` with ``[1, BLOCK_N, D]`` blocks, whose rows outside
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

from .plan import Plan, make_plan

LOG2E = 1.4426950408889634

# Row reductions go through tl.reduce with triton's own combine functions instead of
# tl.max / tl.sum: those are @triton.jit helpers decorated when triton was imported, and
# the interpreter cannot call them if TRITON_INTERPRET=1 was set only afterwards (as the
# tests do), while it recognises these combine functions and reduces with numpy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


def _two_simplicial_fwd_kernel(
    q_ptr, ks_ptr, vs_ptr, kb_ptr, vb_ptr, kb_desc, vb_desc, kb_desc2, vb_desc2, out_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_kbb, stride_kbs, stride_kbh,
    stride_vbb, stride_vbs, stride_vbh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    S, HKV, GKV, N_HBLK, WS, WB, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, P: tl.constexpr, G: tl.constexpr, T: tl.constexpr,
    DOT_PREC: tl.constexpr, ONE_CHUNK: tl.constexpr, PREFETCH_VS: tl.constexpr, INT64_IDX: tl.constexpr,
    USE_TMA: tl.constexpr, EDGE_DOT: tl.constexpr, NEG_Z: tl.constexpr,
):
    EVEN_D: tl.constexpr = D == BLOCK_D
    EVEN_DV: tl.constexpr = DV == BLOCK_DV
    BLOCK_M: tl.constexpr = P * G * T
    NQ: tl.constexpr = P * G                       # distinct queries (position, head) per tile
    NARROW: tl.constexpr = P > 1 and not EDGE_DOT  # right-edge keys by narrow masked blocks
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hblk = pid % N_HBLK                            # head block fastest: neighbours share k_b in L2
    pblk = pid // N_HBLK
    b32 = pid_bh // HKV
    b = b32.to(tl.int64)
    hk = pid_bh % HKV
    i0 = pblk * P
    if INT64_IDX:                                  # position * stride may pass 2^31 (huge S * H * D)
        i0 = i0.to(tl.int64)

    # ---- virtual rows r = ((p*G)+g)*T + t -------------------------------------------------
    r = tl.arange(0, BLOCK_M)
    t_loc = r % T
    g_r = (r // T) % G
    i_r = i0 + r // (G * T)                        # query position of each row
    hl_r = hblk * G + g_r                          # head index inside the kv group
    q_ok = (i_r < S) & (hl_r < GKV)
    h_r = hk * GKV + hl_r                          # query head

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < D
    dv_ok = dv < DV

    q_row_ptr = q_ptr + b * stride_qb + i_r[:, None] * stride_qs + h_r[:, None] * stride_qh + d[None, :]
    ks_base = ks_ptr + b * stride_ksb + hk * stride_ksh
    vs_base = vs_ptr + b * stride_vsb + hk * stride_vsh
    kb_base = kb_ptr + b * stride_kbb + hk * stride_kbh
    vb_base = vb_ptr + b * stride_vbb + hk * stride_vbh

    # ---- key blocks of the big window, anchored at hi = i0 + 1 ---------------------------------
    # Keys j <= i0 are causal for every row of the tile, so blocks walking left from hi need no
    # causal mask. Keys in [full_lo, i0] are in every row's window (no mask at all); the blocks
    # past full_lo (the window's left edge for positions p > 0, or the sequence start) are masked.
    # The tile's right edge, keys i0 + 1 .. i0 + P - 1 (key i0 + e is seen by positions p >= e),
    # is done apart: for P == 2 (one key, seen by half the rows) folded into the online softmax
    # before and after the loop (EDGE_DOT), otherwise by masked narrow blocks of BLOCK_N2 keys.
    hi = i0 + 1
    lo = tl.maximum(i0 - WB + 1, 0)                # first key of position i0's window
    full_lo = tl.maximum(i0 + P - WB, 0)           # keys in [full_lo, i0] are in every row's window
    n_blk = (hi - lo + BLOCK_N - 1) // BLOCK_N
    n_full = tl.minimum(tl.maximum(hi - full_lo, 0) // BLOCK_N, n_blk)
    n_right = (tl.minimum(P - 1, S - hi) + BLOCK_N2 - 1) // BLOCK_N2   # narrow right-edge blocks
    j_min_r = tl.maximum(i_r - WB, -1)             # left edge of each row's window: keys j > j_min_r

    # running merge (2) per query, in base 2
    M_q = tl.full([NQ], -1.0e30, tl.float32)
    L_q = tl.full([NQ], 0.0, tl.float32)
    O_q = tl.full([NQ, BLOCK_DV], 0.0, tl.float32)

    if EDGE_DOT:                                   # P == 2: the one right-edge key i0 + 1, rows of p = 1
        # k_b[i0 + 1] as 16 identical rows (the smallest N of a tensor-core product), at an index
        # clamped into the sequence (sees_e drops the key when i0 + 1 = S); v_b[i0 + 1] is read
        # as a [1, D] row where it is used (a 2-D row broadcasts over the tile's rows without a
        # layout conversion; 1-D vectors went through shared memory: -6% on mha)
        j_e = i0 + 1
        j_e_ld = tl.minimum(j_e, S - 1)
        kb_e_ptr = kb_base + j_e_ld * stride_kbs + d[None, :] + tl.full([16, 1], 0, tl.int32)
        if EVEN_D:
            kb_e = tl.load(kb_e_ptr)
        else:
            kb_e = tl.load(kb_e_ptr, mask=d_ok[None, :], other=0.0)
        sees_e = (i_r == j_e) & (j_e < S)

    if ONE_CHUNK:                                  # ws <= T: a constant trip count lets the compiler
        n_chunk = 1                                # drop the chunk loop (and its registers) entirely
    else:
        n_chunk = (tl.minimum(WS, i0 + P) + T - 1) // T  # offsets t > i never exist
    for c in range(0, n_chunk):
        t_r = c * T + t_loc
        l_r = i_r - t_r                            # small-window key position
        row_ok = q_ok & (t_r < WS) & (l_r >= 0)
        # q is re-read per chunk (from cache) rather than kept live: fewer registers in the hot loop
        q_rows = tl.load(q_row_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ks_rows = tl.load(ks_base + l_r[:, None] * stride_kss + d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        vs_row_ptr = vs_base + l_r[:, None] * stride_vss + dv[None, :]
        if PREFETCH_VS:
            # issued with q and k_s, so that the tile waits for one memory latency before its first
            # key block, not two (v_s goes to the MMA layout before the loop); held until the merge
            vs_rows = tl.load(vs_row_ptr, mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        # (1): virtual query z = q * k_s, one rounding to the input dtype (a packed 16-bit multiply);
        # a negative scale is carried as -z, so qk_scale = |scale| log2(e) > 0 (see z_scaling)
        if NEG_Z:
            ks_rows = -ks_rows
        z = (q_rows * ks_rows).to(kb_ptr.dtype.element_ty)
        if EDGE_DOT:
            # s_e[r] = <z_r, k_b[i0 + 1]> (same rounded z) by a [BLOCK_M, 16] tensor-core product
            # (16 equal columns), not a row reduction of z * k_b[i0 + 1]: shorter before the first
            # key block, and with z used by two products of different widths Triton builds z
            # in the MMA operand layout once, in registers, instead of re-reading it from shared
            # memory in every key block (docs/kernels.md, The right-edge key)
            s_e = tl.where(sees_e, tl.reduce(tl.dot(z, tl.trans(kb_e), input_precision=DOT_PREC), 1, _MAX), -1.0e30)
            # the right-edge key's logit and weight enter the running (m, l) first (m = qk_scale
            # s_e, l = 1 for the rows that see it), so that only its value needs adding after
            # the loop, without rescaling acc; its value is not put into acc here because the
            # compiler then reduces the merge (2) by shuffles, which is slower
            m_i = tl.where(sees_e, s_e * qk_scale, -1.0e30)
            l_i = tl.where(sees_e, 1.0, 0.0)
        else:
            m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
        # stage 0: blocks k = 0 .. n_blk-1, [hi - (k+1) BLOCK_N, hi - k BLOCK_N), masked only from
        # n_full on (the left edge), in one loop so that Triton pipelines the edge block's loads
        # with the others (Triton pipelines each loop apart: a loop of its own would wait for its
        # first block's loads in full);
        # stage 1: the right edge [hi, hi + P - 1) in narrow blocks of BLOCK_N2 keys, masked.
        for stage in tl.static_range(2):
            if stage == 0:
                k_end = n_blk
            else:
                k_end = n_right if NARROW else 0
            for kb_i in range(0, k_end):
                if stage == 1:
                    j0 = hi + kb_i * BLOCK_N2
                    j = j0 + tl.arange(0, BLOCK_N2)
                else:
                    j0 = hi - (kb_i + 1) * BLOCK_N
                    j = j0 + tl.arange(0, BLOCK_N)
                if USE_TMA:
                    # the copy engine fetches the block of batch b, head hk (3-D view [B, S, Hkv*D]);
                    # rows outside [0, S) come back as zeros and are masked below
                    if stage == 1:
                        k_blk = tl.reshape(kb_desc2.load([b32, j0.to(tl.int32), hk * D]), [BLOCK_N2, BLOCK_D])
                        v_blk = tl.reshape(vb_desc2.load([b32, j0.to(tl.int32), hk * DV]), [BLOCK_N2, BLOCK_DV])
                    else:
                        k_blk = tl.reshape(kb_desc.load([b32, j0.to(tl.int32), hk * D]), [BLOCK_N, BLOCK_D])
                        v_blk = tl.reshape(vb_desc.load([b32, j0.to(tl.int32), hk * DV]), [BLOCK_N, BLOCK_DV])
                else:
                    j_ld = tl.minimum(tl.maximum(j, 0), S - 1)     # clamped; the mask drops repeats
                    if EVEN_D:
                        k_blk = tl.load(kb_base + j_ld[:, None] * stride_kbs + d[None, :])
                    else:
                        k_blk = tl.load(kb_base + j_ld[:, None] * stride_kbs + d[None, :], mask=d_ok[None, :],
                                        other=0.0)
                    if EVEN_DV:
                        v_blk = tl.load(vb_base + j_ld[:, None] * stride_vbs + dv[None, :])
                    else:
                        v_blk = tl.load(vb_base + j_ld[:, None] * stride_vbs + dv[None, :], mask=dv_ok[None, :],
                                        other=0.0)
                # s[r, j] = <z_r, k_b[j]>, so logit * log2(e) = qk_scale * s
                s = tl.dot(z, tl.trans(k_blk), input_precision=DOT_PREC)
                if stage == 0:
                    if kb_i >= n_full:             # left edge: j > i - wb and j >= 0 (j <= i0 <= i holds)
                        s = tl.where(j[None, :] > j_min_r[:, None], s, float("-inf"))
                else:                              # right edge: causal, and inside the window
                    s = tl.where((j[None, :] <= i_r[:, None]) & (j[None, :] > j_min_r[:, None]), s,
                                 float("-inf"))
                # online softmax (base 2, qk_scale > 0 so max commutes with it):
                # m' = max(m, qk_scale max_j s); acc = acc 2^(m-m') + 2^(qk_scale s - m') v_b
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX) * qk_scale)
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
                acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk, input_precision=DOT_PREC)
                m_i = m_new
        if EDGE_DOT:                               # the right-edge key's value: weight 2^(qk_scale s_e - m)
            p_e = tl.where(sees_e, tl.math.exp2(s_e * qk_scale - m_i), 0.0)
            if EVEN_DV:
                vb_e = tl.load(vb_base + j_e_ld * stride_vbs + dv[None, :]).to(tl.float32)
            else:
                vb_e = tl.load(vb_base + j_e_ld * stride_vbs + dv[None, :], mask=dv_ok[None, :], other=0.0).to(tl.float32)
            acc = acc + p_e[:, None] * vb_e

        # (2) for this chunk: y_r = v_s[l_r] * acc_r, merged over the T offsets of each query
        if not PREFETCH_VS:
            vs_rows = tl.load(vs_row_ptr, mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        m_r = tl.where(row_ok, m_i, -1.0e30)
        l_r_sum = tl.where(row_ok, l_i, 0.0)
        m3 = tl.reshape(m_r, [NQ, T])
        m_c = tl.reduce(m3, 1, _MAX)                          # max over the chunk's offsets
        a3 = tl.math.exp2(m3 - m_c[:, None])
        L_c = tl.reduce(a3 * tl.reshape(l_r_sum, [NQ, T]), 1, _SUM)
        # rows that do not exist get weight 0 (their acc is finite: z = 0 there), so y needs no
        # select of its own
        a_r = tl.where(row_ok, tl.reshape(a3, [BLOCK_M]), 0.0)
        O_c = tl.reduce(tl.reshape(acc * vs_rows * a_r[:, None], [NQ, T, BLOCK_DV]), 1, _SUM)
        # fold into the running merge across chunks
        M_new = tl.maximum(M_q, m_c)
        a_old = tl.math.exp2(M_q - M_new)
        a_new = tl.math.exp2(m_c - M_new)
        L_q = L_q * a_old + L_c * a_new
        O_q = O_q * a_old[:, None] + O_c * a_new[:, None]
        M_q = M_new

    # ---- epilogue: out = O / L, lse = (M + log2 L) ln 2 ----------------------------------------
    qq = tl.arange(0, NQ)
    i_q = i0 + qq // G
    hl_q = hblk * G + qq % G
    ok_q = (i_q < S) & (hl_q < GKV)
    h_q = hk * GKV + hl_q
    L_safe = tl.where(L_q > 0.0, L_q, 1.0)
    o = O_q / L_safe[:, None]
    tl.store(out_ptr + b * stride_ob + i_q[:, None] * stride_os + h_q[:, None] * stride_oh + dv[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok_q[:, None] & dv_ok[None, :])
    lse = (M_q + tl.math.log2(L_safe)) * 0.6931471805599453
    tl.store(lse_ptr + b * stride_lb + h_q * stride_lh + i_q, lse, mask=ok_q)


# The kernel is built lazily, once per mode: compiled (``triton.jit``) for CUDA tensors, the
# Triton interpreter for CPU tensors (chosen by the tensors' device, as in triton_bwd, so
# forward and backward always agree). The kernel calls no @triton.jit helpers of
# triton.language.standard (tl.cdiv, tl.zeros, tl.max, tl.sum), which the interpreter could
# not run from a compiled module; see _MAX / _SUM above.
_KERNELS: dict[bool, object] = {}


def _kernel(interpret: bool):
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _KERNELS[True] = InterpretedFunction(_two_simplicial_fwd_kernel)
        else:
            _KERNELS[False] = triton.jit(_two_simplicial_fwd_kernel)
    return _KERNELS[interpret]


def z_scaling(scale: float) -> tuple[bool, float]:
    """How the kernels (forward and backward alike) apply ``scale``: the virtual query is the
    plain product ``z = q * k_s`` (``-z`` for a negative scale: ``neg``), rounded once to the
    input dtype, and the base-2 logits are ``qk_scale * <z, k_b>`` with ``qk_scale = |scale| *
    log2(e) > 0``. A zero scale runs as 1e-30 (logits ~1e-28: the same uniform softmax in fp32)."""
    return scale < 0, max(abs(float(scale)), 1e-30) * LOG2E


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pack_rows(block_m: int, gkv: int, ws: int) -> tuple[int, int, int]:
    """Split ``block_m`` rows into ``(P, G, T)``: T (offsets per tile) takes as much of the
    small window as fits, then G takes query heads of the kv group, then P positions."""
    T = min(_pow2(ws), block_m)
    G = min(_pow2(gkv), block_m // T)
    return block_m // (T * G), G, T


def fwd_config(gkv: int, ws: int, D: int, Dv: int, interpret: bool, block_m: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               maxnreg: int | None = None, prefetch_vs: bool | None = None, int64_idx: bool = False,
               tma: bool | None = None, edge_dot: bool | None = None) -> dict:
    """Launch configuration. The defaults were chosen by measurement on Hopper (docs/kernels.md,
    Launch configuration): 64 rows and 4 warps (one warpgroup) beat 128 rows and 8 warps, because
    two such programs fit on an SM and overlap one's softmax with the other's matrix products. A small window wider than the
    tile (ws > T) makes the kernel loop over offset chunks, which costs registers (spills), so
    tiles grow to 128 rows to hold up to 128 offsets at once. The interpreter gets tiny tiles."""
    if interpret:
        dflt = (16, 16, 1, 1)
    elif max(D, Dv) > 128:
        dflt = (64, 32, 4, 2)
    elif ws > 64:
        dflt = (128, 64, 8, 3)
    else:
        dflt = (64, 64, 4, 3)
    block_m = block_m or dflt[0]
    P, G, T = pack_rows(block_m, gkv, ws)
    cfg = dict(BLOCK_N=block_n or dflt[1], P=P, G=G, T=T, num_warps=num_warps or dflt[2],
               num_stages=num_stages or dflt[3],
               prefetch_vs=bool(prefetch_vs) if prefetch_vs is not None else (not interpret and max(D, Dv) <= 128),
               int64_idx=int64_idx, tma=bool(tma) if tma is not None else not interpret,
               edge_dot=P == 2 and (edge_dot if edge_dot is not None else True))
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return cfg


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


def two_simplicial_fwd(q, k1, v1, k2, v2, w1: int, w2: int, scale: float, allow_tf32: bool, config: dict | None = None):
    """Forward of trilinear 2-simplicial attention.

    q ``[B, S, Hq, D]``; k1, k2 ``[B, S, Hkv, D]``; v1, v2 ``[B, S, Hkv, Dv]`` (any strides;
    a non-unit last stride is made contiguous). Returns ``(out [B, S, Hq, Dv] in q.dtype,
    lse [B, Hq, S] float32)``. fp32 inputs use tf32 tensor cores only when ``allow_tf32``.
    ``config`` (keys of :func:`fwd_config`: block_m, block_n, num_warps, num_stages)
    overrides the default launch configuration, for tuning. The window roles come from
    :func:`~twosimplicial.ops.plan.make_plan`, as in the backward.
    """
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, allow_tf32)
    return canonical_fwd(plan, q, *plan.split(k1, v1, k2, v2), scale, config)


def canonical_fwd(plan: Plan, q, ks, vs, kb, vb, scale: float, config: dict | None = None):
    """:func:`two_simplicial_fwd` on the canonical problem: ``(ks, vs)`` over the small window
    ``plan.ws``, ``(kb, vb)`` over the big window ``plan.wb``."""
    B, S, Hq, Hkv, D, Dv, ws, wb = plan.B, plan.S, plan.Hq, plan.Hkv, plan.D, plan.Dv, plan.ws, plan.wb
    q, kb, vb, ks, vs = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, kb, vb, ks, vs))
    out = torch.empty((B, S, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    if plan.empty:
        return out, lse
    gkv = plan.G
    interpret = q.device.type != "cuda"
    cfg = fwd_config(gkv, ws, D, Dv, interpret, **(config or {}))
    P, G = cfg["P"], cfg["G"]
    n_hblk = triton.cdiv(gkv, G)
    grid = (triton.cdiv(S, P) * n_hblk, B * Hkv)
    block_n2 = min(cfg["BLOCK_N"], max(16, _pow2(P - 1)))
    # (the narrow pair is built even when unused: the kernel body that reads it is compiled anyway)
    descs = [_kv_desc(t, n) for n in (cfg["BLOCK_N"], block_n2) for t in (kb, vb)] if cfg["tma"] else [None]
    use_tma = all(d is not None for d in descs)
    neg_z, qk_scale = z_scaling(scale)
    _kernel(interpret)[grid](
        q, ks, vs, kb, vb, *(descs if use_tma else (kb, vb, kb, vb)), out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        kb.stride(0), kb.stride(1), kb.stride(2),
        vb.stride(0), vb.stride(1), vb.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        S, Hkv, gkv, n_hblk, ws, wb, qk_scale,
        D=D, DV=Dv, BLOCK_D=max(16, _pow2(D)), BLOCK_DV=max(16, _pow2(Dv)),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_N2=block_n2,
        P=P, G=G, T=cfg["T"], DOT_PREC=plan.precision, ONE_CHUNK=ws <= cfg["T"], PREFETCH_VS=cfg["prefetch_vs"],
        INT64_IDX=cfg["int64_idx"] or max(t.stride(1) * S for t in (q, ks, vs, kb, vb, out)) >= 2 ** 31,
        USE_TMA=use_tma, EDGE_DOT=cfg["edge_dot"], NEG_Z=neg_z, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
    )
    return out, lse

"""Warp-specialised keys kernel of the backward (Gluon, Hopper): a prototype of the issue-18 lead.

Computes what :func:`.bwd._bwd_big_keys` computes, ``dk_b`` and ``dv_b`` of a block of ``2 KN =
128`` big-window keys of one (batch, kv head) from every virtual row that sees them (positions
``j0 <= i < j0 + 127 + wb``, all query heads of the group, all offsets; :mod:`.bwd`'s docstring
has the math), with the work of a program split over partitions:

- the *builder* (the default partition, 4 warps) walks the row tiles in the Triton kernel's
  order (head blocks, then positions, then offset chunks), gathers ``q``, ``k_s``, ``dO`` and
  ``v_s``, forms ``z = q * k_s`` and ``dO' = dO * v_s`` (one rounding to the input dtype each,
  as everywhere) and the rows' ``Lse * log2(e)`` and ``Delta``, and stores them into a ring of
  ``NS`` slots in shared memory (with ``stage``, the factors come a tile ahead by ``cp.async``
  and are multiplied in shared memory: a builder of few registers keeps its loads in flight);
- two *consumers* (one warpgroup each) own ``KN = 64`` keys of the block each: their ``k_b``,
  ``v_b`` in shared memory, their ``dk_b``, ``dv_b`` accumulators in registers. Per tile:
  ``S^T = k_b z^T``, ``dP^T = v_b dO'^T``, ``P^T``, ``dS^T = P^T (dP^T - Delta)``, then
  ``dv_b += P^T dO'`` and ``dk_b += dS^T z``: the Triton kernel's four products per (row, key).
  Both consumers read every slot; the builder refills a slot once both have released it.

Why: the Triton kernel's 8 warps form ``z``, ``dO'`` and run the exponentials in step, so the
tensor cores wait while they do (one program per SM: its accumulators fill the registers).
Here the builder forms the next tiles while the consumers compute, and the two consumers, not
synchronised with each other, can run one's exponentials under the other's products. The
Triton kernel with 4 warps and 64 keys per program (two programs per SM, 1.35-1.64x slower,
docs/kernels.md, Tried and dropped) formed every tile once per 64 keys; the builder forms it
once for both consumers' 128.

Scope (:data:`SCOPE`, :func:`supports`): the trilinear form, 16-bit CUDA inputs, head dims
``D = Dv`` in (64, 128), 32-bit offsets within a batch. Any windows (the offsets are walked in
chunks, as in the Triton kernel). Not dispatched: ``config={"ws": {...}}`` of
:func:`.bwd.two_simplicial_bwd` runs it in place of the Triton keys kernel (the rows kernel is
unchanged), for tests and benchmarks (docs/kernels.md, The warp-specialised keys kernel).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

from ..plan import Plan
from . import gluon_common
from .common import kernel, z_scaling
from .gluon_common import cp_async, in_scope, issue_turn, pass_turn, rows_layout, thread_barrier, tile_rows

KN = 64        # keys per consumer (one warpgroup's wgmma M); a program owns 2 KN
BM = 64        # virtual rows per tile (the products' N and K)
NS = 2         # tiles in flight (ring slots)


@gluon.jit
def _program(dims, BI: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr, KN: gl.constexpr):
    """This program's batch (int64), kv head and first key ``j0``, and its walk's sizes: offset
    chunks per position ``n_t``, position tiles ``n_pt`` (positions ``j0 .. j0 + 2 KN - 2 + wb``
    inside the sequence) and tiles in all ``n_tiles`` (times the head blocks)."""
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale = dims
    pid_bg = gl.program_id(0)
    j0 = gl.program_id(1) * (2 * KN)
    n_t = (WS + BT - 1) // BT
    n_pt = (gl.minimum(S, j0 + 2 * KN - 1 + WB) - j0 + BI - 1) // BI
    return (pid_bg // HKV).to(gl.int64), pid_bg % HKV, j0, n_t, n_pt, ((GQA + BH - 1) // BH) * n_pt * n_t


@gluon.jit
def _walk(k, j0, n_t, n_pt, BI: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr):
    """Tile ``k`` of a program's flat walk: ``(h0, i0, t0)``, its first head inside the group,
    first position and first offset; head blocks slowest, then positions (``n_pt`` tiles of
    ``BI``), offset chunks (``n_t`` of ``BT``) fastest, as :func:`.bwd._bwd_big_keys` walks."""
    hb = k // (n_pt * n_t)
    rem = k % (n_pt * n_t)
    return hb * BH, j0 + (rem // n_t) * BI, (rem % n_t) * BT


@gluon.jit
def _row_ptrs(ins, b, hk, h0, i0, t0, r0, dims, D: gl.constexpr, BR: gl.constexpr, BH: gl.constexpr,
              BT: gl.constexpr, VALUES: gl.constexpr):
    """Rows ``r0 .. r0 + BR`` of a tile (``r = (p BH + hh) BT + tt``, offset fastest), in the
    builder's layout: pointers to the two factors of ``z`` (``q``, ``k_s``) or, with ``VALUES``,
    of ``dO'`` (``dO``, ``v_s``; ``D`` is then the value head dim), and the rows that exist:
    the others (offset past ``ws`` or before the sequence, position past ``S``, head past the
    group) get 0, so they add nothing to ``dk_b``, ``dv_b``."""
    Q, KS, VS, DO, LSE, DELTA, sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2, sdo0, sdo1, sdo2 = ins
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale = dims
    layout: gl.constexpr = rows_layout(D)
    r = r0 + gl.arange(0, BR, layout=gl.SliceLayout(1, layout))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    ii, hl, l, ok = tile_rows(r, i0, h0, t0, S, GQA, WS, BH, BT)
    ok = ok[:, None]
    hq = hk * GQA + hl
    if VALUES:
        x = DO + b * sdo0 + ii[:, None] * sdo1 + hq[:, None] * sdo2 + dd[None, :]
        y = VS + b * svs0 + l[:, None] * svs1 + hk * svs2 + dd[None, :]
    else:
        x = Q + b * sq0 + ii[:, None] * sq1 + hq[:, None] * sq2 + dd[None, :]
        y = KS + b * sks0 + l[:, None] * sks1 + hk * sks2 + dd[None, :]
    return x, y, ok


@gluon.jit
def _product(x, y, NEG: gl.constexpr):
    """``x * y`` (``-x * y`` if ``NEG``) in fp32, rounded once to the inputs' dtype."""
    if NEG:
        y = -y
    return (x.to(gl.float32) * y.to(gl.float32)).to(x.dtype)


@gluon.jit
def _gather_rows(ins, b, hk, h0, i0, t0, r0, dims, D: gl.constexpr, BR: gl.constexpr, BH: gl.constexpr,
                 BT: gl.constexpr, VALUES: gl.constexpr, NEG_Z: gl.constexpr):
    """Rows ``r0 .. r0 + BR`` of a tile's ``z`` or, with ``VALUES``, ``dO'`` (:func:`_row_ptrs`)."""
    x, y, ok = _row_ptrs(ins, b, hk, h0, i0, t0, r0, dims, D, BR, BH, BT, VALUES)
    return _product(gl.load(x, mask=ok, other=0.0), gl.load(y, mask=ok, other=0.0), NEG_Z and not VALUES)


@gluon.jit
def _copy_tile(ins, b, hk, h0, i0, t0, dims, zs, ds_, kst, vst, D: gl.constexpr, DV: gl.constexpr,
               BR: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr):
    """``STAGE``: a tile's factors by ``cp.async`` (no registers held while they are in flight),
    ``q`` into its ``z`` slot ``zs``, ``k_s`` into ``kst``, ``dO`` into its ``dO'`` slot ``ds_``,
    ``v_s`` into ``vst``; rows that do not exist are zero-filled. One commit group."""
    for c in gl.static_range(BM // BR):
        x, y, ok = _row_ptrs(ins, b, hk, h0, i0, t0, c * BR, dims, D, BR, BH, BT, False)
        cp_async(zs.slice(c * BR, BR), x, mask=ok)
        cp_async(kst.slice(c * BR, BR), y, mask=ok)
        x, y, ok = _row_ptrs(ins, b, hk, h0, i0, t0, c * BR, dims, DV, BR, BH, BT, True)
        cp_async(ds_.slice(c * BR, BR), x, mask=ok)
        cp_async(vst.slice(c * BR, BR), y, mask=ok)
    async_copy.commit_group()


@gluon.jit
def _form_in_place(xs, ys, D: gl.constexpr, BR: gl.constexpr, BM: gl.constexpr, NEG: gl.constexpr):
    """``STAGE``: ``xs <- xs * ys`` (:func:`_product`), ``BR`` rows at a time."""
    layout: gl.constexpr = rows_layout(D)
    for c in gl.static_range(BM // BR):
        x = xs.slice(c * BR, BR).load(layout)
        xs.slice(c * BR, BR).store(_product(x, ys.slice(c * BR, BR).load(layout), NEG))


@gluon.jit
def _rows_stats(LSE, DELTA, b, hk, h0, i0, dims, BH: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr):
    """A tile's per-row ``Lse log2(e)`` and ``Delta`` (per position and head); rows outside the
    problem get lse = inf, so P = dS = 0 there."""
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale = dims
    ii, hl, _l, _ok = tile_rows(gl.arange(0, BM, layout=gl.BlockedLayout([1], [32], [4], [0])), i0, h0, 0, S, GQA, WS,
                                BH, BT)
    qok = (ii < S) & (hl < GQA)
    row = (b * HQ + hk * GQA + hl) * S + ii
    return (gl.load(LSE + row, mask=qok, other=float("inf")) * 1.4426950408889634,
            gl.load(DELTA + row, mask=qok, other=0.0))


@gluon.jit
def _builder(ins, bufs, bars, dims, NEG_Z: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, BI: gl.constexpr,
             BH: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr, BR: gl.constexpr, KN: gl.constexpr,
             NS: gl.constexpr, STAGE: gl.constexpr):
    """Default partition: every tile's ``z``, ``dO'``, ``Lse log2(e)`` and ``Delta`` into ring
    slot ``k % NS`` once both consumers have released the slot's previous tile. ``z``, ``dO'``
    in chunks of ``BR`` rows (which bounds the builder's registers): gathered and multiplied in
    registers, or with ``STAGE`` copied by ``cp.async`` (tile k + 1's issued before tile k is
    formed: ``q`` and ``dO`` into the ring slot itself, ``k_s`` and ``v_s`` into one of two
    staging buffers) and multiplied in place."""
    LSE, DELTA = ins[4], ins[5]
    zbuf, dbuf, lbuf, tbuf, kbuf, vbuf, kst, vst = bufs
    ready, empty, _turn = bars
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale = dims
    b, hk, j0, n_t, n_pt, n_tiles = _program(dims, BI, BH, BT, KN)
    if STAGE:                                       # tile 0's copies (a fresh slot: phase 1 passes at once)
        h0, i0, t0 = _walk(0, j0, n_t, n_pt, BI, BH, BT)
        mbarrier.wait(empty.index(0), 1)
        _copy_tile(ins, b, hk, h0, i0, t0, dims, zbuf.index(0), dbuf.index(0), kst.index(0), vst.index(0),
                   D, DV, BR, BH, BT, BM)
    for k in range(n_tiles):
        h0, i0, t0 = _walk(k, j0, n_t, n_pt, BI, BH, BT)
        slot = k % NS
        lse2, dlt = _rows_stats(LSE, DELTA, b, hk, h0, i0, dims, BH, BT, BM)
        if STAGE:
            # tile k + 1's copies, into its slot once released and the staging buffer tile k - 1
            # was formed from (every thread was past that before tile k - 1's ready arrive)
            if k + 1 < n_tiles:
                h0n, i0n, t0n = _walk(k + 1, j0, n_t, n_pt, BI, BH, BT)
                nxt = (k + 1) % NS
                mbarrier.wait(empty.index(nxt), (((k + 1) // NS) & 1) ^ 1)
                _copy_tile(ins, b, hk, h0n, i0n, t0n, dims, zbuf.index(nxt), dbuf.index(nxt), kst.index((k + 1) % 2),
                           vst.index((k + 1) % 2), D, DV, BR, BH, BT, BM)
            else:
                async_copy.commit_group()           # an empty group: tile k's is always the second newest
            async_copy.wait_group(1)                # this thread's copies of tile k have landed,
            thread_barrier()                       # and every thread's
            _form_in_place(zbuf.index(slot), kst.index(k % 2), D, BR, BM, NEG_Z)
            _form_in_place(dbuf.index(slot), vst.index(k % 2), DV, BR, BM, False)
        else:
            mbarrier.wait(empty.index(slot), ((k // NS) & 1) ^ 1)     # phase 1 passes at once: a fresh slot
            for c in gl.static_range(BM // BR):
                z = _gather_rows(ins, b, hk, h0, i0, t0, c * BR, dims, D, BR, BH, BT, False, NEG_Z)
                zbuf.index(slot).slice(c * BR, BR).store(z)
                dop = _gather_rows(ins, b, hk, h0, i0, t0, c * BR, dims, DV, BR, BH, BT, True, NEG_Z)
                dbuf.index(slot).slice(c * BR, BR).store(dop)
        lbuf.index(slot).store(lse2)
        tbuf.index(slot).store(dlt)
        fence_async_shared()                                          # z, dO' are read by wgmma
        mbarrier.arrive(ready.index(slot), count=1)


@gluon.jit
def _consumer(cid, outs, bufs, bars, dims, D: gl.constexpr, DV: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr,
              BT: gl.constexpr, BM: gl.constexpr, KN: gl.constexpr, NS: gl.constexpr, PINGPONG: gl.constexpr):
    """Worker partition (one warpgroup): keys ``j0 + cid KN .. + KN`` of the program's block
    against every tile of the ring; stores their ``dk_b`` (times ``|scale|``: ``z`` carries the
    scale's sign) and ``dv_b``. With ``PINGPONG`` the two consumers issue their groups of
    products (``S^T``, ``dP^T``; ``dv_b``, ``dk_b``) in turn, so that one's exponentials run
    while the other's products do (FA3's ping-pong; both read the same tiles, and without it
    they tend to compute in step)."""
    KB, VB, DKB, DVB, skb0, skb1, skb2, svb0, svb1, svb2, sdk0, sdk1, sdk2, sdv0, sdv1, sdv2 = outs
    zbuf, dbuf, lbuf, tbuf, kbuf, vbuf, kst, vst = bufs
    ready, empty, turn = bars
    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale = dims
    dtype: gl.constexpr = zbuf.dtype
    b, hk, j0, n_t, n_pt, n_tiles = _program(dims, BI, BH, BT, KN)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    k_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    v_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    a_k: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=k_layout, k_width=2)
    a_v: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=v_layout, k_width=2)

    # the consumer's keys, once: k_b, v_b into shared memory (the A operands of S^T, dP^T)
    ld_k: gl.constexpr = rows_layout(D)
    ld_v: gl.constexpr = rows_layout(DV)
    jl = j0 + cid * KN + gl.arange(0, KN, layout=gl.SliceLayout(1, ld_k))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, ld_k))
    kbuf.index(cid).store(gl.load(KB + b * skb0 + jl[:, None] * skb1 + hk * skb2 + dd[None, :], mask=(jl < S)[:, None],
                                  other=0.0))
    jl = j0 + cid * KN + gl.arange(0, KN, layout=gl.SliceLayout(1, ld_v))
    ee = gl.arange(0, DV, layout=gl.SliceLayout(0, ld_v))
    vbuf.index(cid).store(gl.load(VB + b * svb0 + jl[:, None] * svb1 + hk * svb2 + ee[None, :], mask=(jl < S)[:, None],
                                  other=0.0))
    fence_async_shared()
    kb = kbuf.index(cid)
    vb = vbuf.index(cid)

    jj = j0 + cid * KN + gl.arange(0, KN, layout=gl.SliceLayout(1, s_layout))
    p_col = gl.arange(0, BM, layout=gl.SliceLayout(0, s_layout)) // (BH * BT)   # position of each row in the tile
    s_zero = gl.zeros([KN, BM], gl.float32, s_layout)
    dk = gl.zeros([KN, D], gl.float32, k_layout)
    dv = gl.zeros([KN, DV], gl.float32, v_layout)
    for k in range(n_tiles):
        _h0, i0, _t0 = _walk(k, j0, n_t, n_pt, BI, BH, BT)
        slot = k % NS
        mbarrier.wait(ready.index(slot), (k // NS) & 1)
        zs = zbuf.index(slot)
        ds_ = dbuf.index(slot)
        # S^T = k_b z^T and dP^T = v_b dO'^T, both issued before either is waited for
        issue_turn(turn, cid, 2 * k, PINGPONG)
        sT = warpgroup_mma(kb, zs.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpT = warpgroup_mma(vb, ds_.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        pass_turn(turn, cid, PINGPONG)
        lse2 = lbuf.index(slot).load(gl.SliceLayout(0, s_layout))
        dlt = tbuf.index(slot).load(gl.SliceLayout(0, s_layout))
        sT = warpgroup_mma_wait(1, deps=(sT, ))
        # P^T = exp2(qk_scale S^T - Lse_i log2 e) (clamped at 0: P <= 1), zero outside the
        # windows: key j is in row r's window iff 0 <= i_r - j < wb (keys past S are never stored)
        d_ij = (i0 + p_col)[None, :] - jj[:, None]
        pT = gl.exp2(gl.minimum(sT * qk_scale - lse2[None, :], 0.0))
        pT = gl.where((d_ij >= 0) & (d_ij < WB), pT, 0.0)
        dpT = warpgroup_mma_wait(0, deps=(dpT, ))
        dsT = pT * (dpT - dlt[None, :])
        # dv_b += P^T dO';  dk_b += dS^T z
        pT = gl.convert_layout(pT.to(dtype), a_v)
        dsT = gl.convert_layout(dsT.to(dtype), a_k)
        issue_turn(turn, cid, 2 * k + 1, PINGPONG)
        dv = warpgroup_mma(pT, ds_, dv, is_async=True)
        dk = warpgroup_mma(dsT, zs, dk, is_async=True)
        pass_turn(turn, cid, PINGPONG)
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(empty.index(slot), count=1)

    # dk_b = scale * sum dS (q * k_s) = |scale| * sum dS z  (z carries the sign of scale)
    dk = dk * dk_scale
    jk = j0 + cid * KN + gl.arange(0, KN, layout=gl.SliceLayout(1, k_layout))
    dk_cols = gl.arange(0, D, layout=gl.SliceLayout(0, k_layout))
    gl.store(DKB + b * sdk0 + jk[:, None] * sdk1 + hk * sdk2 + dk_cols[None, :], dk.to(DKB.dtype.element_ty),
             mask=(jk < S)[:, None])
    jv = j0 + cid * KN + gl.arange(0, KN, layout=gl.SliceLayout(1, v_layout))
    dv_cols = gl.arange(0, DV, layout=gl.SliceLayout(0, v_layout))
    gl.store(DVB + b * sdv0 + jv[:, None] * sdv1 + hk * sdv2 + dv_cols[None, :], dv.to(DVB.dtype.element_ty),
             mask=(jv < S)[:, None])


@gluon.jit
def _keys_ws_kernel(Q, KS, VS, KB, VB, DO, LSE, DELTA, DKB, DVB,
                    sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2, skb0, skb1, skb2, svb0, svb1, svb2,
                    sdo0, sdo1, sdo2, sdk0, sdk1, sdk2, sdv0, sdv1, sdv2,
                    S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale,
                    NEG_Z: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr,
                    BT: gl.constexpr, BM: gl.constexpr, BR: gl.constexpr, KN: gl.constexpr, NS: gl.constexpr,
                    STAGE: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    zbuf = gl.allocate_shared_memory(dtype, [NS, BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], dtype))
    dbuf = gl.allocate_shared_memory(dtype, [NS, BM, DV], gl.NVMMASharedLayout.get_default_for([BM, DV], dtype))
    row_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])    # per slot: one row of BM
    lbuf = gl.allocate_shared_memory(gl.float32, [NS, BM], row_smem)
    tbuf = gl.allocate_shared_memory(gl.float32, [NS, BM], row_smem)
    kbuf = gl.allocate_shared_memory(dtype, [2, KN, D], gl.NVMMASharedLayout.get_default_for([KN, D], dtype))
    vbuf = gl.allocate_shared_memory(dtype, [2, KN, DV], gl.NVMMASharedLayout.get_default_for([KN, DV], dtype))
    if STAGE:                                       # k_s, v_s rows of two tiles (the builder's cp.async)
        kst = gl.allocate_shared_memory(dtype, [2, BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], dtype))
        vst = gl.allocate_shared_memory(dtype, [2, BM, DV], gl.NVMMASharedLayout.get_default_for([BM, DV], dtype))
    else:                                           # stand-ins, unused
        kst = zbuf
        vst = dbuf
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)          # released by both consumers
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # PINGPONG
    for c in gl.static_range(2):
        mbarrier.init(turn.index(c), count=1)
    ins = (Q, KS, VS, DO, LSE, DELTA, sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2, sdo0, sdo1, sdo2)
    outs = (KB, VB, DKB, DVB, skb0, skb1, skb2, svb0, svb1, svb2, sdk0, sdk1, sdk2, sdv0, sdv1, sdv2)
    bufs = (zbuf, dbuf, lbuf, tbuf, kbuf, vbuf, kst, vst)
    bars = (ready, empty, turn)
    dims = (S, HQ, HKV, GQA, WS, WB, qk_scale, dk_scale)
    gl.warp_specialize([(_builder, (ins, bufs, bars, dims, NEG_Z, D, DV, BI, BH, BT, BM, BR, KN, NS, STAGE)),
                        (_consumer, (0, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, KN, NS, PINGPONG)),
                        (_consumer, (1, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, KN, NS, PINGPONG))],
                       [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


SCOPE = f"{gluon_common.SCOPE}, and 32-bit offsets within a batch"


def supports(plan: Plan, form: str, q, ks, vs, kb, vb, do) -> bool:
    """Whether :func:`keys_ws` takes this problem (:data:`SCOPE`)."""
    if not in_scope(plan, form, q):
        return False
    reach = plan.S + 2 * KN + plan.wb         # positions a program's tiles index, past the sequence included
    return all(reach * t.stride(1) + (t.shape[2] + 1) * t.stride(2) < 2 ** 31 for t in (q, ks, vs, kb, vb, do))


def keys_ws(q, ks, vs, kb, vb, do, lse, delta, dkb, dvb, ws: int, wb: int, scale: float, tile: tuple[int, int, int],
            stages: int = NS, stage: bool = False, pingpong: bool = False, builder_rows: int | None = None,
            consumer_regs: int | None = None, maxnreg: int | None = None):
    """``dkb``, ``dvb`` (written) of the canonical problem, as :func:`.bwd._launch`'s keys kernel
    (same inputs: ``lse`` with the marked rows at +inf, ``delta`` from ``_delta``). ``tile`` is
    ``(BI, BH, BT)`` of :func:`.bwd.bwd_config`'s keys-kernel tile (``BI BH BT = 64`` rows).
    Knobs: ``stages`` (ring slots, at least 2), ``stage`` (the builder copies the factors of
    ``z``, ``dO'`` with ``cp.async``, a tile ahead, and multiplies them in shared memory: no
    registers held while loads are in flight), ``pingpong`` (the consumers issue their products
    in turn), ``builder_rows`` (rows the builder gathers at a time: a divisor of 64, at least
    8), the consumers' registers (the builder gets what the
    kernel's ``maxnreg`` leaves: 40 at D = 128, where the consumers' accumulators take 232, and
    136 at D = 64) and ``maxnreg``. The defaults had the fewest spills under ptxas (triton 3.6):
    at D = 128 8-row chunks (one 16-byte load per thread and tensor), 32-56 bytes (consumer
    scalars, outside the products), or with ``stage`` 32-row chunks (fewer partition barriers;
    36-72 bytes); at D = 64 32-row chunks, none. ``stage`` with 3 stages at D = 128 takes
    231,232 of the 232,448 bytes of shared memory a block may have (``metadata.shared``)."""
    B, S, HQ, D = q.shape
    HKV, DV = kb.shape[2], vb.shape[3]
    BI, BH, BT = tile
    wide = max(D, DV) > 64
    builder_rows = builder_rows or (8 if wide and not stage else 32)
    consumer_regs = consumer_regs or (232 if wide else 184)
    if BI * BH * BT != BM:
        raise ValueError(f"tile: expected (BI, BH, BT) of {BM} rows, got {tile}")
    if stages < 2:
        raise ValueError(f"stages: expected at least 2 ring slots, got {stages}")
    if builder_rows < 8 or BM % builder_rows:
        raise ValueError(f"builder_rows: expected a divisor of {BM} of at least 8, got {builder_rows}")
    neg_z, qk_scale = z_scaling(scale)
    grid = (B * HKV, triton.cdiv(S, 2 * KN))
    kernel(_keys_ws_kernel, q.device)[grid](
        q, ks, vs, kb, vb, do, lse, delta, dkb, dvb,
        *q.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], *kb.stride()[:3], *vb.stride()[:3],
        *do.stride()[:3], *dkb.stride()[:3], *dvb.stride()[:3],
        S, HQ, HKV, HQ // HKV, ws, wb, qk_scale, abs(float(scale)),
        NEG_Z=neg_z, D=D, DV=DV, BI=BI, BH=BH, BT=BT, BM=BM, BR=builder_rows, KN=KN, NS=stages, STAGE=stage, PINGPONG=pingpong,
        CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=maxnreg or 168)

"""Warp-specialised forward (Gluon, Hopper): a prototype of the issue-18 lead.

Same math and tile as :mod:`.fwd` (virtual rows ``z[i, t] = q_i * k_s[i - t]`` against the big
window, the offsets of a query merged as split-KV decoding merges its splits), same outputs
(``out``, ``lse``, the non-finite marks), but the work of a program is split over partitions:

- the *builder* (the default partition, 4 warps) gathers ``q``, ``k_s`` and ``v_s`` rows for the
  next tile of each consumer, forms ``z`` (one rounding to the input dtype) and writes ``z`` and
  ``v_s`` to shared memory: the gathers and the products that were each tile's fixed cost leave
  the consumers' instruction streams;
- ``NCONS`` (2 or 3) *consumers* (4 warps each, one warpgroup) walk the program's work units
  over a persistent grid. A unit is one tile (consumer ``c`` takes the program's units ``c, c +
  NCONS, ...`` and refills its own ring of ``NS`` key / value blocks through the copy engine,
  across tile boundaries), or with ``PAIRS`` a pair of tiles that see the same keys, one per
  consumer, whose key / value blocks the builder loads once into one ring that both read: two
  head blocks of one position (``PAIRS == 1``, GQA) or two neighbouring position blocks
  (``PAIRS == 2``, the pair's window one block wider than a tile's at most). Each key block is
  then read from L2 once per 128 rows instead of once per 64. With ``OVERLAP`` each consumer
  runs a block's softmax while the previous block's ``P V`` is in flight (FA3's order), and with
  ``PINGPONG`` the two consumers of a pair issue their products in turn.

Key blocks of a unit (positions ``first .. last``) are anchored at ``first + 1`` and walk left,
as :mod:`.fwd`'s: every key is at or before every row's position, and only the blocks past the
left edge of some row's window are masked. A unit of several positions (``EDGE``) has right-edge
keys ``first + 1 .. last``, seen by some of its rows: each consumer loads them as one narrow
block of ``BE`` keys at the start of the unit and folds them into its online softmax after the
main blocks (once per tile; a whole extra block of 64 keys for them cost 1/8 of MHA's work).

Scope (:data:`SCOPE`, :func:`supports`): one offset chunk (``ws <= BT``), the trilinear form,
16-bit inputs, head dims 64 or 128, contiguous ``[B, S, H, D]`` keys and values. Not
dispatched: ``config={"ws": {...}}`` of :func:`.fwd.two_simplicial_fwd` runs it, for tests and
benchmarks (docs/kernels.md, The warp-specialised forward).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..plan import Plan
from . import gluon_common
from .common import kernel, pack_rows, sm_count, z_scaling
from .fwd import _window_holds
from .gluon_common import in_scope, issue_turn, pass_turn, rows_layout, tile_rows, tma_load

BM = 64        # virtual rows per tile (one warpgroup's wgmma M)
BN = 64        # keys per block
NS = 2         # key / value blocks in flight per consumer


@gluon.jit
def _unit(g, c, dims, BI: gl.constexpr, PAIRS: gl.constexpr):
    """Consumer ``c``'s tile of work unit ``g``: ``(b, hk, hblk, i0, first, last)``, its batch, kv
    head, head block and first position, and the first and last positions of the unit (whose
    key blocks it walks). Units are ordered as :mod:`.fwd`'s grid (head blocks fastest)."""
    S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale = dims
    bh = g // n_ph
    r = g % n_ph
    if PAIRS == 1:                                 # head blocks 2h, 2h + 1 of one position (BI = 1)
        hblk = (r % (NHB // 2)) * 2 + c
        i0 = r // (NHB // 2)
        first = i0
        last = i0
    elif PAIRS == 2:                               # position blocks 2p, 2p + 1 (one head block)
        hblk = r * 0
        first = r * (2 * BI)
        i0 = first + c * BI
        last = first + 2 * BI - 1
    else:                                          # one tile
        hblk = r % NHB
        i0 = (r // NHB) * BI
        first = i0
        last = i0 + BI - 1
    return bh // HKV, bh % HKV, hblk, i0, first, last


@gluon.jit
def _blocks(first, last, WB, BN: gl.constexpr):
    """Key blocks of positions ``first .. last``, ``[first + 1 - (k + 1) BN, first + 1 - k BN)``:
    ``(n_blk, n_full)``; blocks ``k >= n_full`` hold keys past the left edge of some row's window
    (or before the sequence)."""
    hi = first + 1
    lo = gl.maximum(first - WB + 1, 0)
    n_blk = (hi - lo + BN - 1) // BN
    full_lo = gl.maximum(last + 1 - WB, 0)         # keys in [full_lo, first] are in every row's window
    return n_blk, gl.minimum(gl.maximum(hi - full_lo, 0) // BN, n_blk)


@gluon.jit
def _gather(ins, b, hk, hblk, i0, S, GQA, WS, D: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr,
            BM: gl.constexpr, VALUES: gl.constexpr, NEG_Z: gl.constexpr):
    """A tile's ``z`` (one rounding to the input dtype), or with ``VALUES`` its ``v_s`` rows
    (``D`` is then the value head dim), in the builder's layout; rows ``r = (p BH + h) BT + t``."""
    Q, KS, VS, sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2 = ins
    layout: gl.constexpr = rows_layout(D)
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    ii, hg, l, ok = tile_rows(r, i0, hblk * BH, 0, S, GQA, WS, BH, BT)
    ok = ok[:, None]
    if VALUES:
        return gl.load(VS + b * svs0 + l[:, None] * svs1 + hk * svs2 + dd[None, :], mask=ok, other=0.0)
    q = gl.load(Q + b * sq0 + ii[:, None] * sq1 + (hk * GQA + hg)[:, None] * sq2 + dd[None, :], mask=ok,
                other=0.0).to(gl.float32)
    ks = gl.load(KS + b * sks0 + l[:, None] * sks1 + hk * sks2 + dd[None, :], mask=ok, other=0.0).to(gl.float32)
    if NEG_Z:
        ks = -ks
    return (ks * q).to(Q.dtype.element_ty)


@gluon.jit
def _my_unit(u, pid, nprog, cid, NCONS: gl.constexpr, PAIRS: gl.constexpr):
    """Index of the consumer's ``u``-th work unit: the program's pair ``u`` with ``PAIRS``, else
    the program's tile ``cid + NCONS u``."""
    if PAIRS != 0:
        g = pid + u * nprog
    else:
        g = pid + (cid + NCONS * u) * nprog
    return g


@gluon.jit
def _hand_over(bufs, empty, ready, i, phase, x, ASYNC_READER: gl.constexpr):
    """Store ``x`` into buffer ``i`` once its reader has released the previous contents (phase
    ``phase`` of ``empty``; barriers start in phase 0, so waiting on phase 1 passes at once), then
    signal ``ready``; a reader through the async proxy (wgmma) needs the fence between."""
    mbarrier.wait(empty.index(i), phase ^ 1)
    bufs.index(i).store(x)
    if ASYNC_READER:
        fence_async_shared()
    mbarrier.arrive(ready.index(i), count=1)


@gluon.jit
def _builder(ins, bufs, bars, dims, NEG_Z: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, BI: gl.constexpr,
             BH: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr, NCONS: gl.constexpr):
    """Default partition: ``z`` and ``v_s`` of the program's tiles, in order, into the buffers of
    the consumer that takes each (``k % NCONS``), once that consumer has released them (with
    one ``v_s`` buffer, it serves the consumers in turn, released by each merge)."""
    zbuf, vsbuf, kbuf, vbuf, pbuf, kebuf, vebuf = bufs
    z_ready, z_empty, vs_ready, vs_empty, kv_ready, kv_empty, turn, edge_ready = bars
    S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale = dims
    N_VS: gl.constexpr = vsbuf.type.shape[0]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_local = (T - pid + nprog - 1) // nprog
    for k in range(n_local):
        c = k % NCONS
        ph = (k // NCONS) & 1
        b, hk, hblk, i0, _first, _last = _unit(pid + k * nprog, 0, dims, BI, 0)
        b = b.to(gl.int64)
        z = _gather(ins, b, hk, hblk, i0, S, GQA, WS, D, BH, BT, BM, False, NEG_Z)
        vs = _gather(ins, b, hk, hblk, i0, S, GQA, WS, DV, BH, BT, BM, True, NEG_Z)
        _hand_over(zbuf, z_empty, z_ready, c, ph, z, True)
        # v_s buffer k % N_VS: the consumer's, or the one they share in turn
        _hand_over(vsbuf, vs_empty, vs_ready, k % N_VS, (k // N_VS) & 1, vs, False)


@gluon.jit
def _builder_pairs(ins, outs, bufs, bars, dims, NEG_Z: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
                   BI: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   NS: gl.constexpr, PAIRS: gl.constexpr):
    """Default partition with ``PAIRS``: the program walks pairs of tiles that see the same keys,
    one tile per consumer. Per pair: both tiles' ``z`` (gathered while the consumers finish the
    previous pair, stored once each has issued its last ``S`` of it), then the pair's key /
    value blocks into the one ring both consumers read, each slot refilled once both have
    released it; the tiles' ``v_s`` after the first ``NS`` blocks are in flight (the consumers
    release ``v_s`` in the previous pair's merge)."""
    kb_desc, vb_desc = outs[0], outs[1]
    zbuf, vsbuf, kbuf, vbuf, pbuf, kebuf, vebuf = bufs
    z_ready, z_empty, vs_ready, vs_empty, kv_ready, kv_empty, turn, edge_ready = bars
    S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale = dims
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_mine = (T - pid + nprog - 1) // nprog
    it = 0
    for u in range(n_mine):
        g = pid + u * nprog
        b, hk, _hblk, _i0, first, last = _unit(g, 0, dims, BI, PAIRS)
        b64 = b.to(gl.int64)
        for c in gl.static_range(2):
            _b, _hk, hblk_c, i0_c, _first, _last = _unit(g, c, dims, BI, PAIRS)
            z = _gather(ins, b64, hk, hblk_c, i0_c, S, GQA, WS, D, BH, BT, BM, False, NEG_Z)
            _hand_over(zbuf, z_empty, z_ready, c, u & 1, z, True)   # after the consumer's last S of the previous pair
        n_blk, _n_full = _blocks(first, last, WB, BN)
        row = b * S + first + 1 - BN               # block k: keys [first + 1 - (k + 1) BN, first + 1 - k BN)
        for blk in range(n_blk):
            slot = it % NS
            bar = kv_ready.index(slot)
            mbarrier.wait(kv_empty.index(slot), ((it // NS) & 1) ^ 1)
            mbarrier.expect(bar, kb_desc.block_type.nbytes + vb_desc.block_type.nbytes)
            tma_load(kb_desc, [row - blk * BN, hk * D], bar, kbuf.index(slot))
            tma_load(vb_desc, [row - blk * BN, hk * DV], bar, vbuf.index(slot))
            it += 1
            if blk == gl.minimum(n_blk, NS) - 1:
                for c in gl.static_range(2):
                    _b, _hk, hblk_c, i0_c, _first, _last = _unit(g, c, dims, BI, PAIRS)
                    vs = _gather(ins, b64, hk, hblk_c, i0_c, S, GQA, WS, DV, BH, BT, BM, True, NEG_Z)
                    _hand_over(vsbuf, vs_empty, vs_ready, c, u & 1, vs, False)


@gluon.jit
def _fetch(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs, bars, dims, NCONS: gl.constexpr,
           BI: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, DV: gl.constexpr):
    """The consumer's load cursor (its own ring): block ``lb`` of its tile ``lu`` (of ``ln``
    blocks, one past the tile's last key row ``lrow`` in the 2-D views, kv head ``lhk``) fetched
    into ring ``slot`` (none past the consumer's ``n_mine`` tiles); returns the cursor one block on."""
    kb_desc, vb_desc = outs[0], outs[1]
    kbuf, vbuf, kv_ready = bufs[2], bufs[3], bars[4]
    S = dims[0]
    WB = dims[5]
    row = lrow - (lb + 1) * BN
    pred = lu < n_mine
    bar = kv_ready.index(slot)
    mbarrier.expect(bar, kb_desc.block_type.nbytes + vb_desc.block_type.nbytes, pred=pred)
    tma_load(kb_desc, [row, lhk * D], bar, kbuf.index(slot), pred=pred)
    tma_load(vb_desc, [row, lhk * DV], bar, vbuf.index(slot), pred=pred)
    lb += 1
    if lb == ln:
        lu += 1
        lb = 0
        b, lhk, _hblk, _i0, first, last = _unit(_my_unit(lu, pid, nprog, cid, NCONS, 0), cid, dims, BI, 0)
        ln, _n_full = _blocks(first, last, WB, BN)
        lrow = b * S + first + 1
    return lu, lb, ln, lrow, lhk


@gluon.jit
def _release(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs, bars, dims, NCONS: gl.constexpr,
             BI: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, PAIRS: gl.constexpr):
    """The consumer is done with ring ``slot``: with a shared ring, tell the builder (who refills
    it once both consumers have); with its own ring, refill it (:func:`_fetch`)."""
    if PAIRS != 0:
        mbarrier.arrive(bars[5].index(slot), count=1)
    else:
        lu, lb, ln, lrow, lhk = _fetch(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs, bars, dims,
                                      NCONS, BI, BN, D, DV)
    return lu, lb, ln, lrow, lhk


@gluon.jit
def _softmax_block(s, m_i, l_i, masked, j, j_min, qk_scale):
    """Online softmax (base 2) of one block of logits ``s``: (p, alpha, m, l). A masked block
    keeps keys ``j > j_min`` of each row (its window, inside the sequence)."""
    if masked:
        s = gl.where(j[None, :] > j_min[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _consumer(cid, outs, bufs, bars, dims,
              D: gl.constexpr, DV: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr,
              BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, NCONS: gl.constexpr,
              OVERLAP: gl.constexpr, PAIRS: gl.constexpr, PINGPONG: gl.constexpr, EDGE: gl.constexpr,
              BE: gl.constexpr):
    """Worker partition (one warpgroup): the program's tiles ``cid, cid + NCONS, ...``, or with
    ``PAIRS`` tile ``cid`` of each of the program's pairs. The kernel's tensors, buffers, barriers
    and sizes come packed, as :func:`_fwd_ws_kernel` makes them."""
    kb_desc, vb_desc, O, LSE, CNT_S, CNT_B, so0, so1, so2, sl0, sl1, ke_desc, ve_desc = outs
    zbuf, vsbuf, kbuf, vbuf, pbuf, kebuf, vebuf = bufs
    z_ready, z_empty, vs_ready, vs_empty, kv_ready, kv_empty, turn, edge_ready = bars
    S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale = dims
    NQ: gl.constexpr = BI * BH                     # queries (position, head) per tile
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    se_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BE, 16])
    se_rows: gl.constexpr = gl.SliceLayout(1, se_layout)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_local = (T - pid + nprog - 1) // nprog
    if PAIRS != 0:
        n_mine = n_local
        ring = 0
    else:
        n_mine = (n_local - cid + NCONS - 1) // NCONS
        ring = cid * NS
    zb = zbuf.index(cid)
    N_VS: gl.constexpr = vsbuf.type.shape[0]       # one per consumer, or one they share in turn
    vc = cid % N_VS
    vsb = vsbuf.index(vc)

    # load cursor (_fetch) of a consumer's own ring, NS blocks ahead of the computation, across tiles
    b0, lhk, _hblk0, _i00, first0, last0 = _unit(_my_unit(0, pid, nprog, cid, NCONS, PAIRS), cid, dims, BI, PAIRS)
    lu = 0
    lb = 0
    ln, _n_full0 = _blocks(first0, last0, WB, BN)
    lrow = b0 * S + first0 + 1
    if PAIRS == 0:
        for k0 in gl.static_range(NS):
            lu, lb, ln, lrow, lhk = _fetch(ring + k0, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs,
                                          bars, dims, NCONS, BI, BN, D, DV)

    jj = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    p_row = gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout)) // (BH * BT)   # position of each row in the tile
    s_zero = gl.zeros([BM, BN], gl.float32, s_layout)
    se_zero = gl.zeros([BM, BE], gl.float32, se_layout)
    je = gl.arange(0, BE, layout=gl.SliceLayout(0, se_layout))
    it = 0                                          # blocks consumed
    tg = 0                                          # groups of products issued (PINGPONG)
    for u in range(n_mine):
        b, hk, hblk, i0, first, last = _unit(_my_unit(u, pid, nprog, cid, NCONS, PAIRS), cid, dims, BI, PAIRS)
        n_blk, n_full = _blocks(first, last, WB, BN)
        i_row = i0 + p_row
        j_min = gl.maximum(i_row - WB, -1)          # keys j_min < j <= i_row are in a row's window
        j_top = first + 1 - BN + jj                 # keys of block 0; block k: j_top - k BN
        m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([BM], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BM, DV], gl.float32, o_layout)
        if EDGE:                                    # the unit's right-edge keys, folded in after the main blocks
            ebar = edge_ready.index(cid)
            mbarrier.expect(ebar, ke_desc.block_type.nbytes + ve_desc.block_type.nbytes)
            tma_load(ke_desc, [b * S + first + 1, hk * D], ebar, kebuf.index(cid))
            tma_load(ve_desc, [b * S + first + 1, hk * DV], ebar, vebuf.index(cid))
        mbarrier.wait(z_ready.index(cid), u & 1)
        if OVERLAP:
            # FA3's order: S of block k + 1 is issued with P V of block k, and its softmax runs
            # while P V is on the tensor cores. P goes through shared memory, two buffers: as a
            # register operand its registers would be rewritten by the next softmax while the
            # product still reads them; and P of block k + 1 is stored before the wait for P V
            # of block k, so that ptxas has no reason to sink the softmax below that wait
            # (with PINGPONG the groups of products issued together, S of block 0, then S of
            # block k + 1 with P V of block k, then P V of the last block, alternate between
            # the consumers: both walk the same blocks, so both issue n_blk + 1 groups per pair)
            ring2 = 2 * cid
            pb = ring2
            slot = ring + it % NS
            mbarrier.wait(kv_ready.index(slot), (it // NS) & 1)
            issue_turn(turn, cid, tg, PINGPONG)
            s = warpgroup_mma(zb, kbuf.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            pass_turn(turn, cid, PINGPONG)
            tg += 1
            s = warpgroup_mma_wait(0, deps=(s, ))
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, 0 >= n_full, j_top, j_min, qk_scale)
            pbuf.index(pb).store(p.to(zbuf.dtype))
            fence_async_shared()
            for blk in range(n_blk - 1):
                slot = ring + it % NS
                nxt = ring + (it + 1) % NS
                mbarrier.wait(kv_ready.index(nxt), ((it + 1) // NS) & 1)
                issue_turn(turn, cid, tg, PINGPONG)
                s = warpgroup_mma(zb, kbuf.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                acc = warpgroup_mma(pbuf.index(pb), vbuf.index(slot), acc, is_async=True)
                pass_turn(turn, cid, PINGPONG)
                tg += 1
                s = warpgroup_mma_wait(1, deps=(s, ))
                p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, blk + 1 >= n_full, j_top - (blk + 1) * BN, j_min,
                                                    qk_scale)
                pb = ring2 + (blk + 1) % 2                 # the buffer P V of block k - 1 read (done)
                pbuf.index(pb).store(p.to(zbuf.dtype))
                fence_async_shared()
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                lu, lb, ln, lrow, lhk = _release(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs,
                                                bars, dims, NCONS, BI, BN, D, DV, PAIRS)
                it += 1
            slot = ring + it % NS
            issue_turn(turn, cid, tg, PINGPONG)
            acc = warpgroup_mma(pbuf.index(pb), vbuf.index(slot), acc, is_async=True)
            pass_turn(turn, cid, PINGPONG)
            tg += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            lu, lb, ln, lrow, lhk = _release(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs, bars,
                                            dims, NCONS, BI, BN, D, DV, PAIRS)
            it += 1
        else:
            for blk in range(n_blk):
                slot = ring + it % NS
                mbarrier.wait(kv_ready.index(slot), (it // NS) & 1)
                # s[r, j] = <z_r, k_b[j]>
                s = warpgroup_mma(zb, kbuf.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, blk >= n_full, j_top - blk * BN, j_min, qk_scale)
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                acc = warpgroup_mma(gl.convert_layout(p.to(zbuf.dtype), p_layout), vbuf.index(slot), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                # the slot is free: fetch the consumer's next block into it
                lu, lb, ln, lrow, lhk = _release(slot, lu, lb, ln, lrow, lhk, n_mine, pid, nprog, cid, outs, bufs,
                                                bars, dims, NCONS, BI, BN, D, DV, PAIRS)
                it += 1

        if EDGE:
            # keys first + 1 .. first + BE: in row r's window iff i_r - WB < j <= i_r (and before S,
            # as i_r is for the rows that exist); one more block of the online softmax
            mbarrier.wait(edge_ready.index(cid), u & 1)
            issue_turn(turn, cid, tg, PINGPONG)
            se = warpgroup_mma(zb, kebuf.index(cid).permute((1, 0)), se_zero, use_acc=False, is_async=True)
            pass_turn(turn, cid, PINGPONG)
            tg += 1
            se = warpgroup_mma_wait(0, deps=(se, ))
            ir = gl.convert_layout(i_row, se_rows)
            j_e = first + 1 + je
            se = gl.where((j_e[None, :] <= ir[:, None]) & (j_e[None, :] > gl.maximum(ir - WB, -1)[:, None]), se,
                          float("-inf"))
            m_e = gl.convert_layout(m_i, se_rows)
            m_new = gl.maximum(m_e, gl.max(se, 1) * qk_scale)
            alpha_e = gl.exp2(m_e - m_new)
            p_e = gl.exp2(se * qk_scale - m_new[:, None])
            l_i = gl.convert_layout(l_i, se_rows) * alpha_e + gl.sum(p_e, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha_e, o_rows)[:, None]
            issue_turn(turn, cid, tg, PINGPONG)
            acc = warpgroup_mma(gl.convert_layout(p_e.to(zbuf.dtype), p_layout), vebuf.index(cid), acc, is_async=True)
            pass_turn(turn, cid, PINGPONG)
            tg += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(z_empty.index(cid), count=1)

        # merge of the tile's offsets per query (fwd.py, (2)), in base 2
        _ii, _hg, _l, rvalid = tile_rows(gl.arange(0, BM, layout=o_rows), i0, hblk * BH, 0, S, GQA, WS, BH, BT)
        mbarrier.wait(vs_ready.index(vc), ((cid + NCONS * u) // N_VS) & 1)   # the program's tile k // N_VS
        vs = vsb.load(o_layout).to(gl.float32)
        mbarrier.arrive(vs_empty.index(vc), count=1)
        m_r = gl.where(rvalid, gl.convert_layout(m_i, o_rows), -1.0e30)
        l_r = gl.where(rvalid, gl.convert_layout(l_i, o_rows), 0.0)
        m3 = gl.reshape(m_r, [NQ, BT])
        m_c = gl.max(m3, 1)
        a3 = gl.exp2(m3 - m_c[:, None])
        L_c = gl.sum(a3 * gl.reshape(l_r, [NQ, BT]), 1)
        a_r = gl.where(rvalid, gl.convert_layout(gl.reshape(a3, [BM]), o_rows), 0.0)
        y = gl.where(rvalid[:, None], acc * vs * a_r[:, None], 0.0)
        O_c = gl.convert_layout(gl.sum(gl.reshape(y, [NQ, BT, DV]), 1), out_layout)

        qq = gl.arange(0, NQ, layout=gl.SliceLayout(1, out_layout))
        ee = gl.arange(0, DV, layout=gl.SliceLayout(0, out_layout))
        i_q = i0 + qq // BH
        hl_q = hblk * BH + qq % BH
        ok_q = (i_q < S) & (hl_q < GQA)
        h_q = hk * GQA + hl_q
        L_q = gl.convert_layout(L_c, gl.SliceLayout(1, out_layout))
        M_q = gl.convert_layout(m_c, gl.SliceLayout(1, out_layout))
        L_safe = gl.where(L_q > 0.0, L_q, 1.0)
        o = O_c / L_safe[:, None]
        b64 = b.to(gl.int64)
        # a query whose window holds a non-finite value gets NaN in its whole row (fwd.py)
        holds = _window_holds(CNT_S, b64, hk, HKV, S, i_q, WS, ok_q) | \
            _window_holds(CNT_B, b64, hk, HKV, S, i_q, WB, ok_q)
        o = gl.where(holds[:, None], float("nan"), o)
        gl.store(O + b64 * so0 + i_q[:, None] * so1 + h_q[:, None] * so2 + ee[None, :], o.to(O.dtype.element_ty),
                 mask=ok_q[:, None])
        lse = (M_q + gl.log2(L_safe)) * 0.6931471805599453
        gl.store(LSE + b64 * sl0 + h_q * sl1 + i_q, lse, mask=ok_q)


@gluon.jit
def _fwd_ws_kernel(Q, KS, VS, kb_desc, vb_desc, ke_desc, ve_desc, O, LSE, CNT_S, CNT_B,
                   sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2, so0, so1, so2, sl0, sl1,
                   S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale,
                   NEG_Z: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, BH: gl.constexpr, BT: gl.constexpr,
                   BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, NCONS: gl.constexpr, OVERLAP: gl.constexpr,
                   BI: gl.constexpr, PAIRS: gl.constexpr, PINGPONG: gl.constexpr, EDGE: gl.constexpr,
                   BE: gl.constexpr, z_layout: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    zbuf = gl.allocate_shared_memory(dtype, [NCONS, BM, D], z_layout)
    vs_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, DV], dtype)
    # v_s buffers: one, shared in turn, beside two P buffers per consumer (each its own ring)
    N_VS: gl.constexpr = 1 if OVERLAP and PAIRS == 0 else NCONS
    vsbuf = gl.allocate_shared_memory(dtype, [N_VS, BM, DV], vs_layout)
    N_KV: gl.constexpr = NS if PAIRS != 0 else NCONS * NS
    kbuf = gl.allocate_shared_memory(dtype, [N_KV, BN, D], kb_desc.layout)
    vbuf = gl.allocate_shared_memory(dtype, [N_KV, BN, DV], vb_desc.layout)
    if EDGE:                                       # each consumer's right-edge keys
        kebuf = gl.allocate_shared_memory(dtype, [NCONS, BE, D], ke_desc.layout)
        vebuf = gl.allocate_shared_memory(dtype, [NCONS, BE, DV], ve_desc.layout)
    else:                                          # stand-ins, unused
        kebuf = kbuf
        vebuf = vbuf
    if OVERLAP:                                    # P of two blocks per consumer (FA3's order)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BN], dtype)
        pbuf = gl.allocate_shared_memory(dtype, [2 * NCONS, BM, BN], p_layout)
    else:                                          # P stays in registers: no buffer (a stand-in)
        pbuf = zbuf
    z_ready = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
    z_empty = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
    vs_ready = gl.allocate_shared_memory(gl.int64, [N_VS, 1], mbarrier.MBarrierLayout())
    vs_empty = gl.allocate_shared_memory(gl.int64, [N_VS, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [N_KV, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [N_KV, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NCONS):
        mbarrier.init(z_ready.index(c), count=1)
        mbarrier.init(z_empty.index(c), count=1)
    for c in gl.static_range(N_VS):
        mbarrier.init(vs_ready.index(c), count=1)
        mbarrier.init(vs_empty.index(c), count=1)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    edge_ready = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(turn.index(c), count=1)
    for c in gl.static_range(NCONS):
        mbarrier.init(edge_ready.index(c), count=1)
    for s in gl.static_range(N_KV):
        mbarrier.init(kv_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=NCONS)    # released by every consumer (shared ring)
    # worker partitions take no distributed tensors: each consumer builds its own index vectors
    outs = (kb_desc, vb_desc, O, LSE, CNT_S, CNT_B, so0, so1, so2, sl0, sl1, ke_desc, ve_desc)
    bufs = (zbuf, vsbuf, kbuf, vbuf, pbuf, kebuf, vebuf)
    bars = (z_ready, z_empty, vs_ready, vs_empty, kv_ready, kv_empty, turn, edge_ready)
    dims = (S, HKV, GQA, NHB, WS, WB, n_ph, T, qk_scale)
    ins = (Q, KS, VS, sq0, sq1, sq2, sks0, sks1, sks2, svs0, svs1, svs2)
    if PAIRS != 0:                                 # two consumers (canonical_fwd_ws checks)
        gl.warp_specialize([(_builder_pairs, (ins, outs, bufs, bars, dims, NEG_Z, D, DV, BI, BH, BT, BM, BN, NS, PAIRS)),
                            (_consumer, (0, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE)),
                            (_consumer, (1, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE))],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    elif NCONS == 2:
        gl.warp_specialize([(_builder, (ins, bufs, bars, dims, NEG_Z, D, DV, BI, BH, BT, BM, NCONS)),
                            (_consumer, (0, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE)),
                            (_consumer, (1, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE))],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([(_builder, (ins, bufs, bars, dims, NEG_Z, D, DV, BI, BH, BT, BM, NCONS)),
                            (_consumer, (0, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE)),
                            (_consumer, (1, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE)),
                            (_consumer, (2, outs, bufs, bars, dims, D, DV, BI, BH, BT, BM, BN, NS, NCONS, OVERLAP, PAIRS,
                                         PINGPONG, EDGE, BE))],
                           [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


SCOPE = (f"{gluon_common.SCOPE}, contiguous k_b / v_b, 32-bit offsets, and a small window that fits one tile "
         "(<= 64 offsets; > 1 without GQA)")


def supports(plan: Plan, form: str, q, ks, vs, kb, vb) -> bool:
    """Whether :func:`canonical_fwd_ws` takes this problem (:data:`SCOPE`)."""
    if not in_scope(plan, form, q):
        return False
    BI, BH, BT = pack_rows(BM, plan.gqa, plan.ws)
    # 32-bit indices: copy-engine rows of the [B * S, Hkv * D] views, position * stride offsets
    small = (plan.B * plan.S + 2 * BI) < 2 ** 31 and (plan.S + 2 * BI) * max(
        q.stride(1), ks.stride(1), vs.stride(1), plan.Hq * plan.Dv) < 2 ** 31
    # BI <= 32: a pair's right-edge keys fit one block of 64 (BI = 64 only for ws = 1 without GQA)
    return plan.ws <= BT and BI <= 32 and small and all(t.is_contiguous() for t in (kb, vb))


def pairs(gqa: int, ws: int) -> int:
    """How ``share`` pairs the tiles of a problem: 1, two head blocks of one position (an even
    number of head blocks per kv group); 2, two neighbouring position blocks (one head block);
    0, neither (an odd number of head blocks past one)."""
    BI, BH, BT = pack_rows(BM, gqa, ws)
    NHB = triton.cdiv(gqa, BH)
    return 1 if NHB % 2 == 0 else 2 if NHB == 1 else 0


def canonical_fwd_ws(plan: Plan, q, ks, vs, kb, vb, counts, scale: float, num_programs: int | None = None,
                     consumers: int = 2, stages: int = NS, overlap: bool = False, share: bool = False,
                     pingpong: bool = False, block_n: int = BN, consumer_regs: int | None = None,
                     maxnreg: int | None = None):
    """:func:`.fwd.canonical_fwd` for problems in this module's scope (:func:`supports`). Knobs:
    ``consumers`` (2 or 3), ``stages`` (key / value blocks per ring), ``overlap`` (FA3's
    order, P through two shared-memory buffers per consumer and, without ``share``, one ``v_s``
    buffer shared by the consumers in turn), ``share`` (two consumers on the two tiles of a pair
    that see the same keys, reading one ring that the builder fills: each key block loaded once
    for 128 rows; :func:`pairs`), ``pingpong`` (with ``share`` and ``overlap``: the consumers
    issue their products in turn), ``block_n`` (keys per block, 64 or 128), the consumers'
    registers and the kernel's ``maxnreg``. Past D = 64 only two consumers with two stages of
    their own rings fit the shared memory (triton raises ``OutOfResources`` for the others)."""
    if consumers not in (2, 3):
        raise ValueError(f"consumers: expected 2 or 3, got {consumers}")
    if stages < 2:                 # FA3's order waits for block k + 1 while block k's slot is in use
        raise ValueError(f"stages: expected at least 2 key / value blocks per ring, got {stages}")
    if block_n not in (64, 128):
        raise ValueError(f"block_n: expected 64 or 128 keys per block, got {block_n}")
    if share and consumers != 2:
        raise ValueError(f"share: a ring shared by a pair of tiles takes 2 consumers, got {consumers}")
    if pingpong and not (share and overlap):
        raise ValueError("pingpong: the consumers alternate their products only with share=True and overlap=True "
                         f"(both then walk the same blocks); got share={share}, overlap={overlap}")
    B, S, Hq, Hkv, D, Dv, ws, wb = plan.B, plan.S, plan.Hq, plan.Hkv, plan.D, plan.Dv, plan.ws, plan.wb
    out = torch.empty((B, S, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    if plan.empty:
        return out, lse
    BI, BH, BT = pack_rows(BM, plan.gqa, ws)
    NHB = triton.cdiv(plan.gqa, BH)
    n_pairs = pairs(plan.gqa, ws) if share else 0
    if share and not n_pairs:
        raise ValueError(f"share: pairs of tiles need one head block or an even number per kv group; "
                         f"{plan.gqa} query heads per kv head in blocks of {BH} give {NHB}")
    # right-edge keys of a unit of several positions: one narrow block of BE keys
    span = 2 * BI if n_pairs == 2 else BI
    BE = max(16, triton.next_power_of_2(span - 1))
    # work units per (batch, kv head): tiles, or pairs of tiles
    n_ph = S * (NHB // 2) if n_pairs == 1 else triton.cdiv(S, 2 * BI) if n_pairs == 2 else triton.cdiv(S, BI) * NHB
    T = n_ph * B * Hkv
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gdt)
    v_layout = gl.NVMMASharedLayout.get_default_for([block_n, Dv], gdt)
    # 2-D views [B * S, Hkv * D]: a block reaching outside its batch reads the neighbouring
    # batch's rows (or zeros outside the tensor); the masks drop them
    kb_desc = TensorDescriptor(kb, [B * S, Hkv * D], [Hkv * D, 1], [block_n, D], k_layout)
    vb_desc = TensorDescriptor(vb, [B * S, Hkv * Dv], [Hkv * Dv, 1], [block_n, Dv], v_layout)
    ke_desc, ve_desc = kb_desc, vb_desc
    if span > 1:
        ke_desc = TensorDescriptor(kb, [B * S, Hkv * D], [Hkv * D, 1], [BE, D],
                                   gl.NVMMASharedLayout.get_default_for([BE, D], gdt))
        ve_desc = TensorDescriptor(vb, [B * S, Hkv * Dv], [Hkv * Dv, 1], [BE, Dv],
                                   gl.NVMMASharedLayout.get_default_for([BE, Dv], gdt))
    neg_z, qk_scale = z_scaling(scale)
    grid = (min(T, num_programs or sm_count(q.device)),)
    kernel(_fwd_ws_kernel, q.device)[grid](
        q, ks, vs, kb_desc, vb_desc, ke_desc, ve_desc, out, lse, *counts,
        *q.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], *out.stride()[:3], lse.stride(0), lse.stride(1),
        S, Hkv, plan.gqa, NHB, ws, wb, n_ph, T, qk_scale,
        NEG_Z=neg_z, D=D, DV=Dv, BH=BH, BT=BT, BM=BM, BN=block_n, NS=stages, NCONS=consumers, OVERLAP=overlap,
        BI=BI, PAIRS=n_pairs, PINGPONG=pingpong, EDGE=span > 1, BE=BE,
        z_layout=gl.NVMMASharedLayout.get_default_for([BM, D], gdt),
        CONSUMER_REGS=consumer_regs or (200 if consumers == 2 else 144),
        num_warps=4, maxnreg=maxnreg or (168 if consumers == 2 else 128))
    return out, lse

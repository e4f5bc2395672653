"""What the warp-specialised Gluon prototypes (:mod:`.fwd_ws`, :mod:`.bwd_ws`) share: the names
triton renamed between 3.6 and 3.9, their common scope, the builders' row layout and tile-row
arithmetic (rows ``r = (p BH + hh) BT + tt`` of a tile, offset fastest, as in :mod:`.common`),
and the consumers' ping-pong turns."""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from ..plan import Plan

# renamed between triton 3.6 and 3.9 (the old names raise or are gone): the copy engine's
# global -> shared load, the cp.async global -> shared copy, a barrier of a partition's threads
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

SCOPE = "bf16 / fp16 CUDA tensors, the trilinear form, D = Dv in (64, 128)"


def in_scope(plan: Plan, form: str, q: torch.Tensor) -> bool:
    """Whether a problem is in :data:`SCOPE` (each kernel adds its own conditions)."""
    return (form == "trilinear" and q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cuda"
            and plan.D == plan.Dv and plan.D in (64, 128))


@gluon.constexpr_function
def rows_layout(D):
    """A builder's layout of ``[rows, D]`` (4 warps): 8 contiguous elements (16 bytes) per thread."""
    tpw_c = min(D // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // tpw_c, tpw_c], [4, 1], [1, 0])


@gluon.jit
def tile_rows(r, i0, h0, t0, S, GQA, WS, BH: gl.constexpr, BT: gl.constexpr):
    """Rows ``r`` of a tile whose first position, head (inside the kv group) and offset are
    ``i0, h0, t0``: each row's position ``i``, head ``h``, small key ``l = i - t``, and whether
    the row exists (position inside the sequence, head inside the group, offset below ``ws``
    and not before the sequence start)."""
    hl = h0 + (r // BT) % BH
    ii = i0 + r // (BH * BT)
    t = t0 + r % BT
    l = ii - t
    return ii, hl, l, (ii < S) & (hl < GQA) & (t < WS) & (l >= 0)


@gluon.jit
def issue_turn(turn, cid, g, PINGPONG: gl.constexpr):
    """With ``PINGPONG``, wait until the other consumer has issued its products of group ``g - 1``
    (consumer 0 goes first), so that the two consumers' products reach the tensor cores in turn
    and one's softmax runs while the other's products do (FA3's ping-pong)."""
    if PINGPONG:
        mbarrier.wait(turn.index(cid), (g + 1 - cid) & 1)


@gluon.jit
def pass_turn(turn, cid, PINGPONG: gl.constexpr):
    """With ``PINGPONG``: this consumer's group of products is issued; the other's turn."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - cid), count=1)

"""Memory-bounded, exact PyTorch path for 2-simplicial attention (trilinear form).

This is what runs wherever the Triton kernels do not: CPU tensors, float64, and machines
without the ``triton`` package. It never holds an ``S x w1 x w2`` tensor for the whole sequence: queries are processed
in chunks, and the backward recomputes each chunk's probabilities from the saved
log-sum-exp instead of storing them.

Per query ``i`` the valid keys are a window of ``ws`` positions ``l = i - t`` of one key
set (the *small* window) and ``wb >= ws`` positions ``j`` of the other (the *big* window):
the canonical problem of ``ops/plan.py``, which decides the roles. With the virtual query ``z[i, t] = q_i * k_s[i - t]``
(docs/math.md, Virtual rows) the logits are an ordinary matrix product

    logit[i, t, j] = scale * <z[i, t], k_b[j]>,      i - wb < j <= i

For a chunk of ``C`` queries the big windows together span ``C + wb - 1`` consecutive
positions, so each chunk is a handful of large GEMMs against that contiguous slice, with
a band mask (``(C + wb - 1) / wb`` times the useful work; C is kept near ``wb / 4``;
positions before 0 are left out of the slice).
Only the small windows (``ws`` rows) are gathered, and their gradients are scattered
back by overlap-add, in a fixed order, so the path is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import Plan, make_plan

# Elements of one chunk's [B, Hq, C, ws, C + wb - 1] logit tensor. The backward holds
# about four tensors of this size at once, so the default peak is a few hundred MB.
CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, H, X] -> [B, H, S, X]`` contiguous, in the compute dtype."""
    return x.to(dtype).transpose(1, 2).contiguous()


def _padded(x: torch.Tensor, w: int) -> torch.Tensor:
    """Zero-pad ``[B, H, S, X]`` with ``w - 1`` positions in front, so that position ``p``
    lives at index ``p + w - 1`` and every window is in range."""
    return F.pad(x, (0, 0, w - 1, 0))


def _chunk_size(S: int, per_row: int, ws: int, wb: int) -> int:
    """Queries per chunk: near ``wb / 4`` (little band waste), within the memory budget."""
    C = max(16, wb // 4)
    while C > 1 and per_row * ws * C * (C + wb - 1) > CHUNK_ELEMENTS:
        C //= 2
    return max(1, min(S, C))


def _overlap_add(x: torch.Tensor, out: torch.Tensor, c0: int) -> None:
    """Add small-window rows ``x [B, H, C, w, X]`` (entry ``e`` of query ``c0 + c`` is
    padded index ``c0 + c + e``) into ``out [B, H, S + w - 1, X]``: one shifted add per
    window entry (``w`` is the small window), in a fixed order, so deterministic."""
    C = x.shape[2]
    for e in range(x.shape[3]):
        out[:, :, c0 + e : c0 + e + C] += x[:, :, :, e]


class _Chunk:
    """Queries ``[c0, c1)``: small windows, the big-window slice, virtual queries, logits.

    The big-window slice holds positions ``[p0, c1)`` with ``p0 = max(0, c0 - wb + 1)``:
    ``R <= C + wb - 1`` keys. Small-window entry ``e`` of query ``c0 + c`` is position
    ``c0 + c + e - ws + 1`` (the small windows are gathered from a front-padded copy).
    """

    def __init__(self, q, ksp, vsp, kb, vb, ws, wb, c0, c1, scale, masks):
        C = c1 - c0
        self.p0 = max(0, c0 - wb + 1)
        self.ks = ksp[:, :, c0 : c1 + ws - 1].unfold(2, ws, 1).transpose(-1, -2)   # [B, H, C, ws, D]
        self.vs = vsp[:, :, c0 : c1 + ws - 1].unfold(2, ws, 1).transpose(-1, -2)   # [B, H, C, ws, Dv]
        self.kb = kb[:, :, self.p0 : c1]                                            # [B, H, R, D]
        self.vb = vb[:, :, self.p0 : c1]                                            # [B, H, R, Dv]
        self.q = q[:, :, c0:c1]                                                     # [B, H, C, G, D]
        B, H, _, G, D = self.q.shape
        self.shape = (B, H, C, G, ws, c1 - self.p0)
        # virtual queries z[i, g, t] = q[i, g] * k_s[i - t], as rows of one matrix
        self.z = (self.q[:, :, :, :, None, :] * self.ks[:, :, :, None]).reshape(B, H, C * G * ws, D)
        logits = torch.matmul(self.z, self.kb.transpose(-1, -2)).mul_(scale).view(self.shape)
        key = (C, min(c0, max(ws, wb) - 1))            # past both windows' start the mask repeats
        if key not in masks:
            masks[key] = _invalid(C, ws, wb, key[1], q.device)
        self.logits = logits.masked_fill_(masks[key], float("-inf"))   # [B, H, C, G, ws, R]


def _invalid(C: int, ws: int, wb: int, c0: int, device) -> torch.Tensor:
    """``[C, 1, ws or 1, R]`` True where (query ``c0 + c``, small entry ``e``, big key ``r``)
    is not a valid triple. Big key ``r`` is position ``p0 + r`` with ``p0 = max(0, c0 - wb + 1)``;
    query ``i`` sees ``i - wb < p <= i``; small entries before position 0 are invalid."""
    p0 = max(0, c0 - wb + 1)
    R = c0 + C - p0
    i = c0 + torch.arange(C, device=device)[:, None]
    p = p0 + torch.arange(R, device=device)[None, :]
    bad = (p > i) | (p <= i - wb)                                        # [C, R]
    bad = bad[:, None, None, :]
    if c0 < ws - 1:                                                      # small window before position 0
        e = torch.arange(ws, device=device)[None, :]
        bad = bad | (i + e - (ws - 1) < 0)[:, None, :, None]
    return bad


def _prepare(q, ks, vs, kb, vb, ws, wb):
    B, S, Hq, D = q.shape
    Hkv = ks.shape[2]
    dt = _compute_dtype(q.dtype)
    qh = _heads_first(q, dt).view(B, Hkv, Hq // Hkv, S, D).transpose(2, 3)   # [B, Hkv, S, G, D]
    ksp, vsp = _padded(_heads_first(ks, dt), ws), _padded(_heads_first(vs, dt), ws)
    kb, vb = _heads_first(kb, dt), _heads_first(vb, dt)
    chunk = _chunk_size(S, B * Hq, ws, wb)
    return qh, ksp, vsp, kb, vb, chunk


def chunked_forward(q, ks, vs, kb, vb, ws, wb, scale):
    """``(out [B, S, Hq, Dv], lse [B, Hq, S])`` of the canonical problem (``(ks, vs)`` over the
    small window ``ws``, ``(kb, vb)`` over the big window ``wb >= ws``, both ``<= S``), both in
    the compute dtype (float32, or float64 for float64 inputs): the backward recomputes P from
    this lse and takes Delta = <dO, O> from this unrounded output."""
    B, S, Hq, _ = q.shape
    Hkv, Dv = vs.shape[2], vs.shape[3]
    qh, ksp, vsp, kb, vb, chunk = _prepare(q, ks, vs, kb, vb, ws, wb)
    G = Hq // Hkv
    out = torch.empty(B, Hkv, S, G, Dv, dtype=qh.dtype, device=q.device)
    lse = torch.empty(B, Hkv, S, G, dtype=qh.dtype, device=q.device)
    masks = {}
    for c0 in range(0, S, chunk):
        c1 = min(S, c0 + chunk)
        ch = _Chunk(qh, ksp, vsp, kb, vb, ws, wb, c0, c1, scale, masks)
        flat = ch.logits.flatten(-2)                                  # one softmax over the pair (t, j)
        m = flat.logsumexp(-1)                                        # [B, H, C, G]
        P = flat.sub_(m[..., None]).exp_()                            # in place: logits are not needed again
        # out[i, g] = sum_t v_s[i - t] * sum_j P[i, g, t, j] v_b[j]
        Y = torch.matmul(P.view(B, Hkv, -1, ch.shape[-1]), ch.vb)     # [B, H, C*G*ws, Dv]
        out[:, :, c0:c1] = (Y.view(*ch.shape[:5], Dv) * ch.vs[:, :, :, None]).sum(-2)
        lse[:, :, c0:c1] = m
    out = out.transpose(2, 3).reshape(B, Hq, S, Dv).transpose(1, 2)
    return out, lse.transpose(2, 3).reshape(B, Hq, S)


def chunked_backward(do, q, ks, vs, kb, vb, out, lse, ws, wb, scale):
    """Gradients ``(dq, dks, dvs, dkb, dvb)`` of the canonical problem (docs/math.md,
    Gradients), recomputing P chunk by chunk."""
    B, S, Hq, D = q.shape
    Hkv, Dv = vs.shape[2], vs.shape[3]
    qh, ksp, vsp, kb, vb, chunk = _prepare(q, ks, vs, kb, vb, ws, wb)
    dt, G = qh.dtype, Hq // Hkv
    doh = _heads_first(do, dt).view(B, Hkv, G, S, Dv).transpose(2, 3)         # [B, Hkv, S, G, Dv]
    oh = _heads_first(out, dt).view(B, Hkv, G, S, Dv).transpose(2, 3)
    delta = (doh * oh).sum(-1)                                                 # Delta_i = <dO_i, O_i>
    lseh = lse.to(dt).view(B, Hkv, G, S).transpose(2, 3)                       # [B, Hkv, S, G]
    dq = torch.empty_like(qh)
    dksp, dvsp = torch.zeros_like(ksp), torch.zeros_like(vsp)
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    masks = {}
    for c0 in range(0, S, chunk):
        c1 = min(S, c0 + chunk)
        ch = _Chunk(qh, ksp, vsp, kb, vb, ws, wb, c0, c1, scale, masks)
        _, _, C, _, _, R = ch.shape
        P = ch.logits.sub_(lseh[:, :, c0:c1, :, None, None]).exp_()           # [B, H, C, G, ws, R]
        Pm = P.view(B, Hkv, -1, R)                                            # rows = virtual queries
        dO = doh[:, :, c0:c1]                                                 # [B, H, C, G, Dv]
        # virtual output gradient dO'[i, g, t] = dO[i, g] * v_s[i - t]
        dOv = (dO[:, :, :, :, None] * ch.vs[:, :, :, None]).reshape(B, Hkv, -1, Dv)
        # dv_b[j] = sum_{i,g,t} P[i,g,t,j] dO'[i,g,t]
        dvb[:, :, ch.p0 : c1] += torch.matmul(Pm.transpose(-1, -2), dOv)
        # dv_s[l] = sum_{i,g} dO[i,g] * (P @ v_b)[i,g,t]
        Y = torch.matmul(Pm, ch.vb).view(B, Hkv, C, G, ws, Dv)
        _overlap_add((Y * dO[:, :, :, :, None]).sum(3), dvsp, c0)
        # dS = P * (dP - Delta), dP[i,g,t,j] = <dO'[i,g,t], v_b[j]>
        dP = torch.matmul(dOv, ch.vb.transpose(-1, -2)).view_as(P)
        dS = P.mul_(dP.sub_(delta[:, :, c0:c1, :, None, None])).view(B, Hkv, -1, R)   # reuses P's storage
        # dk_b[j] = scale * sum_{i,g,t} dS[i,g,t,j] z[i,g,t]
        dkb[:, :, ch.p0 : c1] += torch.matmul(dS.transpose(-1, -2), ch.z).mul_(scale)
        # T[i,g,t] = sum_j dS[i,g,t,j] k_b[j]; dq_i = scale sum_t T * k_s[i-t]; dk_s[l] = scale sum_g T * q_i
        T = torch.matmul(dS, ch.kb).view(B, Hkv, C, G, ws, D)
        dq[:, :, c0:c1] = (T * ch.ks[:, :, :, None]).sum(-2) * scale
        _overlap_add((T * ch.q[:, :, :, :, None]).sum(3) * scale, dksp, c0)

    def unpad(xp, w, like):
        return xp[:, :, w - 1 :].transpose(1, 2).to(like.dtype)

    dq = dq.transpose(2, 3).reshape(B, Hq, S, D).transpose(1, 2).to(q.dtype)
    dks, dvs = unpad(dksp, ws, ks), unpad(dvsp, ws, vs)
    return dq, dks, dvs, dkb.transpose(1, 2).to(kb.dtype), dvb.transpose(1, 2).to(vb.dtype)


class ChunkedTwoSimplicial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, ks, vs, kb, vb, ws, wb, scale):
        out, lse = chunked_forward(q, ks, vs, kb, vb, ws, wb, scale)
        ctx.save_for_backward(q, ks, vs, kb, vb, out, lse)
        ctx.args = (ws, wb, scale)
        lse32 = lse.float()
        ctx.mark_non_differentiable(lse32)
        return out.to(q.dtype), lse32

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, ks, vs, kb, vb, out, lse = ctx.saved_tensors
        grads = chunked_backward(do, q, ks, vs, kb, vb, out, lse, *ctx.args)
        return (*grads, None, None, None)


def chunked_attention(plan: Plan, q, ks, vs, kb, vb, scale):
    """Differentiable ``(out, lse)`` for validated trilinear inputs in the roles of ``plan``
    (``plan.split``); autograd takes the role gradients back to ``k1, v1, k2, v2``."""
    return ChunkedTwoSimplicial.apply(q, ks, vs, kb, vb, plan.ws, plan.wb, scale)


def clean_values(v):
    """``(v with non-finite entries as 0, bad)``, ``bad [B, S, Hkv]`` marking the positions whose
    value vector holds a non-finite entry: two passes over ``v`` (a max-abs reduction, which
    propagates NaN, and ``nan_to_num``), no sync. ``nan_to_num`` passes no gradient to the entries
    it replaces."""
    bad = ~torch.isfinite(torch.linalg.vector_norm(v.detach(), float("inf"), dim=-1))
    return torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), bad


def mark_nonfinite(out, *windows):
    """``out`` with NaN in every output row whose window holds a non-finite value: ``windows``
    are ``(bad, w)`` pairs, ``bad`` the ``[B, S, Hkv]`` mask of :func:`clean_values` for ``v1``
    (or ``v2``) and ``w`` its window; the query at ``i`` sees ``(i - w, i]``.

    The PyTorch backend computes with the values cleaned (non-finite entries as 0, see
    :func:`torch_attention`): a masked key's weight is 0, but ``0 * nan = nan`` in a
    matrix product would carry its value to queries that cannot see it, and in the backward
    ``dO = 0`` times a non-finite value would reach gradients of positions before it. This
    restores a non-finite result exactly where a query does see such a value, in the whole
    row (dense arithmetic would leave the columns of the value's finite entries finite; a
    per-column mark costs ``Dv`` times more, docs/kernels.md, Non-finite inputs). The count of
    non-finite positions up to each position is a cumulative sum over the sequence, run along
    contiguous memory (``[B, Hkv, S]``): no sync, traceable. The marked outputs carry no gradient
    (``masked_fill``), so the backward, which also sees the cleaned values, stays finite for
    every output that does not see them. Non-finite queries and keys need no help in the
    forward: they reach exactly the outputs that see them (the backward then follows IEEE
    arithmetic, as dense autograd does).
    """
    seen = None
    for bad, w in windows:
        count = bad.transpose(1, 2).to(torch.int32, memory_format=torch.contiguous_format).cumsum(-1)  # [B, Hkv, S]
        before = torch.nn.functional.pad(count, (w, 0))[..., : count.shape[-1]]     # up to i - w
        seen = count > before if seen is None else seen | (count > before)
    B, Hkv, S = seen.shape
    rows = seen.transpose(1, 2)[:, :, :, None, None]                                # [B, S, Hkv, 1, 1]
    return out.view(B, S, Hkv, -1, out.shape[-1]).masked_fill(rows, float("nan")).view(out.shape)


def torch_attention(plan: Plan, q, k1, v1, k2, v2, scale):
    """The op's PyTorch backend: differentiable ``(out, lse)`` for validated trilinear inputs and
    ``plan``, computed with ``v1``, ``v2``'s non-finite entries as 0 and NaN in the output rows
    whose windows hold one (:func:`mark_nonfinite`)."""
    (v1, bad1), (v2, bad2) = clean_values(v1), clean_values(v2)
    out, lse = chunked_attention(plan, q, *plan.split(k1, v1, k2, v2), scale)
    return mark_nonfinite(out, (bad1, plan.w1), (bad2, plan.w2)), lse


def chunked_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale):
    """Differentiable ``(out, lse)`` for validated trilinear inputs and windows ``w1``, ``w2``."""
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, allow_tf32=False)
    return chunked_attention(plan, q, *plan.split(k1, v1, k2, v2), scale)

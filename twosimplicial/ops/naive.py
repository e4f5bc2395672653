"""Dense O(S^3) reference for 2-simplicial attention, written to be read beside docs/math.md
(The operation).

Shapes follow FlashAttention: q ``[B, S, Hq, D]``, k1/k2 ``[B, S, Hkv, D]``,
v1/v2 ``[B, S, Hkv, Dv]``. Every triple (i, j, k) is materialised, so this is
only for tests and teaching; the library's real paths live beside it.
"""
from __future__ import annotations

import math

import torch


def window_mask(S: int, w1: int, w2: int, device=None) -> torch.Tensor:
    """Boolean ``[S, S, S]``: True where ``i - w1 < j <= i`` and ``i - w2 < k <= i``."""
    i = torch.arange(S, device=device)
    d = i[:, None] - i[None, :]                      # d[i, j] = i - j
    m1 = (d >= 0) & (d < w1)
    m2 = (d >= 0) & (d < w2)
    return m1[:, :, None] & m2[:, None, :]


def trilinear_logits(q, k1, k2):
    """``sum_d q[i,d] k1[j,d] k2[k,d]`` per batch and head: ``[B, H, S, S, S]`` (heads already expanded)."""
    return torch.einsum("bihd,bjhd,bkhd->bhijk", q, k1, k2)


def determinant_logits(q, k1, k2):
    """The determinant form (docs/math.md, The determinant form): ``floor(D/3)`` 3x3
    determinants per (i, j, k), summed, plus the plain trilinear term of the ``D mod 3``
    leftover dims. Computed directly from the 3x3 determinant (not via the Sarrus rewrite
    the fast paths use)."""
    D = q.shape[-1]
    n = D // 3
    B, S, H, _ = q.shape
    out = 0
    if n:
        a = q[..., : 3 * n].reshape(B, S, H, n, 3)
        b = k1[..., : 3 * n].reshape(B, S, H, n, 3)
        c = k2[..., : 3 * n].reshape(B, S, H, n, 3)
        # det[a; b; c] = a . (b x c), broadcast over (i, j, k)
        bc = torch.linalg.cross(b[:, None, :, None], c[:, None, None, :], dim=-1)  # [B,1,S_j,S_k,H,n,3]
        out = torch.einsum("bihnx,bojkhnx->bhijk", a, bc)
    if D % 3:
        out = out + trilinear_logits(q[..., 3 * n :], k1[..., 3 * n :], k2[..., 3 * n :])
    return out


def naive_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale=None, form="trilinear"):
    """Returns ``(out [B, S, Hq, Dv], lse [B, Hq, S])`` computed densely in q's dtype."""
    B, S, Hq, D = q.shape
    Hkv = k1.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    g = Hq // Hkv                                    # query heads per kv head (GQA)
    k1, v1, k2, v2 = (t.repeat_interleave(g, dim=2) for t in (k1, v1, k2, v2))
    logits = (trilinear_logits if form == "trilinear" else determinant_logits)(q, k1, k2) * scale
    mask = window_mask(S, w1, w2, device=q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    flat = logits.reshape(B, Hq, S, S * S)           # one joint softmax over the pair (j, k)
    lse = torch.logsumexp(flat, dim=-1)
    P = torch.exp(flat - lse[..., None]).reshape(B, Hq, S, S, S)
    out = torch.einsum("bhijk,bjhd,bkhd->bihd", P, v1, v2)
    return out, lse

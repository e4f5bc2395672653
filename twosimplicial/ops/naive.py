"""Dense O(S^3) reference for 2-simplicial attention, written to be read beside docs/math.md
(The operation).

Shapes follow FlashAttention: q ``[B, S, Hq, D]``, k1/k2 ``[B, S, Hkv, D]``,
v1/v2 ``[B, S, Hkv, Dv]``. Every triple (i, j, k) is materialised, so this is
only for tests and teaching; the library's real paths live beside it. Each form's logits
come from its definition in :mod:`~twosimplicial.ops.forms` (``trilinear_logits``,
``determinant_logits``, importable from here too).
"""
from __future__ import annotations

import math

import torch

from .._validate import check_choice
from .forms import FORMS, REGISTRY, determinant_logits, trilinear_logits

__all__ = ["window_mask", "trilinear_logits", "determinant_logits", "naive_two_simplicial_attention"]


def window_mask(S: int, w1: int, w2: int, device=None) -> torch.Tensor:
    """Boolean ``[S, S, S]``: True where ``i - w1 < j <= i`` and ``i - w2 < k <= i``."""
    i = torch.arange(S, device=device)
    d = i[:, None] - i[None, :]                      # d[i, j] = i - j
    m1 = (d >= 0) & (d < w1)
    m2 = (d >= 0) & (d < w2)
    return m1[:, :, None] & m2[:, None, :]


def naive_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale=None, form="trilinear"):
    """Returns ``(out [B, S, Hq, Dv], lse [B, Hq, S])`` computed densely in q's dtype.
    ``form`` is one of :data:`~twosimplicial.ops.forms.FORMS`."""
    check_choice("form", form, FORMS)
    B, S, Hq, D = q.shape
    Hkv = k1.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    g = Hq // Hkv                                    # query heads per kv head (GQA)
    k1, v1, k2, v2 = (t.repeat_interleave(g, dim=2) for t in (k1, v1, k2, v2))
    logits = REGISTRY[form].logits(q, k1, k2) * scale
    mask = window_mask(S, w1, w2, device=q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    flat = logits.reshape(B, Hq, S, S * S)           # one joint softmax over the pair (j, k)
    lse = torch.logsumexp(flat, dim=-1)
    P = torch.exp(flat - lse[..., None]).reshape(B, Hq, S, S, S)
    out = torch.einsum("bhijk,bjhd,bkhd->bihd", P, v1, v2)
    return out, lse

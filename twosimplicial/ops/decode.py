"""One query against cached windows: the decode step of 2-simplicial attention.

During generation each new token ``i`` attends to the last ``w1`` positions of
``(k1, v1)`` and the last ``w2`` of ``(k2, v2)`` (its own position included). That is a
small dense problem per head:

    logit[j, k] = scale * sum_d q[d] k1[j, d] k2[k, d]     (L1 x L2 logits)
    P           = softmax over the pair (j, k)
    out[d]      = sum_{j,k} P[j, k] v1[j, d] v2[k, d] = sum_j v1[j, d] * (P[j, :] @ v2)[d]

computed as ``(q * k1) @ k2^T`` (the virtual-query trick of docs/math.md, Virtual rows;
one row per ``j``) in float32 (float64 for float64 inputs). ``L1 * L2 <= w1 * w2`` logits per head.
Every form goes through the same transform to trilinear inputs as the full op
(:mod:`~twosimplicial.ops.forms`).
"""
from __future__ import annotations

import torch

from .chunked import _compute_dtype
from .forms import REGISTRY
from .interface import check_inputs, check_options


def decode_two_simplicial_attention(q, k1, v1, k2, v2, *, scale=None, form="trilinear", return_lse=False):
    """Attention of one query position per sequence over given key windows.

    Args:
        q: ``[B, 1, Hq, D]``, the query at the newest position.
        k1, v1: ``[B, L1, Hkv, D]`` / ``[B, L1, Hkv, Dv]``: exactly the positions in the
            (k1, v1) window of that query, i.e. the last ``min(w1, i + 1)``.
        k2, v2: ``[B, L2, Hkv, D]`` / ``[B, L2, Hkv, Dv]``: the last ``min(w2, i + 1)``.
        scale: default ``1/sqrt(D)``.
        form: a name in :data:`~twosimplicial.ops.forms.FORMS`, as for the full op.
        return_lse: also return the float32 log-sum-exp.

    Bad inputs raise the op's errors (:func:`~twosimplicial.ops.interface.check_inputs`).

    Returns:
        ``out [B, 1, Hq, Dv]`` in q's dtype (and ``lse [B, Hq, 1]`` float32 with return_lse).
    """
    check_inputs(q, k1, v1, k2, v2, decode=True)
    B, _, Hq, D = q.shape
    Hkv = k1.shape[2]
    scale = check_options(scale, form, return_lse, D)
    q, k1, k2 = REGISTRY[form].to_trilinear(q, k1, k2)

    dt = _compute_dtype(q.dtype)
    G = Hq // Hkv
    qg = q.to(dt).reshape(B, Hkv, G, 1, -1)                       # [B, Hkv, G, 1, D']
    k1h, v1h = k1.to(dt).transpose(1, 2), v1.to(dt).transpose(1, 2)  # [B, Hkv, L1, .]
    k2h, v2h = k2.to(dt).transpose(1, 2), v2.to(dt).transpose(1, 2)  # [B, Hkv, L2, .]
    z = qg * k1h[:, :, None]                                       # virtual queries q * k1_j: [B, Hkv, G, L1, D']
    logits = scale * (z @ k2h[:, :, None].transpose(-1, -2))       # [B, Hkv, G, L1, L2]
    lse = torch.logsumexp(logits.flatten(-2), dim=-1)              # one softmax over the pair (j, k)
    P = torch.exp(logits - lse[..., None, None])
    out = ((P @ v2h[:, :, None]) * v1h[:, :, None]).sum(-2)        # sum_j v1_j * (P_j @ v2): [B, Hkv, G, Dv]
    out = out.reshape(B, 1, Hq, -1).to(q.dtype)
    return (out, lse.reshape(B, Hq, 1).float()) if return_lse else out

"""The determinant (rotation-invariant) form as a trilinear form of twice the head dim.

Per 3-dim chunk, Sarrus' rule gives (docs/math.md, The determinant form)

    det[a; b; c] = <a, rot1(b), rot2(c)> - <a, rot2(b), rot1(c)>

with ``rot1(x)_m = x_{m+1}`` and ``rot2(x)_m = x_{m+2}`` (indices mod 3), so

    q'  = [q_c,       -q_c,       q_rest]
    k1' = [rot1 k1_c,  rot2 k1_c,  k1_rest]
    k2' = [rot2 k2_c,  rot1 k2_c,  k2_rest]

where ``_c`` are the first ``3 * floor(D/3)`` dims and ``_rest`` the ``D mod 3`` leftover
dims, which contribute their plain trilinear term. Every backend then runs the
trilinear form on head dim ``6 * floor(D/3) + D mod 3``; autograd carries the gradients
back through these index maps. The forms' registry (:mod:`~twosimplicial.ops.forms`) names
:func:`determinant_to_trilinear` as the determinant form's transform.
"""
from __future__ import annotations

import torch


def rotation_index(D: int, shift: int, device) -> torch.Tensor:
    """Indices that cyclically shift each 3-chunk of the first ``3*(D//3)`` dims by ``shift``."""
    n = D // 3
    base = torch.arange(n, device=device)[:, None] * 3
    return (base + (torch.arange(3, device=device) + shift) % 3).reshape(-1)


def determinant_to_trilinear(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor):
    """Map ``(q, k1, k2)`` with head dim ``D`` to trilinear inputs whose logits are the
    determinant form's. Returns ``(q', k1', k2')`` with head dim ``6*(D//3) + D%3``."""
    D = q.shape[-1]
    c = 3 * (D // 3)
    r1, r2 = rotation_index(D, 1, q.device), rotation_index(D, 2, q.device)
    qc = q[..., :c]
    q_ = torch.cat([qc, -qc, q[..., c:]], dim=-1)
    k1_ = torch.cat([k1[..., r1], k1[..., r2], k1[..., c:]], dim=-1)
    k2_ = torch.cat([k2[..., r2], k2[..., r1], k2[..., c:]], dim=-1)
    return q_, k1_, k2_

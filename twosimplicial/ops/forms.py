"""The forms of the 2-simplicial logit, in one registry every consumer reads.

A form is a function ``logit[i, j, k] = f(q_i, k1_j, k2_k)`` that the library computes as a
trilinear form ``sum_d q'[i, d] k1'[j, d] k2'[k, d]`` of transformed inputs (docs/math.md, The
operation; The determinant form). Each :class:`Form` holds

- ``to_trilinear``: ``(q, k1, k2) -> (q', k1', k2')``, applied by the op
  (:mod:`~twosimplicial.ops.interface`) and the decode step (:mod:`~twosimplicial.ops.decode`)
  before any backend runs; the backends only ever see a trilinear problem;
- ``logits``: the dense reference ``[B, H, S, S, S]`` written from the form's definition (not
  via ``to_trilinear``), used by :func:`~twosimplicial.ops.naive.naive_two_simplicial_attention`
  to check the transform and the backends;
- ``rotary``: whether the form is rotation invariant, so that the 3-chunk rotary embedding
  (docs/math.md, Rotary) makes its logits depend on relative positions only. It is the
  default of ``ModelConfig.simplicial_rotary`` and the only forms that admit it;
- ``min_head_dim``: the least head dim at which the form is itself (one 3x3 determinant needs
  3 dims). ``ModelConfig`` and ``TwoSimplicialAttention`` enforce it; the op takes any head dim
  (below 3 the determinant form has no 3-chunk and reduces to the trilinear term of its dims).
- ``native``: the Triton kernels compute the form at head dim ``D`` themselves (their ``FORM``,
  ``ops/triton/common.py``), so the op skips ``to_trilinear`` on that backend. Both forms are
  native (the determinant form's kernels: docs/kernels.md, The determinant form at head dim D);
  a new form starts with its transform and becomes native once kernels for it pass the GPU tests.

``FORMS`` (the names, in order) is the list of valid ``form`` arguments everywhere: the op, the
decode step, the dense reference, ``ModelConfig``, the layer and the ``demo --form`` choices.

Adding a form is one entry here plus its tests. The paper's companion rank-1 form
``q.k1 + q.k2``, for example, would be: a reference ``rank1_logits`` beside
:func:`determinant_logits` below (``einsum("bihd,bjhd->bhij", q, k1)[..., None] +
einsum("bihd,bkhd->bhik", q, k2)[..., None, :]``), a transform to trilinear inputs of head dim
``2 D`` (``q' = [q, q]``, ``k1' = [k1, 1]``, ``k2' = [1, k2]``), and the entry
``"rank1": Form("rank1", rank1_to_trilinear, rank1_logits, rotary=False, min_head_dim=1)`` in
``REGISTRY``; tests/test_forms.py then checks its transform against its reference logits and
that every consumer lists it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .determinant import determinant_to_trilinear

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Form:
    """One form of the 2-simplicial logit (see the module docstring for each field)."""
    name: str
    to_trilinear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Triple]
    logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rotary: bool
    min_head_dim: int
    native: bool = False


def trilinear_logits(q, k1, k2):
    """``sum_d q[i,d] k1[j,d] k2[k,d]`` per batch and head: ``[B, H, S, S, S]`` (heads already expanded)."""
    return torch.einsum("bihd,bjhd,bkhd->bhijk", q, k1, k2)


def determinant_logits(q, k1, k2):
    """The determinant form (docs/math.md, The determinant form): ``floor(D/3)`` 3x3
    determinants per (i, j, k), summed, plus the plain trilinear term of the ``D mod 3``
    leftover dims. Computed directly from the 3x3 determinant (not via the Sarrus rewrite
    of :func:`~twosimplicial.ops.determinant.determinant_to_trilinear` the fast paths use)."""
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


def _identity(q, k1, k2) -> Triple:
    """The trilinear form is its own trilinear problem."""
    return q, k1, k2


REGISTRY: dict[str, Form] = {
    "trilinear": Form("trilinear", _identity, trilinear_logits, rotary=False, min_head_dim=1, native=True),
    "determinant": Form("determinant", determinant_to_trilinear, determinant_logits, rotary=True, min_head_dim=3,
                        native=True),
}

FORMS: tuple[str, ...] = tuple(REGISTRY)
ROTARY_FORMS: tuple[str, ...] = tuple(name for name, f in REGISTRY.items() if f.rotary)

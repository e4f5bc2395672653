"""Theorem 5.1 (Roy et al. 2025, appendix A), built explicitly: one determinant-form head of
head dim 7 solves causal Match3, run through the public op.

Task (``twosimplicial.data.match3``): tokens ``x_0..x_{n-1}`` in ``[0, M)``; label ``y_t = 1`` iff
some ``j, k <= t`` (repeats allowed, ``t`` itself included) have ``x_t + x_j + x_k = 0 (mod M)``.

Construction. Position 0 of the attention sequence is a *blank*; token ``t`` sits at position
``t + 1``. With ``th = 2 pi x / M`` and a constant ``c`` (``scale = 1``, ``c`` lives in ``q``):

    q  = c (cos th, sin th, 0,  -sin th,  cos th,  0,  1)
    k1 =   (sin th, cos th, 0,  -sin th, -cos th,  0,  0)       v1 = v2 = 1  (one channel)
    k2 =   (0,      0,      cos th, 0,    0,  -sin th,  0)
    blank: k1 = k2 = e_7, v1 = v2 = 0, q = 0 (its own output is not a label)

Our form (docs/math.md, The determinant form) is ``sum_c det[q^(c); k1^(c); k2^(c)] +
q_7 k1_7 k2_7`` with rows in the order (q, k1, k2). Expanding along the third column, chunk 1
gives ``c cos(th_i + th_j) cos th_k`` and chunk 2 gives ``-c sin(th_i + th_j) sin th_k``, so the
paper's vectors need no change under our convention: a real triple scores
``c cos(th_i + th_j + th_k)``, which is ``c`` exactly at a match. Pairs with the blank:
blank-blank scores ``c`` (the 7th dim); blank-real and real-blank score 0 (one determinant row
is zero and one of ``k1_7, k2_7`` is 0). Both have value product 0.

Output. For token ``t`` with ``m = t + 1`` real tokens in its windows (windows cover the
sequence), ``beta`` matching pairs and ``R = sum`` of ``exp(c cos(2 pi s_jk / M))`` over the
non-matching real pairs (``s_jk = x_t + x_j + x_k mod M != 0``):

    out_t = (beta e^c + R) / ((beta + 1) e^c + 2m + R)

Thresholding at 1/4. With ``g = 1 - cos(2 pi / M)`` every non-match has ``cos <= 1 - g``, so
``R <= m^2 e^{c(1-g)}``. No match (beta = 0): ``out_t < R / e^c <= m^2 e^{-cg}``, below 1/4 (in
fact ``3R < e^c``) when ``c > log(3 m^2) / g``. A match (beta >= 1; ``out_t`` grows with beta):
``out_t >= 1 / (2 (1 + m e^{-c})) > 1/4`` once ``e^c > m``, which the first condition implies
(``g <= 2``). Since ``m <= n``:

    required_c(n, M) = log(3 n^2) / (1 - cos(2 pi / M)),   any c > required_c(n, M) is exact.

The bound is tight: when ``3`` does not divide ``M``, the constant sequence ``x = 3^{-1} mod M``
has every pair at ``s = 1`` and no match, and its last output exceeds 1/4 iff
``c < (log(3 n^2) - log(1 + 2n e^{-c})) / g``. The default ``c = 2 required_c`` leaves a margin
of ``log(3 n^2)`` nats: no-match outputs stay below ``1 / (9 n^2)``.

Precision. Logits are sums of products of ``c``-sized entries, so rounding moves them by a few
``eps * c`` nats: nothing in float64; in float32 about 1e-2 nats at ``(n, M) = (24, 188)``
(``c ~ 2.7e4``), far inside the margin; tf32 (``eps ~ 5e-4``) would move them by ~10 nats, so
the Triton path needs ``torch.backends.cuda.matmul.allow_tf32 = False`` for large ``M``.

The same vectors through the *trilinear* form score 0 for every real pair (``q`` is zero
wherever ``k2`` is nonzero), so that output depends on the position only, not on ``x``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._validate import check_int
from ..ops import two_simplicial_attention

THRESHOLD = 0.25


def required_c(n: int, M: int) -> float:
    """Any ``c`` strictly above ``log(3 n^2) / (1 - cos(2 pi / M))`` labels every position exactly."""
    check_int("n", n, 1)
    check_int("M", M, 2)
    return math.log(3 * n * n) / (1 - math.cos(2 * math.pi / M))


def _tokens(x, M: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).cpu()
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be [batch, n] with n >= 1, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"x must hold integers, got {x.dtype}")
    check_int("M", M, 2)
    if x.numel() and (x.min() < 0 or x.max() >= M):
        raise ValueError(f"x values must lie in [0, M={M})")
    return x.long()


def build_inputs(x, M: int, c: float | None = None, dtype=torch.float64, device="cpu"):
    """``(q, k1, v1, k2, v2, scale)`` for tokens ``x [B, n]``: ``[B, n + 1, 1, 7]`` keys and query,
    ``[B, n + 1, 1, 1]`` values, position 0 the blank, ``scale = 1.0``; ``c`` defaults to
    ``2 * required_c(n, M)``."""
    x = _tokens(x, M)
    c = 2 * required_c(x.shape[1], M) if c is None else c
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"c must be a real number or None, got {type(c).__name__}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a finite number > 0, got {c!r}")
    th = 2 * math.pi * torch.cat([torch.zeros_like(x[:, :1]), x], dim=1).double() / M     # [B, n+1]
    cos, sin, zero = th.cos(), th.sin(), torch.zeros_like(th)
    q = c * torch.stack([cos, sin, zero, -sin, cos, zero, zero + 1], dim=-1)
    k1 = torch.stack([sin, cos, zero, -sin, -cos, zero, zero], dim=-1)
    k2 = torch.stack([zero, zero, cos, zero, zero, -sin, zero], dim=-1)
    v = torch.ones_like(th)[..., None]
    q[:, 0] = 0
    k1[:, 0] = k2[:, 0] = torch.tensor([0, 0, 0, 0, 0, 0, 1], dtype=torch.float64)
    v[:, 0] = 0
    q, k1, k2, v = (t[:, :, None].to(dtype=dtype, device=device) for t in (q, k1, k2, v))
    return q, k1, v, k2, v.clone(), 1.0


def construction_output(x, M: int, c: float | None = None, form: str = "determinant", backend: str = "torch",
                        dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The head's output at the real tokens, ``[B, n]`` (about ``beta / (beta + 1)``), through
    ``two_simplicial_attention`` with windows covering the sequence."""
    q, k1, v1, k2, v2, scale = build_inputs(x, M, c, dtype=dtype, device=device)
    S = q.shape[1]
    out = two_simplicial_attention(q, k1, v1, k2, v2, S, S, scale=scale, form=form, backend=backend)
    return out[:, 1:, 0, 0]


def predict_labels(x, M: int, c: float | None = None, form: str = "determinant", backend: str = "torch",
                   dtype=torch.float64, device="cpu") -> np.ndarray:
    """Match3 labels ``[B, n]`` (int64 0/1, as ``match3_labels``): the output above 1/4."""
    out = construction_output(x, M, c, form=form, backend=backend, dtype=dtype, device=device)
    return (out > THRESHOLD).long().cpu().numpy()

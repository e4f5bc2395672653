"""Rotary position embeddings.

* ``RotaryEmbedding``: RoPE for dot-product attention (Su et al.). Pairs of dims
  ``(x[d], x[d + D/2])`` are rotated by the angle ``p * theta_d``, so
  ``<R_i q, R_j k> = <q, R_{j-i} k>`` depends on ``j - i`` only.

* ``Rotary3D``: the determinant form's generalisation (docs/math.md, Rotary). Every 3-chunk
  ``c`` of ``q``, ``k1``, ``k2`` is rotated about a fixed unit axis ``u_c`` by the
  angle ``p * theta_c``: ``R(p) = exp(p * theta_c * [u_c]x)``. Rotations about one
  axis commute and ``det R = 1``, so

      det(R_i q, R_j k1, R_k k2) = det(q, R_{j-i} k1, R_{k-i} k2),

  and the logit depends on relative positions only. The ``D mod 3`` leftover dims
  stay unrotated (their trilinear terms carry no position).

Angles are computed on the fly from integer positions, in float32 (float64 for
float64 inputs): there is no table to outgrow, and no buffer that ``model.half()``
could round.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_int, check_real


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _angles(start_pos: int, S: int, freqs: torch.Tensor) -> torch.Tensor:
    """``[S, len(freqs)]``: position ``p`` times each frequency, for ``p = start_pos .. start_pos+S-1``."""
    start_pos = check_int("start_pos", start_pos, 0)
    pos = torch.arange(start_pos, start_pos + S, device=freqs.device, dtype=torch.float64)
    return (pos[:, None] * freqs.to(torch.float64)).to(freqs.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE on ``x [B, S, H, D]`` (D even), half-split layout (GPT-NeoX / Llama)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        head_dim = check_int("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, check_real("theta", theta, positive=True)

    def freqs(self, device, dtype) -> torch.Tensor:
        """theta_d = theta^(-2d/D), d = 0 .. D/2-1."""
        return self.theta ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=dtype) / self.head_dim)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        dt = _compute_dtype(x)
        ang = _angles(start_pos, x.shape[1], self.freqs(x.device, dt))      # [S, D/2]
        cos = ang.cos()[None, :, None, :]                                     # [1, S, 1, D/2]
        sin = ang.sin()[None, :, None, :]
        x1, x2 = x.to(dt).chunk(2, dim=-1)
        # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos): a 2-d rotation per pair
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Rotary3D(nn.Module):
    """3-chunk rotary for the determinant form on ``x [B, S, H, D]``, ``D >= 3``.

    Chunk ``c`` (dims ``3c .. 3c+2``, ``c < D // 3``) is rotated about the axis
    ``u_c`` by ``p * theta_c`` with ``theta_c = theta^(-c / n_chunks)`` (RoPE's
    frequency ladder). Rodrigues' formula gives the rotation:

        R v = v cos(a) + (u x v) sin(a) + u (u . v) (1 - cos(a)).

    The axes are fixed (not learned): all ``(1, 1, 1) / sqrt(3)``. Any fixed axis
    gives the relative property; the projections can learn any basis change.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        head_dim = check_int("head_dim", head_dim, 3, what="an integer >= 3 (one 3-chunk)")
        self.head_dim, self.n_chunks, self.theta = head_dim, head_dim // 3, check_real("theta", theta, positive=True)

    def freqs(self, device, dtype) -> torch.Tensor:
        """theta_c = theta^(-c/n), c = 0 .. n-1."""
        return self.theta ** (-torch.arange(self.n_chunks, device=device, dtype=dtype) / self.n_chunks)

    def axes(self, device, dtype) -> torch.Tensor:
        """The unit rotation axis of each chunk, ``[n, 3]``."""
        return torch.full((self.n_chunks, 3), 3 ** -0.5, device=device, dtype=dtype)

    def rotation_matrices(self, start_pos: int, S: int, device=None, dtype=torch.float64) -> torch.Tensor:
        """``R [S, n_chunks, 3, 3]`` for positions ``start_pos .. start_pos+S-1`` (for tests and reading)."""
        ang = _angles(start_pos, S, self.freqs(device, dtype))                         # [S, n]
        u = self.axes(device, dtype)                                                   # [n, 3]
        ux = torch.zeros(self.n_chunks, 3, 3, device=device, dtype=dtype)              # [u]x v = u x v
        ux[:, 0, 1], ux[:, 0, 2], ux[:, 1, 2] = -u[:, 2], u[:, 1], -u[:, 0]
        ux = ux - ux.transpose(-1, -2)
        c, s = ang.cos()[..., None, None], ang.sin()[..., None, None]
        uu = u[:, :, None] * u[:, None, :]
        return torch.eye(3, device=device, dtype=dtype) * c + ux * s + uu * (1 - c)   # [S, n, 3, 3]

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, S, H, D = x.shape
        n = self.n_chunks
        dt = _compute_dtype(x)
        ang = _angles(start_pos, S, self.freqs(x.device, dt))                          # [S, n]
        cos = ang.cos()[None, :, None, :, None]                                        # [1, S, 1, n, 1]
        sin = ang.sin()[None, :, None, :, None]
        v = x[..., : 3 * n].to(dt).reshape(B, S, H, n, 3)
        u = self.axes(x.device, dt)                                                    # [n, 3]
        u_cross_v = torch.linalg.cross(u.expand_as(v), v, dim=-1)
        u_dot_v = (v * u).sum(-1, keepdim=True)
        rot = v * cos + u_cross_v * sin + u * u_dot_v * (1 - cos)
        return torch.cat([rot.reshape(B, S, H, 3 * n).to(x.dtype), x[..., 3 * n :]], dim=-1)

"""``TwoSimplicialAttention``: the 2-simplicial attention layer, ``[B, S, dim] -> [B, S, dim]``."""
from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import nn

from .._validate import check_bool, check_choice, check_head_shape, check_layer_call, check_real
from ..ops import two_simplicial_attention
from ..ops.forms import FORMS, REGISTRY, ROTARY_FORMS
from ..ops.interface import BACKENDS, check_window
from ..ops.decode import decode_two_simplicial_attention
from .cache import WindowCache
from .rotary import Rotary3D


class TwoSimplicialAttention(nn.Module):
    """Five input projections (Q, K1, V1, K2, V2), 2-simplicial attention over causal
    windows ``(w1, w2)``, and an output projection.

    Args:
        dim: model width.
        heads: query heads.
        kv_heads: key/value heads (default ``heads``); ``heads % kv_heads == 0``.
        head_dim: per-head width of q, k1, k2, v1, v2 (default ``dim // heads``).
        w1, w2: window lengths for (k1, v1) and (k2, v2), or ``None`` for no limit (the
            whole causal past; a cache then keeps every past position).
        form: a name in :data:`~twosimplicial.ops.forms.FORMS` (``"trilinear"``, e.g.
            ``"determinant"``); ``head_dim`` must reach the form's minimum (3 for the determinant).
        kv_offsets: add constants to K2 and V2 as Meta's kernels do (``q.(k1*(k2+c))``
            folds a plain dot-product term into the trilinear one). ``True`` uses
            ``(1/head_dim, 1.0)``; a pair ``(k2_offset, v2_offset)`` sets them; ``False``
            (default) adds nothing.
        bias: biases on the projections.
        backend: passed to :func:`two_simplicial_attention`.
        rotary: the 3-chunk rotary embedding (docs/math.md, Rotary; needs a rotation-invariant
            form, e.g. ``form="determinant"``, and ``head_dim >= 3``): q, k1 and k2 (after the
            offsets) are rotated by their absolute positions, and the logits depend on relative
            positions only.
        rope_theta: base of the rotary frequency ladder.

    ``forward(x, start_pos=0, cache=None)``: ``start_pos`` is the absolute position of
    ``x[:, 0]`` (it matters only with rotary); a :class:`WindowCache` from
    :meth:`new_cache` makes the call continue a sequence whose past the cache holds
    (incremental decoding; the cache keeps the last ``w1 - 1`` / ``w2 - 1`` positions).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 w1: int | None = 512, w2: int | None = 32, form: str = "trilinear",
                 kv_offsets: bool | tuple[float, float] = False, bias: bool = False, backend: str = "auto",
                 rotary: bool = False, rope_theta: float = 10000.0):
        super().__init__()
        dim, heads, kv_heads, head_dim = check_head_shape(dim, heads, kv_heads, head_dim)
        check_choice("form", form, FORMS)
        if head_dim < REGISTRY[form].min_head_dim:
            raise ValueError(f"form={form!r} needs head_dim >= {REGISTRY[form].min_head_dim}, got {head_dim}")
        check_choice("backend", backend, BACKENDS)
        w1, w2 = check_window("w1", w1), check_window("w2", w2)
        check_bool("bias", bias)
        check_bool("rotary", rotary)
        rope_theta = check_real("rope_theta", rope_theta, positive=True)
        if kv_offsets is True:
            kv_offsets = (1.0 / head_dim, 1.0)
        elif kv_offsets is False:
            kv_offsets = (0.0, 0.0)
        elif not (isinstance(kv_offsets, (tuple, list)) and len(kv_offsets) == 2
                  and all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c)
                          for c in kv_offsets)):
            raise ValueError(f"kv_offsets must be a bool or a pair of finite numbers (k2_offset, v2_offset), "
                             f"got {kv_offsets!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.w1, self.w2, self.form, self.backend = w1, w2, form, backend
        self.k2_offset, self.v2_offset = float(kv_offsets[0]), float(kv_offsets[1])
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k1_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v1_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.k2_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v2_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        if rotary and not REGISTRY[form].rotary:
            raise ValueError(f"rotary=True needs a rotation-invariant form {ROTARY_FORMS}, got form={form!r}: "
                             "only there do rotations make the logits relative")
        if rotary and head_dim < 3:
            raise ValueError(f"rotary=True needs head_dim >= 3 (one 3-chunk), got {head_dim}")
        self.rotary = Rotary3D(head_dim, rope_theta) if rotary else None

    def project(self, x: torch.Tensor):
        """``x [B, S, dim]`` -> ``(q, k1, v1, k2, v2)`` as ``[B, S, H, head_dim]``, offsets added."""
        B, S, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, D)
        k1 = self.k1_proj(x).view(B, S, Hkv, D)
        v1 = self.v1_proj(x).view(B, S, Hkv, D)
        k2 = self.k2_proj(x).view(B, S, Hkv, D) + self.k2_offset
        v2 = self.v2_proj(x).view(B, S, Hkv, D) + self.v2_offset
        return q, k1, v1, k2, v2

    def _cache_windows(self) -> tuple[int, int]:
        """The windows a cache keeps; no limit (``None``) is a window no sequence reaches."""
        return tuple(sys.maxsize if w is None else w for w in (self.w1, self.w2))

    def new_cache(self) -> WindowCache:
        return WindowCache(*self._cache_windows())

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: WindowCache | None = None) -> torch.Tensor:
        check_layer_call(self.dim, x, start_pos, cache, WindowCache)
        if (cache is not None) and (cache.w1, cache.w2) != self._cache_windows():
            raise ValueError(f"cache holds windows (w1, w2) = ({cache.w1}, {cache.w2}) but the layer's are "
                             f"({self.w1}, {self.w2}): make it with layer.new_cache()")
        q, k1, v1, k2, v2 = self.project(x)
        if self.rotary is not None:
            # R_p applied at absolute positions; det(R_i q, R_j k1, R_k k2) = det(q, R_{j-i} k1, R_{k-i} k2)
            q, k1, k2 = (self.rotary(t, start_pos) for t in (q, k1, k2))
        if cache is None:
            out = self._attend(q, k1, v1, k2, v2)
        else:
            out = self._attend_cached(q, k1, v1, k2, v2, cache)
        return self.out_proj(out.flatten(2))

    def _attend(self, q, k1, v1, k2, v2):
        return two_simplicial_attention(q, k1, v1, k2, v2, self.w1, self.w2, form=self.form, backend=self.backend)

    def _attend_cached(self, q, k1, v1, k2, v2, cache: WindowCache):
        S = q.shape[1]
        k1, v1, k2, v2 = cache.append(k1, v1, k2, v2)          # past (<= w - 1 positions) + the S new ones
        P1, P2 = k1.shape[1] - S, k2.shape[1] - S              # cached past lengths
        if S == 1:                                             # one token: a small dense problem
            return decode_two_simplicial_attention(q, k1, v1, k2, v2, form=self.form)
        if P1 == 0 and P2 == 0:                                # a prefill from an empty cache
            return self._attend(q, k1, v1, k2, v2)
        # A chunk continuing a sequence: run the full op on [past, new] and keep the new rows.
        # k2/v2 have the shorter past when w2 < w1 (and vice versa): front-pad them with zeros to a
        # common length P; those positions lie outside every new query's window, so they never count.
        P = max(P1, P2)
        q = _front_pad(q, P)                                   # the past rows' queries: zeros, discarded
        out = self._attend(q, _front_pad(k1, P - P1), _front_pad(v1, P - P1), _front_pad(k2, P - P2),
                           _front_pad(v2, P - P2))
        return out[:, P:]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"w1={self.w1}, w2={self.w2}, form={self.form!r}, kv_offsets=({self.k2_offset}, {self.v2_offset}), "
                f"rotary={self.rotary is not None}")


def _front_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` zero positions in front of ``t [B, S, H, D]``."""
    return torch.cat([t.new_zeros(t.shape[0], n, *t.shape[2:]), t], dim=1) if n else t

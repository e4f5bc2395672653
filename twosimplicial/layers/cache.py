"""Key/value caches for incremental decoding.

* ``DotCache``: every past ``(k, v)`` of a dot-product layer (grows with the sequence).
* ``WindowCache``: a 2-simplicial layer only ever looks back ``w1 - 1`` positions for
  ``(k1, v1)`` and ``w2 - 1`` for ``(k2, v2)``, so it keeps just those positions: its
  size is bounded by the windows, not by the sequence.
* ``KVCache``: one per-layer cache per block plus ``pos``, the number of tokens the
  model has already seen (the absolute position of the next token).

Tensors are stored as ``[B, T, H, D]`` exactly as the layers produce them (after
rotary embeddings and offsets), so a cached step sees the same numbers as a full
recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _check_continues(held: torch.Tensor, new: torch.Tensor) -> None:
    """The new positions continue the cached sequences: same batch, heads, head dim, dtype, device."""
    def desc(t):
        return f"batch {t.shape[0]}, {t.shape[2]} heads of {t.shape[3]}, {t.dtype} on {t.device}"
    if held.shape[0] != new.shape[0] or held.shape[2:] != new.shape[2:] or held.dtype != new.dtype \
            or held.device != new.device:
        raise ValueError(f"cache holds {desc(held)} but the new positions have {desc(new)}: "
                         "use a fresh cache (new_cache() or reset())")


@dataclass
class DotCache:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions and return every cached ``(k, v)``, oldest first."""
        if self.k is not None:
            _check_continues(self.k, k)
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        self.k, self.v = k, v
        return k, v

    def clear(self) -> None:
        self.k = self.v = None


def _last(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` positions of ``t [B, T, ...]``; a view when its storage is at most twice
    their size (a decode step's fresh ``cat``), else a copy, so that a long prefill (or a
    fused projection the tensor is a view of) is not kept alive: memory stays O(window)."""
    kept = t[:, max(0, t.shape[1] - n):]
    if kept.untyped_storage().nbytes() > 2 * kept.numel() * kept.element_size():
        kept = kept.clone()
    return kept


@dataclass
class WindowCache:
    w1: int
    w2: int
    k1: torch.Tensor | None = None     # the last <= w1 - 1 positions
    v1: torch.Tensor | None = None
    k2: torch.Tensor | None = None     # the last <= w2 - 1 positions
    v2: torch.Tensor | None = None

    def append(self, k1, v1, k2, v2):
        """Add the new positions; return ``(k1, v1, k2, v2)`` = cached past + new, oldest
        first (k1/v1 and k2/v2 may differ in length), and keep only what a later query
        can see: query ``i`` reads ``j > i - w1`` and ``k > i - w2``, so the next one
        needs the last ``w1 - 1`` and ``w2 - 1`` positions."""
        if self.k1 is not None:
            _check_continues(self.k1, k1)
            k1, v1 = torch.cat([self.k1, k1], dim=1), torch.cat([self.v1, v1], dim=1)
            k2, v2 = torch.cat([self.k2, k2], dim=1), torch.cat([self.v2, v2], dim=1)
        self.k1, self.v1 = _last(k1, self.w1 - 1), _last(v1, self.w1 - 1)
        self.k2, self.v2 = _last(k2, self.w2 - 1), _last(v2, self.w2 - 1)
        return k1, v1, k2, v2

    def clear(self) -> None:
        self.k1 = self.v1 = self.k2 = self.v2 = None


@dataclass
class KVCache:
    layers: list = field(default_factory=list)
    pos: int = 0

    def reset(self) -> None:
        for c in self.layers:
            c.clear()
        self.pos = 0

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for c in self.layers for t in vars(c).values()
                   if isinstance(t, torch.Tensor))

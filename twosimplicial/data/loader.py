"""Sources of fixed-length samples and a weighted mixture loader, deterministic and resumable.

A *source* maps a counter ``c = 0, 1, 2, ...`` to a sample ``(x, y)`` of length
``seq_len`` by a pure function of ``(seed, c)`` (``get_many(counters)``). Nothing else is
hidden state, so the loader's whole position is a few integers and a run can stop
and resume anywhere, mid-epoch included.

``TokenChunks`` cuts a flat token array into non-overlapping windows of
``seq_len + 1`` tokens (``x = w[:-1]``, ``y = w[1:]``); epoch ``e`` visits them in the
permutation drawn from ``(seed, e)``; counter ``c`` is window ``perm_e[c % N]`` with
``e = c // N``.

``MixtureLoader`` draws, for global batch ``t``, a source for each of the
``batch_size * world_size`` rows from ``(seed, t)`` with the given weights; the rows
given to a source take its next counters in order. Rank ``r`` materialises rows
``[r*batch_size, (r+1)*batch_size)``, so ``world_size`` ranks together see exactly the
batch one process with ``batch_size * world_size`` rows would.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class TokenChunks:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        n = (len(tokens) - 1) // seq_len
        if n < 1:
            raise ValueError(f"token array of {len(tokens)} tokens is too short for one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.seed, self.shuffle, self.n = tokens, seq_len, seed, shuffle, n
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.n

    def _window(self, c: int) -> int:
        epoch, pos = divmod(int(c), self.n)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 0x70C5, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def get_many(self, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L = self.seq_len
        w = np.stack([np.asarray(self.tokens[s * L: s * L + L + 1], dtype=np.int64)
                      for s in (self._window(c) for c in counters)]) if len(counters) \
            else np.zeros((0, L + 1), dtype=np.int64)
        return w[:, :-1], w[:, 1:]


class MixtureLoader:
    def __init__(self, sources: Mapping[str, object], weights: Mapping[str, float] | None = None, *,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not sources:
            raise ValueError("sources must name at least one source")
        self.names = sorted(sources)
        weights = dict(weights) if weights else {k: 1.0 for k in self.names}
        if set(weights) != set(self.names):
            raise ValueError(f"weights must name exactly the sources {self.names}, got {sorted(weights)}")
        w = np.array([float(weights[k]) for k in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.sources = dict(sources)
        self.p = w / w.sum()
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.step = 0
        self.counters = {k: 0 for k in self.names}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, 0x313, self.step])
        choice = rng.choice(len(self.names), size=G, p=self.p) if len(self.names) > 1 else np.zeros(G, dtype=int)
        counters = np.empty(G, dtype=np.int64)
        for s, name in enumerate(self.names):
            rows = np.nonzero(choice == s)[0]
            counters[rows] = self.counters[name] + np.arange(len(rows))
            self.counters[name] += len(rows)
        lo = self.rank * self.batch_size
        mine = slice(lo, lo + self.batch_size)
        xs = [None] * self.batch_size
        ys = [None] * self.batch_size
        for s, name in enumerate(self.names):
            rows = np.nonzero(choice[mine] == s)[0]
            if len(rows):
                x, y = self.sources[name].get_many(counters[mine][rows])
                for r, xi, yi in zip(rows, x, y):
                    xs[r], ys[r] = xi, yi
        self.step += 1
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def epochs(self) -> dict[str, float]:
        """Fraction of an epoch each source has served (all ranks together)."""
        return {k: self.counters[k] / len(self.sources[k]) for k in self.names}

    def state_dict(self) -> dict:
        return {"step": self.step, "counters": dict(self.counters), "seed": self.seed,
                "world_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        if state["world_batch"] != self.batch_size * self.world_size:
            raise ValueError(f"loader state was saved with global batch {state['world_batch']}, "
                             f"this loader has {self.batch_size * self.world_size}")
        if set(state["counters"]) != set(self.names):
            raise ValueError(f"loader state names sources {sorted(state['counters'])}, this loader {self.names}")
        self.step = int(state["step"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}

"""Match3 (Sanford et al. 2023; docs/math.md, Match3), causal token-classification variant.

Input ``x_0..x_{n-1}`` uniform in ``[0, M)``. Label at position ``i``:

    y_i = 1  iff  there are j, k with 0 <= j, k <= i and x_i + x_j + x_k = 0 (mod M)

Convention chosen here: ``j`` and ``k`` range over the whole causal prefix
*including* ``i`` itself and may be equal to each other. This is exactly the set of
pairs a 2-simplicial layer with windows ``w1, w2 >= n`` attends over (both windows
include the diagonal), so the task asks nothing about positions, only about values.

Balance: for a prefix of ``i+1`` tokens there are ``(i+1)(i+2)/2`` unordered pairs, each
hitting the residue ``-x_i`` with probability about ``1/M``, so the positive rate at
``i`` is about ``1 - (1 - 1/M)^((i+1)(i+2)/2)``. ``balanced_modulus(n)`` picks the ``M``
whose positive rate averaged over positions (measured exactly on a fixed sample) is
closest to one half. Early positions are mostly 0 and late ones mostly 1 whatever M
is, so a model that only knows the position already beats 50%: ``position_baseline``
gives that accuracy, the bar a real solution must clear.
"""
from __future__ import annotations

import numpy as np


def match3_labels(x: np.ndarray, M: int) -> np.ndarray:
    """Labels ``[B, n]`` (int64 0/1) for inputs ``x`` ``[B, n]`` in ``[0, M)``; O(B n^2).

    ``reach[b, r]`` is True once some pair ``j, k <= i`` has ``x_j + x_k = r (mod M)``;
    step ``i`` adds the pairs ``(i, j)`` for ``j <= i`` and then reads ``reach[b, -x_i]``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, n], got shape {x.shape}")
    if x.size and (x.min() < 0 or x.max() >= M):
        raise ValueError(f"x values must lie in [0, M={M})")
    B, n = x.shape
    reach = np.zeros((B, M), dtype=bool)
    rows = np.arange(B)[:, None]
    y = np.zeros((B, n), dtype=np.int64)
    for i in range(n):
        reach[rows, (x[:, i:i + 1] + x[:, : i + 1]) % M] = True
        y[:, i] = reach[np.arange(B), (-x[:, i]) % M]
    return y


def _check(n: int, M: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(M, int) or M < 2:
        raise ValueError(f"M must be an int >= 2, got {M!r}")


def match3_batch(rng: np.random.Generator, batch: int, n: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    _check(n, M)
    x = rng.integers(0, M, size=(batch, n), dtype=np.int64)
    return x, match3_labels(x, M)


def positive_rate(n: int, M: int, samples: int = 2048, seed: int = 1234) -> np.ndarray:
    """Measured fraction of positive labels per position ``[n]`` (fixed sample)."""
    _, y = match3_batch(np.random.default_rng(seed), samples, n, M)
    return y.mean(0)


def balanced_modulus(n: int) -> int:
    """The modulus ``M`` whose mean positive rate for length ``n`` is closest to 0.5.

    The rate falls monotonically as ``M`` grows, so bisect on ``M`` and compare neighbours."""
    _check(n, 2)
    rates: dict[int, float] = {}                 # memo: the final lo/hi were already sampled by the bisection

    def rate(M: int) -> float:
        if M not in rates:
            rates[M] = float(positive_rate(n, M, samples=512).mean())
        return rates[M]

    lo, hi = 2, 2 * n * n + 2                     # rate(lo) >= 1/2 > rate(hi) for any n >= 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rate(mid) >= 0.5:
            lo = mid
        else:
            hi = mid
    return lo if abs(rate(lo) - 0.5) <= abs(rate(hi) - 0.5) else hi


def position_baseline(n: int, M: int) -> float:
    """Accuracy of predicting each position's majority label (knows the position only)."""
    r = positive_rate(n, M)
    return float(np.maximum(r, 1 - r).mean())


class Match3Source:
    """Sample ``c`` of a stream is a pure function of ``(seed, split, c)``: resumable anywhere."""

    _SPLIT_KEY = {"train": 0, "val": 1}

    def __init__(self, n: int, M: int, seed: int = 0, split: str = "train"):
        _check(n, M)
        if split not in self._SPLIT_KEY:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.n, self.M, self.seed, self.split = n, M, seed, split

    def __len__(self) -> int:           # a stream has no epochs; report a nominal size
        return 2**62

    def get_many(self, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = self._SPLIT_KEY[self.split]
        x = np.stack([np.random.default_rng([self.seed, 0x3A7C, key, int(c)]).integers(0, self.M, self.n)
                      for c in counters]) if len(counters) else np.zeros((0, self.n), dtype=np.int64)
        return x.astype(np.int64), match3_labels(x, self.M)

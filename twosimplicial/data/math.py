"""Multi-step arithmetic word problems with worked solutions (GSM8k-like in form).

A problem is a start amount followed by 2-5 operations (buy, buy packs, give away,
double, share equally, and optionally sell at a price). Every intermediate value is
a non-negative integer and every division is exact. The worked solution writes one
equation ``a op b = c`` per step and ends with ``#### answer`` as GSM8k does.

Held-out problems: a problem is held out iff ``int(sha256(question)[:8], 16) %
HELDOUT_MODULUS == 0``. Training streams skip those, evaluation streams keep only
those, so the two are disjoint by construction whatever the seeds; the streams also
use different seed keys, and duplicates within a stream are dropped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

HELDOUT_MODULUS = 10

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemi", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards",
         "stamps", "coins", "eggs", "flowers", "candles", "buttons", "ribbons"]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str            # worked steps, ending with "#### <answer>"
    answer: int
    start: int
    ops: tuple               # ((op, *args), ...) in order; see ``evaluate_ops``

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def target(self) -> str:
        return f" {self.solution}"

    @property
    def text(self) -> str:
        return self.prompt + self.target


def evaluate_ops(start: int, ops) -> int:
    """Recompute a problem's answer from its structured operations (independent of the text)."""
    x = start
    for op, *args in ops:
        if op == "add":
            x = x + args[0]
        elif op == "packs":
            x = x + args[0] * args[1]
        elif op == "sub":
            x = x - args[0]
        elif op == "mul":
            x = x * args[0]
        elif op == "div":
            if x % args[0]:
                raise ValueError(f"inexact division {x} / {args[0]}")
            x = x // args[0]
        elif op == "price":
            x = x * args[0]
        else:
            raise ValueError(f"unknown op {op!r}")
        if x < 0:
            raise ValueError("negative intermediate value")
    return x


def make_problem(rng: np.random.Generator) -> Problem:
    name, friend = (NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False))
    item = ITEMS[rng.integers(len(ITEMS))]
    x = start = int(rng.integers(5, 60))
    q = [f"{name} has {x} {item}."]
    s = [f"{name} starts with {x} {item}."]
    ops = []
    n_steps = int(rng.integers(2, 6))
    for _ in range(n_steps):
        kind = rng.choice(["add", "packs", "sub", "mul", "div"])
        if kind == "sub" and x < 2:
            kind = "add"
        divisors = [m for m in range(2, 7) if x % m == 0]
        if kind == "div" and not divisors:
            kind = "packs"
        if kind == "mul" and x > 200:
            kind = "sub"
        if kind == "add":
            k = int(rng.integers(2, 40))
            q.append(f"{name} buys {k} more {item}.")
            s.append(f"After buying {k} more: {x} + {k} = {x + k}.")
            ops.append(("add", k)); x += k
        elif kind == "packs":
            p, e = int(rng.integers(2, 7)), int(rng.integers(2, 13))
            q.append(f"Then {name} gets {p} packs with {e} {item} in each pack.")
            s.append(f"The packs hold {p} * {e} = {p * e} {item}, so {x} + {p * e} = {x + p * e}.")
            ops.append(("packs", p, e)); x += p * e
        elif kind == "sub":
            k = int(rng.integers(1, x))
            q.append(f"{name} gives {k} {item} to {friend}.")
            s.append(f"After giving {k} to {friend}: {x} - {k} = {x - k}.")
            ops.append(("sub", k)); x -= k
        elif kind == "mul":
            m = int(rng.integers(2, 4))
            word = {2: "doubles", 3: "triples"}[m]
            q.append(f"Then {name} {word} the number of {item}.")
            s.append(f"The number {word}: {x} * {m} = {x * m}.")
            ops.append(("mul", m)); x *= m
        else:
            m = divisors[int(rng.integers(len(divisors)))]
            q.append(f"{name} splits the {item} into {m} equal groups and keeps one group.")
            s.append(f"One of {m} equal groups: {x} / {m} = {x // m}.")
            ops.append(("div", m)); x //= m
    if rng.random() < 0.3:
        price = int(rng.integers(2, 10))
        q.append(f"{name} sells all of them for ${price} each. How many dollars does {name} get?")
        s.append(f"Selling {x} at ${price} each: {x} * {price} = {x * price}.")
        ops.append(("price", price)); x *= price
    else:
        q.append(f"How many {item} does {name} have now?")
    s.append(f"#### {x}")
    return Problem(" ".join(q), "\n".join(s), x, start, tuple(ops))


def is_heldout(p: Problem) -> bool:
    return int(hashlib.sha256(p.question.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


_SPLIT_KEY = {"train": 0, "eval": 1}


def math_problems(n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "eval"), deterministic in ``seed``."""
    if split not in _SPLIT_KEY:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    want_heldout = split == "eval"
    out, seen, i = [], set(), 0
    while len(out) < n:
        p = make_problem(np.random.default_rng([seed, _SPLIT_KEY[split], i]))
        i += 1
        if is_heldout(p) == want_heldout and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def math_token_stream(tokenizer, n: int, seed: int, eos: int, dtype=np.uint32) -> np.ndarray:
    """Training problems encoded and concatenated, ``<|endoftext|>`` after each."""
    texts = [p.text for p in math_problems(n, seed, "train")]
    ids = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=dtype)

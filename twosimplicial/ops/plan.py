"""The op's problem decisions, made in one place: the windows clamped to ``S``, which key set
takes the small window, the GQA ratio, the kernels' dot precision and the empty-input case.

The op is symmetric under swapping ``(k1, v1, w1)`` with ``(k2, v2, w2)`` (docs/math.md), so
every backend works on one canonical problem: a *small* window ``ws`` over ``(ks, vs)`` and a
*big* window ``wb >= ws`` over ``(kb, vb)`` (docs/kernels.md, The canonical problem).
:func:`make_plan` decides the roles; :meth:`Plan.split` hands the inputs to the backend in
their roles and :meth:`Plan.merge` hands the role gradients back as ``(dk1, dv1, dk2, dv2)``.
The forward and the backward must see the same roles (the backward recomputes the forward's
rounded virtual queries ``z = q * k_s``), which holds because both build their plan here from
the same shapes, windows, dtype and flag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One call's problem. Build it with :func:`make_plan`.

    ``ws <= wb`` are the windows clamped to ``S``; ``swap`` is True when ``(k2, v2, w2)`` takes
    the small role (``w1 >= w2``: ``k2`` is small on a tie), False when ``(k1, v1, w1)`` does.
    ``precision`` is the kernels' ``tl.dot`` precision: ``"ieee"`` for float32 inputs without
    ``allow_tf32``, else ``"tf32"`` (16-bit operands ignore it).
    """
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    ws: int
    wb: int
    swap: bool
    allow_tf32: bool
    precision: str

    @property
    def gqa(self) -> int:
        """Query heads per key/value head (1: MHA; Hq: MQA)."""
        return self.Hq // self.Hkv

    @property
    def w1(self) -> int:
        """``w1`` clamped to ``S``."""
        return self.wb if self.swap else self.ws

    @property
    def w2(self) -> int:
        """``w2`` clamped to ``S``."""
        return self.ws if self.swap else self.wb

    @property
    def empty(self) -> bool:
        """No query to attend from (empty batch, sequence or query heads)."""
        return self.B * self.S * self.Hq == 0

    def roles(self, x1, x2):
        """``(x_s, x_b)``: what belongs to window 1 and window 2, in the small and big roles."""
        return (x2, x1) if self.swap else (x1, x2)

    def split(self, k1, v1, k2, v2):
        """``(ks, vs, kb, vb)``: the key/value sets in their small and big roles."""
        (ks, vs), (kb, vb) = self.roles((k1, v1), (k2, v2))
        return ks, vs, kb, vb

    def merge(self, dks, dvs, dkb, dvb):
        """``(dk1, dv1, dk2, dv2)`` from the gradients of the small and big roles."""
        return (dkb, dvb, dks, dvs) if self.swap else (dks, dvs, dkb, dvb)


def make_plan(q_shape, v_shape, w1: int, w2: int, dtype: torch.dtype, allow_tf32: bool) -> Plan:
    """The plan for ``q [B, S, Hq, D]``, ``v1``/``v2 [B, S, Hkv, Dv]`` (``v_shape``), windows
    ``w1``, ``w2`` (integers >= 1; past ``S`` means ``S``), the inputs' dtype and whether float32
    products may use tf32."""
    B, S, Hq, D = q_shape
    Hkv, Dv = v_shape[2], v_shape[3]
    w1, w2 = min(int(w1), S), min(int(w2), S)
    swap = w1 >= w2                     # the larger window takes the big (matmul) role, k1 on a tie
    ws, wb = (w2, w1) if swap else (w1, w2)
    if dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "ieee"
    else:
        precision = "tf32"
    return Plan(B=B, S=S, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, ws=ws, wb=wb, swap=swap,
                allow_tf32=bool(allow_tf32), precision=precision)

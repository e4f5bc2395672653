"""The Triton kernels as torch custom ops, differentiable and traceable.

``twosimplicial::fwd`` and ``twosimplicial::bwd`` are registered with
``torch.library.custom_op``, each with a fake (meta) implementation that only computes
output shapes, and the forward gets ``register_autograd``. ``torch.compile(fullgraph=True)``
therefore sees one opaque node per call (no graph break), and CUDA-graph capture works
because neither op synchronises, allocates outside the caching allocator or picks a
configuration by timing.

Precision: float16 / bfloat16 inputs use tensor cores with fp32 accumulation. float32
inputs use tf32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is True
at call time (torch's default is False: full fp32 products, slower); the flag is read
when the plan is made (``interface``) and passed to the op, so compiled graphs see it as a
constant.

The plan (``ops/plan.py``) cannot cross the custom-op boundary: the ops take the inputs in
their ``(k1, v1, k2, v2)`` roles with the plan's clamped windows and tf32 flag, and the
kernels' host code (``two_simplicial_fwd``, ``two_simplicial_bwd``) rebuilds the same plan
from them with the same function, ``make_plan``, to split the inputs and merge the gradients.

``lse`` is returned for callers that need it (decoding, tests) but is not differentiable:
gradients flow through ``out`` only.

Both kernels are deterministic (no atomics): the same inputs give bitwise the same outputs
and gradients.
"""
from __future__ import annotations

import os

import torch

from ..plan import Plan, make_plan
from .bwd import two_simplicial_bwd
from .fwd import two_simplicial_fwd


@torch.library.custom_op("twosimplicial::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
         w1: int, w2: int, scale: float, allow_tf32: bool, form: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # out, lse, and the values as the kernel computed with them (non-finite entries as 0), for
    # the backward
    return two_simplicial_fwd(q, k1, v1, k2, v2, w1, w2, scale, allow_tf32, form=form, keep_values=True)


@_fwd.register_fake
def _fwd_fake(q, k1, v1, k2, v2, w1, w2, scale, allow_tf32, form):
    B, S, Hq, _ = q.shape
    out = q.new_empty((B, S, Hq, v1.shape[3]))
    lse = q.new_empty((B, Hq, S), dtype=torch.float32)
    return out, lse, v1.new_empty(v1.shape), v2.new_empty(v2.shape)      # contiguous, as clean_values makes them


@torch.library.custom_op("twosimplicial::bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: torch.Tensor,
         v2: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, w1: int, w2: int, scale: float,
         allow_tf32: bool, form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = two_simplicial_bwd(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, allow_tf32, form=form)
    # the fake promises contiguous gradients (inductor asserts the strides); the kernels may
    # hand back gathered views
    return tuple(g.contiguous() for g in grads)


@_bwd.register_fake
def _bwd_fake(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, allow_tf32, form):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k1, v1, k2, v2))


def _setup_context(ctx, inputs, output):
    q, k1, _, k2, _, w1, w2, scale, allow_tf32, form = inputs
    out, lse, c1, c2 = output
    ctx.save_for_backward(q, k1, c1, k2, c2, out, lse)
    ctx.w1, ctx.w2, ctx.scale, ctx.allow_tf32, ctx.form = w1, w2, scale, allow_tf32, form
    ctx.mark_non_differentiable(lse, c1, c2)


def _backward(ctx, dout, dlse, dc1, dc2):
    q, k1, v1, k2, v2, out, lse = ctx.saved_tensors
    dq, dk1, dv1, dk2, dv2 = _bwd(dout.contiguous(), q, k1, v1, k2, v2, out, lse,
                                  ctx.w1, ctx.w2, ctx.scale, ctx.allow_tf32, ctx.form)
    return dq, dk1, dv1, dk2, dv2, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def triton_attention(plan: Plan, q, k1, v1, k2, v2, scale: float, form: str = "trilinear"):
    """Differentiable 2-simplicial attention on the Triton kernels, for ``plan``, in ``form``: the
    trilinear form, or a form the kernels compute natively (``forms.Form.native``).

    Inputs are already validated by ``twosimplicial.ops.interface`` (same dtype among
    float16/bfloat16/float32, same device, ``[B, S, H, D]`` layout, ``Hq % Hkv == 0``).
    Returns ``(out [B, S, Hq, Dv] in q.dtype, lse [B, Hq, S] float32)``.
    """
    out, lse, _, _ = _fwd(q, k1, v1, k2, v2, plan.w1, plan.w2, float(scale), plan.allow_tf32, form)
    return out, lse


def triton_two_simplicial(q, k1, v1, k2, v2, w1: int, w2: int, scale: float):
    """:func:`triton_attention` for windows ``w1``, ``w2`` and torch's tf32 flag at call time."""
    return triton_attention(make_plan(q.shape, v1.shape, w1, w2, q.dtype, _allow_tf32()), q, k1, v1, k2, v2, scale)


def is_available(t: torch.Tensor) -> bool:
    """True when the kernels can run on ``t``'s device: CUDA, or CPU under the Triton
    interpreter (``TRITON_INTERPRET=1``). ``interface`` imports this module only where the
    ``triton`` package is installed."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"

"""The public op: argument checks, the form's transform to trilinear inputs, backend dispatch.

Shapes and dtypes are checked once here, and the problem's decisions (window roles, GQA
ratio, precision, empty input) are made once, in a :class:`~twosimplicial.ops.plan.Plan`;
the backends (``chunked`` in PyTorch, ``triton.op`` on NVIDIA GPUs) receive validated
trilinear inputs and that plan.
"""
from __future__ import annotations

import importlib
import importlib.util
import math

import torch

from .._validate import check_bool, check_choice, check_int, check_real, check_tensor
from .chunked import torch_attention
from .forms import FORMS, REGISTRY
from .plan import make_plan

BACKENDS = ("auto", "torch", "triton")


def check_inputs(q, k1, v1, k2, v2, *, decode=False):
    """The op's tensor checks, shared with the decode step (``decode=True``: ``q`` holds one
    position and ``k1``/``v1``, ``k2``/``v2`` hold their windows, lengths ``L1``, ``L2 >= 1``)."""
    named = {"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    for name, t in named.items():
        check_tensor(name, t, ndim=4, layout="[B, L, H, D]" if decode else "[B, S, H, D]")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must be on one device")
    B, S, Hq, D = q.shape
    Hkv, Dv = k1.shape[2], v1.shape[3]
    for name, t in named.items():
        if t.shape[0] != B:
            raise ValueError(f"{name} has batch size {t.shape[0]} but q has {B}")
    if decode:
        if S != 1:
            raise ValueError(f"q must hold one position [B, 1, Hq, D], got shape {tuple(q.shape)}")
        for k, v in (("k1", "v1"), ("k2", "v2")):
            L = named[k].shape[1]
            if named[v].shape[1] != L:
                raise ValueError(f"{v} has sequence length {named[v].shape[1]} but {k} has {L}")
            if L < 1:
                raise ValueError(f"{k} must hold at least the query's own position, got length 0")
    else:
        for name, t in named.items():
            if t.shape[1] != S:
                raise ValueError(f"{name} has sequence length {t.shape[1]} but q has {S}")
    for name in ("v1", "k2", "v2"):
        if named[name].shape[2] != Hkv:
            raise ValueError(f"{name} has {named[name].shape[2]} heads but k1 has {Hkv}: k1, v1, k2, v2 must share Hkv")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a positive multiple of k1's ({Hkv}) for MHA/GQA/MQA")
    for name in ("k1", "k2"):
        if named[name].shape[3] != D:
            raise ValueError(f"{name} has head dim {named[name].shape[3]} but q has {D}")
    if v2.shape[3] != Dv:
        raise ValueError(f"v2 has head dim {v2.shape[3]} but v1 has {Dv}")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be >= 1, got D={D} (q, k1, k2) and Dv={Dv} (v1, v2)")


def check_options(scale, form, return_lse, D) -> float:
    """The options the op and the decode step share; returns the scale (default ``1/sqrt(D)``)."""
    check_choice("form", form, FORMS)
    check_bool("return_lse", return_lse)
    if scale is None:
        return 1.0 / math.sqrt(D)
    return check_real("scale", scale, what="a real number or None")


# The Triton backend module, or None where the ``triton`` package is not installed. Decided once,
# at import: a lookup inside the op would be traced by torch.compile and break the graph.
_TRITON_OP = importlib.import_module(".triton.op", __package__) if importlib.util.find_spec("triton") else None


def _pick_backend(backend, q):
    if backend == "torch":
        return "torch"
    op = _TRITON_OP
    if backend == "triton":
        if op is None:
            raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch' or 'auto'")
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 runs on backend='torch'")
        if not op.is_available(q):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                             f"got tensors on {q.device}")
        if not q.is_cuda and q.dtype == torch.bfloat16:
            # the Triton interpreter computes bfloat16 on raw bit patterns (triton-lang/triton#11584;
            # products, negations, outputs wrong by orders of magnitude): refuse, rather
            # than return numbers that are not the op's
            raise TypeError("backend='triton' on CPU tensors (the Triton interpreter) supports float16 and "
                            "float32; bfloat16 runs on backend='torch' or on CUDA tensors")
        return "triton"
    # auto: the kernels on CUDA; the interpreter is far slower than the PyTorch path on a CPU
    return "triton" if op is not None and q.is_cuda and q.dtype != torch.float64 else "torch"


def check_window(name: str, w, S: int | None = None):
    """A window length: an integer >= 1, or ``None`` for no limit (the whole causal past: a
    window of ``S``, or ``None`` where no ``S`` is given, as in a layer). Any length past ``S`` is valid: the plan (``make_plan``) clamps it to
    ``S``, so a window of 2**64 means what a window of ``S`` does."""
    if w is None:
        return S
    return check_int(name, w, 1, what="an integer >= 1 or None (no limit)")


def two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, *, scale=None, form="trilinear",
                             return_lse=False, backend="auto"):
    """2-simplicial attention with causal sliding windows (docs/math.md, The operation).

    ``out[i] = sum_{j,k} softmax_{(j,k)}(scale * <q_i, k1_j, k2_k>) * v1_j * v2_k`` over
    ``i - w1 < j <= i`` and ``i - w2 < k <= i``.

    Args:
        q: ``[B, S, Hq, D]``.
        k1, k2: ``[B, S, Hkv, D]``; ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v1, v2: ``[B, S, Hkv, Dv]``.
        w1, w2: window lengths (integers >= 1, each including the query's own position;
            longer than S is fine), or ``None`` for no limit (the same as a window of S).
        scale: logit scale, default ``1/sqrt(D)``.
        form: a name in :data:`~twosimplicial.ops.forms.FORMS`, the registry of forms:
            ``"trilinear"`` or e.g. ``"determinant"`` (sum of 3x3 determinants over ``D // 3``
            chunks plus the trilinear term of the ``D % 3`` leftover dims).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, S]`` (natural log). It
            carries no gradient (``lse.requires_grad`` is False on every backend): gradients
            flow through ``out`` only.
        backend: ``"auto"`` (Triton for CUDA tensors in half precision or float32 when
            triton is installed, else PyTorch), ``"torch"`` or ``"triton"`` (CUDA tensors,
            or CPU tensors under the Triton interpreter, ``TRITON_INTERPRET=1``).

    Returns:
        ``out [B, S, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    """
    check_inputs(q, k1, v1, k2, v2)
    w1, w2 = check_window("w1", w1, q.shape[1]), check_window("w2", w2, q.shape[1])
    scale = check_options(scale, form, return_lse, q.shape[-1])
    check_choice("backend", backend, BACKENDS)
    chosen = _pick_backend(backend, q)
    # the form: computed by the Triton kernels where they can (Form.native), else as the trilinear
    # form of transformed inputs, which every backend computes
    kernel_form = form if chosen == "triton" and REGISTRY[form].native else "trilinear"
    if kernel_form == "trilinear":
        q, k1, k2 = REGISTRY[form].to_trilinear(q, k1, k2)
    plan = make_plan(q.shape, v1.shape, w1, w2, q.dtype, torch.backends.cuda.matmul.allow_tf32)
    if plan.empty:                                        # empty batch or sequence: nothing to attend
        anchor = sum(t.sum() for t in (q, k1, v1, k2, v2)) * 0    # keeps out in the autograd graph
        out = q.new_zeros(plan.B, plan.S, plan.Hq, plan.Dv) + anchor
        lse = torch.zeros(plan.B, plan.Hq, plan.S, dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    # each backend computes with v1, v2 with non-finite entries as 0 and marks with NaN the
    # output rows whose windows hold one (docs/kernels.md, Non-finite inputs)
    if chosen == "triton":
        out, lse = _TRITON_OP.triton_attention(plan, q, k1, v1, k2, v2, scale, kernel_form)
    else:
        out, lse = torch_attention(plan, q, k1, v1, k2, v2, scale)
    return (out, lse) if return_lse else out

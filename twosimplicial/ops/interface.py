"""The public op: argument checks, the determinant transform, backend dispatch.

Shapes and dtypes are checked once here; the backends (``chunked`` in PyTorch,
``triton_op`` on NVIDIA GPUs) receive validated trilinear inputs.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import numbers

import torch

from .chunked import chunked_two_simplicial_attention
from .determinant import determinant_to_trilinear

FORMS = ("trilinear", "determinant")
BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(q, k1, v1, k2, v2):
    named = {"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
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


def _check_window(name, w):
    if isinstance(w, bool) or not isinstance(w, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {type(w).__name__} {w!r}")
    if w < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {w}")
    return int(w)


def _check_scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


@functools.lru_cache(maxsize=None)
def _triton_op():
    """The Triton backend module, or None where the ``triton`` package is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from . import triton_op
    return triton_op


def _pick_backend(backend, q):
    if backend == "torch":
        return "torch"
    op = _triton_op()
    if backend == "triton":
        if op is None:
            raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch' or 'auto'")
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 runs on backend='torch'")
        if not op.is_available(q):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                             f"got tensors on {q.device}")
        return "triton"
    # auto: the kernels on CUDA; the interpreter is far slower than the PyTorch path on a CPU
    return "triton" if op is not None and q.is_cuda and q.dtype != torch.float64 else "torch"


def two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, *, scale=None, form="trilinear",
                             return_lse=False, backend="auto"):
    """2-simplicial attention with causal sliding windows (SPEC §1).

    ``out[i] = sum_{j,k} softmax_{(j,k)}(scale * <q_i, k1_j, k2_k>) * v1_j * v2_k`` over
    ``i - w1 < j <= i`` and ``i - w2 < k <= i``.

    Args:
        q: ``[B, S, Hq, D]``.
        k1, k2: ``[B, S, Hkv, D]``; ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v1, v2: ``[B, S, Hkv, Dv]``.
        w1, w2: window lengths (integers >= 1, each including the query's own position;
            longer than S is fine).
        scale: logit scale, default ``1/sqrt(D)``.
        form: ``"trilinear"`` or ``"determinant"`` (sum of 3x3 determinants over
            ``D // 3`` chunks plus the trilinear term of the ``D % 3`` leftover dims).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, S]`` (natural log).
        backend: ``"auto"`` (Triton for CUDA tensors in half precision or float32 when
            triton is installed, else PyTorch), ``"torch"`` or ``"triton"`` (CUDA tensors,
            or CPU tensors under the Triton interpreter, ``TRITON_INTERPRET=1``).

    Returns:
        ``out [B, S, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    """
    _check_tensors(q, k1, v1, k2, v2)
    w1, w2 = _check_window("w1", w1), _check_window("w2", w2)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    chosen = _pick_backend(backend, q)
    B, S, Hq, _ = q.shape
    if B * S * Hq == 0:                                   # empty batch or sequence: nothing to attend
        anchor = sum(t.sum() for t in (q, k1, v1, k2, v2)) * 0    # keeps out in the autograd graph
        out = q.new_zeros(B, S, Hq, v1.shape[3]) + anchor
        lse = torch.zeros(B, Hq, S, dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if form == "determinant":
        q, k1, k2 = determinant_to_trilinear(q, k1, k2)
    if chosen == "triton":
        out, lse = _triton_op().triton_two_simplicial(q, k1, v1, k2, v2, w1, w2, scale)
    else:
        out, lse = chunked_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale)
    return (out, lse) if return_lse else out

"""Argument checks shared by the op, the layers, the model and generation.

Each check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a
wrong value, with a short message ``"<name> must be ..., got ..."``, and returns the
value normalised (``int``/``float``/``bool``). Checks of argument types and tensor
shapes/dtypes are static, so ``torch.compile`` traces them without a graph break; the
one check of tensor *values*, :func:`check_id_range`, skips itself where it would need a
device sync that tracing or CUDA-graph capture cannot take.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, minimum: int | None = None, *, what: str | None = None) -> int:
    """``value`` as an ``int`` (any integral number, not a bool), ``>= minimum``."""
    what = what or ("an integer" if minimum is None else f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value}")
    return int(value)


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False,
               what: str | None = None) -> float:
    """``value`` as a finite ``float`` (any real number, not a bool), ``> 0`` with ``positive``,
    ``>= minimum`` with ``minimum``."""
    what = what or ("a positive number" if positive else "a number" if minimum is None else f"a number >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (positive and not value > 0) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be {what}, got {value}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value, choices: tuple):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_instance(name: str, value, cls: type, what: str):
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(name: str, t, *, ndim: int | None = None, layout: str = "",
                 dtypes: tuple = FLOAT_DTYPES) -> torch.Tensor:
    """A ``torch.Tensor`` of ``ndim`` dims (``layout`` names them in the message) and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}".rstrip() + f", got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    return t


def check_token_ids(name: str, t) -> torch.Tensor:
    """A ``[B, S]`` long tensor of token ids (a wrong dtype or shape is a ``ValueError``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a [B, S] long tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.dtype != torch.long:
        raise ValueError(f"{name} must be a [B, S] long tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t


def check_id_range(name: str, t: torch.Tensor, high: int, *, ignore_index: int | None = None) -> None:
    """Every entry of the integer tensor ``t`` lies in ``[0, high)`` (or equals ``ignore_index``).

    Reading the range back is a device sync on a GPU, so it is skipped while
    ``torch.compile`` traces (a data-dependent branch would break the graph; the compiled
    model keeps only torch's own bounds checks) and during CUDA-graph capture (a sync is
    illegal there). In eager mode it runs on every device: on CUDA the alternative is a
    device-side assert that leaves the process's CUDA context unusable, and one min/max per
    forward is small next to a model step. Meta tensors hold no values to check.
    """
    if torch.compiler.is_compiling() or t.numel() == 0 or t.is_meta:
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if ignore_index is not None:
        t = t.masked_fill(t == ignore_index, 0)           # a valid id; no boolean indexing (a sync)
    lo, hi = torch.stack(torch.aminmax(t)).tolist()       # one transfer
    if lo < 0 or hi >= high:
        bad = lo if lo < 0 else hi
        also = f" or {ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name} must hold ids in [0, {high}){also}, got {bad}")


def check_head_shape(dim, heads, kv_heads, head_dim) -> tuple[int, int, int, int]:
    """An attention layer's ``(dim, heads, kv_heads, head_dim)``: positive integers, ``heads`` a
    multiple of ``kv_heads`` (``None``: ``heads``), ``head_dim`` given or ``dim / heads``."""
    kv_heads = heads if kv_heads is None else kv_heads
    dim, heads, kv_heads = (check_int(name, v, 1, what="a positive integer")
                            for name, v in (("dim", dim), ("heads", heads), ("kv_heads", kv_heads)))
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless head_dim is given")
        head_dim = dim // heads
    return dim, heads, kv_heads, check_int("head_dim", head_dim, 1, what="a positive integer")


def check_layer_call(dim: int, x, start_pos, cache, cache_type: type) -> None:
    """An attention layer's ``forward(x [B, S, dim], start_pos, cache)`` arguments."""
    check_tensor("x", x, ndim=3, layout=f"[B, S, {dim}]")
    if x.shape[-1] != dim:
        raise ValueError(f"x must be [B, S, {dim}], got shape {tuple(x.shape)}")
    check_int("start_pos", start_pos, 0)
    if cache is not None:
        check_instance("cache", cache, cache_type, f"a {cache_type.__name__} (layer.new_cache()) or None")


def resolve_device(name: str, device) -> str:
    """``device`` as ``"cpu"`` or ``"cuda"``: one of those or ``"auto"`` (CUDA when available)."""
    check_choice(name, device, ("auto", "cpu", "cuda"))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}='cuda' but CUDA is not available")
    return device

"""Studies: code that produces the project's evidence (Theorem 5.1, Match3, the scaling study).

Kept apart from the library: the library computes 2-simplicial attention and trains models; a study
uses it and writes its results (JSON and PNG) under ``results/``.
"""
from __future__ import annotations

import platform

import torch


def device_name(device) -> str:
    """What a result file records as its device: the GPU's name, or the CPU and its threads."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__

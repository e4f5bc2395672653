"""Shared test utilities: random inputs and relative-error checks against float64."""
from __future__ import annotations

import torch


def make_inputs(B, S, Hq, Hkv, D, Dv, dtype=torch.float64, device="cpu", requires_grad=True, scale=1.0, generator=None):
    """Fresh random ``(q, k1, v1, k2, v2)`` in the op's layout."""
    def r(*shape):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return r(B, S, Hq, D), r(B, S, Hkv, D), r(B, S, Hkv, Dv), r(B, S, Hkv, D), r(B, S, Hkv, Dv)


def assert_close(x, ref, tol, name="", floor=1e-2):
    """``||x - ref|| <= tol * max(||ref||, floor * sqrt(numel))``: relative error, with a floor for
    references that are (mathematically) zero, such as every gradient but dv at S = 1."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    den = max(ref.norm().item(), floor * ref.numel() ** 0.5)
    err = (x - ref).norm().item() / den
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"

"""The determinant form computed by the Triton kernels at head dim D (``FORM`` = +-1: the virtual
query is a cross product, docs/kernels.md, The determinant form at head dim D) against float64
autograd through the dense reference.

CPU: the interpreter (tiny tiles), fp32 and fp16. GPU (``-m gpu``): bf16/fp16/fp32 at tiles the
GPU uses. The ``native`` fixture sets ``Form.native`` for the test, so that the tests check the
native kernels whatever the registry's default.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from twosimplicial import two_simplicial_attention  # noqa: E402
from twosimplicial.ops import forms  # noqa: E402
from twosimplicial.ops.naive import naive_two_simplicial_attention  # noqa: E402

NAMES = ("q", "k1", "v1", "k2", "v2")


@pytest.fixture
def native(monkeypatch):
    """The op with the determinant form on the kernels' native path."""
    monkeypatch.setitem(forms.REGISTRY, "determinant", dataclasses.replace(forms.REGISTRY["determinant"], native=True))


def _check(device, dtype, B, S, Hq, Hkv, D, Dv, w1, w2, scale, tol, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ins = [torch.randn(B, S, h, d, generator=gen, dtype=torch.float64)
           for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv), (Hkv, D), (Hkv, Dv))]
    do = torch.randn(B, S, Hq, Dv, generator=gen, dtype=torch.float64)
    ins = [t.to(dtype) for t in ins]                       # the reference gets the same rounded inputs
    ref = [t.double().requires_grad_() for t in ins]
    out_r, lse_r = naive_two_simplicial_attention(*ref, w1, w2, scale, form="determinant")
    out_r.backward(do)
    xs = [t.to(device).requires_grad_() for t in ins]
    out, lse = two_simplicial_attention(*xs, w1, w2, scale=scale, form="determinant", return_lse=True,
                                        backend="triton")
    out.backward(do.to(device, dtype))
    errs = {"out": out, "lse": lse, **{n: x.grad for n, x in zip(NAMES, xs)}}
    refs = {"out": out_r, "lse": lse_r, **{n: x.grad for n, x in zip(NAMES, ref)}}
    for name in errs:
        g, r = errs[name].detach().cpu().double(), refs[name].detach().double()
        assert torch.isfinite(g).all(), name
        if S == 1 and name in ("q", "k1", "k2"):
            # one key pair: P = 1 and dS = dP - Delta = 0, so these gradients are exactly 0; the
            # kernels' are the rounding of dP - Delta, measured against elements of size 1 (the
            # inputs' scale)
            assert r.abs().max().item() < 1e-12, name
            errs[name] = g.norm().item() / g.numel() ** 0.5
        else:
            errs[name] = (g - r).norm().item() / max(r.norm().item(), 1e-6 * r.numel() ** 0.5)
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("D", [3, 7, 16])                           # no leftover dim, one, one past 15
@pytest.mark.parametrize("w1, w2", [(6, 3), (3, 6), (40, 40)])      # k2 small, k1 small, windows past S
def test_native_determinant_matches_the_reference(native, monkeypatch, D, w1, w2):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check("cpu", torch.float32, 1, 11, 4, 2, D, 5, w1, w2, 1 / math.sqrt(D), 1e-5)


def test_native_determinant_negative_scale_fp16_and_mqa(native, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check("cpu", torch.float32, 2, 9, 3, 1, 8, 4, 5, 2, -0.3, 1e-5, seed=1)
    _check("cpu", torch.float16, 1, 10, 2, 2, 9, 8, 4, 7, 0.3, 5e-3, seed=2)


def test_native_determinant_is_the_transform_on_the_kernels(native, monkeypatch):
    """The native path and the transformed path (2D-wide trilinear) agree on the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 13, 2, d, generator=gen) for d in (10, 10, 6, 10, 6)]
    a = two_simplicial_attention(*xs, 7, 4, form="determinant", backend="triton")
    monkeypatch.setitem(forms.REGISTRY, "determinant", dataclasses.replace(forms.REGISTRY["determinant"], native=False))
    b = two_simplicial_attention(*xs, 7, 4, form="determinant", backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=str)
@pytest.mark.parametrize("case", [(1, 300, 8, 8, 128, 128, 128, 32), (2, 200, 8, 1, 64, 64, 40, 100),
                                  (1, 1, 2, 2, 64, 64, 1, 1), (1, 70, 4, 2, 48, 32, 16, 16)], ids=str)
def test_native_determinant_matches_the_reference_gpu(native, dtype, tol, case):
    B, S, Hq, Hkv, D, Dv, w1, w2 = case
    _check("cuda", dtype, B, S, Hq, Hkv, D, Dv, w1, w2, 1 / math.sqrt(D), tol)


@pytest.mark.parametrize("D", [2, 3, 8, 9])                        # no chunk, no leftover, two leftover dims
@pytest.mark.parametrize("form_id", [1, -1])
@pytest.mark.parametrize("neg_z", [False, True])
def test_z_operands_make_the_cross_product(D, form_id, neg_z):
    """``common.z_operands``: a * b - c * e is s sgn (k_s x q) per 3-chunk and s k_s q on the
    leftover dims (s = -1 for a negative scale), against torch.linalg.cross in float64."""
    from twosimplicial.ops.triton.common import z_operands
    gen = torch.Generator().manual_seed(D)
    q, ks = (torch.randn(2, 5, 3, D, generator=gen, dtype=torch.float64) for _ in range(2))
    qz, ksz = z_operands(q, ks, form_id, neg_z)
    assert qz.shape == ksz.shape == (2, 5, 3, 2 * D)
    b, e = qz[..., :D], qz[..., D:]
    a, c = ksz[..., :D], ksz[..., D:]
    z = a * b - c * e
    c3, s = 3 * (D // 3), -1.0 if neg_z else 1.0
    cross = torch.linalg.cross(ks[..., :c3].unflatten(-1, (-1, 3)), q[..., :c3].unflatten(-1, (-1, 3)), dim=-1)
    want = torch.cat([s * form_id * cross.flatten(-2), s * ks[..., c3:] * q[..., c3:]], -1)
    torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-12)


def _check_z_operands(device, dtype, D, form_id, neg_z):
    """Every entry of z's operands is an input's, moved and maybe negated, or 0, bit for bit, also
    from strided inputs (a [B, H, S, D] tensor seen as [B, S, H, D]) and with S = H = 1."""
    from twosimplicial.ops.determinant import rotation_index
    from twosimplicial.ops.triton.common import z_operands
    gen = torch.Generator().manual_seed(D + form_id)
    for B, S, H in ((2, 7, 3), (1, 1, 1)):
        q = torch.randn(B, H, S, D, generator=gen).to(device, dtype).transpose(1, 2)
        ks = torch.randn(B, S, H, D, generator=gen).to(device, dtype)
        qz, ksz = z_operands(q, ks, form_id, neg_z)
        c3, nx, pv = 3 * (D // 3), rotation_index(D, 1, device), rotation_index(D, 2, device)
        zero = torch.zeros_like(q[..., c3:])
        sc, sl = (-1 if neg_z else 1) * form_id, -1 if neg_z else 1
        assert torch.equal(qz, torch.cat([q[..., pv], q[..., c3:], q[..., nx], zero], -1))
        assert torch.equal(ksz, torch.cat([sc * ks[..., nx], sl * ks[..., c3:], sc * ks[..., pv], zero], -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])   # bf16: the interpreter gets it wrong
@pytest.mark.parametrize("D", [3, 8, 16])
@pytest.mark.parametrize("form_id,neg_z", [(1, False), (-1, False), (1, True), (-1, True)])
def test_z_operands_are_the_inputs_permuted(D, form_id, neg_z, dtype):
    _check_z_operands("cpu", dtype, D, form_id, neg_z)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [3, 64, 128])
@pytest.mark.parametrize("form_id,neg_z", [(1, False), (-1, False), (1, True), (-1, True)])
def test_z_operands_are_the_inputs_permuted_gpu(D, form_id, neg_z, dtype):
    _check_z_operands("cuda", dtype, D, form_id, neg_z)

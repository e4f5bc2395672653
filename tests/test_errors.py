"""Every bad input raises ValueError or TypeError naming the argument and what was expected."""
from __future__ import annotations

import math

import pytest
import torch

from twosimplicial import two_simplicial_attention
from twosimplicial.ops.decode import decode_two_simplicial_attention

from helpers import make_inputs


def good():
    return list(make_inputs(2, 5, 4, 2, 6, 3, dtype=torch.float32, requires_grad=False))


def call(ins, w1=3, w2=2, **kw):
    return two_simplicial_attention(*ins, w1, w2, **kw)


def replace(i, t):
    ins = good()
    ins[i] = t
    return ins


NAMES = ["q", "k1", "v1", "k2", "v2"]


@pytest.mark.parametrize("i", range(5))
def test_not_a_tensor(i):
    with pytest.raises(TypeError, match=NAMES[i]):
        call(replace(i, [[1.0]]))


@pytest.mark.parametrize("i", range(5))
def test_wrong_ndim(i):
    with pytest.raises(ValueError, match=rf"{NAMES[i]} must be 4-D"):
        call(replace(i, good()[i][0]))


@pytest.mark.parametrize("i", range(1, 5))
def test_mixed_dtypes(i):
    with pytest.raises(TypeError, match=rf"{NAMES[i]} has dtype torch.float64"):
        call(replace(i, good()[i].double()))


def test_integer_dtype():
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        call(replace(0, torch.ones(2, 5, 4, 6, dtype=torch.int64)))


def test_mixed_devices():
    meta = good()[1].to("meta")
    with pytest.raises(ValueError, match="k1 is on meta"):
        call(replace(1, meta))


@pytest.mark.parametrize("i,dim,match", [
    (1, 0, "k1 has batch size"), (4, 0, "v2 has batch size"),
    (2, 1, "v1 has sequence length"), (3, 1, "k2 has sequence length"),
    (2, 2, "v1 has .* heads but k1"), (3, 2, "k2 has .* heads but k1"),
    (1, 3, "k1 has head dim"), (3, 3, "k2 has head dim"), (4, 3, "v2 has head dim"),
])
def test_mismatched_shapes(i, dim, match):
    t = good()[i]
    shape = list(t.shape)
    shape[dim] += 1
    with pytest.raises(ValueError, match=match):
        call(replace(i, torch.randn(shape)))


def test_heads_not_divisible():
    ins = good()
    ins[0] = torch.randn(2, 5, 3, 6)                                   # 3 query heads, 2 kv heads
    with pytest.raises(ValueError, match=r"q's head count \(3\) must be a positive multiple of k1's \(2\)"):
        call(ins)


@pytest.mark.parametrize("bad", [0, -1])
@pytest.mark.parametrize("which", ["w1", "w2"])
def test_window_below_one(which, bad):
    kw = {"w1": 3, "w2": 2, which: bad}
    with pytest.raises(ValueError, match=rf"{which} must be an integer >= 1"):
        call(good(), **kw)


@pytest.mark.parametrize("bad", [2.0, "4", True])
@pytest.mark.parametrize("which", ["w1", "w2"])
def test_window_not_integer(which, bad):
    kw = {"w1": 3, "w2": 2, which: bad}
    with pytest.raises(TypeError, match=rf"{which} must be an integer >= 1"):
        call(good(), **kw)


def test_unknown_form():
    with pytest.raises(ValueError, match="form must be one of"):
        call(good(), form="quadrilinear")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        call(good(), backend="cuda")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_scale(bad):
    with pytest.raises(ValueError, match="scale must be finite"):
        call(good(), scale=bad)


def test_scale_not_a_number():
    with pytest.raises(TypeError, match="scale must be a real number"):
        call(good(), scale="0.5")


def test_return_lse_not_bool():
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        call(good(), return_lse=1)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, RuntimeError), match="backend='triton'"):
        call(good(), backend="triton")


def test_triton_backend_rejects_bfloat16_under_the_interpreter(monkeypatch):
    """The interpreter gets bfloat16 wrong (relative errors ~1e9 measured): refused, not computed."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ins = [t.bfloat16() for t in good()]
    with pytest.raises(TypeError, match="backend='triton' on CPU tensors .* bfloat16"):
        call(ins, backend="triton")


def test_triton_backend_rejects_float64():
    ins = [t.double() for t in good()]
    with pytest.raises((TypeError, RuntimeError), match="backend='triton'"):
        call(ins, backend="triton")


# --- the decode step shares the op's checks ------------------------------------------------------

def decode_inputs():
    """``(q [1, 1, 2, 4], k1, v1, k2, v2)`` with windows of 3 (k1, v1) and 2 (k2, v2) positions."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 4, generator=g)
    k1, v1 = (torch.randn(1, 3, 1, 4, generator=g) for _ in range(2))
    k2, v2 = (torch.randn(1, 2, 1, 4, generator=g) for _ in range(2))
    return [q, k1, v1, k2, v2]


def test_decode_accepts_good_inputs():
    out, lse = decode_two_simplicial_attention(*decode_inputs(), return_lse=True)
    assert out.shape == (1, 1, 2, 4) and lse.shape == (1, 2, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_decode_rejects_non_float_dtypes(dtype):
    ins = [t.to(dtype) for t in decode_inputs()]
    with pytest.raises(TypeError, match=rf"q must be float16, bfloat16, float32 or float64, got {dtype}"):
        decode_two_simplicial_attention(*ins)


def test_decode_rejects_zero_head_dim():
    ins = decode_inputs()
    for i in (0, 1, 3):                                               # q, k1, k2: D = 0
        ins[i] = ins[i][..., :0]
    with pytest.raises(ValueError, match="head dims must be >= 1, got D=0"):
        decode_two_simplicial_attention(*ins)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_decode_return_lse_not_bool(bad):
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        decode_two_simplicial_attention(*decode_inputs(), return_lse=bad)


@pytest.mark.parametrize("i", range(5))
def test_decode_not_a_tensor(i):
    ins = decode_inputs()
    ins[i] = ins[i].tolist()
    with pytest.raises(TypeError, match=rf"{NAMES[i]} must be a torch.Tensor, got list"):
        decode_two_simplicial_attention(*ins)


@pytest.mark.parametrize("k,v", [(1, 2), (3, 4)])
def test_decode_window_lengths(k, v):
    ins = decode_inputs()
    ins[v] = ins[v][:, 1:]                                            # v one position shorter than its k
    with pytest.raises(ValueError, match=rf"{NAMES[v]} has sequence length .* but {NAMES[k]} has"):
        decode_two_simplicial_attention(*ins)
    ins = decode_inputs()
    ins[k], ins[v] = ins[k][:, :0], ins[v][:, :0]                     # an empty window
    with pytest.raises(ValueError, match=rf"{NAMES[k]} must hold at least the query's own position"):
        decode_two_simplicial_attention(*ins)

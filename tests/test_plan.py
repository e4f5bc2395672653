"""The plan (ops/plan.py): window roles, ties, clamping, precision, empty input, split/merge."""
import dataclasses

import pytest
import torch

from twosimplicial import two_simplicial_attention
from twosimplicial.ops.chunked import chunked_attention
from twosimplicial.ops.plan import make_plan


def plan_for(S=16, w1=8, w2=4, B=2, Hq=6, Hkv=3, D=5, Dv=7, dtype=torch.float32, allow_tf32=False):
    return make_plan((B, S, Hq, D), (B, S, Hkv, Dv), w1, w2, dtype, allow_tf32)


def test_fields():
    p = plan_for()
    assert (p.B, p.S, p.Hq, p.Hkv, p.gqa, p.D, p.Dv) == (2, 16, 6, 3, 2, 5, 7)
    assert not p.empty
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ws = 1


@pytest.mark.parametrize("w1, w2, swap, ws, wb", [
    (8, 4, True, 4, 8),          # w1 larger: (k2, v2) small
    (4, 8, False, 4, 8),         # w2 larger: (k1, v1) small
    (5, 5, True, 5, 5),          # tie: k2 takes the small role
    (100, 40, True, 16, 16),     # both past S: clamped to a tie, k2 small
    (100, 3, True, 3, 16),       # one past S
    (2, 2 ** 64, False, 2, 16),  # a window past every integer type
])
def test_roles(w1, w2, swap, ws, wb):
    p = plan_for(S=16, w1=w1, w2=w2)
    assert (p.swap, p.ws, p.wb) == (swap, ws, wb)
    assert (p.w1, p.w2) == (min(w1, 16), min(w2, 16))


def test_clamped_tie_keeps_the_tie_rule():
    # w1 = 100 and w2 = 40 are a tie once clamped to S = 16: k2 small, as for w1 == w2
    assert plan_for(S=16, w1=100, w2=40).swap == plan_for(S=16, w1=16, w2=16).swap is True


@pytest.mark.parametrize("w1, w2", [(8, 4), (4, 8), (5, 5)])
def test_split_merge_round_trip(w1, w2):
    p = plan_for(w1=w1, w2=w2)
    k1, v1, k2, v2 = object(), object(), object(), object()
    ks, vs, kb, vb = p.split(k1, v1, k2, v2)
    assert (ks, vs) == ((k2, v2) if w1 >= w2 else (k1, v1))
    assert (kb, vb) == ((k1, v1) if w1 >= w2 else (k2, v2))
    back = p.merge(ks, vs, kb, vb)
    assert all(a is b for a, b in zip(back, (k1, v1, k2, v2)))


@pytest.mark.parametrize("dtype, allow_tf32, precision", [
    (torch.float32, False, "ieee"), (torch.float32, True, "tf32"),
    (torch.bfloat16, False, "tf32"), (torch.float16, True, "tf32"),
])
def test_precision(dtype, allow_tf32, precision):
    p = plan_for(dtype=dtype, allow_tf32=allow_tf32)
    assert p.precision == precision and p.allow_tf32 is allow_tf32


@pytest.mark.parametrize("B, S, Hq", [(0, 8, 2), (2, 0, 2), (2, 8, 0)])
def test_empty(B, S, Hq):
    assert plan_for(B=B, S=S, Hq=Hq).empty


@pytest.mark.parametrize("w1, w2", [(6, 3), (3, 6), (4, 4)])
def test_backend_gets_canonical_roles(w1, w2):
    """The chunked path on the plan's split matches the public op, and the role gradients reach
    k1, v1, k2, v2 through the split."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 10, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k1, k2 = (torch.randn(1, 10, 2, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v1, v2 = (torch.randn(1, 10, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inputs = (q, k1, v1, k2, v2)
    p = make_plan(q.shape, v1.shape, w1, w2, q.dtype, False)
    out, _ = chunked_attention(p, q, *p.split(k1, v1, k2, v2), 0.4)
    ref = two_simplicial_attention(*inputs, w1, w2, scale=0.4, backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    do = torch.randn(out.shape, generator=g, dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, do)
    # swapping the arguments (and windows) swaps the gradients: the op is symmetric
    out_sw = two_simplicial_attention(q, k2, v2, k1, v1, w2, w1, scale=0.4, backend="torch")
    sw = torch.autograd.grad(out_sw, inputs, do)
    for a, b in zip(got, sw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

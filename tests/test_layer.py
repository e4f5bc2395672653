"""The TwoSimplicialAttention layer: shapes, equivalence with the op, options, errors."""
from __future__ import annotations

import pytest
import torch

from twosimplicial import TwoSimplicialAttention, two_simplicial_attention
from twosimplicial.ops.naive import naive_two_simplicial_attention


@pytest.mark.parametrize("form", ["trilinear", "determinant"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_layer_matches_reference(form, heads, kv_heads):
    torch.manual_seed(0)
    layer = TwoSimplicialAttention(24, heads, kv_heads, head_dim=7, w1=6, w2=3, form=form).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    q, k1, v1, k2, v2 = layer.project(x)
    ref = naive_two_simplicial_attention(q, k1, v1, k2, v2, 6, 3, form=form)[0]
    torch.testing.assert_close(y, layer.out_proj(ref.flatten(2)))
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_kv_offsets():
    torch.manual_seed(0)
    plain = TwoSimplicialAttention(16, 2, w1=4, w2=4)
    meta = TwoSimplicialAttention(16, 2, w1=4, w2=4, kv_offsets=True)
    meta.load_state_dict(plain.state_dict())
    x = torch.randn(1, 9, 16)
    q, k1, v1, k2, v2 = plain.project(x)
    q_, k1_, v1_, k2_, v2_ = meta.project(x)
    torch.testing.assert_close(k2_, k2 + 1 / 8)                          # 1/head_dim
    torch.testing.assert_close(v2_, v2 + 1.0)
    expect = meta.out_proj(two_simplicial_attention(q, k1, v1, k2 + 1 / 8, v2 + 1.0, 4, 4).flatten(2))
    torch.testing.assert_close(meta(x), expect)
    custom = TwoSimplicialAttention(16, 2, kv_offsets=(0.5, -2.0))
    assert (custom.k2_offset, custom.v2_offset) == (0.5, -2.0)


def test_causal():
    """Changing a future token leaves earlier outputs unchanged."""
    torch.manual_seed(0)
    layer = TwoSimplicialAttention(16, 2, w1=5, w2=3)
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 7] += 1.0
    torch.testing.assert_close(layer(x)[:, :7], layer(x2)[:, :7])
    assert not torch.allclose(layer(x)[:, 7:], layer(x2)[:, 7:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=10, heads=3), "dim \\(10\\) must be divisible by heads"),
    (dict(dim=12, heads=4, kv_heads=3), "heads \\(4\\) must be a multiple of kv_heads"),
    (dict(dim=12, heads=0), "heads must be a positive integer"),
    (dict(dim=12, heads=2, w1=0), "w1 must be an integer >= 1"),
    (dict(dim=12, heads=2, form="x"), "form must be"),
    (dict(dim=12, heads=2, head_dim=0), "head_dim must be a positive integer"),
    (dict(dim=12, heads=2, kv_offsets=(1.0,)), "kv_offsets must be"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoSimplicialAttention(**kwargs)


def test_bad_input_shape():
    layer = TwoSimplicialAttention(12, 2)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 13))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kv_offsets=("a", 1.0)), ValueError, "kv_offsets must be"),
    (dict(kv_offsets=(float("nan"), 1.0)), ValueError, "kv_offsets must be"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(form="determinant", rotary=True, rope_theta=0.0), ValueError, "rope_theta must be a positive number"),
    (dict(w2=2.5), TypeError, "w2 must be an integer"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TwoSimplicialAttention(12, 2, **kwargs)


@pytest.mark.parametrize("form", ["trilinear", "determinant"])
@pytest.mark.parametrize("windows", [(None, None), (None, 3), (4, None)])
def test_none_window_is_a_window_of_S(form, windows):
    """``w1``/``w2`` = ``None`` (no limit) is the layer with windows of the sequence length, with and
    without a cache (prefill, a continuing chunk, then one token at a time)."""
    torch.manual_seed(0)
    S = 11
    kw = dict(head_dim=6, form=form, rotary=form == "determinant")
    layer = TwoSimplicialAttention(12, 2, w1=windows[0], w2=windows[1], **kw).double()
    fixed = TwoSimplicialAttention(12, 2, w1=windows[0] or S, w2=windows[1] or S, **kw).double()
    fixed.load_state_dict(layer.state_dict())
    assert (layer.w1, layer.w2) == windows
    x = torch.randn(2, S, 12, dtype=torch.float64)
    full = layer(x)
    torch.testing.assert_close(full, fixed(x), rtol=0, atol=0)
    cache = layer.new_cache()
    parts = [layer(x[:, :4], 0, cache), layer(x[:, 4:7], 4, cache)]
    parts += [layer(x[:, p:p + 1], p, cache) for p in range(7, S)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    if windows[0] is None:
        assert cache.k1.shape[1] == S                               # no limit: every past position is kept

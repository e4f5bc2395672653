"""Bad arguments to the layers, the model and generation raise ValueError/TypeError naming them
(before any torch error); valid calls next to each case still run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twosimplicial.generate import generate
from twosimplicial.layers.attention import Attention
from twosimplicial.layers.cache import DotCache, WindowCache
from twosimplicial.layers.mlp import MoE, SwiGLU
from twosimplicial.layers.rotary import Rotary3D, RotaryEmbedding
from twosimplicial.layers.two_simplicial import TwoSimplicialAttention
from twosimplicial.models import ModelConfig, TwoSimplicialLM

V = 41


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_seq_len=64, simplicial_every=2, w1=4, w2=3)
    return TwoSimplicialLM(cfg).eval()


def ids(B, S, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# --- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_token_id_out_of_range(model, bad):
    idx = ids(2, 5)
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=rf"idx must hold ids in \[0, {V}\), got {bad}"):
        model(idx)


def test_token_ids_at_the_edges_run(model):
    idx = ids(1, 4)
    idx[0, 0], idx[0, 1] = 0, V - 1
    assert model(idx)[0].shape == (1, 4, V)


def test_targets_float(model):
    idx = ids(2, 5)
    with pytest.raises(ValueError, match=r"targets must be a \[B, S\] long tensor, got torch.float32"):
        model(idx, idx.float())


def test_targets_not_a_tensor(model):
    with pytest.raises(TypeError, match=r"targets must be a \[B, S\] long tensor, got list"):
        model(ids(1, 3), [[1, 2, 3]])


@pytest.mark.parametrize("bad", [V, -1, -99])
def test_targets_out_of_range(model, bad):
    idx = ids(2, 5)
    targets = ids(2, 5, seed=1)
    targets[0, 2] = bad
    with pytest.raises(ValueError, match=rf"targets must hold ids in \[0, {V}\) or -100, got {bad}"):
        model(idx, targets)


def test_targets_ignore_index_is_accepted(model):
    idx, targets = ids(2, 5), ids(2, 5, seed=1)
    targets[:, :2] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 2:].flatten(0, 1), targets[:, 2:].flatten())
    torch.testing.assert_close(loss, expected)


def test_cache_reused_with_another_batch_size(model):
    cache = model.new_cache()
    idx = ids(1, 6)
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        with pytest.raises(ValueError, match="cache holds batch 1, .* but the new positions have batch 2"):
            model(ids(2, 1), cache=cache)
        assert cache.pos == 5                                       # the failed call left the cache as it was
        step, _ = model(idx[:, 5:], cache=cache)
        torch.testing.assert_close(step[:, 0], model(idx)[0][:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["abc", [], DotCache()])
def test_cache_of_the_wrong_type(model, bad):
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model(ids(1, 3), cache=bad)


@pytest.mark.parametrize("bad,err", [(1.5, TypeError), ("0", TypeError), (True, TypeError), (-1, ValueError)])
def test_model_start_pos(model, bad, err):
    with pytest.raises(err, match="start_pos must be an integer >= 0"):
        model(ids(1, 3), start_pos=bad)


def test_idx_on_another_device_than_the_model(model):
    with pytest.raises(ValueError, match="idx is on meta but the model is on cpu"):
        model(ids(1, 3).to("meta"))


def test_model_compiles_without_graph_breaks(model):
    """The checks are static or skipped while tracing: fullgraph=True traces the whole forward
    (both layer kinds, targets included)."""
    idx, targets = ids(2, 6), ids(2, 6, seed=1)
    targets[0, 0] = -100
    logits, loss = torch.compile(model, fullgraph=True, backend="eager")(idx, targets, start_pos=3)
    ref_logits, ref_loss = model(idx, targets, start_pos=3)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


# --- generate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_generate_temperature_not_finite(model, bad):
    with pytest.raises(ValueError, match="temperature must be finite"):
        generate(model, ids(1, 3), 2, temperature=bad)


@pytest.mark.parametrize("kw,err,match", [
    (dict(temperature="1"), TypeError, "temperature must be a number >= 0"),
    (dict(use_cache="yes"), TypeError, "use_cache must be a bool"),
    (dict(return_logits=1), TypeError, "return_logits must be a bool"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator or None"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an integer >= 0"),
    (dict(top_k=1.5), TypeError, "top_k must be None or an integer >= 1"),
    (dict(idx=torch.full((1, 3), V)), ValueError, rf"idx must hold ids in \[0, {V}\)"),
    (dict(idx=[[1, 2]]), TypeError, r"idx must be a \[B, S\] long tensor"),
])
def test_generate_argument_types(model, kw, err, match):
    args = dict(idx=ids(1, 3), max_new_tokens=2) | kw
    with pytest.raises(err, match=match):
        generate(model, **args)


def test_generate_greedy_with_integer_temperature(model):
    out = generate(model, ids(1, 3), 2, temperature=0)
    assert out.shape == (1, 5) and ((0 <= out) & (out < V)).all()


# --- the layers ----------------------------------------------------------------------------------

LAYERS = {
    "simplicial": lambda **kw: TwoSimplicialAttention(12, 2, w1=4, w2=3, **kw),
    "rotary": lambda **kw: TwoSimplicialAttention(12, 2, w1=4, w2=3, form="determinant", rotary=True, **kw),
    "dot": lambda **kw: Attention(12, 2, **kw),
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_layer_rope_theta_not_finite(kind, bad):
    with pytest.raises(ValueError, match="rope_theta must be finite"):
        LAYERS[kind](rope_theta=bad)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bad", ["no", 0, None])
def test_layer_bias_not_bool(kind, bad):
    with pytest.raises(TypeError, match="bias must be a bool"):
        LAYERS[kind](bias=bad)


def test_layer_rotary_not_bool():
    with pytest.raises(TypeError, match="rotary must be a bool"):
        TwoSimplicialAttention(12, 2, form="determinant", rotary="yes")


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bad,err", [(1.5, TypeError), (-1, ValueError), (None, TypeError)])
def test_layer_start_pos(kind, bad, err):
    layer = LAYERS[kind]()
    x = torch.randn(1, 4, 12)
    with pytest.raises(err, match="start_pos must be an integer >= 0"):
        layer(x, start_pos=bad)
    assert layer(x, start_pos=2).shape == x.shape


@pytest.mark.parametrize("rotary", [RotaryEmbedding(6), Rotary3D(6)])
@pytest.mark.parametrize("bad,err", [(0.5, TypeError), (-3, ValueError)])
def test_rotary_start_pos(rotary, bad, err):
    with pytest.raises(err, match="start_pos must be an integer >= 0"):
        rotary(torch.randn(1, 2, 1, 6), start_pos=bad)


@pytest.mark.parametrize("cls", [RotaryEmbedding, Rotary3D])
@pytest.mark.parametrize("bad,err,match", [(math.inf, ValueError, "theta must be finite"),
                                           (-2.0, ValueError, "theta must be a positive number"),
                                           ("1e4", TypeError, "theta must be a positive number")])
def test_rotary_theta(cls, bad, err, match):
    with pytest.raises(err, match=match):
        cls(6, bad)


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_input(kind):
    layer = LAYERS[kind]()
    with pytest.raises(ValueError, match=r"x must be \[B, S, 12\], got shape \(1, 4, 13\)"):
        layer(torch.randn(1, 4, 13))
    with pytest.raises(ValueError, match=r"x must be 3-D \[B, S, 12\]"):
        layer(torch.randn(4, 12))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        layer(torch.ones(1, 4, 12, dtype=torch.long))


@pytest.mark.parametrize("kind,wrong", [("simplicial", DotCache()), ("dot", WindowCache(4, 3)), ("dot", "abc")])
def test_layer_cache_of_the_wrong_type(kind, wrong):
    with pytest.raises(TypeError, match="cache must be a (WindowCache|DotCache)"):
        LAYERS[kind]()(torch.randn(1, 2, 12), cache=wrong)


def test_layer_cache_of_other_windows():
    with pytest.raises(ValueError, match=r"cache holds windows \(w1, w2\) = \(5, 3\) but the layer's are \(4, 3\)"):
        LAYERS["simplicial"]()(torch.randn(1, 2, 12), cache=WindowCache(5, 3))


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_cache_reused_with_another_batch_size(kind):
    layer = LAYERS[kind]()
    cache = layer.new_cache()
    layer(torch.randn(1, 3, 12), cache=cache)
    with pytest.raises(ValueError, match="cache holds batch 1, .* but the new positions have batch 2"):
        layer(torch.randn(2, 1, 12), start_pos=3, cache=cache)


def test_dot_layer_dims():
    with pytest.raises(ValueError, match=r"dim \(12\) must be divisible by heads \(5\)"):
        Attention(12, 5)
    with pytest.raises(TypeError, match="heads must be a positive integer"):
        Attention(12, 2.0)
    with pytest.raises(ValueError, match="kv_heads must be a positive integer"):
        Attention(12, 2, kv_heads=0)


@pytest.mark.parametrize("make,match", [
    (lambda: SwiGLU(8, 2.5), "hidden must be an integer >= 1"),
    (lambda: MoE(8, 16, n_experts=4, top_k=2.0), r"top_k must be an integer in \[1, n_experts=4\]"),
    (lambda: MoE(8, "16", n_experts=4, top_k=2), "hidden must be an integer >= 1"),
])
def test_mlp_dims(make, match):
    with pytest.raises(TypeError, match=match):
        make()

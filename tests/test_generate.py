"""KV caches and generation: cached decoding must match recomputing the whole sequence."""
import pytest
import torch

from twosimplicial.generate import generate
from twosimplicial.layers.attention import Attention
from twosimplicial.layers.cache import WindowCache
from twosimplicial.layers.two_simplicial import TwoSimplicialAttention
from twosimplicial.models import ModelConfig, TwoSimplicialLM
from twosimplicial.ops.decode import decode_two_simplicial_attention
from twosimplicial.ops.naive import naive_two_simplicial_attention


def tiny(**kw):
    base = dict(vocab_size=41, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


# --- the decode op -------------------------------------------------------------------------------

@pytest.mark.parametrize("S, w1, w2, Hq, Hkv, D, form", [
    (1, 4, 3, 2, 2, 8, "trilinear"),            # first token: windows hold one position
    (9, 4, 3, 4, 2, 8, "trilinear"),            # GQA, windows smaller than the sequence
    (9, 2, 6, 4, 1, 5, "trilinear"),            # MQA, w1 < w2, odd head dim
    (6, 20, 20, 3, 3, 7, "trilinear"),          # windows larger than the sequence
    (9, 1, 1, 2, 2, 4, "trilinear"),            # w = 1: only (i, i, i)
    (9, 5, 3, 4, 2, 7, "determinant"),          # D % 3 == 1 leftover
    (8, 3, 4, 2, 1, 6, "determinant"),
])
def test_decode_matches_full_op(S, w1, w2, Hq, Hkv, D, form):
    torch.manual_seed(S * 100 + w1 * 10 + w2)
    q = torch.randn(2, S, Hq, D, dtype=torch.float64)
    k1, k2 = (torch.randn(2, S, Hkv, D, dtype=torch.float64) for _ in range(2))
    v1, v2 = (torch.randn(2, S, Hkv, D + 1, dtype=torch.float64) for _ in range(2))
    ref, ref_lse = naive_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, form=form)
    out, lse = decode_two_simplicial_attention(q[:, -1:], k1[:, -w1:], v1[:, -w1:], k2[:, -w2:], v2[:, -w2:],
                                               form=form, return_lse=True)
    err = (out - ref[:, -1:]).norm() / ref[:, -1:].norm()
    assert err < 1e-12, err
    torch.testing.assert_close(lse, ref_lse[..., -1:].float())


def test_decode_low_precision_and_errors():
    torch.manual_seed(0)
    q = torch.randn(1, 1, 2, 16)
    k1, v1, k2, v2 = (torch.randn(1, 5, 2, 16) for _ in range(4))
    ref = decode_two_simplicial_attention(*(t.double() for t in (q, k1, v1, k2, v2)))
    out = decode_two_simplicial_attention(*(t.bfloat16() for t in (q, k1, v1, k2, v2)))
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).norm() / ref.norm() < 2e-2
    with pytest.raises(ValueError, match="one position"):
        decode_two_simplicial_attention(k1, k1, v1, k2, v2)
    with pytest.raises(ValueError, match="multiple"):
        decode_two_simplicial_attention(torch.randn(1, 1, 3, 16), k1, v1, k2, v2)
    with pytest.raises(ValueError, match="form"):
        decode_two_simplicial_attention(q, k1, v1, k2, v2, form="cubic")


# --- layer caches, fed in chunks ---------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(w1=4, w2=3),
    dict(w1=2, w2=6, kv_heads=2),
    dict(w1=5, w2=3, form="determinant", rotary=True, head_dim=7, kv_heads=1),
    dict(w1=30, w2=30, form="determinant", kv_offsets=True),
    dict(w1=1, w2=1),
])
def test_simplicial_layer_cache_in_chunks(kw):
    torch.manual_seed(0)
    layer = TwoSimplicialAttention(24, 4, **kw).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    full = layer(x)
    cache, outs, p = layer.new_cache(), [], 0
    for n in (5, 1, 1, 7, 3):                                  # prefill, decode steps, continued chunks
        outs.append(layer(x[:, p : p + n], start_pos=p, cache=cache))
        p += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    # the cache is bounded by the windows, not the sequence
    assert cache.k1.shape[1] == min(layer.w1 - 1, 17) and cache.k2.shape[1] == min(layer.w2 - 1, 17)


def test_dot_layer_cache_in_chunks():
    torch.manual_seed(0)
    layer = Attention(24, 4, 2).double()
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    full = layer(x)
    cache, outs, p = layer.new_cache(), [], 0
    for n in (4, 1, 6, 1, 3):
        outs.append(layer(x[:, p : p + n], start_pos=p, cache=cache))
        p += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


# --- generation ----------------------------------------------------------------------------------

GEN_CONFIGS = {
    "dot-gqa": dict(n_kv_heads=2),
    "trilinear": dict(simplicial_every=2, w1=5, w2=3),
    "trilinear-all-mqa": dict(simplicial_every=1, w1=3, w2=7, simplicial_kv_heads=1),
    "determinant-rotary": dict(simplicial_every=1, form="determinant", simplicial_head_dim=7, w1=6, w2=4,
                               simplicial_kv_heads=2),
    "determinant-offsets-moe": dict(simplicial_every=2, form="determinant", kv_offsets=True, n_experts=3,
                                    moe_top_k=2, tie_embeddings=False, w1=4, w2=2),
}


@pytest.mark.parametrize("name", GEN_CONFIGS)
def test_cached_generation_matches_recompute(name):
    torch.manual_seed(0)
    model = TwoSimplicialLM(tiny(**GEN_CONFIGS[name])).double()
    prompt = torch.randint(0, 41, (2, 5))
    a, la = generate(model, prompt, 14, temperature=0, return_logits=True)
    b, lb = generate(model, prompt, 14, temperature=0, use_cache=False, return_logits=True)
    assert torch.equal(a, b) and a.shape == (2, 19) and torch.equal(a[:, :5], prompt)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    full, _ = model(a[:, :-1])                                 # one forward over the whole sequence
    torch.testing.assert_close(la, full[:, 4:], rtol=1e-10, atol=1e-10)


def test_sampled_generation_is_reproducible_and_cache_agnostic():
    torch.manual_seed(0)
    model = TwoSimplicialLM(tiny(simplicial_every=2, w1=4, w2=3)).double()
    prompt = torch.randint(0, 41, (3, 4))
    runs = [generate(model, prompt, 12, temperature=0.9, top_k=5, use_cache=c, generator=torch.Generator().manual_seed(7))
            for c in (True, False, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # top_k=1 is greedy
    assert torch.equal(generate(model, prompt, 6, top_k=1), generate(model, prompt, 6, temperature=0))


def test_generation_past_max_seq_len_slides_the_window():
    torch.manual_seed(0)
    model = TwoSimplicialLM(tiny(simplicial_every=2, w1=4, w2=3, max_seq_len=12)).double()
    prompt = torch.randint(0, 41, (1, 5))
    a, la = generate(model, prompt, 15, temperature=0, return_logits=True)
    b, lb = generate(model, prompt, 15, temperature=0, use_cache=False, return_logits=True)
    assert torch.equal(a, b) and a.shape == (1, 20)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(la[:, -1], model(a[:, -13:-1])[0][:, -1], rtol=1e-10, atol=1e-10)


def test_window_cache_memory_is_bounded_and_decode_copies_once():
    w1, w2 = 4, 3
    cache = WindowCache(w1, w2)
    fused = torch.randn(2, 100, 4, 4 * 8)                       # a long prefill, each tensor a view of one projection
    k1, v1, k2, v2 = fused.split(8, dim=-1)
    out = cache.append(k1, v1, k2, v2)
    assert all(o is t for o, t in zip(out, (k1, v1, k2, v2)))
    full = [k1, v1, k2, v2]
    for step in range(5):
        for name, t, w in zip(("k1", "v1", "k2", "v2"), full, (w1, w1, w2, w2)):
            c = getattr(cache, name)
            assert torch.equal(c, t[:, -(w - 1):])
            assert c.untyped_storage().nbytes() <= 2 * c.numel() * c.element_size()   # no long tensor pinned
        new = [torch.randn(2, 1, 4, 8) for _ in range(4)]
        out = cache.append(*new)
        full = [torch.cat([t, n], 1) for t, n in zip(full, new)]
        for o, t, w in zip(out, full, (w1, w1, w2, w2)):
            assert torch.equal(o, t[:, -w:])                       # cached past + the new position
        assert cache.k1.untyped_storage().data_ptr() == out[0].untyped_storage().data_ptr()  # kept as a view


def test_model_cache_api():
    model = TwoSimplicialLM(tiny(simplicial_every=2, w1=4, w2=3))
    model.eval()
    idx = torch.randint(0, 41, (1, 9))
    cache = model.new_cache()
    with torch.no_grad():
        model(idx[:, :6], cache=cache)
        assert cache.pos == 6 and cache.nbytes() > 0
        with pytest.raises(ValueError, match="start_pos"):
            model(idx[:, 6:7], cache=cache, start_pos=3)
        step, _ = model(idx[:, 6:7], cache=cache, start_pos=6)
        torch.testing.assert_close(step[:, 0], model(idx[:, :7])[0][:, -1], rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.pos == 0 and cache.nbytes() == 0
    assert generate(model, idx, 0).shape == idx.shape
    assert model.training is False
    model.train()
    generate(model, idx, 2)
    assert model.training                                      # generate restores the mode


def test_generate_restores_train_mode_when_a_step_raises(monkeypatch):
    model = TwoSimplicialLM(tiny(simplicial_every=2, w1=4, w2=3))
    model.train()
    seen = []

    def boom(*args, **kwargs):
        seen.append(model.training)
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert seen == [False] and model.training                 # ran in eval mode, left in train mode


@pytest.mark.parametrize("kw, match", [
    (dict(idx=torch.zeros(1, 3)), "idx"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
])
def test_generate_rejects_bad_arguments(kw, match):
    model = TwoSimplicialLM(tiny())
    args = dict(idx=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2) | kw
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_decode_op_rejects_bad_inputs():
    from twosimplicial.ops.decode import decode_two_simplicial_attention as decode
    q = torch.randn(1, 1, 2, 4)
    k = torch.randn(1, 3, 1, 4)
    with pytest.raises(TypeError, match="k1 has dtype"):
        decode(q, k.double(), k, k, k)
    with pytest.raises(ValueError, match="scale must be finite"):
        decode(q, k, k, k, k, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        decode(q, k, k, k, k, scale="0.5")
    with pytest.raises(ValueError, match="form must be one of"):
        decode(q, k, k, k, k, form="x")

"""torch.compile(fullgraph=True) through the public API: the op, the layer, the LM and a training
step trace as one graph (no graph break), and compiled results match eager ones.

On CPU the backend is ``aot_eager`` (tracing and autograd without code generation); the GPU
tests compile with inductor and run the Triton kernels.
"""
import pytest
import torch
import torch._dynamo

from twosimplicial import TwoSimplicialAttention, two_simplicial_attention
from twosimplicial.models import ModelConfig, TwoSimplicialLM


def no_breaks(fn, *args):
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args)
    assert e.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in e.break_reasons]
    assert e.graph_count == 1


def layers():
    return {"trilinear": TwoSimplicialAttention(dim=32, heads=4, kv_heads=2, w1=8, w2=4),
            "determinant+rotary+offsets": TwoSimplicialAttention(dim=36, heads=2, kv_heads=1, w1=8, w2=4,
                                                                 form="determinant", rotary=True, kv_offsets=True)}


def lms():
    base = dict(vocab_size=64, dim=32, n_heads=2, w1=8, w2=4, max_seq_len=32)
    return {"dot": ModelConfig.from_preset("tiny", **base),
            "simplicial": ModelConfig.from_preset("tiny", simplicial_every=2, **base),
            "determinant": ModelConfig.from_preset("tiny", simplicial_every=2, form="determinant", **base),
            "moe": ModelConfig.from_preset("tiny", simplicial_every=2, n_experts=4, moe_top_k=2, **base)}


@pytest.mark.parametrize("form", ["trilinear", "determinant"])
def test_public_op_has_no_graph_break(form):
    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(2, 12, 2, 6, generator=g) for _ in range(5))

    def f(q, k1, v1, k2, v2):
        return two_simplicial_attention(q, k1, v1, k2, v2, 5, 3, form=form, return_lse=True)
    no_breaks(f, q, k1, v1, k2, v2)
    out_c, lse_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k1, v1, k2, v2)
    out, lse = f(q, k1, v1, k2, v2)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(lse_c, lse)


@pytest.mark.parametrize("name", list(layers()))
def test_layer_has_no_graph_break(name):
    torch.manual_seed(0)
    layer = layers()[name]
    x = torch.randn(2, 10, layer.dim, requires_grad=True)
    no_breaks(layer, x)
    y_c = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y_c, layer(x))
    g_c, = torch.autograd.grad(y_c.square().sum(), x)
    g, = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize("name", list(lms()))
def test_lm_and_its_training_step_have_no_graph_break(name):
    torch.manual_seed(0)
    model = TwoSimplicialLM(lms()[name])
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    no_breaks(model, x, y)
    # the training step as train.py runs it: compiled forward and loss (one graph), the backward
    # from the same trace (AOT autograd), then the fused optimiser step outside the graph
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits_c, loss_c = compiled(x, y)
    logits, loss = model(x, y)
    torch.testing.assert_close(logits_c, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    g_c = torch.autograd.grad(loss_c, params, allow_unused=True)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    for a, b in zip(g_c, g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_moe_compiled_path_equals_the_eager_one():
    """The static-shape expert sum used under compile is the same function as the routed one."""
    torch.manual_seed(0)
    model = TwoSimplicialLM(lms()["moe"])
    moe = model.blocks[0].mlp
    x = torch.randn(40, 32)
    probs = torch.softmax(moe.router(x), -1)
    top_p, top_e = probs.topk(moe.top_k, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    torch.testing.assert_close(moe._dense(x, top_p, top_e), moe._sparse(x, top_p, top_e), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["simplicial", "determinant", "moe"])
def test_gpu_lm_compiles_with_inductor_without_breaks(name):
    torch.manual_seed(0)
    model = TwoSimplicialLM(lms()[name]).cuda()
    x, y = torch.randint(0, 64, (2, 16), device="cuda"), torch.randint(0, 64, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        no_breaks(model, x, y)
        _, loss_c = torch.compile(model, fullgraph=True)(x, y)
        _, loss = model(x, y)
    torch.testing.assert_close(loss_c.float(), loss.float(), rtol=2e-2, atol=2e-2)
    loss_c.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

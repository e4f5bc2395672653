"""Model config, shapes, parameter counts, rotary properties, MoE, and training sanity."""
import dataclasses

import pytest
import torch

from twosimplicial.layers.attention import Attention
from twosimplicial.layers.mlp import MoE
from twosimplicial.layers.rotary import RotaryEmbedding, Rotary3D
from twosimplicial.layers.two_simplicial import TwoSimplicialAttention
from twosimplicial.models import PRESETS, ModelConfig, TwoSimplicialLM, count_parameters
from twosimplicial.ops.naive import determinant_logits, trilinear_logits


def tiny(**kw):
    base = dict(vocab_size=37, dim=32, n_layers=2, n_heads=4, max_seq_len=64, w1=6, w2=3)
    return ModelConfig(**{**base, **kw})


ARCHS = {
    "dot": dict(),
    "trilinear": dict(simplicial_every=2),
    "determinant": dict(simplicial_every=1, form="determinant", simplicial_head_dim=7),
}


# --- config ------------------------------------------------------------------------------

def test_config_resolves_defaults_and_round_trips():
    cfg = ModelConfig(dim=96, n_heads=6)
    assert cfg.head_dim == 16 and cfg.n_kv_heads == 6 and cfg.output_size == cfg.vocab_size
    assert cfg.mlp_hidden == 256 and cfg.mlp_hidden % 64 == 0 and cfg.mlp_hidden >= 8 * 96 / 3
    assert cfg.simplicial_heads == 6 and cfg.simplicial_kv_heads == 6 and cfg.simplicial_head_dim == 16
    assert cfg.simplicial_rotary is False
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(form="determinant").simplicial_rotary is True


def test_layer_kinds():
    assert tiny().layer_kinds() == ["dot", "dot"]
    assert ModelConfig(n_layers=8, simplicial_every=4).layer_kinds() == ["dot"] * 3 + ["simplicial"] + \
        ["dot"] * 3 + ["simplicial"]
    assert ModelConfig(n_layers=3, simplicial_every=1).layer_kinds() == ["simplicial"] * 3


def test_presets_build_and_grow():
    sizes = []
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name, simplicial_every=2 if name == "tiny" else 4)
        sizes.append(count_parameters(cfg)["non_embedding"])
    assert sizes == sorted(sizes)
    assert ModelConfig.from_preset("tiny", dim=128).dim == 128
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_preset("tiny", hidden=3)


@pytest.mark.parametrize("kw, err, match", [
    (dict(dim=0), ValueError, "dim"),
    (dict(dim=33), ValueError, "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), ValueError, "n_kv_heads"),
    (dict(head_dim=7), ValueError, "head_dim"),
    (dict(vocab_size=10.0), TypeError, "vocab_size"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings"),
    (dict(simplicial_every=3), ValueError, "simplicial_every"),
    (dict(simplicial_every=-1), ValueError, "simplicial_every"),
    (dict(simplicial_heads=4, simplicial_kv_heads=3), ValueError, "simplicial_kv_heads"),
    (dict(w1=0), ValueError, "w1"),
    (dict(w2=True), TypeError, "w2"),
    (dict(form="cubic"), ValueError, "form"),
    (dict(simplicial_rotary=True), ValueError, "simplicial_rotary"),
    (dict(form="determinant", simplicial_head_dim=2), ValueError, "simplicial_head_dim"),
    (dict(n_experts=2, moe_top_k=3), ValueError, "moe_top_k"),
    (dict(moe_aux_weight=-1.0), ValueError, "moe_aux_weight"),
    (dict(output_size=2), ValueError, "tie_embeddings"),
    (dict(rope_theta=0), ValueError, "rope_theta"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps"),
])
def test_bad_configs_raise(kw, err, match):
    with pytest.raises(err, match=match):
        tiny(**kw)


def test_model_rejects_bad_inputs():
    model = TwoSimplicialLM(tiny())
    with pytest.raises(TypeError, match="ModelConfig"):
        TwoSimplicialLM(dict(dim=32))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 10, dtype=torch.long), start_pos=60)
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# --- shapes and parameter counts ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_loss(arch):
    cfg = tiny(**ARCHS[arch])
    model = TwoSimplicialLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, cfg.vocab_size) and loss is None
    targets = torch.randint(0, cfg.vocab_size, (3, 11))
    targets[0] = -100                                          # ignored positions do not count
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[1:].reshape(-1, cfg.vocab_size), targets[1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    # at init the model predicts nearly uniformly
    assert abs(loss.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5
    kinds = [type(b.attn) for b in model.blocks]
    expect = [TwoSimplicialAttention if k == "simplicial" else Attention for k in cfg.layer_kinds()]
    assert kinds == expect


def test_token_classification_head():
    cfg = tiny(output_size=2, tie_embeddings=False, simplicial_every=1)
    logits, loss = TwoSimplicialLM(cfg)(torch.randint(0, 37, (2, 9)), torch.randint(0, 2, (2, 9)))
    assert logits.shape == (2, 9, 2) and loss.ndim == 0


COUNT_CONFIGS = [
    dict(),
    dict(tie_embeddings=False),
    dict(n_kv_heads=2, head_dim=12, mlp_hidden=50),
    dict(simplicial_every=1, simplicial_heads=2, simplicial_kv_heads=1, simplicial_head_dim=9),
    dict(simplicial_every=2, form="determinant", kv_offsets=True, output_size=5, tie_embeddings=False),
    dict(n_experts=4, moe_top_k=2),
    dict(n_experts=3, moe_top_k=1, simplicial_every=1, tie_embeddings=False, n_layers=3),
]


@pytest.mark.parametrize("kw", COUNT_CONFIGS)
def test_count_parameters_exact(kw):
    cfg = tiny(**kw)
    model = TwoSimplicialLM(cfg)
    counts = count_parameters(cfg)
    assert counts == count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())     # a tied head counted once
    assert counts["non_embedding"] == counts["total"] - model.embed.weight.numel()
    if cfg.n_experts:
        per_expert = sum(p[0].numel() for p in (model.blocks[0].mlp.gate, model.blocks[0].mlp.up,
                                                model.blocks[0].mlp.down))
        idle = cfg.n_layers * (cfg.n_experts - cfg.moe_top_k) * per_expert
        assert counts["active"] == counts["total"] - idle
    else:
        assert counts["active"] == counts["total"]
    assert counts["active_non_embedding"] == counts["active"] - model.embed.weight.numel()


def test_tied_vs_untied_counts():
    tied, untied = count_parameters(tiny()), count_parameters(tiny(tie_embeddings=False))
    assert untied["total"] - tied["total"] == 37 * 32
    assert untied["non_embedding"] - tied["non_embedding"] == 37 * 32
    model = TwoSimplicialLM(tiny())
    assert model.head.weight is model.embed.weight


def test_simplicial_layer_adds_two_projections():
    dot, simp = count_parameters(tiny()), count_parameters(tiny(simplicial_every=2))
    assert simp["total"] - dot["total"] == 2 * 32 * 32        # K2 and V2 (same heads and head dim)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=64)
    model = TwoSimplicialLM(cfg)
    std_in = model.blocks[0].attn.q_proj.weight.std().item()
    std_out = model.blocks[0].attn.out_proj.weight.std().item()
    assert abs(std_in - 0.02) < 0.002 and abs(std_out - 0.02 / 4) < 0.0005
    assert torch.equal(model.norm.weight, torch.ones(256))


# --- rotary -------------------------------------------------------------------------------------

def test_rope_relative():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 9, 2, 16, dtype=torch.float64), torch.randn(1, 9, 2, 16, dtype=torch.float64)
    dots = [torch.einsum("bihd,bjhd->bhij", rope(q, p), rope(k, p)) for p in (0, 5, 1000)]
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dots[0], dots[2], rtol=1e-10, atol=1e-10)
    plain = torch.einsum("bihd,bjhd->bhij", q, k)
    assert (dots[0] - plain).abs().max() > 1e-2                # the rotation does something


def test_rotary3d_is_a_rotation_group():
    rot = Rotary3D(11)                                         # 3 chunks and 2 leftover dims
    R = rot.rotation_matrices(0, 40)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(40, 3, dtype=torch.float64))
    torch.testing.assert_close(R[0], eye.expand(3, 3, 3))
    torch.testing.assert_close(R[7] @ R[12], R[19])            # R(a) R(b) = R(a + b)
    x = torch.randn(2, 40, 3, 11, dtype=torch.float64)
    y = rot(x)
    ref = torch.einsum("snab,Bshnb->Bshna", R, x[..., :9].reshape(2, 40, 3, 3, 3)).reshape(2, 40, 3, 9)
    torch.testing.assert_close(y[..., :9], ref)
    torch.testing.assert_close(y[..., 9:], x[..., 9:])         # leftover dims stay unrotated
    torch.testing.assert_close(rot(x[:, 5:], start_pos=5), y[:, 5:])


@pytest.mark.parametrize("D", [3, 7, 12])
def test_determinant_logits_depend_on_relative_positions_only(D):
    rot = Rotary3D(D)
    q, k1, k2 = (torch.randn(2, 10, 2, D, dtype=torch.float64) for _ in range(3))
    logits = [determinant_logits(*(rot(t, p) for t in (q, k1, k2))) for p in (0, 3, 517)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-9, atol=1e-9)
    # det(R_i q, R_j k1, R_k k2) = det(q, R_{j-i} k1, R_{k-i} k2) for one triple
    i, j, k = 7, 2, 5
    R = rot.rotation_matrices(0, 10)
    def rel(x, p):                                             # rotate x's chunks by R(p), p may be < 0
        Rp = R[p] if p >= 0 else R[-p].transpose(-1, -2)
        n = D // 3
        chunks = x[..., : 3 * n].reshape(*x.shape[:-1], n, 3)
        return torch.cat([torch.einsum("nab,...nb->...na", Rp, chunks).flatten(-2), x[..., 3 * n:]], -1)
    direct = determinant_logits(q[:, i:i + 1], rel(k1[:, j:j + 1], j - i), rel(k2[:, k:k + 1], k - i))[..., 0, 0, 0]
    torch.testing.assert_close(logits[0][:, :, i, j, k], direct)
    # rotations do not carry over to the trilinear form: its logits change with the shift
    tri = [trilinear_logits(*(rot(t, p) for t in (q, k1, k2))) for p in (0, 3)]
    assert (tri[0] - tri[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kv_offsets", [False, True])
def test_simplicial_layer_with_rotary_is_shift_invariant(kv_offsets):
    torch.manual_seed(0)
    kw = dict(head_dim=7, w1=5, w2=3, form="determinant", kv_offsets=kv_offsets)
    layer = TwoSimplicialAttention(24, 4, 2, rotary=True, **kw).double()   # offsets are added before the rotation
    plain = TwoSimplicialAttention(24, 4, 2, **kw).double()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    y0, y1 = layer(x), layer(x, start_pos=1234)
    torch.testing.assert_close(y0, y1, rtol=1e-9, atol=1e-9)
    assert (y0 - plain(x)).abs().max() > 1e-4                  # but the rotary does change the output
    with pytest.raises(ValueError, match="rotary"):
        TwoSimplicialAttention(24, 4, form="trilinear", rotary=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_logits_invariant_to_global_position_shift(arch):
    torch.manual_seed(0)
    model = TwoSimplicialLM(tiny(**ARCHS[arch])).double()
    idx = torch.randint(0, 37, (2, 12))
    torch.testing.assert_close(model(idx)[0], model(idx, start_pos=40)[0], rtol=1e-9, atol=1e-9)


# --- MoE ----------------------------------------------------------------------------------------

def test_moe_matches_dense_loop_and_aux_loss():
    torch.manual_seed(0)
    moe = MoE(8, 16, n_experts=4, top_k=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y, aux = moe(x)
    # reference: every token, every expert, weighted by its renormalised top-2 probability
    probs = torch.softmax(moe.router(x), -1)
    top_p, top_e = probs.topk(2, -1)
    ref = torch.zeros_like(x)
    for e in range(4):
        h = torch.nn.functional.silu(x @ moe.gate[e]) * (x @ moe.up[e]) @ moe.down[e]
        w = (top_p * (top_e == e)).sum(-1, keepdim=True) / top_p.sum(-1, keepdim=True)
        ref = ref + w * h
    torch.testing.assert_close(y, ref)
    f = torch.stack([(top_e == e).double().mean() for e in range(4)])   # share of the N * top_k assignments
    torch.testing.assert_close(aux, 4 * (f * probs.reshape(-1, 4).mean(0)).sum())
    assert aux.item() >= 1.0 - 1e-9                           # >= 1, = 1 only for uniform routing


def test_moe_aux_loss_in_model_is_differentiable():
    torch.manual_seed(0)
    cfg = tiny(n_experts=4, moe_top_k=2, moe_aux_weight=0.1)
    model = TwoSimplicialLM(cfg)
    idx = torch.randint(0, 37, (2, 10))
    _, loss = model(idx, idx)
    aux = model.last_aux_loss
    assert aux.requires_grad and aux.item() > 0
    router = model.blocks[0].mlp.router.weight
    (g,) = torch.autograd.grad(aux, router, retain_graph=True)
    assert g.abs().sum() > 0                                   # the balancing loss trains the router
    ce = torch.nn.functional.cross_entropy(model(idx)[0].reshape(-1, 37), idx.reshape(-1))
    torch.testing.assert_close(loss, ce + 0.1 * model.last_aux_loss)
    dense = TwoSimplicialLM(tiny())
    dense(idx, idx)
    assert dense.last_aux_loss.item() == 0.0


# --- training sanity ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["dot", "trilinear", "determinant", "moe"])
def test_loss_falls_when_overfitting_a_tiny_batch(arch):
    torch.manual_seed(0)
    kw = dict(n_experts=4, moe_top_k=2, simplicial_every=2) if arch == "moe" else ARCHS[arch]
    model = TwoSimplicialLM(tiny(**kw))
    idx = torch.randint(0, 37, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::8]
    assert all(p.grad is not None for p in model.parameters())


def test_config_is_plain_data():
    cfg = tiny(simplicial_every=2)
    assert all(isinstance(v, (int, float, str, bool)) for v in dataclasses.asdict(cfg).values())

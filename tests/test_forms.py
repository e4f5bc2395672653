"""The forms' registry (ops/forms.py): every consumer takes its list of forms from it, each
form's transform to trilinear inputs reproduces its reference logits, and the rotary default and
the head-dim minimum come from the form's entry."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
import torch

from twosimplicial import TwoSimplicialAttention, demo, two_simplicial_attention
from twosimplicial.layers import two_simplicial as layer_module
from twosimplicial.models import config as config_module
from twosimplicial.models.config import ModelConfig
from twosimplicial.ops import interface
from twosimplicial.ops.decode import decode_two_simplicial_attention
from twosimplicial.ops.forms import FORMS, REGISTRY, ROTARY_FORMS, trilinear_logits
from twosimplicial.ops.naive import naive_two_simplicial_attention

UNKNOWN = "rank1"          # the paper's companion form, not registered


def _inputs(D: int, S: int = 5, Hq: int = 2, Hkv: int = 1, Dv: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, S, Hq, D, dtype=torch.float64, generator=g)
    k1, k2 = (torch.randn(2, S, Hkv, D, dtype=torch.float64, generator=g) for _ in range(2))
    v1, v2 = (torch.randn(2, S, Hkv, Dv, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k1, v1, k2, v2


def _demo_form_choices() -> list[str]:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers(dest="cmd"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    return list(next(a for a in sub._actions if a.dest == "form").choices)


def test_registry_is_consistent():
    assert FORMS == tuple(REGISTRY) and set(FORMS) == {"trilinear", "determinant"} and UNKNOWN not in FORMS
    assert ROTARY_FORMS == ("determinant",)
    for name, form in REGISTRY.items():
        assert form.name == name and form.min_head_dim >= 1 and isinstance(form.rotary, bool)
        with pytest.raises(dataclasses.FrozenInstanceError):
            form.rotary = not form.rotary


def test_every_consumer_lists_the_registry():
    # the names they validate against are the registry's, not copies
    assert interface.FORMS is FORMS and config_module.FORMS is FORMS and layer_module.FORMS is FORMS
    assert demo.FORMS is FORMS
    assert _demo_form_choices() == list(FORMS)


@pytest.mark.parametrize("name", FORMS)
def test_every_consumer_accepts_each_form(name):
    """Each form runs through the op, the decode step, the dense reference, ModelConfig, the layer
    and the demo's command line; the op's and decode's outputs are the reference's."""
    D = max(REGISTRY[name].min_head_dim, 4)
    q, k1, v1, k2, v2 = _inputs(D)
    ref, ref_lse = naive_two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, form=name)
    out = two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, form=name, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dec = decode_two_simplicial_attention(q[:, -1:], k1[:, -4:], v1[:, -4:], k2[:, -3:], v2[:, -3:], form=name)
    torch.testing.assert_close(dec, ref[:, -1:], rtol=1e-12, atol=1e-12)
    cfg = ModelConfig(form=name)
    assert cfg.form == name and cfg.simplicial_rotary is REGISTRY[name].rotary
    layer = TwoSimplicialAttention(12, 2, head_dim=D, w1=4, w2=3, form=name, rotary=REGISTRY[name].rotary)
    assert layer.form == name and (layer.rotary is not None) is REGISTRY[name].rotary
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers(dest="cmd"))
    assert parser.parse_args(["demo", "--form", name]).form == name


_Q, _K1, _V1, _K2, _V2 = _inputs(6)
_REJECTERS = {
    "op": lambda: two_simplicial_attention(_Q, _K1, _V1, _K2, _V2, 4, 3, form=UNKNOWN),
    "decode": lambda: decode_two_simplicial_attention(_Q[:, -1:], _K1, _V1, _K2, _V2, form=UNKNOWN),
    "naive": lambda: naive_two_simplicial_attention(_Q, _K1, _V1, _K2, _V2, 4, 3, form=UNKNOWN),
    "config": lambda: ModelConfig(form=UNKNOWN),
    "layer": lambda: TwoSimplicialAttention(12, 2, form=UNKNOWN),
    "run_demo": lambda: demo.run_demo(device="cpu", form=UNKNOWN),
}


@pytest.mark.parametrize("consumer", sorted(_REJECTERS))
def test_every_consumer_rejects_an_unregistered_form(consumer):
    with pytest.raises(ValueError, match=re.escape(f"form must be one of {FORMS}, got {UNKNOWN!r}")):
        _REJECTERS[consumer]()


def test_demo_command_line_rejects_an_unregistered_form(capsys):
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers(dest="cmd"))
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--form", UNKNOWN])
    assert f"invalid choice: {UNKNOWN!r}" in capsys.readouterr().err


def test_naive_does_not_run_an_unknown_form_as_the_determinant():
    q, k1, v1, k2, v2 = _inputs(6)
    with pytest.raises(ValueError, match="form"):
        naive_two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, form="Determinant")


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 6, 7])
def test_transform_reproduces_reference_logits(name, D):
    """The trilinear logits of ``to_trilinear(q, k1, k2)`` are the form's reference logits
    (float64, random inputs, head dims with every remainder mod 3)."""
    q, k1, _, k2, _ = _inputs(D, S=4, Hq=3, Hkv=3, seed=D)
    form = REGISTRY[name]
    tq, tk1, tk2 = form.to_trilinear(q, k1, k2)
    assert tq.shape[:-1] == q.shape[:-1] and tk1.shape == tk2.shape and tk1.shape[:-1] == k1.shape[:-1]
    ref = form.logits(q, k1, k2)
    assert ref.shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(trilinear_logits(tq, tk1, tk2), ref, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("small", ["k1", "k2"])
def test_cross_product_virtual_query(D, small):
    """The identity a native determinant kernel would rest on (docs/kernels.md, The determinant
    form at head dim D): logit = <z, k_b> with z = sgn * (k_s x q) per 3-chunk (sgn = +1 when
    k_s = k2, -1 when k_s = k1) and z = q * k_s on the leftover dims: head dim D, not 2D."""
    q, k1, _, k2, _ = _inputs(D, S=4, Hq=3, Hkv=3, seed=10 + D)
    ks, kb, sgn = (k2, k1, 1.0) if small == "k2" else (k1, k2, -1.0)
    c = 3 * (D // 3)
    nx = torch.tensor([3 * (d // 3) + (d + 1) % 3 for d in range(c)], dtype=torch.long)   # next in the chunk
    pv = torch.tensor([3 * (d // 3) + (d + 2) % 3 for d in range(c)], dtype=torch.long)   # previous
    qe, kse = q[:, :, None], ks[:, None]                       # [B, i, 1, H, D], [B, 1, l, H, D]
    z = torch.cat([sgn * (kse[..., nx] * qe[..., pv] - kse[..., pv] * qe[..., nx]),
                   qe[..., c:] * kse[..., c:]], dim=-1)        # [B, i, l, H, D]
    spec = "bilhd,bjhd->bhijl" if small == "k2" else "bilhd,bjhd->bhilj"   # logits[b, h, i, j(k1), k(k2)]
    torch.testing.assert_close(torch.einsum(spec, z, kb), REGISTRY["determinant"].logits(q, k1, k2),
                               rtol=1e-12, atol=1e-12)


def test_forms_differ():
    """The registry's forms are different functions of the same inputs (a form silently run as
    another would be caught by the reference)."""
    q, k1, _, k2, _ = _inputs(6, S=4, Hq=1, Hkv=1)
    logits = [REGISTRY[name].logits(q, k1, k2) for name in FORMS]
    for a in range(len(logits)):
        for b in range(a + 1, len(logits)):
            assert not torch.allclose(logits[a], logits[b])


@pytest.mark.parametrize("name", FORMS)
def test_rotary_and_head_dim_minimum_come_from_the_registry(name):
    form = REGISTRY[name]
    if form.rotary:
        assert ModelConfig(form=name, simplicial_rotary=False).simplicial_rotary is False
        assert TwoSimplicialAttention(12, 2, head_dim=6, form=name, rotary=True).rotary is not None
    else:
        with pytest.raises(ValueError, match="simplicial_rotary=True needs a rotation-invariant form"):
            ModelConfig(form=name, simplicial_rotary=True)
        with pytest.raises(ValueError, match="rotary=True needs a rotation-invariant form"):
            TwoSimplicialAttention(12, 2, head_dim=6, form=name, rotary=True)
    m = form.min_head_dim
    assert ModelConfig(form=name, simplicial_head_dim=m, simplicial_rotary=False).simplicial_head_dim == m
    assert TwoSimplicialAttention(12, 2, head_dim=m, form=name).head_dim == m
    if m > 1:
        with pytest.raises(ValueError, match=f"simplicial_head_dim >= {m}, got {m - 1}"):
            ModelConfig(form=name, simplicial_head_dim=m - 1)
        with pytest.raises(ValueError, match=f"needs head_dim >= {m}, got {m - 1}"):
            TwoSimplicialAttention(12, 2, head_dim=m - 1, form=name)

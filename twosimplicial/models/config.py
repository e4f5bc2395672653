"""Model configuration: one dataclass of plain values, plus named size presets.

    cfg = ModelConfig.from_preset("small", simplicial_every=4, vocab_size=8192)

Fields left as ``None`` are resolved in ``__post_init__`` (e.g. ``head_dim`` ->
``dim // n_heads``), so a constructed config holds only concrete values and
``ModelConfig(**cfg.to_dict())`` rebuilds the same config. Every bad value raises
a ``ValueError`` (or ``TypeError`` for a wrong type) that names the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..ops.forms import FORMS, REGISTRY, ROTARY_FORMS


@dataclass
class ModelConfig:
    # --- vocabulary and trunk -------------------------------------------------
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None           # None -> n_heads (MHA); a divisor of n_heads gives GQA
    head_dim: int | None = None             # None -> dim // n_heads
    mlp_hidden: int | None = None           # None -> SwiGLU default: 8/3 * dim, rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # --- 2-simplicial layers (docs/math.md) -----------------------------------
    simplicial_every: int = 0               # 0: none; k: layers k-1, 2k-1, ... are 2-simplicial (paper: 4)
    simplicial_heads: int | None = None     # None -> n_heads
    simplicial_kv_heads: int | None = None  # None -> gcd(n_kv_heads, simplicial_heads)
    simplicial_head_dim: int | None = None  # None -> head_dim
    w1: int = 512                           # window of (k1, v1): i - w1 < j <= i
    w2: int = 32                            # window of (k2, v2): i - w2 < k <= i
    form: str = "trilinear"                 # a name in FORMS (ops/forms.py), e.g. "determinant"
    kv_offsets: bool = False                # Meta's constants added to K2 / V2
    simplicial_rotary: bool | None = None   # None -> the form's default: on for rotation-invariant forms
    # --- mixture of experts ----------------------------------------------------
    n_experts: int = 0                      # 0: dense SwiGLU MLP in every layer
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01
    # --- head ------------------------------------------------------------------
    output_size: int | None = None          # None -> vocab_size; e.g. 2 for Match3 token classification

    def __post_init__(self):
        _int("vocab_size", self.vocab_size, 1)
        _int("dim", self.dim, 1)
        _int("n_layers", self.n_layers, 1)
        _int("n_heads", self.n_heads, 1)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _int("n_kv_heads", self.n_kv_heads, 1)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        _int("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of dims)")
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.dim / 3 / 64)
        _int("mlp_hidden", self.mlp_hidden, 1)
        _int("max_seq_len", self.max_seq_len, 1)
        _float("rope_theta", self.rope_theta, positive=True)
        _bool("tie_embeddings", self.tie_embeddings)
        _float("norm_eps", self.norm_eps, positive=True)
        _float("init_std", self.init_std, positive=True)

        _int("simplicial_every", self.simplicial_every, 0)
        if self.simplicial_every > self.n_layers:
            raise ValueError(
                f"simplicial_every={self.simplicial_every} > n_layers={self.n_layers} gives no 2-simplicial layer; "
                "use 0 for a dot-product-only model")
        if self.simplicial_heads is None:
            self.simplicial_heads = self.n_heads
        _int("simplicial_heads", self.simplicial_heads, 1)
        if self.simplicial_kv_heads is None:
            self.simplicial_kv_heads = math.gcd(self.n_kv_heads, self.simplicial_heads)
        _int("simplicial_kv_heads", self.simplicial_kv_heads, 1)
        if self.simplicial_heads % self.simplicial_kv_heads:
            raise ValueError(f"simplicial_heads={self.simplicial_heads} must be a multiple of "
                             f"simplicial_kv_heads={self.simplicial_kv_heads}")
        if self.simplicial_head_dim is None:
            self.simplicial_head_dim = self.head_dim
        _int("simplicial_head_dim", self.simplicial_head_dim, 1)
        _int("w1", self.w1, 1)
        _int("w2", self.w2, 1)
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        _bool("kv_offsets", self.kv_offsets)
        form = REGISTRY[self.form]
        if self.simplicial_rotary is None:
            self.simplicial_rotary = form.rotary
        _bool("simplicial_rotary", self.simplicial_rotary)
        if self.simplicial_rotary and not form.rotary:
            raise ValueError(f"simplicial_rotary=True needs a rotation-invariant form {ROTARY_FORMS}, got "
                             f"form={self.form!r}: only there do rotations make the logits relative")
        if self.simplicial_head_dim < form.min_head_dim:
            raise ValueError(f"form={self.form!r} needs simplicial_head_dim >= {form.min_head_dim}, "
                             f"got {self.simplicial_head_dim}")

        _int("n_experts", self.n_experts, 0)
        _int("moe_top_k", self.moe_top_k, 1)
        if self.n_experts and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be <= n_experts={self.n_experts}")
        _float("moe_aux_weight", self.moe_aux_weight, positive=False)

        if self.output_size is None:
            self.output_size = self.vocab_size
        _int("output_size", self.output_size, 1)
        if self.tie_embeddings and self.output_size != self.vocab_size:
            raise ValueError(f"tie_embeddings=True needs output_size == vocab_size "
                             f"(got {self.output_size} vs {self.vocab_size}); set tie_embeddings=False")

    # --- helpers ---------------------------------------------------------------
    def layer_kinds(self) -> list[str]:
        """``"simplicial"`` or ``"dot"`` per layer: with ``simplicial_every=k``, layers k-1, 2k-1, ..."""
        k = self.simplicial_every
        return ["simplicial" if k and (i + 1) % k == 0 else "dot" for i in range(self.n_layers)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        _check_keys(d)
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size from ``PRESETS`` with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        _check_keys(overrides)
        return cls(**{**PRESETS[name], **overrides})


# Sizes only: the architecture (simplicial_every, form, experts, ...) is an override.
# Layer counts of "small" and up are multiples of 4 so simplicial_every=4 (the paper) fits.
PRESETS: dict[str, dict] = {
    "tiny":   dict(dim=64,   n_layers=2,  n_heads=4,  max_seq_len=256,  w1=64,  w2=16),   # tests, CPU demo
    "mini":   dict(dim=128,  n_layers=4,  n_heads=4,  max_seq_len=512,  w1=128, w2=32),
    "small":  dict(dim=256,  n_layers=8,  n_heads=4,  max_seq_len=1024, w1=256, w2=32),
    "medium": dict(dim=512,  n_layers=8,  n_heads=8,  max_seq_len=2048, w1=512, w2=32),
    "base":   dict(dim=768,  n_layers=12, n_heads=12, max_seq_len=2048, w1=512, w2=32),
    "large":  dict(dim=1024, n_layers=16, n_heads=16, max_seq_len=2048, w1=512, w2=32),
    "xl":     dict(dim=2048, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=4096, w1=512, w2=32),
}


def _check_keys(d: dict) -> None:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {bad}; valid fields: {sorted(names)}")


def _int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _float(name, value, positive):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")

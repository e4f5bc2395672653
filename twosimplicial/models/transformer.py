"""A decoder-only language model whose every k-th layer is 2-simplicial.

    x = embed(idx)
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))     (pre-norm residual blocks)
    logits = head(norm(x))

``attn`` is causal dot-product attention with RoPE (``layers/attention.py``) or, on
layers ``k-1, 2k-1, ...`` for ``simplicial_every=k``, 2-simplicial attention with
windows ``(w1, w2)`` (``layers/two_simplicial.py``). ``mlp`` is SwiGLU or a top-k
mixture of SwiGLU experts. Positions enter only through the rotary embeddings, so
``forward(idx, start_pos=p)`` runs the same model as if ``idx`` began at position ``p``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_id_range, check_instance, check_int, check_token_ids
from ..layers.attention import Attention
from ..layers.cache import KVCache
from ..layers.mlp import MoE, SwiGLU
from ..layers.two_simplicial import TwoSimplicialAttention
from .config import ModelConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if kind == "simplicial":
            self.attn = TwoSimplicialAttention(
                cfg.dim, cfg.simplicial_heads, cfg.simplicial_kv_heads, cfg.simplicial_head_dim,
                w1=cfg.w1, w2=cfg.w2, form=cfg.form, kv_offsets=cfg.kv_offsets,
                rotary=cfg.simplicial_rotary, rope_theta=cfg.rope_theta)
        else:
            self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MoE(cfg.dim, cfg.mlp_hidden, cfg.n_experts, cfg.moe_top_k)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x, start_pos=0, cache=None):
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        h = self.mlp(self.mlp_norm(x))
        aux = None
        if isinstance(h, tuple):                                   # MoE: (output, load-balancing loss)
            h, aux = h
        return x + h, aux


class TwoSimplicialLM(nn.Module):
    """``forward(idx [B, S] long, targets=None, *, cache=None, start_pos=None) -> (logits, loss)``.

    * ``logits``: ``[B, S, output_size]``.
    * ``loss``: ``None`` without targets, else mean cross-entropy over targets != -100,
      plus ``moe_aux_weight * aux`` for MoE models; ``aux`` (the mean over MoE layers of the
      load-balancing loss, 0 for dense models) is kept in ``self.last_aux_loss``.
    * ``cache``: a :class:`KVCache` from :meth:`new_cache`. The call then continues the
      sequence whose past the cache holds, at position ``cache.pos``, and advances it.
    * ``start_pos``: the absolute position of ``idx[:, 0]`` (default ``cache.pos`` or 0).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.output_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.last_aux_loss = torch.zeros(())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 / nanoGPT init: N(0, init_std) everywhere, and the projections that write into
        the residual stream (attention ``out_proj``, MLP ``down``) scaled by ``1/sqrt(2 * n_layers)``
        so the residual's variance does not grow with depth. Norm weights are 1."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:                                         # RMSNorm weights, biases
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith(("out_proj.weight", "down.weight", "mlp.down")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding (see ``twosimplicial.generate``)."""
        return KVCache([blk.attn.new_cache() for blk in self.blocks])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int | None = None):
        cfg = self.config
        check_token_ids("idx", idx)
        B, S = idx.shape
        if idx.device != self.embed.weight.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.embed.weight.device}")
        if targets is not None:
            check_token_ids("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if targets.device != idx.device:
                raise ValueError(f"targets is on {targets.device} but idx is on {idx.device}")
        if start_pos is not None:
            start_pos = check_int("start_pos", start_pos, 0)
        if cache is not None:
            check_instance("cache", cache, KVCache, "a KVCache (model.new_cache()) or None")
            if start_pos is not None and start_pos != cache.pos:
                raise ValueError(f"start_pos={start_pos} disagrees with the cache, which is at position {cache.pos}")
            start_pos = cache.pos
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.blocks)}; "
                                 "make it with model.new_cache()")
        start_pos = 0 if start_pos is None else start_pos
        if start_pos + S > cfg.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + S - 1} exceed max_seq_len={cfg.max_seq_len}")
        check_id_range("idx", idx, cfg.vocab_size)
        if targets is not None:
            check_id_range("targets", targets, cfg.output_size, ignore_index=-100)

        x = self.embed(idx)
        aux_losses = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, start_pos, None if cache is None else cache.layers[i])
            if aux is not None:
                aux_losses.append(aux)
        logits = self.head(self.norm(x))
        if cache is not None:
            cache.pos += S

        self.last_aux_loss = torch.stack(aux_losses).mean() if aux_losses else logits.new_zeros((), dtype=torch.float32)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            if aux_losses:
                loss = loss + self.config.moe_aux_weight * self.last_aux_loss
        return logits, loss


def count_parameters(config_or_model) -> dict[str, int]:
    """Exact parameter counts from the config alone (or a model's config).

    * ``total``: every parameter (a tied head counted once).
    * ``active``: per token: MoE layers count the router and ``moe_top_k`` experts only.
    * ``non_embedding``: total minus the token-embedding table (an untied head stays: it is
      a matmul every token pays for).
    * ``active_non_embedding``: active minus the embedding table.
    """
    cfg = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig or TwoSimplicialLM, got {type(config_or_model).__name__}")
    d, h = cfg.dim, cfg.mlp_hidden

    def attn_dot():
        D = cfg.head_dim                  # q, k, v, out projections (no biases)
        return d * cfg.n_heads * D + 2 * d * cfg.n_kv_heads * D + cfg.n_heads * D * d

    def attn_simplicial():
        D = cfg.simplicial_head_dim       # q, k1, v1, k2, v2, out projections
        return d * cfg.simplicial_heads * D + 4 * d * cfg.simplicial_kv_heads * D + cfg.simplicial_heads * D * d

    expert = 3 * d * h                    # SwiGLU: gate, up, down
    if cfg.n_experts:
        mlp_total = d * cfg.n_experts + cfg.n_experts * expert
        mlp_active = d * cfg.n_experts + cfg.moe_top_k * expert
    else:
        mlp_total = mlp_active = expert
    norms = 2 * d                         # two RMSNorms per block
    attn = sum(attn_simplicial() if k == "simplicial" else attn_dot() for k in cfg.layer_kinds())
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.output_size
    shared = embed + head + d + attn + cfg.n_layers * norms    # + final norm
    total = shared + cfg.n_layers * mlp_total
    active = shared + cfg.n_layers * mlp_active
    return {"total": total, "active": active, "non_embedding": total - embed,
            "active_non_embedding": active - embed}

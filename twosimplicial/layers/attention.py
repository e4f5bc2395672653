"""Causal dot-product attention with RoPE and grouped-query heads (GQA).

``x [B, S, dim] -> [B, S, dim]``: project to ``q [B, S, H, D]`` and ``k, v [B, S, Hkv, D]``,
rotate q and k by their absolute positions (RoPE), and run
``softmax(q k^T / sqrt(D) + causal mask) v`` through ``F.scaled_dot_product_attention``
(FlashAttention / cuDNN / memory-efficient kernels on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_bool, check_head_shape, check_layer_call, check_real
from .cache import DotCache
from .rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float = 10000.0, bias: bool = False):
        super().__init__()
        dim, heads, kv_heads, head_dim = check_head_shape(dim, heads, kv_heads, head_dim)
        rope_theta = check_real("rope_theta", rope_theta, positive=True)
        check_bool("bias", bias)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.rope = RotaryEmbedding(head_dim, rope_theta)

    def new_cache(self) -> DotCache:
        return DotCache()

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: DotCache | None = None) -> torch.Tensor:
        check_layer_call(self.dim, x, start_pos, cache, DotCache)
        B, S, _ = x.shape
        q = self.rope(self.q_proj(x).view(B, S, self.heads, self.head_dim), start_pos)
        k = self.rope(self.k_proj(x).view(B, S, self.kv_heads, self.head_dim), start_pos)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.append(k, v)                 # every past position + the S new ones
        T = k.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # SDPA wants [B, H, S, D]
        gqa = self.heads != self.kv_heads
        if T == S:                                    # no past: the usual causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif S == 1:                                  # one new token sees every cached position
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:                                         # new row r (position T-S+r) sees keys 0 .. T-S+r
            mask = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(T - S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, -1))

"""Training FLOPs per token of a :class:`ModelConfig`, counted from the config alone.

    flops_per_token(cfg, seq_len)["total"]      # training FLOPs per token (forward + backward)

The count (used by the scaling study for its compute axis, and for MFU):

* **Matmuls**: ``6 x`` the parameters of every matrix product a token passes through
  (2 FLOPs per multiply-add forward, twice that backward): the attention projections
  (q, k, v, out; 2-simplicial layers q, k1, v1, k2, v2, out), the MLP (SwiGLU gate, up,
  down; for mixture-of-experts layers the router and the ``moe_top_k`` active experts only)
  and the output head (counted whether or not it is tied to the embedding). The embedding
  lookup is a gather, not a product, and is not counted; neither are norms, activations,
  rotary embeddings and the softmax.
* **Attention** at ``3.5 x`` its forward FLOPs (forward 1, backward 2.5: the backward's
  five products against the forward's two, as for FlashAttention):
  - dot-product, causal: ``4 * head_dim * n_heads`` per (query, key) pair (``q.k`` and
    ``P v``, 2 FLOPs each per dimension), times the mean over positions ``i < seq_len`` of
    ``min(i + 1, seq_len)`` keys, i.e. ``(seq_len + 1) / 2``;
  - 2-simplicial: ``4 * simplicial_head_dim * simplicial_heads`` per valid triple (the
    trilinear logit and ``P (v1 * v2)``, the tensor-core convention of the kernels'
    benchmarks), times the mean over positions of ``min(i + 1, w1) * min(i + 1, w2)``.
    The determinant form is counted as the trilinear one (its extra chunk arithmetic is not
    included, so its count is a lower bound).

Every value is per token of a ``seq_len``-token training sequence and a float.
"""
from __future__ import annotations

from .config import ModelConfig
from .transformer import count_parameters

ATTENTION_TRAIN_FACTOR = 3.5      # forward 1 + backward 2.5, in units of the forward


def _mean_pairs(seq_len: int, w: int) -> float:
    """Mean over positions ``i < seq_len`` of ``min(i + 1, w)``."""
    return sum(min(i + 1, w) for i in range(seq_len)) / seq_len


def n_triples(S: int, w1: int, w2: int) -> int:
    """The valid triples ``(i, j, k)`` of one sequence and head: ``sum_{i<S} min(i+1, w1) *
    min(i+1, w2)``, in closed form (exact for any ``S``, ``w1``, ``w2 >= 0``). The FLOP count of
    the 2-simplicial op (benchmarks, MFU) is ``4 * D`` per triple forward."""
    a, b = min(w1, w2, S), min(max(w1, w2), S)
    sq = a * (a + 1) * (2 * a + 1) // 6                        # rows i+1 <= a: (i+1)^2
    mid = a * ((b * (b + 1) - a * (a + 1)) // 2)                # a < i+1 <= b: a * (i+1)
    return sq + mid + (S - b) * a * b                           # past b: a * b


def _mean_triples(seq_len: int, w1: int, w2: int) -> float:
    """Mean over positions ``i < seq_len`` of ``min(i + 1, w1) * min(i + 1, w2)``."""
    return n_triples(seq_len, w1, w2) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
    """Training FLOPs per token of ``cfg`` on ``seq_len``-token sequences (see the module docstring).

    Returns ``matmul_params`` (the matrix parameters a token passes through), ``matmul``
    (``6 * matmul_params``), ``attention_dot`` and ``attention_simplicial`` (the training
    FLOPs of the attention cores of all layers of each kind), ``attention`` (their sum),
    ``forward`` (``2 * matmul_params`` plus the attention cores' forward FLOPs) and
    ``total`` (``matmul + attention``: forward and backward).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    params = count_parameters(cfg)["matmul"]
    kinds = cfg.layer_kinds()
    n_dot, n_simp = kinds.count("dot"), kinds.count("simplicial")
    fwd_dot = n_dot * 4 * cfg.head_dim * cfg.n_heads * _mean_pairs(seq_len, seq_len)
    fwd_simp = (n_simp * 4 * cfg.simplicial_head_dim * cfg.simplicial_heads
                * _mean_triples(seq_len, cfg.w1, cfg.w2))
    attention_dot = ATTENTION_TRAIN_FACTOR * fwd_dot
    attention_simplicial = ATTENTION_TRAIN_FACTOR * fwd_simp
    return {
        "matmul_params": float(params),
        "matmul": 6.0 * params,
        "attention_dot": attention_dot,
        "attention_simplicial": attention_simplicial,
        "attention": attention_dot + attention_simplicial,
        "forward": 2.0 * params + fwd_dot + fwd_simp,
        "total": 6.0 * params + attention_dot + attention_simplicial,
    }

"""Feed-forward blocks: SwiGLU and a top-k mixture of SwiGLU experts.

SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

MoE (Switch / GShard style): a linear router gives ``p = softmax(router(x))`` over
``E`` experts; each token goes to its ``top_k`` experts, whose outputs are summed
with the top-k probabilities renormalised to sum to one. The load-balancing loss
(Switch Transformer, eq. 4, generalised to top-k) is

    aux = E * sum_e f_e * P_e,

``f_e`` the fraction of the ``N * top_k`` token-to-expert assignments that go to
``e`` (not differentiable) and ``P_e`` the mean router probability of ``e``
(differentiable). It is 1 for perfectly uniform routing and grows as routing
collapses onto few experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        dim, hidden = check_int("dim", dim, 1), check_int("hidden", hidden, 1)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """``forward(x [..., dim]) -> (y [..., dim], aux_loss scalar)``.

    Expert weights are stacked (``gate``/``up``: ``[E, dim, hidden]``, ``down``:
    ``[E, hidden, dim]``). In eager mode tokens are gathered per expert, so the compute is
    ``top_k`` SwiGLUs per token (dropless: no capacity limit); under ``torch.compile`` every
    expert runs on every token with a zero weight where it is not routed (same result, static
    shapes, ``E / top_k`` times the compute).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        dim, hidden, n_experts = (check_int(name, v, 1) for name, v in
                                  (("dim", dim), ("hidden", hidden), ("n_experts", n_experts)))
        top_k = check_int("top_k", top_k, 1, what=f"an integer in [1, n_experts={n_experts}]")
        if top_k > n_experts:
            raise ValueError(f"top_k must be an integer in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.gate = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.up = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        for p in (self.gate, self.up, self.down):
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                  # [N, dim]
        logits = self.router(x)
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)   # [N, E], >= fp32
        top_p, top_e = probs.topk(self.top_k, dim=-1)                 # [N, k]
        top_p = top_p / top_p.sum(-1, keepdim=True)
        if torch.compiler.is_compiling():
            y = self._dense(x, top_p, top_e)
        else:
            y = self._sparse(x, top_p, top_e)
        # load balancing: f_e from the hard assignments, P_e from the soft probabilities
        counts = torch.zeros(self.n_experts, dtype=probs.dtype, device=x.device)
        f = counts.scatter_add_(0, top_e.flatten(), torch.ones_like(top_p).flatten()) / top_e.numel()
        aux = self.n_experts * (f * probs.mean(0)).sum()
        return y.reshape(shape), aux

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return (F.silu(h @ self.gate[e]) * (h @ self.up[e])) @ self.down[e]

    def _sparse(self, x, top_p, top_e):
        """Each expert on the tokens routed to it: ``top_k`` SwiGLUs per token (eager mode)."""
        y = torch.zeros_like(x)
        for e in range(self.n_experts):
            tok, slot = torch.where(top_e == e)                       # assignments to expert e
            if tok.numel() == 0:
                continue
            y.index_add_(0, tok, (self._expert(e, x[tok]) * top_p[tok, slot, None]).to(y.dtype))
        return y

    def _dense(self, x, top_p, top_e):
        """The same sum with static shapes, for ``torch.compile``: every expert on every token,
        weighted by its (zero unless routed) gate. ``n_experts / top_k`` times the compute of
        ``_sparse``; the routing's data-dependent shapes would otherwise break the graph."""
        w = torch.zeros(x.shape[0], self.n_experts, dtype=top_p.dtype, device=x.device).scatter(1, top_e, top_p)
        y = torch.zeros_like(x)
        for e in range(self.n_experts):
            y = y + (self._expert(e, x) * w[:, e, None]).to(y.dtype)
        return y

"""Drop 2-simplicial attention into an existing PyTorch model.

``TwoSimplicialAttention`` maps ``[B, S, dim]`` to ``[B, S, dim]`` like any self-attention
module, so it replaces one in place. Here the existing model is a small GPT written with
plain ``torch.nn`` (learned position embeddings, causal ``scaled_dot_product_attention``);
every other block's attention becomes 2-simplicial, as in a hybrid model (the paper,
Roy et al. 2025, makes every fourth layer 2-simplicial). Both models then train on the same
batches of bytes of this file, and the script prints their parameter counts and losses.

    python examples/drop_in_layer.py               # 100 steps each, about a minute on 2 CPU cores
    python examples/drop_in_layer.py --steps 10
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from twosimplicial import TwoSimplicialAttention


# --------------------------------------------------------------------------- an existing model
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, dim = x.shape
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 4, max_len: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- the swap
def make_hybrid(model: TinyGPT, every: int = 2, w1: int = 64, w2: int = 16) -> TinyGPT:
    """A copy of ``model`` whose blocks ``every-1, 2*every-1, ...`` attend 2-simplicially: for
    query ``i``, over pairs of keys ``(j, k)`` with ``i-w1 < j <= i`` and ``i-w2 < k <= i``."""
    hybrid = copy.deepcopy(model)
    for i, blk in enumerate(hybrid.blocks):
        if (i + 1) % every == 0:
            dim, heads = blk.attn.out_proj.in_features, blk.attn.heads
            blk.attn = TwoSimplicialAttention(dim, heads, w1=w1, w2=w2)
    return hybrid


def batches(data: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        chunk = torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def train(model: nn.Module, data: torch.Tensor, args, name: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for x, y in tqdm(batches(data, args.seq_len, args.batch_size, args.steps, args.seed), total=args.steps,
                     desc=name, leave=False):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="training steps per model (default: 100)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches (default: 0)")
    args = p.parse_args(argv)

    data = torch.tensor(list(Path(__file__).read_bytes()), dtype=torch.long)
    torch.manual_seed(args.seed)
    base = TinyGPT(max_len=args.seq_len)
    hybrid = make_hybrid(base)                        # same initial weights except the swapped attention
    result = {}
    for name, model in (("dot-product", base), ("hybrid", hybrid)):
        losses = train(model, data, args, name)
        n = min(10, len(losses))
        result[name] = {"parameters": sum(t.numel() for t in model.parameters()),
                        "first_loss": sum(losses[:n]) / n, "last_loss": sum(losses[-n:]) / n}
        print(f"{name:12s} {result[name]['parameters']:>8,d} parameters   loss (mean of {n} steps) "
              f"{result[name]['first_loss']:.3f} -> {result[name]['last_loss']:.3f}")
    result["simplicial_blocks"] = [i for i, b in enumerate(hybrid.blocks) if isinstance(b.attn, TwoSimplicialAttention)]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

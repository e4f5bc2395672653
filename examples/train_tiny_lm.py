"""Train a tiny hybrid language model from Python, sample from it, save it and load it back.

The model is a ``TwoSimplicialLM`` whose second layer is 2-simplicial (``simplicial_every=2``;
the paper makes every fourth layer so). It reads bytes (vocabulary 256, no tokenizer to train)
and trains on the Python sources of the installed ``twosimplicial`` package with AdamW, a linear
warm-up and a cosine decay. Then it samples a continuation (KV cache included), writes the model
with ``save_pretrained`` and reads it back with ``from_pretrained``.

The full recipe (a BPE corpus, verified checkpoints, resume, evaluation) is
``twosimplicial train configs/cpu_smoke.toml``, or ``twosimplicial.train.train(config)`` from Python.

    python examples/train_tiny_lm.py                          # 200 steps, under a minute on 2 CPU cores
    python examples/train_tiny_lm.py --steps 20 --out /tmp/tiny-lm
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

import twosimplicial
from twosimplicial import ModelConfig, TwoSimplicialLM
from twosimplicial.generate import generate


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the package's sources: the first 95% to train on, the rest held out."""
    files = sorted(Path(twosimplicial.__file__).parent.rglob("*.py"))
    data = torch.tensor(list(b"\n".join(f.read_bytes() for f in files)), dtype=torch.long)
    cut = int(0.95 * len(data))
    return data[:cut], data[cut:]


def batch(data: torch.Tensor, seq_len: int, batch_size: int, g: torch.Generator):
    start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    chunk = torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def val_loss(model: TwoSimplicialLM, val: torch.Tensor, seq_len: int, batches: int = 4) -> float:
    g = torch.Generator().manual_seed(1234)            # the same held-out windows every time
    model.eval()
    losses = [model(*batch(val, seq_len, 8, g))[1].item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default: 200)")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and sampling (default: 0)")
    p.add_argument("--out", default="runs/tiny-lm-example", help="save_pretrained directory "
                   "(default: runs/tiny-lm-example)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    # "tiny" preset: width 64, 2 layers of 4 heads; layer 1 is 2-simplicial with windows (w1, w2)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, max_seq_len=args.seq_len, simplicial_every=2,
                                  w1=64, w2=16)
    model = TwoSimplicialLM(cfg)
    print("layers:", cfg.layer_kinds(), f"{sum(t.numel() for t in model.parameters()):,d} parameters")
    train, val = corpus()

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0125)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                max(1, args.steps - warmup))))
    g = torch.Generator().manual_seed(args.seed)
    before = val_loss(model, val, args.seq_len)
    bar = tqdm(range(args.steps), desc="training")
    for _ in bar:
        _, loss = model(*batch(train, args.seq_len, args.batch_size, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    after = val_loss(model, val, args.seq_len)
    print(f"held-out loss (nats per byte): {before:.3f} before training, {after:.3f} after")

    prompt = torch.tensor([list(b"def forward(self, x):\n")])
    out = generate(model, prompt, max_new_tokens=60, temperature=0.8, top_k=20,
                   generator=torch.Generator().manual_seed(args.seed))
    print("sample:", bytes(out[0].tolist()).decode("utf-8", errors="replace"))

    model.save_pretrained(args.out)                    # model.safetensors, config.json, manifest.json
    loaded = TwoSimplicialLM.from_pretrained(args.out)
    x = prompt.expand(2, -1)
    same = torch.equal(model.eval()(x)[0], loaded(x)[0])
    print(f"saved to {args.out}; reloaded model gives the same logits: {same}")
    result = {"val_loss_before": before, "val_loss_after": after, "saved": str(args.out), "reload_equal": same}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

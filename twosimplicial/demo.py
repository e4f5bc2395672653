"""``twosimplicial demo``: dot-product vs 2-simplicial attention on Match3, same parameter budget.

Match3 (SPEC §5; ``twosimplicial.data.match3``): label ``y_i = 1`` iff some ``j, k <= i`` have
``x_i + x_j + x_k = 0 (mod M)``. One 2-simplicial head can represent it (Roy et al. 2025,
Thm 5.1, determinant form); dot-product attention needs far more depth or width.

Two models, identical except for the attention of their last layer (on the CPU size the
only layer, which is the paper's claim: one 2-simplicial layer can represent Match3):
- ``dot``: dot-product (RoPE) attention;
- ``2-simplicial``: 2-simplicial attention, windows covering the whole sequence, trilinear
  form by default (``--form determinant`` for the rotation-invariant form with its rotary
  embedding; slower on CPU, learned no faster in our runs).
The 2-simplicial layer has two more projections (K2, V2); the dot model's MLP width is
raised until the two totals are as close as the MLP's granularity allows (both counts are
printed). Both see the same batches (same seed) for the same number of steps. On a CPU
with two or more cores they train side by side, one core each, so each one's wall time is
its own. The table also gives the per-position majority baseline (a model that only knows
the position): accuracy above it is what the attention earned.

Outputs in ``--out-dir``: ``results.json``, ``curves.png`` (training loss and validation
accuracy against step) and one run directory per model.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Match3Source, balanced_modulus, position_baseline
from .models import ModelConfig, count_parameters
from .train import evaluate_batches, load_model, train

SIZES = {
    # n: sequence length (M is chosen for balanced labels); the 2-simplicial layer has
    # s_heads heads of s_head_dim; the last of n_layers layers is the one that differs
    "cpu": dict(n=16, dim=64, n_heads=4, n_layers=1, s_heads=2, s_head_dim=32, steps=2500, batch_size=64, lr=3e-3),
    "gpu": dict(n=32, dim=128, n_heads=4, n_layers=2, s_heads=2, s_head_dim=64, steps=4000, batch_size=256, lr=2e-3),
    "gpu-large": dict(n=64, dim=256, n_heads=8, n_layers=2, s_heads=4, s_head_dim=64, steps=8000, batch_size=256,
                      lr=1e-3),
}


def model_overrides(size: dict, M: int, form: str = "trilinear") -> dict[str, dict]:
    """Two configs, identical except the attention of the last layer, with equal parameter counts."""
    n, L = size["n"], size["n_layers"]
    common = dict(vocab_size=M, output_size=2, tie_embeddings=False, dim=size["dim"], n_heads=size["n_heads"],
                  n_layers=L, max_seq_len=n)
    simp = dict(common, simplicial_every=L, form=form, w1=n, w2=n,
                simplicial_heads=size["s_heads"], simplicial_head_dim=size["s_head_dim"])
    target = count_parameters(ModelConfig(**simp))["total"]
    # widen the dot model's MLP (3*dim parameters per hidden unit and layer) to meet the budget
    base = ModelConfig(**common, simplicial_every=0)
    extra = round((target - count_parameters(base)["total"]) / (3 * size["dim"] * L))
    dot = dict(common, simplicial_every=0, mlp_hidden=base.mlp_hidden + extra)
    return {"dot": dot, "2-simplicial": simp}


def _config(name: str, model: dict, size: dict, M: int, steps: int, device: str, out_dir: Path, seed: int) -> dict:
    return {
        "run": {"out_dir": str(out_dir / name), "seed": seed, "device": device},
        "model": model,
        "data": {"task": "match3", "match3_n": size["n"], "match3_M": M, "batch_size": size["batch_size"]},
        "train": {"max_steps": steps, "lr": size["lr"], "warmup_steps": max(1, steps // 20), "weight_decay": 0.0,
                  "log_interval": max(1, steps // 100), "eval_interval": max(1, steps // 10), "eval_batches": 16,
                  "ckpt_interval": 0, "keep_checkpoints": 1, "progress": False},
    }


def _train_one(cfg: dict, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    s = train(cfg)
    s["wall_s"] = time.perf_counter() - t0
    return s


def _read(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:          # a line being written
            pass
    return out


def _plot(curves: dict, baseline: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        tr = [r for r in rows if r["kind"] == "train"]
        ev = [r for r in rows if r["kind"] == "eval"]
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
        b.plot([r["step"] for r in ev], [r["match3"]["accuracy"] for r in ev], marker="o", label=name)
    b.axhline(baseline, color="gray", ls="--", label="position-only baseline")
    a.set(xlabel="step", ylabel="training loss (nats)", title="Match3: training loss")
    b.set(xlabel="step", ylabel="validation accuracy", title="Match3: validation accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(size: str = "cpu", out_dir: str | os.PathLike = "runs/demo", steps: int | None = None,
             device: str = "auto", seed: int = 0, parallel: bool | None = None, form: str = "trilinear") -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sz = SIZES[size]
    if steps is None:
        steps = sz["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None (size default) or an int >= 1, got {steps!r}")
    out = Path(out_dir)
    for name in ("dot", "2-simplicial"):             # an earlier demo's runs (only directories this demo made)
        if (out / name / "config.json").is_file():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    n = sz["n"]
    M = balanced_modulus(n)
    base = position_baseline(n, M)
    models = model_overrides(sz, M, form)
    cfgs = {name: _config(name, m, sz, M, steps, device, out, seed) for name, m in models.items()}
    params = {name: count_parameters(ModelConfig(**m)) for name, m in models.items()}
    print(f"Match3: n={n}, M={M} (balanced labels), {steps} steps x {sz['batch_size']} sequences, device {device}")
    for name in models:
        print(f"  {name:13s} {params[name]['total']:,} parameters")

    if parallel is None:
        parallel = device == "cpu" and (os.cpu_count() or 1) >= 2
    bars = {name: tqdm(total=steps, desc=f"{name:13s}", position=i, dynamic_ncols=True)
            for i, name in enumerate(cfgs)}
    results = {}
    if parallel:
        ctx = mp.get_context("spawn")
        with ctx.Pool(len(cfgs)) as pool:
            jobs = {name: pool.apply_async(_train_one, (cfg, 1)) for name, cfg in cfgs.items()}
            while not all(j.ready() for j in jobs.values()):
                for name, cfg in cfgs.items():
                    tr = [r for r in _read(Path(cfg["run"]["out_dir"])) if r["kind"] == "train"]
                    if tr:
                        bars[name].n = tr[-1]["step"]
                        bars[name].set_postfix(loss=f"{tr[-1]['loss']:.4f}")
                time.sleep(0.5)
            results = {name: j.get() for name, j in jobs.items()}
    else:
        for name, cfg in cfgs.items():
            cfg["train"]["progress"] = False
            results[name] = _train_one(cfg, None)
    for name, bar in bars.items():
        bar.n = steps
        bar.close()

    src = Match3Source(n, M, seed, "val")
    batches = [tuple(torch.from_numpy(a) for a in src.get_many(np.arange(b * 256, (b + 1) * 256))) for b in range(16)]
    rows = {}
    for name, cfg in cfgs.items():
        model, _ = load_model(cfg["run"]["out_dir"], device)
        ev = evaluate_batches(model, batches, device, contextlib.nullcontext())
        r = results[name]
        rows[name] = {"accuracy": ev["accuracy"], "val_loss": ev["loss"], "train_loss": r["train_loss"],
                      "parameters": params[name]["total"], "train_time_s": r["train_time_s"],
                      "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"]}
    curves = {name: _read(Path(cfg["run"]["out_dir"])) for name, cfg in cfgs.items()}
    title = f"Match3 n={n}, M={M}: dot-product vs 2-simplicial ({form}), equal parameters"
    _plot(curves, base, out / "curves.png", title)

    header = f"{'model':13s} {'accuracy':>9s} {'val loss':>9s} {'train loss':>11s} {'params':>9s} {'time (s)':>9s}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(f"{name:13s} {r['accuracy']:9.4f} {r['val_loss']:9.4f} {r['train_loss']:11.4f} "
                     f"{r['parameters']:9,d} {r['train_time_s']:9.1f}")
    lines.append(f"{'position-only':13s} {base:9.4f} {'':>9s} {'':>11s} {'0':>9s} {'':>9s}")
    table = "\n".join(lines)
    print()
    print(table)
    winner = max(rows, key=lambda k: rows[k]["accuracy"])
    gap = rows["2-simplicial"]["accuracy"] - rows["dot"]["accuracy"]
    print(f"\n2-simplicial minus dot-product accuracy: {gap:+.4f} ({winner} is ahead; "
          f"{len(batches) * 256} validation sequences, one seed)")
    print(f"curves: {out / 'curves.png'}   results: {out / 'results.json'}")
    res = {"size": size, "form": form, "n": n, "M": M, "steps": steps, "batch_size": sz["batch_size"], "device": device,
           "seed": seed, "parallel": parallel, "position_baseline_accuracy": base, "models": rows,
           "model_configs": models, "accuracy_gap_simplicial_minus_dot": gap, "table": table}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res

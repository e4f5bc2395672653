"""``twosimplicial demo``: dot-product vs 2-simplicial attention on Match3, same parameter budget.

Match3 (docs/math.md, Match3; ``twosimplicial.data.match3``): label ``y_i = 1`` iff some
``j, k <= i`` have ``x_i + x_j + x_k = 0 (mod M)``. One 2-simplicial head can represent it
(Roy et al. 2025, Thm 5.1, determinant form); dot-product attention needs far more depth or width.

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

One seed is one draw: ``--seeds 0,1,2,3,4`` (:func:`run_demo_seeds`) runs the demo once per
seed and writes each seed's accuracies and the spread of the gap to
``results/match3/demo_seeds.json``; a single-seed demo with the same settings says whether its
gap lies outside that spread (larger than either model's accuracy range over the seeds).

Outputs in ``--out-dir``: ``results.json``, ``curves.png`` (training loss and validation
accuracy against step) and one run directory per model. An earlier demo's run directories
there are replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
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

from ._validate import resolve_device
from .checkpoint import write_atomic
from .data import Match3Source, balanced_modulus, position_baseline
from .models import ModelConfig, count_parameters
from .models.config import FORMS
from .train import evaluate_batches, load_model, train

SIZES = {
    # n: sequence length (M is chosen for balanced labels); the 2-simplicial layer has
    # s_heads heads of s_head_dim; the last of n_layers layers is the one that differs
    "cpu": dict(n=16, dim=64, n_heads=4, n_layers=1, s_heads=2, s_head_dim=32, steps=2500, batch_size=64, lr=3e-3),
    "gpu": dict(n=32, dim=128, n_heads=4, n_layers=2, s_heads=2, s_head_dim=64, steps=4000, batch_size=256, lr=2e-3),
    "gpu-large": dict(n=64, dim=256, n_heads=8, n_layers=2, s_heads=4, s_head_dim=64, steps=8000, batch_size=256,
                      lr=1e-3),
}
MODELS = ("dot", "2-simplicial")
# the seed spread of the demo, measured by run_demo_seeds (committed for the CPU size)
SPREAD_JSON = Path(__file__).resolve().parents[1] / "results" / "match3" / "demo_seeds.json"


def matched_models(size: dict, M: int, forms: tuple[str, ...] = ("trilinear",)) -> dict[str, dict]:
    """``ModelConfig`` fields for ``"dot"`` and for each 2-simplicial form in ``forms``, identical
    except the attention of the last layer and the dot model's MLP width, which is raised until
    the totals are as close as the MLP's granularity allows.

    ``size`` gives ``n`` (sequence length), ``dim``, ``n_heads``, ``n_layers`` and the
    2-simplicial layer's ``s_heads`` and ``s_head_dim``; its windows cover the whole sequence.
    The forms have the same parameters (the determinant's rotary embedding has none)."""
    n, L = size["n"], size["n_layers"]
    common = dict(vocab_size=M, output_size=2, tie_embeddings=False, dim=size["dim"], n_heads=size["n_heads"],
                  n_layers=L, max_seq_len=n)
    simp = {form: dict(common, simplicial_every=L, form=form, w1=n, w2=n,
                       simplicial_heads=size["s_heads"], simplicial_head_dim=size["s_head_dim"]) for form in forms}
    target = count_parameters(ModelConfig(**simp[forms[0]]))["total"]
    # widen the dot model's MLP (3*dim parameters per hidden unit and layer) to meet the budget
    base = ModelConfig(**common, simplicial_every=0)
    extra = round((target - count_parameters(base)["total"]) / (3 * size["dim"] * L))
    dot = dict(common, simplicial_every=0, mlp_hidden=base.mlp_hidden + extra)
    return {"dot": dot, **simp}


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


def _experiment(size: str, form: str, steps: int, device: str) -> dict:
    """What makes two demo runs the same experiment up to the seed (compared with the measured spread's)."""
    sz = SIZES[size]
    return {"size": size, **sz, "M": balanced_modulus(sz["n"]), "steps": steps, "form": form, "device": device}


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to touch an earlier demo's run directories unless ``overwrite``; then clear them."""
    runs = []
    for name in MODELS:
        d = out / name
        if not d.exists():
            continue
        if not (d / "config.json").is_file():
            if d.is_dir() and not any(d.iterdir()):
                continue
            raise FileExistsError(f"{d} exists and is not a demo run directory; choose another --out-dir")
        if not overwrite:
            raise FileExistsError(f"{d} holds an earlier demo run; pass --overwrite to replace it, "
                                  "or choose another --out-dir")
        runs.append(d)
    for d in runs:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)


def spread_verdict(gap: float, experiment: dict, spread_json: str | os.PathLike | None) -> str:
    """Whether ``gap`` (2-simplicial minus dot accuracy) is outside the seed-to-seed spread measured by
    :func:`run_demo_seeds` for the same experiment: each model's accuracy varies over seeds by some
    range; the gap is outside the spread when it is larger in size than the larger of the two ranges."""
    path = None if spread_json is None else Path(spread_json)
    if path is None or not path.is_file():
        return "Seed spread not measured for these settings."
    m = json.loads(path.read_text())
    if m.get("experiment") != experiment:
        return f"Seed spread not measured for these settings ({path} is for other settings)."
    s = m["spread"]
    where = "outside" if abs(gap) > s["accuracy_range_max"] else "within"
    return (f"This gap is {where} the seed spread: over seeds {m['seeds']} ({path}) each model's accuracy varied by up to "
            f"{s['accuracy_range_max']:.4f}, and the gap ranged from {s['gap_min']:+.4f} to {s['gap_max']:+.4f} "
            f"(2-simplicial ahead on {s['simplicial_ahead']} of {len(m['seeds'])} seeds).")


def _size_and_device(size: str, device: str) -> str:
    """Check ``size`` and ``device``; return the device ``"auto"`` stands for."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return resolve_device("device", device)


def run_demo(size: str = "cpu", out_dir: str | os.PathLike = "runs/demo", steps: int | None = None,
             device: str = "auto", seed: int = 0, parallel: bool | None = None, form: str = "trilinear",
             overwrite: bool = False, spread_json: str | os.PathLike | None = SPREAD_JSON) -> dict:
    """Train both models and compare them (see the module docstring); returns what ``results.json`` holds.

    An earlier demo's run directories in ``out_dir`` are replaced only with ``overwrite=True``
    (else ``FileExistsError``). ``spread_json``: the seed spread (:func:`run_demo_seeds`) the gap
    is compared with, when it was measured for these settings; ``None`` skips the comparison."""
    device = _size_and_device(size, device)
    sz = SIZES[size]
    if steps is None:
        steps = sz["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None (size default) or an int >= 1, got {steps!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    n = sz["n"]
    M = balanced_modulus(n)
    base = position_baseline(n, M)
    matched = matched_models(sz, M, (form,))
    models = {"dot": matched["dot"], "2-simplicial": matched[form]}
    cfgs = {name: _config(name, m, sz, M, steps, device, out, seed) for name, m in models.items()}
    params = {name: count_parameters(ModelConfig(**m)) for name, m in models.items()}
    print(f"Match3: n={n}, M={M} (balanced labels), {steps} steps x {sz['batch_size']} sequences, device {device}, "
          f"seed {seed}")
    for name in models:
        print(f"  {name:13s} {params[name]['total']:,} parameters")

    if parallel is None:
        parallel = device == "cpu" and (os.cpu_count() or 1) >= 2
    results = {}
    if parallel:
        ctx = mp.get_context("spawn")
        bars = {name: tqdm(total=steps, desc=f"{name:13s}", position=i, dynamic_ncols=True)
                for i, name in enumerate(cfgs)}
        with ctx.Pool(len(cfgs)) as pool:
            jobs = {name: pool.apply_async(_train_one, (cfg, 1)) for name, cfg in cfgs.items()}
            running = set(jobs)
            while running:
                for name in sorted(running):
                    done = jobs[name].ready()           # read before the log: a finished run's log is complete
                    tr = [r for r in _read(Path(cfgs[name]["run"]["out_dir"])) if r["kind"] == "train"]
                    if tr:
                        bars[name].n = tr[-1]["step"]
                        bars[name].set_postfix(loss=f"{tr[-1]['loss']:.4f}")
                    if done:                            # stop the bar's clock with its run
                        bars[name].close()
                        running.discard(name)
                time.sleep(0.5)
            results = {name: j.get() for name, j in jobs.items()}
            # let the workers exit on their own: the context's exit terminates them, which could
            # leave a semaphore behind for the resource tracker to warn about at shutdown
            pool.close()
            pool.join()
    else:
        for name, cfg in cfgs.items():
            print(f"training {name}")
            cfg["train"]["progress"] = True
            results[name] = _train_one(cfg, None)

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
    title = f"Match3 n={n}, M={M}: dot-product vs 2-simplicial ({form}), equal parameters, seed {seed}"
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
    experiment = _experiment(size, form, steps, device)
    verdict = None if spread_json is None else spread_verdict(gap, experiment, spread_json)
    print(f"\n2-simplicial minus dot-product accuracy: {gap:+.4f} ({winner} is ahead; "
          f"{len(batches) * 256} validation sequences, seed {seed})")
    if verdict is not None:
        print(verdict)
    print(f"curves: {out / 'curves.png'}   results: {out / 'results.json'}")
    res = {"size": size, "form": form, "n": n, "M": M, "steps": steps, "batch_size": sz["batch_size"], "device": device,
           "seed": seed, "parallel": parallel, "position_baseline_accuracy": base, "models": rows,
           "model_configs": models, "accuracy_gap_simplicial_minus_dot": gap, "experiment": experiment,
           "seed_spread": verdict, "table": table}
    write_atomic(out / "results.json", json.dumps(res, indent=2))
    return res


def run_demo_seeds(seeds=(0, 1, 2, 3, 4), size: str = "cpu", out_dir: str | os.PathLike = "runs/demo-seeds",
                   steps: int | None = None, device: str = "auto", form: str = "trilinear",
                   parallel: bool | None = None, overwrite: bool = False,
                   out_json: str | os.PathLike = SPREAD_JSON) -> dict:
    """The demo once per seed (``out_dir/seed-<s>``), and the spread of its numbers in ``out_json``.

    A seed whose ``results.json`` already holds this experiment is read, not trained again, so the
    seeds can be run one call at a time. ``out_json`` holds each seed's accuracies and gap, and the
    spread: each model's accuracy range over seeds (``accuracy_range_max`` is the larger of the two)
    and the gap's minimum, median and maximum."""
    if isinstance(seeds, (str, bytes)) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints, got {seeds!r}")
    device = _size_and_device(size, device)
    experiment = _experiment(size, form, SIZES[size]["steps"] if steps is None else steps, device)
    per_seed = []
    for seed in seeds:
        d = Path(out_dir) / f"seed-{seed}"
        prev = json.loads((d / "results.json").read_text()) if (d / "results.json").is_file() else None
        if prev is not None and prev.get("experiment") == experiment and prev.get("seed") == seed:
            print(f"seed {seed}: done earlier ({d / 'results.json'})")
            r = prev
        else:
            r = run_demo(size=size, out_dir=d, steps=steps, device=device, seed=seed, parallel=parallel, form=form,
                         overwrite=overwrite, spread_json=None)
        per_seed.append({"seed": seed, "accuracy": {k: v["accuracy"] for k, v in r["models"].items()},
                         "gap": r["accuracy_gap_simplicial_minus_dot"],
                         "position_baseline_accuracy": r["position_baseline_accuracy"]})
    acc = {name: [p["accuracy"][name] for p in per_seed] for name in MODELS}
    gaps = [p["gap"] for p in per_seed]
    spread = {"accuracy_range": {k: max(v) - min(v) for k, v in acc.items()},
              "accuracy_min": {k: min(v) for k, v in acc.items()}, "accuracy_max": {k: max(v) for k, v in acc.items()},
              "accuracy_median": {k: float(np.median(v)) for k, v in acc.items()},
              "accuracy_range_max": max(max(v) - min(v) for v in acc.values()),
              "gap_min": min(gaps), "gap_median": float(np.median(gaps)), "gap_max": max(gaps),
              "gap_std": float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None,
              "simplicial_ahead": sum(g > 0 for g in gaps)}
    res = {"experiment": experiment, "seeds": list(seeds), "per_seed": per_seed, "spread": spread,
           "outside_rule": "a single seed's gap is outside the seed spread when |gap| > accuracy_range_max"}
    path = Path(out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(res, indent=2))
    print(f"\naccuracy over seeds {list(seeds)}: " + ", ".join(
        f"{k} {spread['accuracy_min'][k]:.4f}..{spread['accuracy_max'][k]:.4f}" for k in MODELS)
        + f"; gap {spread['gap_min']:+.4f}..{spread['gap_max']:+.4f} (median {spread['gap_median']:+.4f}); {path}")
    return res


# --------------------------------------------------------------------------- command line
def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` (argparse type; the demo's and the Match3 study's)."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 0,1,2, got {text!r}") from None


def _cli(args) -> int:
    if args.seeds is not None:
        run_demo_seeds(seeds=args.seeds, size=args.size, out_dir=args.out_dir or "runs/demo-seeds",
                       steps=args.steps, device=args.device, form=args.form, overwrite=args.overwrite,
                       out_json=args.spread_out)
    else:
        run_demo(size=args.size, out_dir=args.out_dir or "runs/demo", steps=args.steps, device=args.device,
                 seed=args.seed, form=args.form, overwrite=args.overwrite)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on ``subparsers`` (of ``twosimplicial``)."""
    d = subparsers.add_parser("demo", help="Match3: a dot-product and a 2-simplicial model of equal size, "
                                           "trained and compared", description=__doc__,
                                formatter_class=_HelpFormatter)
    d.add_argument("--size", default="cpu", choices=sorted(SIZES),
                   help="cpu: a few minutes on 2 cores; gpu / gpu-large: longer sequences, larger models")
    d.add_argument("--out-dir", default=None,
                   help="output directory (default: runs/demo, or runs/demo-seeds with --seeds)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo's run directories in --out-dir")
    d.add_argument("--steps", type=int, default=None, help="training steps per model (default: by size)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seeds", type=parse_seeds, default=None,
                   help="comma-separated seeds, e.g. 0,1,2,3,4: run the demo once per seed (seeds already run in "
                        "--out-dir are read back) and write the seed spread to --spread-out")
    d.add_argument("--spread-out", default=str(SPREAD_JSON), help="with --seeds: where the seed spread is written")
    d.add_argument("--form", default="trilinear", choices=FORMS,
                   help="form of the 2-simplicial layer")
    d.set_defaults(fn=_cli)
    return d


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass

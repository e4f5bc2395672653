"""Match3 study: dot-product vs 2-simplicial attention (trilinear, determinant) at equal parameter counts.

    twosimplicial study match3 --preset gpu                 # the study, one GPU
    python -m twosimplicial.studies.match3 --preset gpu     # the same without the CLI
    twosimplicial study match3 --preset cpu-tiny --device cpu --out /tmp/m3   # seconds (the test suite's)

Task (``twosimplicial.data.match3``): label ``y_i = 1`` iff some ``j, k <= i`` have
``x_i + x_j + x_k = 0 (mod M)``. Grid: settings ``(n, M)`` x depth (1 or 2 layers) x arch x seed.
The archs of one (setting, depth) are identical except the attention of the last layer:

- ``dot``: dot-product attention with RoPE, its MLP widened to the 2-simplicial parameter count;
- ``trilinear``: 2-simplicial attention, trilinear form, windows covering the sequence;
- ``determinant``: the same in the determinant form with its 3-d rotary embedding.

Split, without leakage: for each ``(setting, seed)`` the training set is ``n_train`` sequences
drawn from one random stream and trained on for many epochs (reshuffled every epoch, the last
partial batch of an epoch dropped); the test set is ``n_test`` sequences drawn from a second,
independent stream, from which every sequence that also occurs in the training set is removed
(rows compared by their bytes; the count removed is reported). Every arch of a seed sees the same
training set, test set and batch order, so architectures are compared on paired data. Sequences
have the fixed length ``n``: the models are causal and a label depends only on its prefix, so the
recipe's variable lengths (30-35) would only drop the labels of the last positions.

Training is train.py's recipe in a compact in-process loop (``make_optimizer``,
``evaluate_batches``): AdamW, linear warm-up, cosine decay, gradient clipping, bf16 autocast on CUDA.

Reported per (setting, depth, arch), over seeds: parameter count; final test accuracy (median and
a 95% bootstrap interval of the median, 10k resamples), the same minus the position-only baseline
(``position_baseline``: each position's majority label, the bar a model clears by knowing positions
only); final test and training loss; steps to threshold, the first evaluation step whose test
accuracy reaches ``threshold = baseline + (1 - baseline) / 2`` (halfway from the baseline to a
perfect score; ``None`` for a seed that never does, and for the median when more than half never
do); curves of test accuracy, test loss and training loss against step (median and the bootstrap
band) in ``match3.png``.

Outputs in ``--out``: ``runs/<run>.json`` (one per finished run, written atomically; a study run
again skips the runs that have one, so a killed study continues where it stopped), ``match3.json``
and ``match3.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import device_name
from .._validate import resolve_device
from ..checkpoint import write_atomic
from ..data import match3_labels, position_baseline
from ..demo import matched_models, parse_seeds
from ..models import ModelConfig, TwoSimplicialLM, count_parameters
from ..train import TrainConfig, evaluate_batches, make_optimizer

ARCHS = ("dot", "trilinear", "determinant")

PRESETS: dict[str, dict] = {
    # settings: (n, M) pairs; (16, 55) has balanced labels (balanced_modulus(16) = 55), (32, 37) is the
    # recipe's modulus and length. Model: width 128 and 2 heads as in the recipe, the 2-simplicial layer
    # with the dot layer's head shape. 50k training sequences as in the recipe, trained for 60 epochs.
    # Evaluation every eval_interval steps: the n_test test sequences and the first n_train_eval
    # training sequences (training accuracy, to tell memorising from learning).
    "gpu": dict(settings=((16, 55), (32, 37)), depths=(1, 2), archs=ARCHS, seeds=(0, 1, 2, 3, 4),
                dim=128, n_heads=2, s_heads=2, s_head_dim=64, n_train=50_000, n_test=8192, n_train_eval=4096,
                steps=3000, batch_size=1000, lr=1e-3, warmup_steps=100, weight_decay=0.01, eval_interval=100),
    # the test suite's: every code path, seconds on one CPU core
    "cpu-tiny": dict(settings=((6, 8), (8, 18)), depths=(1, 2), archs=ARCHS, seeds=(0, 1),
                     dim=16, n_heads=2, s_heads=2, s_head_dim=8, n_train=2000, n_test=256, n_train_eval=256,
                     steps=8, batch_size=100, lr=3e-3, warmup_steps=2, weight_decay=0.01, eval_interval=4),
}

EVAL_BATCH = 1024                # sequences per evaluation batch
BOOTSTRAP_RESAMPLES = 10_000


# --------------------------------------------------------------------------- data
def make_split(n: int, M: int, seed: int, n_train: int, n_test: int) -> dict:
    """Training and test sets of one ``(setting, seed)``; no test sequence occurs in the training set.

    Returns ``x_train, y_train, x_test, y_test`` (int64 ``[N, n]``) and ``test_duplicates_removed``,
    the number of test draws dropped because the training set holds the same sequence."""
    for name, v in (("n", n), ("M", M), ("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "M" else 1):
            raise ValueError(f"{name} must be an int >= {2 if name == 'M' else 1}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    x_train = np.random.default_rng([seed, n, M, 0]).integers(0, M, (n_train, n), dtype=np.int64)
    x_test = np.random.default_rng([seed, n, M, 1]).integers(0, M, (n_test, n), dtype=np.int64)
    seen = {row.tobytes() for row in x_train}
    keep = np.array([row.tobytes() not in seen for row in x_test], dtype=bool)
    if not keep.any():
        raise ValueError(f"every test sequence occurs in the training set (n={n}, M={M}, n_train={n_train}): "
                         "too few distinct sequences for a held-out test set")
    x_test = x_test[keep]
    return {"x_train": x_train, "y_train": match3_labels(x_train, M), "x_test": x_test,
            "y_test": match3_labels(x_test, M), "test_duplicates_removed": int((~keep).sum())}


# --------------------------------------------------------------------------- one run
def run_name(n: int, M: int, depth: int, arch: str, seed: int) -> str:
    return f"n{n}-M{M}-L{depth}-{arch}-seed{seed}"


def run_specs(preset: dict, seeds: tuple[int, ...]) -> list[dict]:
    """Every run of the grid, each a plain dict (what identifies a run's result file)."""
    specs = []
    for n, M in preset["settings"]:
        for depth in preset["depths"]:
            size = dict(n=n, dim=preset["dim"], n_heads=preset["n_heads"], n_layers=depth,
                        s_heads=preset["s_heads"], s_head_dim=preset["s_head_dim"])
            models = matched_models(size, M, forms=tuple(a for a in preset["archs"] if a != "dot"))
            for arch in preset["archs"]:
                for seed in seeds:
                    specs.append({
                        "name": run_name(n, M, depth, arch, seed), "n": n, "M": M, "depth": depth, "arch": arch,
                        "seed": seed, "model": models[arch],
                        **{k: preset[k] for k in ("n_train", "n_test", "n_train_eval", "steps", "batch_size", "lr",
                                                  "warmup_steps", "weight_decay", "eval_interval")}})
    return specs


def train_run(spec: dict, device: str | torch.device) -> dict:
    """Train one model of the grid and return its curves and final numbers."""
    device = torch.device(device)
    t0 = time.perf_counter()
    data = make_split(spec["n"], spec["M"], spec["seed"], spec["n_train"], spec["n_test"])
    x_train, y_train = (torch.from_numpy(data[k]).to(device) for k in ("x_train", "y_train"))
    x_test, y_test = (torch.from_numpy(data[k]).to(device) for k in ("x_test", "y_test"))
    test_batches = [(x_test[i:i + EVAL_BATCH], y_test[i:i + EVAL_BATCH]) for i in range(0, len(x_test), EVAL_BATCH)]
    n_seen = min(spec["n_train_eval"], len(x_train))
    train_batches = [(x_train[i:i + EVAL_BATCH], y_train[i:i + EVAL_BATCH]) for i in range(0, n_seen, EVAL_BATCH)]

    torch.manual_seed(spec["seed"])
    cfg = ModelConfig(**spec["model"])
    model = TwoSimplicialLM(cfg).to(device)
    t = TrainConfig(max_steps=spec["steps"], lr=spec["lr"], warmup_steps=spec["warmup_steps"],
                    weight_decay=spec["weight_decay"])
    t.validate()
    optimizer, scheduler = make_optimizer(model, t, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    N, B = len(x_train), min(spec["batch_size"], len(x_train))
    order = torch.Generator().manual_seed(spec["seed"])          # batch order: the same for every arch of a seed
    perm, pos = torch.randperm(N, generator=order).to(device), 0
    curves = {k: [] for k in ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy")}
    interval_loss, interval_steps = torch.zeros((), device=device), 0
    model.train()
    for step in range(1, t.max_steps + 1):
        if pos + B > N:                                          # next epoch
            perm, pos = torch.randperm(N, generator=order).to(device), 0
        idx = perm[pos:pos + B]
        pos += B
        with amp:
            _, loss = model(x_train[idx], y_train[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += loss.detach()
        interval_steps += 1
        if step % spec["eval_interval"] == 0 or step == t.max_steps:
            model.eval()
            te = evaluate_batches(model, test_batches, device, amp)
            tr = evaluate_batches(model, train_batches, device, amp)
            model.train()
            for k, v in (("step", step), ("train_loss", (interval_loss / interval_steps).item()),
                         ("train_accuracy", tr["accuracy"]), ("test_loss", te["loss"]),
                         ("test_accuracy", te["accuracy"])):
                curves[k].append(v)
            interval_loss.zero_()
            interval_steps = 0
    return {"spec": spec, "parameters": count_parameters(cfg)["total"], "curves": curves,
            "final": {k: v[-1] for k, v in curves.items() if k != "step"},
            "n_train": N, "n_test": len(x_test), "test_duplicates_removed": data["test_duplicates_removed"],
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "wall_s": time.perf_counter() - t0}


def _run_and_save(job: tuple[dict, str, str, int]) -> tuple[str, float]:
    spec, device, path, threads = job
    if threads:
        torch.set_num_threads(threads)
    res = train_run(spec, device)
    write_atomic(path, json.dumps(res, indent=1))
    return spec["name"], res["final"]["test_accuracy"]


def _load_finished(path: Path, spec: dict) -> dict | None:
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get("spec") != spec:
        diff = sorted(k for k in set(spec) | set(res.get("spec", {})) if spec.get(k) != res.get("spec", {}).get(k))
        raise ValueError(f"{path} holds a run with other settings (differs in {diff}); choose another --out "
                         "or delete that file")
    return res


# --------------------------------------------------------------------------- statistics
def bootstrap_median_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {v.shape}")
    idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
    lo, hi = np.percentile(np.median(v[idx], axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def _summary(values) -> dict:
    lo, hi = bootstrap_median_ci(values)
    return {"median": float(np.median(values)), "ci95": [lo, hi], "per_seed": [float(v) for v in values]}


def steps_to_threshold(steps, accuracy, threshold: float) -> int | None:
    """First step whose accuracy reaches ``threshold``, else ``None``."""
    return next((int(s) for s, a in zip(steps, accuracy) if a >= threshold), None)


def _median_steps(per_seed: list[int | None]) -> float | None:
    """Median with ``None`` (never reached) counted as infinitely late."""
    m = float(np.median([np.inf if s is None else s for s in per_seed]))
    return None if np.isinf(m) else m


def summarize(runs: list[dict], preset: dict) -> list[dict]:
    """One row per (setting, depth, arch) from the finished runs."""
    rows = []
    for n, M in preset["settings"]:
        base = position_baseline(n, M)
        threshold = base + (1 - base) / 2
        for depth in preset["depths"]:
            group = [r for r in runs if (r["spec"]["n"], r["spec"]["M"], r["spec"]["depth"]) == (n, M, depth)]
            params = {a: next(r["parameters"] for r in group if r["spec"]["arch"] == a) for a in preset["archs"]}
            for arch in preset["archs"]:
                rs = sorted((r for r in group if r["spec"]["arch"] == arch), key=lambda r: r["spec"]["seed"])
                acc = [r["final"]["test_accuracy"] for r in rs]
                reach = [steps_to_threshold(r["curves"]["step"], r["curves"]["test_accuracy"], threshold) for r in rs]
                curves = {}
                for k in ("test_accuracy", "test_loss", "train_loss", "train_accuracy"):
                    per_step = np.array([r["curves"][k] for r in rs])          # [seeds, evals]
                    ci = [bootstrap_median_ci(col) for col in per_step.T]
                    curves[k] = {"median": np.median(per_step, 0).tolist(),
                                 "lo": [c[0] for c in ci], "hi": [c[1] for c in ci]}
                rows.append({
                    "n": n, "M": M, "depth": depth, "arch": arch, "seeds": [r["spec"]["seed"] for r in rs],
                    "parameters": params[arch], "parameters_by_arch": params,
                    "position_baseline": base, "threshold": threshold,
                    "test_accuracy": _summary(acc),
                    "above_baseline": _summary([a - base for a in acc]),
                    "test_loss": _summary([r["final"]["test_loss"] for r in rs]),
                    "train_loss": _summary([r["final"]["train_loss"] for r in rs]),
                    "train_accuracy": _summary([r["final"]["train_accuracy"] for r in rs]),
                    "steps_to_threshold": {"median": _median_steps(reach), "per_seed": reach,
                                           "reached": sum(s is not None for s in reach)},
                    "split": {"n_train": [r["n_train"] for r in rs], "n_test": [r["n_test"] for r in rs],
                              "test_duplicates_removed": [r["test_duplicates_removed"] for r in rs]},
                    "steps": rs[0]["curves"]["step"], "curves": curves})
    return rows


# --------------------------------------------------------------------------- plot
def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["n"], r["M"], r["depth"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.4 * len(panels)), squeeze=False)
    colors = dict(zip(ARCHS, ("tab:blue", "tab:orange", "tab:green")))
    for (a, b), (n, M, depth) in zip(axes, panels):
        for r in (r for r in rows if (r["n"], r["M"], r["depth"]) == (n, M, depth)):
            c, s, cv = colors[r["arch"]], r["steps"], r["curves"]
            label = f"{r['arch']} ({r['parameters']:,} params)"
            a.plot(s, cv["test_accuracy"]["median"], color=c, label=label)
            a.fill_between(s, cv["test_accuracy"]["lo"], cv["test_accuracy"]["hi"], color=c, alpha=0.2)
            b.plot(s, cv["test_loss"]["median"], color=c, label=f"{r['arch']} test")
            b.fill_between(s, cv["test_loss"]["lo"], cv["test_loss"]["hi"], color=c, alpha=0.2)
            b.plot(s, cv["train_loss"]["median"], color=c, ls="--", label=f"{r['arch']} train")
        r0 = next(r for r in rows if (r["n"], r["M"], r["depth"]) == (n, M, depth))
        a.axhline(r0["position_baseline"], color="gray", ls="--", label="position-only baseline")
        a.axhline(r0["threshold"], color="gray", ls=":", label="threshold")
        a.set(xlabel="step", ylabel="test accuracy", title=f"n={n}, M={M}, {depth} layer(s): test accuracy")
        b.set(xlabel="step", ylabel="loss (nats, log scale)", yscale="log",
              title=f"n={n}, M={M}, {depth} layer(s): test (solid) and training (dashed) loss")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}\nmedian over seeds, band: 95% bootstrap interval of the median")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the study
def run_study(preset: str = "gpu", out: str | os.PathLike = "results/match3", device: str = "auto",
              seeds: tuple[int, ...] | list[int] | None = None, workers: int | None = None,
              progress: bool = True) -> dict:
    """Run (or continue) the grid of ``PRESETS[preset]`` and write ``match3.json`` and ``match3.png`` in ``out``.

    ``seeds`` overrides the preset's; ``workers`` processes train runs side by side (default: 8 on
    CUDA, where one small run leaves the GPU mostly idle, and 1 on CPU)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    device = resolve_device("device", device)
    seeds = tuple(p["seeds"] if seeds is None else seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints >= 0, got {seeds!r}")
    if workers is None:
        workers = 8 if device == "cuda" else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")

    out = Path(out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    specs = run_specs(p, seeds)
    paths = {s["name"]: run_dir / f"{s['name']}.json" for s in specs}
    done = {s["name"] for s in specs if _load_finished(paths[s["name"]], s) is not None}
    todo = [s for s in specs if s["name"] not in done]
    print(f"Match3 study, preset {preset!r}: {len(specs)} runs, {len(done)} already in {run_dir}, "
          f"{len(todo)} to train on {device} ({min(workers, max(1, len(todo)))} at a time)")

    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    jobs = [(s, device, str(paths[s["name"]]), threads) for s in todo]
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    if workers == 1 or len(jobs) <= 1:
        finished = map(_run_and_save, jobs)
    else:
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)))
        finished = pool.imap_unordered(_run_and_save, jobs)
    try:
        for name, acc in finished:
            bar.update(1)
            bar.set_postfix_str(f"{name}: test acc {acc:.4f}")
    finally:
        bar.close()
        if workers > 1 and len(jobs) > 1:
            pool.terminate()
            pool.join()
    train_wall = time.perf_counter() - t0

    runs = [json.loads(paths[s["name"]].read_text()) for s in specs]
    rows = summarize(runs, p)
    title = f"Match3: dot-product vs 2-simplicial attention at equal parameter counts ({len(seeds)} seeds)"
    plot(rows, out / "match3.png", title)
    res = {
        "preset": preset, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "seeds": list(seeds), "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__, "train_wall_s_this_invocation": train_wall,
        "split": ("per (setting, seed): n_train training sequences from one random stream, trained for many "
                  "epochs; n_test test sequences from an independent stream with every sequence that also "
                  "occurs in the training set removed (rows compared by bytes); fixed length n"),
        "threshold": "position_baseline + (1 - position_baseline) / 2; steps_to_threshold: first evaluation step "
                     "with test accuracy >= threshold (None: never; median None when more than half never)",
        "interval": f"95% percentile bootstrap of the median over seeds, {BOOTSTRAP_RESAMPLES} resamples",
        "rows": rows}
    write_atomic(out / "match3.json", json.dumps(res, indent=1))
    _print_table(rows)
    print(f"results: {out / 'match3.json'}   plot: {out / 'match3.png'}")
    return res


def _print_table(rows: list[dict]) -> None:
    header = (f"{'n':>3s} {'M':>4s} {'L':>2s} {'arch':12s} {'params':>9s} {'test acc':>9s} {'95% CI':>17s} "
              f"{'-baseline':>9s} {'test loss':>9s} {'steps to thr':>12s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        acc, st = r["test_accuracy"], r["steps_to_threshold"]
        med = "-" if st["median"] is None else f"{st['median']:.0f}"
        print(f"{r['n']:3d} {r['M']:4d} {r['depth']:2d} {r['arch']:12s} {r['parameters']:9,d} {acc['median']:9.4f} "
              f"[{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}] {r['above_baseline']['median']:+9.4f} "
              f"{r['test_loss']['median']:9.4f} {med:>7s} ({st['reached']}/{len(r['seeds'])})")


# --------------------------------------------------------------------------- command line
def _cli(args) -> int:
    run_study(preset=args.preset, out=args.out, device=args.device, seeds=args.seeds, workers=args.workers)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``match3`` on ``subparsers`` (of ``twosimplicial study``)."""
    p = subparsers.add_parser("match3", help="Match3: dot-product vs 2-simplicial accuracy against steps, many seeds",
                              description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS),
                   help="gpu: the study (minutes on one GPU); cpu-tiny: every code path in seconds")
    p.add_argument("--out", default="results/match3", help="output directory (runs/ inside it makes the study resumable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seeds", type=parse_seeds, default=None, help="comma-separated seeds (default: the preset's, 0..4 for gpu)")
    p.add_argument("--workers", type=int, default=None, help="runs trained side by side (default: 8 on CUDA, 1 on CPU)")
    p.set_defaults(fn=_cli)
    return p


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twosimplicial.studies.match3")
    add_parser(parser.add_subparsers(dest="study", required=True))
    args = parser.parse_args(["match3", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""``twosimplicial fit RESULTS_DIR``: scaling-law fits of a sweep's run files, with bootstrap intervals and plots.

    twosimplicial fit results/scaling            # reads results/scaling/runs/*.json (studies/scaling.py)

For each evaluation suite (the run files' ``eval``: held-out code, HumanEval, held-out math) and
architecture, the least-squares fit of the paper's law (Roy et al. 2025, Table 3)

    -log L = alpha * log N + beta

over every run (each seed a point), ``L`` the suite's NLL and ``N`` the non-embedding parameter
count (and again with the total count), with its R^2 over the runs. With the same seeds at every
size this is the fit through the per-size means of ``-log L``.

Intervals: 95% percentile bootstrap, ``--bootstrap`` resamples (default 2000). A resample draws,
independently for each size, as many seeds as the size has, with replacement; a drawn seed brings
the runs of every architecture with that seed (a seed fixes the data order, so the architectures
are compared on paired data). Before resampling, each size's per-seed deviations from their mean
are scaled by ``sqrt(k / (k - 1))`` (``k`` seeds), so a resampled mean varies by the unbiased
``s^2 / k`` rather than ``(k - 1) / k`` of it. Intervals are given for alpha and beta of each fit
and for the change in alpha from ``dot`` to ``simplicial``: relative, ``(alpha_simplicial -
alpha_dot) / alpha_dot`` (the paper's "+18.5%"), and absolute. They reflect the seed-to-seed
spread that was observed and no more, and with few seeds they run narrow: on synthetic power laws
(6 sizes, log-normal noise, 100 data sets) the 95% interval of alpha held the true value in 87-90%
of data sets with 2 seeds per size, 90-92% with 4 and 95-97% with 8.

Token efficiency (not in the paper): for each size, the tokens the ``dot`` model needs to reach the
``simplicial`` model's final validation loss: the first crossing of the dot model's validation
curve (mean over seeds, at the in-training evaluations) below that loss (mean over seeds),
interpolated linearly in log-tokens between the two evaluations around it; its ratio to the token
budget (< 1: the dot model gets there on fewer tokens). It is censored (``None``) when the dot
curve never reaches the loss within the budget, and reported as the first evaluation's tokens
(``at_first_eval``, an upper bound) when the dot curve is already below it there. Its interval
comes from the same bootstrap over seeds; a censored bound is ``None``.

Refused: run files with different ``tokens`` or ``data_sha256`` (a ``ValueError`` lists them).
Runs whose seed is missing for another architecture at the same size are left out of the fits
(listed under ``unpaired_runs``).

``--report docs/REPORT.md`` also rewrites that file's table blocks (:func:`update_report`), so the
report's numbers come from the fit and nowhere else.

Writes ``fit.json`` and four PNGs in the results directory (or ``--out``): ``loss_vs_params.png``
(log-log loss vs N per suite, fits and bootstrap bands), ``loss_vs_tokens.png`` (validation loss
vs tokens per size), ``loss_vs_flops.png`` (validation loss vs counted training FLOPs) and
``token_efficiency.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..checkpoint import write_atomic

ARCHS = ("dot", "simplicial")
ARCH_LABEL = {"dot": "dot-product", "simplicial": "2-simplicial"}     # in plots and report tables
PARAMS = {"non_embedding": "params_nonembedding", "total": "params_total"}
REQUIRED = {
    "run": str, "arch": str, "size": str, "seed": int, "params_nonembedding": int, "params_total": int,
    "tokens": int, "flops": (int, float), "data_sha256": (str, type(None)), "curve": list, "eval": dict,
}
CI = 0.95


# --------------------------------------------------------------------------- loading
def load_runs(results_dir: str | os.PathLike) -> list[dict]:
    """Every run file ``<results_dir>/runs/*.json``, checked for the fields the fit reads."""
    run_dir = Path(results_dir) / "runs"
    files = sorted(run_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no run files in {run_dir} (twosimplicial sweep writes them)")
    runs = []
    for f in files:
        r = json.loads(f.read_text())
        for key, typ in REQUIRED.items():
            if key not in r:
                raise ValueError(f"{f}: run file has no {key!r}")
            if isinstance(r[key], bool) or not isinstance(r[key], typ):
                raise ValueError(f"{f}: {key!r} has type {type(r[key]).__name__}")
        if r["arch"] not in ARCHS:
            raise ValueError(f"{f}: arch must be one of {ARCHS}, got {r['arch']!r}")
        if not r["curve"] or any(len(p) != 2 for p in r["curve"]):
            raise ValueError(f"{f}: curve must be a non-empty list of [tokens, loss]")
        for suite, nll in r["eval"].items():
            if isinstance(nll, bool) or not isinstance(nll, (int, float)) or not nll > 0:
                raise ValueError(f"{f}: eval[{suite!r}] must be a positive NLL, got {nll!r}")
        runs.append(r)
    return runs


def check_comparable(runs: list[dict]) -> None:
    """Refuse runs that trained on different token counts, different data or (where the run files
    record it) a different recipe: the learning-rate check's runs do not mix with the grid's."""
    for key in ("tokens", "data_sha256", "train"):
        groups = defaultdict(list)
        for r in runs:
            v = r.get(key)
            groups[json.dumps(v, sort_keys=True) if isinstance(v, dict) else v].append(r["run"])
        if len(groups) > 1:
            listing = "; ".join(f"{k!r}: {sorted(v)}" for k, v in sorted(groups.items(), key=lambda kv: str(kv[0])))
            raise ValueError(f"run files differ in {key} and cannot be fitted together ({listing}); "
                             f"fit each group from its own results directory")


def _pair(runs: list[dict]):
    """``{size: {seed: {arch: run}}}`` keeping the seeds every architecture has at that size, and the
    runs left out."""
    archs = sorted({r["arch"] for r in runs})
    cells = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        if r["arch"] in cells[r["size"]][r["seed"]]:
            raise ValueError(f"two run files for size {r['size']!r}, arch {r['arch']!r}, seed {r['seed']}")
        cells[r["size"]][r["seed"]][r["arch"]] = r
    paired, unpaired = {}, []
    for size, by_seed in cells.items():
        keep = {s: a for s, a in by_seed.items() if set(a) == set(archs)}
        unpaired += [r["run"] for s, a in by_seed.items() if s not in keep for r in a.values()]
        if keep:
            paired[size] = dict(sorted(keep.items()))
    # sizes from the smallest model up
    order = sorted(paired, key=lambda s: next(iter(paired[s].values()))[archs[0]]["params_nonembedding"])
    return archs, {s: paired[s] for s in order}, sorted(unpaired)


# --------------------------------------------------------------------------- fitting
def _wls_slope(x: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Weighted least squares ``y = a x + b`` along the last axis (``y`` may carry leading batch axes)."""
    xm = (w * x).sum() / w.sum()
    ym = (w * y).sum(-1) / w.sum()
    a = (w * (x - xm) * (y - ym[..., None])).sum(-1) / (w * (x - xm) ** 2).sum()
    return a, ym - a * xm


def _inflated(y: np.ndarray) -> np.ndarray:
    """A size's per-seed values (axis 0) with their deviations from the seed mean scaled by
    ``sqrt(k / (k - 1))``: the mean of ``k`` values drawn from them with replacement then varies by the
    unbiased ``s^2 / k`` (drawn from the raw values it varies by ``(k - 1) / k`` of that, half with 2 seeds)."""
    k = len(y)
    if k < 2:
        return y
    m = y.mean(0, keepdims=True)
    return m + (y - m) * math.sqrt(k / (k - 1))


def _interval(samples: np.ndarray) -> list:
    lo, hi = np.quantile(samples, [(1 - CI) / 2, (1 + CI) / 2], method="inverted_cdf")
    return [None if not np.isfinite(v) else float(v) for v in (lo, hi)]


def _bootstrap_draws(paired: dict, n_boot: int, rng: np.random.Generator) -> dict:
    """Per size, ``[n_boot, n_seeds]`` indices into that size's seed list (seeds drawn with replacement)."""
    return {size: rng.integers(0, len(by_seed), size=(n_boot, len(by_seed))) for size, by_seed in paired.items()}


def fit_suite(archs, paired, draws, suite: str, params: str) -> dict:
    """Fits of ``-log L = alpha log N + beta`` per architecture, with bootstrap intervals and the change in alpha."""
    sizes = list(paired)
    k = np.array([len(paired[s]) for s in sizes], dtype=float)        # runs per size and arch
    out, boot = {}, {}
    for arch in archs:
        x = np.array([math.log(next(iter(paired[s].values()))[arch][PARAMS[params]]) for s in sizes])
        y_runs = [np.array([-math.log(paired[s][seed][arch]["eval"][suite]) for seed in paired[s]]) for s in sizes]
        ybar = np.array([y.mean() for y in y_runs])
        alpha, beta = _wls_slope(x, ybar, k)
        xs = np.concatenate([np.full(len(y), xi) for xi, y in zip(x, y_runs)])
        ys = np.concatenate(y_runs)
        ss_res = float(((ys - (alpha * xs + beta)) ** 2).sum())
        ss_tot = float(((ys - ys.mean()) ** 2).sum())
        yb = np.stack([_inflated(y_runs[i])[draws[s]].mean(-1) for i, s in enumerate(sizes)], -1)   # [n_boot, n_sizes]
        a_b, b_b = _wls_slope(x, yb, k)
        boot[arch] = (a_b, b_b)
        out[arch] = {"alpha": float(alpha), "beta": float(beta),
                     "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None,
                     "alpha_ci": _interval(a_b), "beta_ci": _interval(b_b),
                     "n_runs": int(len(ys)), "n_sizes": len(sizes)}
    if set(ARCHS) <= set(archs):
        a_d, a_s = out["dot"]["alpha"], out["simplicial"]["alpha"]
        (bd, _), (bs, _) = boot["dot"], boot["simplicial"]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_b = (bs - bd) / bd
        out["alpha_change"] = {
            "relative": (a_s - a_d) / a_d if a_d != 0 else None,
            "relative_ci": _interval(rel_b[np.isfinite(rel_b)]) if np.isfinite(rel_b).any() else [None, None],
            "absolute": a_s - a_d, "absolute_ci": _interval(bs - bd),
            "dot_alpha_nonpositive_fraction": float((bd <= 0).mean()),
        }
    return {"fits": out, "_boot": boot}


# --------------------------------------------------------------------------- token efficiency
def _crossing(tokens: np.ndarray, loss: np.ndarray, target: np.ndarray):
    """Tokens at which each curve ``loss [n, T]`` first falls to ``target [n]``, interpolated in log-tokens;
    ``inf`` if never, and a flag for curves already at or below the target at their first point."""
    below = loss <= target[:, None]
    reached = below.any(-1)
    j = below.argmax(-1)
    first = reached & (j == 0)
    jm = np.maximum(j - 1, 0)
    rows = np.arange(len(loss))
    l0, l1 = loss[rows, jm], loss[rows, j]
    lt0, lt1 = np.log(tokens[jm]), np.log(tokens[j])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(l1 != l0, (target - l0) / (l1 - l0), 1.0)
    out = np.exp(lt0 + np.clip(frac, 0, 1) * (lt1 - lt0))
    out = np.where(first, tokens[0], out)
    return np.where(reached, out, np.inf), first


def token_efficiency(paired: dict, draws: dict, budget: int) -> list[dict]:
    """Per size, the tokens the dot model needs to reach the 2-simplicial model's final validation loss."""
    rows = []
    for size, by_seed in paired.items():
        seeds = list(by_seed)
        grids = [np.array([p[0] for p in by_seed[s]["dot"]["curve"]], dtype=float) for s in seeds]
        common = sorted(set.intersection(*(set(g.tolist()) for g in grids)))
        if not common:
            raise ValueError(f"size {size!r}: the dot runs' validation curves share no evaluation point")
        tokens = np.array(common)
        dot = np.stack([np.array([l for t, l in by_seed[s]["dot"]["curve"] if t in set(common)]) for s in seeds])
        final = np.array([by_seed[s]["simplicial"]["curve"][-1][1] for s in seeds])
        point, first = _crossing(tokens, dot.mean(0, keepdims=True), np.array([final.mean()]))
        d = draws[size]
        samples, _ = _crossing(tokens, _inflated(dot)[d].mean(1), _inflated(final)[d].mean(1))
        needed = float(point[0])
        censored = not np.isfinite(needed)
        rows.append({
            "size": size, "params_nonembedding_dot": by_seed[seeds[0]]["dot"]["params_nonembedding"],
            "simplicial_final_val_loss": float(final.mean()), "dot_final_val_loss": float(dot[:, -1].mean()),
            "dot_tokens_to_reach": None if censored else needed,
            "ratio_to_budget": None if censored else needed / budget,
            "censored": censored, "at_first_eval": bool(first[0]),
            "ci": _interval(samples), "ratio_ci": [None if v is None else v / budget for v in _interval(samples)],
            "censored_fraction": float((~np.isfinite(samples)).mean()), "seeds": len(seeds),
        })
    return rows


# --------------------------------------------------------------------------- plots
def _plots(out_dir: Path, archs, paired, suites, fits, eff, budget) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    style = {"dot": dict(color="tab:blue", ls="-", marker="o"),
             "simplicial": dict(color="tab:red", ls="--", marker="s")}
    sizes = list(paired)
    written = []

    fig, axes = plt.subplots(1, len(suites), figsize=(4.6 * len(suites), 4.0), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for arch in archs:
            f = fits[suite]["non_embedding"]
            n = np.array([paired[s][seed][arch]["params_nonembedding"] for s in sizes for seed in paired[s]])
            loss = np.array([paired[s][seed][arch]["eval"][suite] for s in sizes for seed in paired[s]])
            ax.scatter(n, loss, s=14, color=style[arch]["color"], marker=style[arch]["marker"], alpha=0.7)
            grid = np.geomspace(n.min(), n.max(), 50)
            fa = f["fits"][arch]
            a_b, b_b = f["_boot"][arch]
            pred_b = np.exp(-(a_b[:, None] * np.log(grid)[None] + b_b[:, None]))
            lo, hi = np.quantile(pred_b, [(1 - CI) / 2, (1 + CI) / 2], axis=0)
            r2 = "n/a" if fa["r2"] is None else f"{fa['r2']:.3f}"
            ax.plot(grid, np.exp(-(fa["alpha"] * np.log(grid) + fa["beta"])), color=style[arch]["color"],
                    ls=style[arch]["ls"], label=f"{ARCH_LABEL[arch]}: alpha {fa['alpha']:.4f}, R^2 {r2}")
            ax.fill_between(grid, lo, hi, color=style[arch]["color"], alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            fmt(FormatStrFormatter("%.2f"))                 # losses span well under a decade
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel(f"{suite} NLL (nats/token)")
        ax.set_title(suite)
        ax.legend(fontsize=7)
    fig.suptitle(f"-log L = alpha log N + beta, {budget:,} tokens per run; bands: {CI:.0%} bootstrap over seeds")
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_params.png", dpi=120)
    plt.close(fig)
    written.append("loss_vs_params.png")

    cmap = plt.get_cmap("viridis")
    for fname, xlabel, scale in (("loss_vs_tokens.png", "training tokens", None),
                                 ("loss_vs_flops.png", "counted training FLOPs", "flops")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, s in enumerate(sizes):
            color = cmap(i / max(1, len(sizes) - 1))
            for arch in archs:
                runs = [paired[s][seed][arch] for seed in paired[s]]
                tok = np.array([p[0] for p in runs[0]["curve"]], dtype=float)
                loss = np.mean([[p[1] for p in r["curve"]] for r in runs if len(r["curve"]) == len(tok)], axis=0)
                x = tok * runs[0]["flops"] / runs[0]["tokens"] if scale == "flops" else tok
                ax.plot(x, loss, color=color, ls=style[arch]["ls"],
                        label=f"{s} {ARCH_LABEL[arch]} (N={runs[0]['params_nonembedding']:,})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (code, nats/token)")
        ax.set_title("validation loss, mean over seeds (solid: dot-product, dashed: 2-simplicial)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(fname)

    if eff is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for row in eff:
            x = row["params_nonembedding_dot"]
            lo, hi = row["ratio_ci"]
            if row["censored"]:
                ax.scatter([x], [1.0], marker="^", s=80, color="tab:gray")
                ax.annotate("not reached within\nthe budget (censored)", (x, 1.0), textcoords="offset points",
                            xytext=(0, -24), ha="center", fontsize=7)
                continue
            y = row["ratio_to_budget"]
            top = hi if hi is not None else 1.0
            ax.errorbar([x], [y], yerr=[[y - (lo if lo is not None else y)], [max(top - y, 0)]], fmt="o",
                        color="tab:purple", capsize=4)
            if hi is None:
                ax.annotate("upper bound censored", (x, top), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7)
            if row["at_first_eval"]:
                ax.annotate("at first eval (upper bound)", (x, y), textcoords="offset points", xytext=(0, -12),
                            ha="center", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_ylim(top=max(1.15, ax.get_ylim()[1]))
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N (dot-product model)")
        ax.set_ylabel("dot-product tokens / 2-simplicial tokens")
        ax.set_title("tokens the dot-product model needs to reach the 2-simplicial\n"
                     f"model's final validation loss ({CI:.0%} bootstrap over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "token_efficiency.png", dpi=120)
        plt.close(fig)
        written.append("token_efficiency.png")
    return written


# --------------------------------------------------------------------------- the fit
def fit_results(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, n_boot: int = 2000,
                seed: int = 0, plots: bool = True) -> dict:
    """Fit the run files of ``results_dir``; write ``fit.json`` (and the PNGs) in ``out_dir``
    (default ``results_dir``) and return what ``fit.json`` holds."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    runs = load_runs(results_dir)
    check_comparable(runs)
    archs, paired, unpaired = _pair(runs)
    if len(paired) < 2:
        raise ValueError(f"a fit needs at least 2 sizes with runs of every architecture ({archs}), "
                         f"got {list(paired)}")
    used = [r for by_seed in paired.values() for a in by_seed.values() for r in a.values()]
    suites = sorted(set.intersection(*(set(r["eval"]) for r in used)))
    skipped = sorted(set.union(*(set(r["eval"]) for r in used)) - set(suites))
    if not suites:
        raise ValueError("no evaluation suite is present in every run file")
    draws = _bootstrap_draws(paired, n_boot, np.random.default_rng(seed))
    fits = {suite: {p: fit_suite(archs, paired, draws, suite, p) for p in PARAMS} for suite in suites}
    budget = runs[0]["tokens"]
    eff = token_efficiency(paired, draws, budget) if set(ARCHS) <= set(archs) else None
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "law": "-log L = alpha * log N + beta (least squares over runs; L: NLL in nats/token)",
        "tokens": budget, "data_sha256": runs[0]["data_sha256"], "archs": archs,
        "sizes": {s: {"seeds": list(by_seed),
                      **{f"params_nonembedding_{a}": next(iter(by_seed.values()))[a]["params_nonembedding"]
                         for a in archs},
                      **{f"params_total_{a}": next(iter(by_seed.values()))[a]["params_total"] for a in archs}}
                  for s, by_seed in paired.items()},
        "n_runs": len(used), "unpaired_runs": unpaired, "suites": suites, "suites_skipped": skipped,
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": CI,
                      "unit": "seeds within each size, paired across architectures"},
        "fits": {suite: {p: f["fits"] for p, f in by_p.items()} for suite, by_p in fits.items()},
        "token_efficiency": eff,
        "finals": {s: {a: {"eval": {str(seed): runs_[a]["eval"] for seed, runs_ in by_seed.items()},
                           "flops_per_token": next(iter(by_seed.values()))[a]["flops"] / budget}
                       for a in archs}
                   for s, by_seed in paired.items()},
        "plots": _plots(out_dir, archs, paired, suites, fits, eff, budget) if plots else [],
    }
    if result["data_sha256"] is None:
        print("fit: warning: the run files carry no data_sha256; their data cannot be checked to be the same",
              file=sys.stderr)
    write_atomic(out_dir / "fit.json", json.dumps(result, indent=2, allow_nan=False))
    return result


def format_fit(result: dict) -> str:
    lines = [f"{result['n_runs']} runs, {len(result['sizes'])} sizes, {result['tokens']:,} tokens each"]
    for suite in result["suites"]:
        for p in PARAMS:
            f = result["fits"][suite][p]
            parts = [f"{a} alpha {f[a]['alpha']:.4f} [{_fmt(f[a]['alpha_ci'][0])}, {_fmt(f[a]['alpha_ci'][1])}] "
                     f"R^2 {_fmt(f[a]['r2'])}" for a in result["archs"]]
            if "alpha_change" in f:
                c = f["alpha_change"]
                rel = "n/a" if c["relative"] is None else f"{c['relative']:+.1%}"
                parts.append(f"change {rel} [{_pct(c['relative_ci'][0])}, {_pct(c['relative_ci'][1])}]")
            lines.append(f"{suite:10s} N={p:13s} " + "; ".join(parts))
    for row in result["token_efficiency"] or []:
        v = "censored (not reached)" if row["censored"] else f"{row['ratio_to_budget']:.3f}x budget"
        lines.append(f"token efficiency {row['size']}: dot reaches the 2-simplicial final loss at {v} "
                     f"[{_fmt(row['ratio_ci'][0])}, {_fmt(row['ratio_ci'][1])}]")
    return "\n".join(lines)


# The paper's Table 3 (Roy et al. 2025, arXiv 2507.02754): MoE models of 1B-3.5B active
# parameters, N = active parameters, one fit per benchmark: (alpha, beta) per architecture.
PAPER_TABLE3 = {
    "GSM8k": {"dot": (0.1420, -1.8280), "simplicial": (0.1683, -2.3939)},
    "MMLU": {"dot": (0.1256, -2.1606), "simplicial": (0.1364, -2.3960)},
    "MMLU-pro": {"dot": (0.0901, -1.7289), "simplicial": (0.1083, -2.1181)},
    "MBPP": {"dot": (0.1720, -2.2569), "simplicial": (0.1837, -2.5201)},
}
REPORT_BLOCKS = ("sizes", "table3", "token_efficiency", "losses", "compute")


def report_blocks(result: dict) -> dict[str, str]:
    """Markdown tables of a fit (what ``fit.json`` holds), by block name (:data:`REPORT_BLOCKS`)."""
    archs = result["archs"]
    rows = ["| size | N non-emb. " + " | ".join(archs) + " | N total " + " | ".join(archs) + " | seeds |",
            "|---|" + "---|" * (2 * len(archs) + 1)]
    for size, info in result["sizes"].items():
        rows.append(f"| {size} | " + " | ".join(f"{info[f'params_nonembedding_{a}']:,}" for a in archs) + " | "
                    + " | ".join(f"{info[f'params_total_{a}']:,}" for a in archs)
                    + f" | {', '.join(map(str, info['seeds']))} |")
    sizes = "\n".join(rows)

    rows = ["| source | suite (N) | dot-product alpha / beta | 2-simplicial alpha / beta | R^2 dot / 2-simp. "
            "| change in alpha [95% CI] |", "|---|---|---|---|---|---|"]
    for suite, by_arch in PAPER_TABLE3.items():
        (ad, bd), (as_, bs) = by_arch["dot"], by_arch["simplicial"]
        rows.append(f"| paper | {suite} (active) | {ad:.4f} / {bd:.4f} | {as_:.4f} / {bs:.4f} | >= 0.996 "
                    f"| {(as_ - ad) / ad:+.1%} |")
    for suite in result["suites"]:
        for p in PARAMS:
            f = result["fits"][suite][p]
            cells = []
            for a in ("dot", "simplicial"):
                fa = f.get(a)
                cells.append("n/a" if fa is None else
                             f"{fa['alpha']:.4f} [{_fmt(fa['alpha_ci'][0])}, {_fmt(fa['alpha_ci'][1])}] / {fa['beta']:.4f}")
            r2 = " / ".join("n/a" if a not in f or f[a]["r2"] is None else f"{f[a]['r2']:.3f}"
                            for a in ("dot", "simplicial"))
            c = f.get("alpha_change")
            change = "n/a" if c is None or c["relative"] is None else (
                f"{c['relative']:+.1%} [{_pct(c['relative_ci'][0])}, {_pct(c['relative_ci'][1])}]")
            rows.append(f"| ours | {suite} ({p.replace('_', '-')}) | {cells[0]} | {cells[1]} | {r2} | {change} |")
    table3 = "\n".join(rows)

    rows = ["| size | N non-emb. (dot) | 2-simp. final val. loss | dot final val. loss | tokens dot needs "
            "| ratio to budget [95% CI] |", "|---|---|---|---|---|---|"]
    for r in result["token_efficiency"] or []:
        if r["censored"]:
            need, ratio = "not reached", "not reached"
        else:
            bound = " (at the first evaluation: an upper bound)" if r["at_first_eval"] else ""
            need = f"{r['dot_tokens_to_reach']:,.0f}{bound}"
            ratio = f"{r['ratio_to_budget']:.3f} [{_fmt(r['ratio_ci'][0])}, {_fmt(r['ratio_ci'][1])}]"
        rows.append(f"| {r['size']} | {r['params_nonembedding_dot']:,} | {r['simplicial_final_val_loss']:.4f} "
                    f"| {r['dot_final_val_loss']:.4f} | {need} | {ratio} |")
    eff = "\n".join(rows)

    # final NLL per size and suite: the mean over seeds, each seed, and the paired difference per
    # seed (a seed fixes the data order for both architectures)
    both = set(ARCHS) <= set(archs)              # the pair: a difference (ratio) column
    rows = ["| size | suite | " + " | ".join(f"{ARCH_LABEL.get(a, a)}: mean (per seed)" for a in archs)
            + (" | 2-simp. - dot, per seed |" if both else " |"), "|---|---|" + "---|" * (len(archs) + both)]
    for size, by_arch in result.get("finals", {}).items():
        seeds = list(by_arch[archs[0]]["eval"])
        for suite in result["suites"]:
            v = {a: [by_arch[a]["eval"][sd][suite] for sd in seeds] for a in archs}
            cells = [f"{sum(x) / len(x):.4f} ({', '.join(f'{y:.4f}' for y in x)})" for x in v.values()]
            if both:
                cells.append(", ".join(f"{b - a:+.4f}" for a, b in zip(v["dot"], v["simplicial"])))
            rows.append(f"| {size} | {suite} | " + " | ".join(cells) + " |")
    losses = "\n".join(rows)

    rows = ["| size | " + " | ".join(f"FLOPs/token {ARCH_LABEL.get(a, a)}" for a in archs)
            + (" | 2-simp. / dot |" if both else " |"), "|---|" + "---|" * (len(archs) + both)]
    for size, by_arch in result.get("finals", {}).items():
        f = {a: by_arch[a]["flops_per_token"] for a in archs}
        ratio = [f"{f['simplicial'] / f['dot']:.2f}x"] if both else []
        rows.append(f"| {size} | " + " | ".join([f"{v:.3e}" for v in f.values()] + ratio) + " |")
    compute = "\n".join(rows)
    return {"sizes": sizes, "table3": table3, "token_efficiency": eff, "losses": losses, "compute": compute}


def update_report(path: str | os.PathLike, result: dict) -> list[str]:
    """Rewrite the blocks ``<!-- fit:NAME -->`` ... ``<!-- /fit:NAME -->`` of the markdown file
    ``path`` with :func:`report_blocks` of ``result`` (see :func:`write_blocks`)."""
    return write_blocks(path, report_blocks(result), "fit")


def write_blocks(path: str | os.PathLike, blocks: dict[str, str], tag: str) -> list[str]:
    """Rewrite the blocks ``<!-- TAG:NAME -->`` ... ``<!-- /TAG:NAME -->`` of the markdown file
    ``path`` with ``blocks[NAME]``; the text around them is kept. Returns the names rewritten; a
    file with none of the blocks is an error (nothing is written)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report {path} does not exist")
    text = path.read_text()
    done = []
    for name, body in blocks.items():
        start, end = f"<!-- {tag}:{name} -->", f"<!-- /{tag}:{name} -->"
        if text.count(start) != text.count(end) or text.count(start) > 1:
            raise ValueError(f"report {path}: block {name!r} needs one {start} and one {end}")
        if start not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
        done.append(name)
    if not done:
        raise ValueError(f"report {path} holds none of the blocks " + ", ".join(f"<!-- {tag}:{n} -->" for n in blocks))
    write_atomic(path, text)
    return done


def _fmt(v):
    return "None" if v is None else f"{v:.4f}"


def _pct(v):
    return "None" if v is None else f"{v:+.1%}"


def _fit_cmd(args) -> int:
    res = fit_results(args.results_dir, out_dir=args.out, n_boot=args.bootstrap, seed=args.seed)
    print(format_fit(res))
    if args.report:
        names = update_report(args.report, res)
        print(f"fit: rewrote the blocks {', '.join(names)} of {args.report}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fit`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "fit", help="scaling-law fits of a sweep's run files (JSON + PNG)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", help="directory holding runs/<run>.json (the sweep's results_dir)")
    p.add_argument("--out", default=None, help="where fit.json and the PNGs go (default: results_dir)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--report", default=None,
                   help="a markdown file (docs/REPORT.md) whose <!-- fit:NAME --> ... <!-- /fit:NAME --> blocks "
                        "(" + ", ".join(REPORT_BLOCKS) + ") are rewritten with this fit's tables")
    p.set_defaults(fn=_fit_cmd)
    return p

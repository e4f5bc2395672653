"""The learning-rate check before the scaling grid: which peak learning rate the grid takes, by
the rule fixed before the check ran (``configs/scaling.toml``'s header).

    twosimplicial study lr-check results/scaling_lr     # table, the pick, lr_check.json and .png

Reads every run file ``ROOT/*/runs/*.json`` (one folder per learning rate, as
``benchmarks/device_sweep.sh MODE=lr`` writes them), groups the runs by the peak learning rate
they record (``train.lr``) and applies :data:`RULE`. Every learning rate must have the same
(size, arch) runs (several seeds of one are averaged). Each architecture's own pick (the rule
over its runs alone) is reported too, so that a disagreement shows.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from ..checkpoint import write_atomic
from . import fit

SUITE = "code"
RULE = ("the peak learning rate with the lowest mean final held-out code NLL (eval.code) over every "
        "(size, arch) run of the check; one rate for both architectures")


def load_runs(root: str | os.PathLike) -> list[dict]:
    """The run files of every ``root/*/runs/`` (each checked by :func:`fit.load_runs`), which must
    record their peak learning rate and the :data:`SUITE` NLL."""
    folders = sorted(p.parent for p in Path(root).glob("*/runs") if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no run files in {root}/*/runs/ (benchmarks/device_sweep.sh MODE=lr writes them)")
    runs = [r for folder in folders for r in fit.load_runs(folder)]
    for r in runs:
        lr = r.get("train", {}).get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"run {r['run']!r}: the run file records no peak learning rate (train.lr), got {lr!r}")
        if SUITE not in r["eval"]:
            raise ValueError(f"run {r['run']!r}: no eval[{SUITE!r}] NLL")
    return runs


def _pick(means: dict[float, float]) -> float:
    return min(means, key=lambda lr: (means[lr], lr))          # ties: the smaller rate


def summarize(runs: list[dict]) -> dict:
    """The table (mean NLL per learning rate and (size, arch)), the mean per learning rate, the
    rule's pick, each architecture's own pick, and whether the pick is the smallest or largest
    rate checked (the optimum may then lie outside the range)."""
    cells = defaultdict(list)
    for r in runs:
        cells[(float(r["train"]["lr"]), r["size"], r["arch"])].append(float(r["eval"][SUITE]))
    lrs = sorted({lr for lr, _, _ in cells})
    pairs = sorted({(size, arch) for _, size, arch in cells})
    missing = [f"lr {lr:g}: {size} {arch}" for lr in lrs for size, arch in pairs if (lr, size, arch) not in cells]
    if missing:
        raise ValueError("every learning rate needs the same (size, arch) runs; missing: " + "; ".join(missing))
    nll = {(lr, size, arch): sum(v) / len(v) for (lr, size, arch), v in cells.items()}
    mean = {lr: sum(nll[lr, s, a] for s, a in pairs) / len(pairs) for lr in lrs}
    by_arch = {}
    for arch in sorted({a for _, a in pairs}):
        sizes = [s for s, a in pairs if a == arch]
        by_arch[arch] = _pick({lr: sum(nll[lr, s, arch] for s in sizes) / len(sizes) for lr in lrs})
    pick = _pick(mean)
    return {
        "rule": RULE, "suite": SUITE, "lrs": lrs,
        "table": [{"lr": lr, "size": s, "arch": a, "nll": nll[lr, s, a], "seeds": len(cells[lr, s, a])}
                  for lr in lrs for s, a in pairs],
        "mean": [{"lr": lr, "nll": mean[lr]} for lr in lrs],
        "pick": pick, "pick_by_arch": by_arch, "archs_agree": len(set(by_arch.values())) == 1,
        "pick_at_edge": len(lrs) > 1 and pick in (lrs[0], lrs[-1]),
    }


def format_summary(summary: dict) -> str:
    pairs = sorted({(row["size"], row["arch"]) for row in summary["table"]})
    nll = {(row["lr"], row["size"], row["arch"]): row["nll"] for row in summary["table"]}
    mean = {row["lr"]: row["nll"] for row in summary["mean"]}
    head = "| peak lr | " + " | ".join(f"{s} {a}" for s, a in pairs) + " | mean |"
    lines = [head, "|" + "---|" * (len(pairs) + 2)]
    for lr in summary["lrs"]:
        mark = " (picked)" if lr == summary["pick"] else ""
        lines.append(f"| {lr:g}{mark} | " + " | ".join(f"{nll[lr, s, a]:.4f}" for s, a in pairs)
                     + f" | {mean[lr]:.4f} |")
    own = ", ".join(f"{a}: {lr:g}" for a, lr in summary["pick_by_arch"].items())
    lines += ["", f"- rule: {summary['rule']}", f"- pick: {summary['pick']:g}; each architecture alone: {own}"
              + ("" if summary["archs_agree"] else " (they disagree)")]
    if summary["pick_at_edge"]:
        lines.append("- the pick is at the edge of the rates checked: a wider check may pick past it")
    return "\n".join(lines)


def plot(summary: dict, path: str | os.PathLike) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pairs = sorted({(row["size"], row["arch"]) for row in summary["table"]})
    for size, arch in pairs:
        rows = [row for row in summary["table"] if (row["size"], row["arch"]) == (size, arch)]
        ax.plot([r["lr"] for r in rows], [r["nll"] for r in rows], "o-" if arch == "dot" else "s--",
                label=f"{size} {arch}")
    ax.axvline(summary["pick"], color="grey", lw=0.8, ls=":", label=f"picked {summary['pick']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"final held-out {SUITE} NLL (nats/token)")
    ax.set_title("Learning-rate check before the scaling grid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_check(root: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Summarize the check under ``root``; writes ``lr_check.json`` and ``lr_check.png`` in ``out``
    (default ``root``) and returns the summary."""
    summary = summarize(load_runs(root))
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "lr_check.json", json.dumps(summary, indent=2, allow_nan=False))
    plot(summary, out / "lr_check.png")
    return summary


def _cli(args) -> int:
    summary = lr_check(args.root, args.out)
    print(format_summary(summary))
    out = Path(args.out or args.root)
    print(f"results: {out / 'lr_check.json'}   plot: {out / 'lr_check.png'}")
    if args.report:
        fit.write_blocks(args.report, {"table": format_summary(summary)}, "lr-check")
        print(f"lr-check: rewrote the block table of {args.report}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lr-check`` on ``subparsers`` (of ``twosimplicial study``)."""
    p = subparsers.add_parser("lr-check", help="the scaling grid's learning rate, from the check's run files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="results/scaling_lr",
                   help="folder of one results folder per learning rate (default: results/scaling_lr)")
    p.add_argument("--out", default=None, help="where lr_check.json and .png go (default: root)")
    p.add_argument("--report", default=None,
                   help="a markdown file (docs/REPORT.md) whose <!-- lr-check:table --> ... <!-- /lr-check:table --> "
                        "block is rewritten with the check's table and pick")
    p.set_defaults(fn=_cli)
    return p

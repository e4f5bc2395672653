"""Before / after comparison of two kernel benchmark runs (benchmarks/bench_kernels.py JSONs).

    python3 benchmarks/compare_kernels.py BEFORE.json AFTER.json --out DIR [--impl twosimplicial]
        [--min-noise 0.01] [--fail-on-slower]

For every case in both files and each direction (forward, backward): our TFLOP/s ratio to the
reference impl of the same run (``ratio_to``, cuDNN SDPA on a GPU) before and after, the change in
percent, and a flag when the change is past the run-to-run noise. The noise of a row is the
relative spread ``(max - min) / median`` of its per-round ratios (each round times ours and the
reference back to back; ``*_ratio_rounds``, or from ``*_ms_rounds`` in older files); the noise of
a comparison is the larger of the two rows' spreads, and at least ``--min-noise``. ``slower``:
the ratio fell by more than that noise; ``faster``: it rose by more.

Prints a markdown table and writes ``DIR/compare.json`` and ``DIR/compare.png`` (per case, the
before and after ratios of both directions, the issue-18 targets as black lines, flagged cases
named in red). Ratios, not times, are compared, so that the GPU clock of each run (which drifts)
cancels; both files should still come from the same kind of GPU (a warning says when not).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

DIRS = ("fwd", "bwd")


def spread(xs) -> float:
    """``(max - min) / median`` of a row's per-round ratios; 0 for fewer than two rounds."""
    xs = [x for x in xs or [] if x]
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) >= 2 else 0.0


def ratio_of(res: dict, row: dict, k: str):
    """(ratio to the reference, per-round ratios) of ``row`` in direction ``k``; computed from the
    reference row of the same case for files written before rows kept their ratios."""
    if row.get(f"{k}_ratio") is not None:
        return row[f"{k}_ratio"], row.get(f"{k}_ratio_rounds") or []
    ref_name = res.get("ratio_to", "sdpa-cudnn")
    ref = next((r for r in res["rows"] if r["case"] == row["case"] and r["impl"] == ref_name), None)
    if ref is None or not row.get(f"{k}_tflops") or not ref.get(f"{k}_tflops"):
        return None, []
    ratio = row[f"{k}_tflops"] / ref[f"{k}_tflops"]
    flop_ratio = (row[f"{k}_tflops"] * row[f"{k}_ms"]) / (ref[f"{k}_tflops"] * ref[f"{k}_ms"])
    ours, theirs = row.get(f"{k}_ms_rounds") or [], ref.get(f"{k}_ms_rounds") or []
    return ratio, [flop_ratio * b / a for a, b in zip(ours, theirs)]


def target_of(res: dict, row: dict, k: str):
    if row.get(f"target_{k}") is not None:
        return row[f"target_{k}"]
    case = (res.get("cases") or {}).get(row["case"]) or {}
    if case.get("target"):
        return case["target"][DIRS.index(k)]
    try:                                                   # older files: the rule of bench_kernels
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_kernels import CASES
    except ImportError:
        return None
    c = CASES.get(row["case"])
    return None if c is None else c.target[DIRS.index(k)]


def compare(before: dict, after: dict, impl: str = "twosimplicial", min_noise: float = 0.01) -> dict:
    b_rows = {r["case"]: r for r in before["rows"] if r["impl"] == impl}
    a_rows = {r["case"]: r for r in after["rows"] if r["impl"] == impl}
    cases = [c for c in a_rows if c in b_rows]
    out = []
    for case in cases:
        for k in DIRS:
            (rb, rounds_b), (ra, rounds_a) = ratio_of(before, b_rows[case], k), ratio_of(after, a_rows[case], k)
            if rb is None or ra is None:
                continue
            sb, sa = spread(rounds_b), spread(rounds_a)
            noise = max(sb, sa, min_noise)
            change = ra / rb - 1
            t = target_of(after, a_rows[case], k)
            out.append({"case": case, "direction": k, "before": rb, "after": ra, "change_pct": 100 * change,
                        "noise_pct": 100 * noise, "spread_before_pct": 100 * sb, "spread_after_pct": 100 * sa,
                        "rounds_before": len(rounds_b), "rounds_after": len(rounds_a), "target": t,
                        "meets_before": None if t is None else rb >= t, "meets_after": None if t is None else ra >= t,
                        "flag": "slower" if change < -noise else "faster" if change > noise else ""})
    meta = lambda res: {k: res.get(k) for k in ("device", "torch", "triton", "date", "tag", "package",
                                                      "ratio_to", "method")}
    warnings = []
    if before.get("device") != after.get("device"):
        warnings.append(f"different devices: {before.get('device')!r} before, {after.get('device')!r} after")
    if before.get("ratio_to", "sdpa-cudnn") != after.get("ratio_to", "sdpa-cudnn"):
        warnings.append("the two runs' ratios are to different reference impls")
    return {"impl": impl, "before": meta(before), "after": meta(after),
            "noise_rule": (f"noise = max(spread of the before row's per-round ratios, spread of the after row's, "
                           f"{min_noise:g}); spread = (max - min) / median; flag 'slower' when "
                           f"after / before - 1 < -noise, 'faster' when > noise"),
            "min_noise": min_noise, "rows": out,
            "only_before": [c for c in b_rows if c not in a_rows], "only_after": [c for c in a_rows if c not in b_rows],
            "warnings": warnings}


def markdown(cmp: dict) -> str:
    yn = lambda v: "-" if v is None else ("yes" if v else "no")
    lines = [f"before: {cmp['before'].get('tag') or ''} {cmp['before'].get('device')} {cmp['before'].get('date')} "
             f"({cmp['before'].get('package')})",
             f"after:  {cmp['after'].get('tag') or ''} {cmp['after'].get('device')} {cmp['after'].get('date')} "
             f"({cmp['after'].get('package')})",
             f"ratios of {cmp['impl']} TFLOP/s to {cmp['after'].get('ratio_to') or 'sdpa-cudnn'}; {cmp['noise_rule']}",
             "", "| case | dir | before | after | change | noise | target | met before -> after | flag |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        t = "-" if r["target"] is None else f"{r['target']:.2f}"
        lines.append(f"| {r['case']} | {r['direction']} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['change_pct']:+.1f}% | {r['noise_pct']:.1f}% | {t} | "
                     f"{yn(r['meets_before'])} -> {yn(r['meets_after'])} | "
                     f"{r['flag'].upper() if r['flag'] == 'slower' else r['flag']} |")
    for key, what in (("only_before", "only in BEFORE"), ("only_after", "only in AFTER")):
        if cmp[key]:
            lines.append(f"\n{what}: {', '.join(cmp[key])}")
    slower = sorted({r["case"] for r in cmp["rows"] if r["flag"] == "slower"})
    lines.append(f"\nslower past the noise: {', '.join(slower) if slower else 'none'}")
    lines += [f"WARNING: {w}" for w in cmp["warnings"]]
    return "\n".join(lines)


def plot(cmp: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    cases = list(dict.fromkeys(r["case"] for r in cmp["rows"]))
    by = {(r["case"], r["direction"]): r for r in cmp["rows"]}
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(cases) + 2), 5))
    w = 0.2
    bars = (("fwd", "before", "tab:blue", 0.45), ("fwd", "after", "tab:blue", 0.9),
            ("bwd", "before", "tab:orange", 0.45), ("bwd", "after", "tab:orange", 0.9))
    top = 0.1
    for n, case in enumerate(cases):
        for m, (k, when, color, alpha) in enumerate(bars):
            r = by.get((case, k))
            if r is None:
                continue
            x = n + (m - 1.5) * w
            ax.bar(x, r[when], w * 0.95, color=color, alpha=alpha, edgecolor="black", linewidth=0.4)
            top = max(top, r[when], r["target"] or 0)
            if when == "after":
                ax.text(x, r[when] + 0.01, f"{r['change_pct']:+.0f}%", ha="center", va="bottom", fontsize=6,
                        color="red" if r["flag"] == "slower" else "black")
            if r["target"] is not None and when == "after":
                ax.hlines(r["target"], x - 1.5 * w, x + 0.5 * w, colors="black", linewidth=1.8)
    ax.set_xticks(range(len(cases)), cases, rotation=35, ha="right", fontsize=8)
    for label in ax.get_xticklabels():
        if any(by.get((label.get_text(), k), {}).get("flag") == "slower" for k in DIRS):
            label.set_color("red")
    ax.set_ylim(0, 1.35 * top)
    ax.set_ylabel(f"TFLOP/s ratio to {cmp['after'].get('ratio_to') or 'sdpa-cudnn'}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Patch(color="tab:blue", alpha=0.45, label="fwd before"), Patch(color="tab:blue", alpha=0.9,
                                                                                       label="fwd after"),
                       Patch(color="tab:orange", alpha=0.45, label="bwd before"),
                       Patch(color="tab:orange", alpha=0.9, label="bwd after"),
                       Line2D([], [], color="black", linewidth=1.8, label="target")],
              fontsize=7, loc="upper center", ncol=5)
    ax.set_title(f"before ({cmp['before'].get('tag') or cmp['before'].get('date')}) vs after "
                 f"({cmp['after'].get('tag') or cmp['after'].get('date')}), {cmp['after'].get('device')}; "
                 "red: slower past the run-to-run noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--out", required=True, help="directory for compare.json and compare.png")
    ap.add_argument("--impl", default="twosimplicial")
    ap.add_argument("--min-noise", type=float, default=0.01, help="smallest noise (fraction) a flag needs")
    ap.add_argument("--fail-on-slower", action="store_true", help="exit 1 when a case is flagged slower")
    args = ap.parse_args(argv)
    with open(args.before) as fb, open(args.after) as fa:
        before, after = json.load(fb), json.load(fa)
    cmp = compare(before, after, args.impl, args.min_noise)
    cmp["before"]["file"], cmp["after"]["file"] = args.before, args.after
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump(cmp, fh, indent=1)
    if cmp["rows"]:
        plot(cmp, os.path.join(args.out, "compare.png"))
    print(markdown(cmp))
    if args.fail_on_slower and any(r["flag"] == "slower" for r in cmp["rows"]):
        raise SystemExit(1)
    return cmp


if __name__ == "__main__":
    main()

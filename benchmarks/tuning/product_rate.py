"""The backward's tensor-core rate against the forward's, from a kernel benchmark JSON (CPU).

    python -m benchmarks.tuning.product_rate benchmarks/results/RUN.json [...]

The benchmark counts the backward as 2.5x the forward's FLOPs (five matrix products per (row,
key) against the forward's two: docs/kernels.md, FLOPs), but the Triton backward performs eight
(four in each of its kernels, which both recompute P and dP). Per trilinear case of each file
this prints the forward's TFLOP/s, the backward's as counted and its product rate (8 / 5 of the
counted), their quotient, and the product rate the backward target (``target_bwd`` times the
reference's backward TFLOP/s) would need, as a multiple of the forward's TFLOP/s. A quotient near
1 says the backward runs its products as fast as the forward; the last column says how far past
the forward's rate the eight-product design must go to meet its target. The determinant form
is left out: its kernels run at about twice the counted head dim.
"""
from __future__ import annotations

import argparse
import json

PRODUCTS_RUN, PRODUCTS_COUNTED = 8, 5


def rates(res: dict, impl: str = "twosimplicial") -> list[dict]:
    """Per trilinear case with both directions timed: the forward's and the backward's rates."""
    ref = res.get("ratio_to")
    refs = {r["case"]: r for r in res["rows"] if r.get("impl") == ref}
    out = []
    for r in res["rows"]:
        if r.get("impl") != impl or r["case"].startswith("det") or not (r.get("fwd_tflops") and r.get("bwd_tflops")):
            continue
        bwd_rate = r["bwd_tflops"] * PRODUCTS_RUN / PRODUCTS_COUNTED
        row = dict(case=r["case"], fwd_tflops=r["fwd_tflops"], bwd_tflops=r["bwd_tflops"], bwd_product_rate=bwd_rate,
                   bwd_over_fwd=bwd_rate / r["fwd_tflops"], target_needs_x_fwd=None)
        ref_bwd = refs.get(r["case"], {}).get("bwd_tflops")
        if ref_bwd and r.get("target_bwd"):
            row["target_needs_x_fwd"] = r["target_bwd"] * ref_bwd * PRODUCTS_RUN / PRODUCTS_COUNTED / r["fwd_tflops"]
        out.append(row)
    return out


def markdown(path: str, res: dict, rows: list[dict]) -> str:
    lines = [f"{path}: {res.get('device')}, torch {res.get('torch')}, triton {res.get('triton')}, {res.get('date')}", "",
             "| case | fwd TFLOP/s | bwd TFLOP/s (counted) | bwd product rate | bwd rate / fwd | target needs x fwd |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        need = "-" if r["target_needs_x_fwd"] is None else f"{r['target_needs_x_fwd']:.2f}"
        lines.append(f"| {r['case']} | {r['fwd_tflops']:.0f} | {r['bwd_tflops']:.0f} | {r['bwd_product_rate']:.0f} | "
                     f"{r['bwd_over_fwd']:.2f} | {need} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="benchmarks/bench_kernels.py JSON files")
    ap.add_argument("--impl", default="twosimplicial")
    args = ap.parse_args(argv)
    for path in args.files:
        with open(path) as f:
            res = json.load(f)
        print(markdown(path, res, rates(res, args.impl)), end="\n\n")


if __name__ == "__main__":
    main()

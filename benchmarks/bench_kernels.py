"""Kernel benchmark for issue 3, run on the device (GPU):

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out benchmarks/results [--tune] [--quick]

Writes ``<out>/<gpu>-<date>.json`` as
``{"device", "torch", "triton", "date", "rows": [{"case", "impl", "fwd_ms", "bwd_ms",
"fwd_tflops", "bwd_tflops"}]}`` and a PNG plot beside it.

Cases (bf16, (w1, w2) = (512, 32) unless named): ``gqa64`` B=2 S=8192 Hq=64 Hkv=1 D=128;
``mha`` B=1 S=8192 Hq=Hkv=16 D=128; ``mha-d64`` B=2 S=8192 Hq=Hkv=16 D=64; ``det`` the
determinant form at the ``mha`` shape; ``table1-<w1>x<w2>`` the paper's window grid at the
``gqa64`` shape, forward only.

Impls: ``twosimplicial`` (this library's Triton kernels, through the public op);
``sdpa-cudnn`` / ``sdpa-flash``: torch SDPA with that backend, non-causal, q length S, kv
length w1*w2, same heads and head dim: the FLOP-matched dot-product baseline; ``torch``: the
library's PyTorch path (chunked), forward only, on the MHA shapes.

FLOPs (docs/math.md, Cost): 4*D per valid triple forward (``sum_i min(i+1,w1) min(i+1,w2)`` triples per
batch and query head), 2.5x that backward; SDPA 4*S*Lkv*D*H forward, 2.5x backward. For
``det`` D is the model's head dim (128), not the doubled kernel head dim, so its TFLOP/s are
comparable to ``mha`` as "useful" work. Times: the timed impls of a case are measured in
``--rounds`` interleaved rounds (default 5), each a triton.testing.do_bench median; a row
reports the median over its rounds (``fwd_ms_rounds`` / ``bwd_ms_rounds`` keep them all).

``--tune`` first sweeps forward launch configurations on gqa64 / mha / mha-d64 and prints them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics

import torch
import triton
from tqdm import tqdm

from twosimplicial.ops import two_simplicial_attention
from twosimplicial.ops.chunked import chunked_two_simplicial_attention
from twosimplicial.ops.triton.fwd import two_simplicial_fwd


BASE = {  # name: (B, S, Hq, Hkv, D, w1, w2, form, with_bwd)
    "gqa64": (2, 8192, 64, 1, 128, 512, 32, "trilinear", True),
    "mha": (1, 8192, 16, 16, 128, 512, 32, "trilinear", True),
    "mha-d64": (2, 8192, 16, 16, 64, 512, 32, "trilinear", True),
    "det": (1, 8192, 16, 16, 128, 512, 32, "determinant", True),
}
TABLE1 = [(1024, 32), (512, 64), (128, 128), (256, 64), (512, 32), (1024, 16), (256, 32)]
CASES = dict(BASE)
for _w1, _w2 in TABLE1:
    CASES[f"table1-{_w1}x{_w2}"] = (2, 8192, 64, 1, 128, _w1, _w2, "trilinear", False)


def n_triples(S, w1, w2):
    i = torch.arange(S, dtype=torch.float64)
    return float((torch.clamp(i + 1, max=w1) * torch.clamp(i + 1, max=w2)).sum())


def rand(*shape, gen):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd_fns(fwd, inputs, do, with_bwd):
    """(forward closure, backward closure or None): the backward is autograd.grad on a graph
    retained once, so each call times the backward kernels alone."""
    def fwd_fn():
        with torch.no_grad():
            fwd(*inputs)
    bwd_fn = None
    if with_bwd:
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fwd(*leaves)
        bwd_fn = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)
    return fwd_fn, bwd_fn


def row(case, impl, fwd_ms, bwd_ms, flops, fwd_rounds=None, bwd_rounds=None):
    tf = lambda ms, f: None if ms is None else f / (ms * 1e-3) / 1e12
    r = {"case": case, "impl": impl, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
         "fwd_tflops": tf(fwd_ms, flops), "bwd_tflops": tf(bwd_ms, 2.5 * flops)}
    if fwd_rounds:
        r["fwd_ms_rounds"], r["bwd_ms_rounds"] = fwd_rounds, bwd_rounds or None
    return r


def run_case(name, spec, impls, gen, rounds):
    """Rows of one case. The timed impls (this library, cuDNN and flash SDPA) are measured in
    ``rounds`` interleaved rounds (ours, cuDNN, flash, ours, cuDNN, ...), each a do_bench median,
    and a row reports the median over its rounds: the GPU's clock drifts over a run (up to ~8%
    for the same kernel, docs/kernels.md, Measured), and interleaving puts that drift on all impls
    alike instead of on whichever was timed last."""
    B, S, Hq, Hkv, D, w1, w2, form, with_bwd = spec
    rows = []
    q = rand(B, S, Hq, D, gen=gen)
    k1, v1, k2, v2 = (rand(B, S, Hkv, D, gen=gen) for _ in range(4))
    do = rand(B, S, Hq, D, gen=gen)
    flops = 4 * D * n_triples(S, w1, w2) * B * Hq
    timed = {}                                             # impl: (flops, fwd_fn, bwd_fn)
    if "twosimplicial" in impls:
        f = lambda *a: two_simplicial_attention(*a, w1, w2, form=form, backend="triton")
        timed["twosimplicial"] = (flops, *fwd_bwd_fns(f, (q, k1, v1, k2, v2), do, with_bwd))
    if "torch" in impls and Hq == Hkv and form == "trilinear":   # slow: one forward, not interleaved
        f = lambda *a: chunked_two_simplicial_attention(*a, w1, w2, 1 / math.sqrt(D))[0]
        with torch.no_grad():
            fwd_ms = bench(lambda: f(q, k1, v1, k2, v2), warmup=1, rep=1)
        rows.append(row(name, "torch", fwd_ms, None, flops))
    # FLOP-matched dot-product attention: q length S, kv length w1*w2, same heads and D
    L = w1 * w2
    sq = rand(B, Hq, S, D, gen=gen)
    sk, sv = rand(B, Hq, L, D, gen=gen), rand(B, Hq, L, D, gen=gen)
    sdo = rand(B, Hq, S, D, gen=gen)
    sflops = 4 * S * L * D * Hq * B
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for impl, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        if impl not in impls:
            continue
        def f(a, b, c, backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(a, b, c)
        try:
            timed[impl] = (sflops, *fwd_bwd_fns(f, (sq, sk, sv), sdo, with_bwd))
        except RuntimeError as e:                          # backend refused this shape
            print(f"{name} {impl}: {str(e)[:120]}")
    ms = {impl: ([], []) for impl in timed}
    for _ in range(rounds):
        for impl, (_, fwd_fn, bwd_fn) in timed.items():
            ms[impl][0].append(bench(fwd_fn))
            if bwd_fn is not None:
                ms[impl][1].append(bench(bwd_fn))
    med = lambda xs: statistics.median(xs) if xs else None
    for impl, (fl, *_) in timed.items():
        fwd_r, bwd_r = ms[impl]
        rows.append(row(name, impl, med(fwd_r), med(bwd_r), fl, fwd_r, bwd_r))
    del q, k1, v1, k2, v2, do, sq, sk, sv, sdo, timed
    torch.cuda.empty_cache()
    return rows


def tune(gen):
    """Forward launch configurations on the main shapes (printed, not saved)."""
    grid = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, maxnreg=mr, prefetch_vs=pf)
            for bm, bn, w, st, mr, pf in ((64, 64, 4, 3, None, False), (64, 64, 4, 3, None, True),
                                          (64, 64, 4, 2, None, True), (64, 32, 4, 3, 168, False),
                                          (64, 32, 4, 4, 168, True), (128, 64, 8, 3, None, True))]
    for name in ("gqa64", "mha", "mha-d64", "table1-128x128"):
        B, S, Hq, Hkv, D, w1, w2, *_ = CASES[name]
        q = rand(B, S, Hq, D, gen=gen)
        k1, v1, k2, v2 = (rand(B, S, Hkv, D, gen=gen) for _ in range(4))
        flops = 4 * D * n_triples(S, w1, w2) * B * Hq
        for cfg in grid:
            try:
                ms = bench(lambda: two_simplicial_fwd(q, k1, v1, k2, v2, w1, w2, D ** -0.5, False, config=cfg))
                print(f"tune {name:14s} {cfg} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
            except Exception as e:                         # e.g. out of shared memory
                print(f"tune {name:14s} {cfg} failed: {str(e)[:100]}", flush=True)
        del q, k1, v1, k2, v2
        torch.cuda.empty_cache()


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(cases)), 8))
    width = 0.8 / len(impls)
    for ax, key in zip(axes, ("fwd_tflops", "bwd_tflops")):
        for n, impl in enumerate(impls):
            vals = [next((r[key] for r in rows if r["case"] == c and r["impl"] == impl), None) for c in cases]
            xs = [i + n * width for i, v in enumerate(vals) if v]
            ax.bar(xs, [v for v in vals if v], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(key.replace("_", " ").replace("tflops", "TFLOP/s"))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tune", action="store_true", help="sweep forward configurations first")
    ap.add_argument("--quick", action="store_true", help="only gqa64 and mha")
    ap.add_argument("--cases", default=None, help="comma-separated case names")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per case (median reported)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.tune:
        tune(gen)
    names = args.cases.split(",") if args.cases else (["gqa64", "mha"] if args.quick else list(CASES))
    rows = []
    for name in tqdm(names, desc="cases"):
        impls = {"twosimplicial", "sdpa-cudnn", "sdpa-flash"}
        if name in ("mha", "mha-d64"):
            impls.add("torch")
        rows += run_case(name, CASES[name], impls, gen, args.rounds)
    dev = torch.cuda.get_device_name()
    gpu = re.sub(r"[^a-z0-9]+", "-", (re.search(r"[HABL]\d{2,3}\w*", dev) or [dev])[0].lower()).strip("-")
    date = datetime.date.today().isoformat()
    res = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "date": date,
           "method": f"median over {args.rounds} interleaved rounds of triton.testing.do_bench medians",
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu}-{date}.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    plot(rows, path[:-5] + ".png", f"2-simplicial vs FLOP-matched SDPA, {dev}, bf16")
    ref = {r["case"]: r for r in rows if r["impl"] == "sdpa-cudnn"}
    print(f"{'case':18s} {'impl':14s} {'fwd ms':>8s} {'fwd TF':>7s} {'bwd ms':>8s} {'bwd TF':>7s} {'fwd/cudnn':>9s} {'bwd/cudnn':>9s}")
    for r in rows:
        c = ref.get(r["case"], {})
        ratio = lambda k: f"{r[k] / c[k]:9.2f}" if r[k] and c.get(k) else f"{'-':>9s}"
        fmt = lambda v, spec: f"{v:{spec}}" if v is not None else f"{'-':>{spec.split('.')[0]}s}"
        print(f"{r['case']:18s} {r['impl']:14s} {fmt(r['fwd_ms'], '8.3f')} {fmt(r['fwd_tflops'], '7.1f')} "
              f"{fmt(r['bwd_ms'], '8.3f')} {fmt(r['bwd_tflops'], '7.1f')} {ratio('fwd_tflops')} {ratio('bwd_tflops')}")
    for r in rows:                                          # round-by-round ratios (same round)
        c = ref.get(r["case"], {})
        if r["impl"] == "twosimplicial" and c.get("fwd_ms_rounds"):
            for k in ("fwd", "bwd"):
                ours, theirs = r.get(f"{k}_ms_rounds") or [], c.get(f"{k}_ms_rounds") or []
                if not ours:
                    continue
                flop_ratio = (r[f"{k}_tflops"] * r[f"{k}_ms"]) / (c[f"{k}_tflops"] * c[f"{k}_ms"])
                ratios = [flop_ratio * b / a for a, b in zip(ours, theirs)]
                if ratios:
                    print(f"{r['case']:18s} {k}/cudnn by round: " + " ".join(f"{x:.3f}" for x in ratios))
    print("wrote", path)


if __name__ == "__main__":
    main()

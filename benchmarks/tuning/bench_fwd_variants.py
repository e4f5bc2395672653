"""Device script for the Triton forward (twosimplicial/ops/triton/fwd.py): check, then time variants.

    python3 -m benchmarks.tuning.bench_fwd_variants [--variants NAME,...] [--cases CASE[:V1+V2],...] \
        [--rounds N] [--out FILE.json]

from the repository root, e.g. ``--variants default,3st --cases gqa64:default+3st,det:default+3st-pf``
checks the three variants on reduced shapes, then times two of them per case (~1 min on an H100).

1. Correctness of each variant (bf16) on reduced shapes against float64 through the
   memory-bounded torch path (``chunked``), relative errors of out and lse.
2. Timing (bf16, the issue's shapes, (w1, w2) = (512, 32) unless the case says otherwise):
   forward median per variant, and cuDNN SDPA forward FLOP-matched (q length S, kv length
   w1 * w2, same heads and D) in the same run, in ``--rounds`` interleaved rounds (variants and
   cuDNN in turn, each round's times kept; the table gives their medians, as the GPU's clock
   drifts over a run); FLOPs: docs/math.md, Cost: 4 * D per valid triple.
Prints a table and writes it with the device, versions, date and command to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch
import triton
from triton.runtime.errors import OutOfResources

from twosimplicial.models import n_triples
from benchmarks.tuning.bench_bwd_variants import load_module, report_kernels
from twosimplicial.ops.chunked import chunked_two_simplicial_attention
from twosimplicial.ops.triton.fwd import two_simplicial_fwd

CASES = {  # name: (B, S, Hq, Hkv, D, Dv, w1, w2); FLOPs counted at head dim min(D, Dv)
    "gqa64": (2, 8192, 64, 1, 128, 128, 512, 32),
    "mha": (1, 8192, 16, 16, 128, 128, 512, 32),
    "mha-d64": (2, 8192, 16, 16, 64, 64, 512, 32),
    # one-position (GQA) tiles at the other head dims and group sizes (the ws variants' scope)
    "gqa8": (1, 8192, 32, 4, 128, 128, 512, 32),
    "gqa64-d64": (2, 8192, 64, 1, 64, 64, 512, 32),
    # the determinant form at the mha shape, as the kernel sees it: D' = 2 * 3 * (128 // 3) + 128 % 3
    "det": (1, 8192, 16, 16, 254, 128, 512, 32),
    # the determinant form at the mha shape on its native kernels (head dim D, FORMS below)
    "det-native": (1, 8192, 16, 16, 128, 128, 512, 32),
    # the weak window shapes of issue 18 (mha, D = 128)
    "w256x64": (1, 8192, 16, 16, 128, 128, 256, 64),
    "w128x128": (1, 8192, 16, 16, 128, 128, 128, 128),
    # the LM shapes of issue 18
    "lm-h4-d64": (16, 1024, 4, 4, 64, 64, 512, 32),
    "lm-h8-d64": (8, 2048, 8, 8, 64, 64, 512, 32),
    "lm-h2-d128": (16, 1024, 2, 2, 128, 128, 512, 32),
}
FORMS = {"det-native": "determinant"}   # the form of a case (default: trilinear)
VARIANTS = {  # name: config overrides of fwd_config ({} = the defaults)
    "default": {},
    # candidates for D > 128 (the determinant form; default there: 32 keys, 2 stages, no v_s prefetch)
    "3st": dict(num_stages=3),
    "3st-pf": dict(num_stages=3, prefetch_vs=True),
    "bn64-2st-pf": dict(block_n=64, num_stages=2, prefetch_vs=True),
    # big-window key blocks through the copy engine (TMA descriptors)
    "notma": dict(tma=False),
    "tma": dict(tma=True),
    "tma-bn32-168": dict(tma=True, block_n=32, num_stages=3, maxnreg=168),
    "tma-bn32-4st": dict(tma=True, block_n=32, num_stages=4),
    "tma-4st": dict(tma=True, num_stages=4),
    "tma-bn128": dict(tma=True, block_n=128, num_stages=2),
    "tma-m128-bn128": dict(tma=True, block_m=128, block_n=128, num_warps=8, num_stages=2),
    "tma-m128": dict(tma=True, block_m=128, num_warps=8, num_stages=3),
    # tile shapes for wide small windows (the default past ws = 64: 128 rows, 4 warps, 2 stages)
    "m64": dict(block_m=64, num_warps=4, num_stages=3),
    "m128-4w": dict(block_m=128, num_warps=4, num_stages=2),
    "m128-bn32": dict(block_m=128, block_n=32, num_warps=8, num_stages=3),
    "m256": dict(block_m=256, num_warps=8, num_stages=2),
    "m256-bn32": dict(block_m=256, block_n=32, num_warps=8, num_stages=2),
    # tiles of several positions x 16 offsets (the backward's rule for one-head tiles): fewer
    # small keys per tile and a 16-offset merge, at the cost of the offset-chunk loop
    "m128-t16": dict(block_m=128, block_t=16, num_warps=4, num_stages=2),
    "m64-t16": dict(block_m=64, block_t=16, num_warps=4, num_stages=3),
    # the tile's right-edge key (P == 2) by a masked narrow block instead of a per-row dot
    "narrow": dict(edge_dot=False),
    # v_s rows loaded after the key loop instead of with q and k_s
    "nopf": dict(prefetch_vs=False),
    # the warp-specialised Gluon prototype (fwd_ws.py; small windows of one tile): two or three
    # consumer warpgroups, rings of 2 or 3 blocks, FA3's order (P V in flight during the softmax)
    "ws": dict(ws={}),
    "ws-s3": dict(ws={"stages": 3}),
    "ws-c3": dict(ws={"consumers": 3}),
    "ws-c3s3": dict(ws={"consumers": 3, "stages": 3}),
    "ws-overlap": dict(ws={"overlap": True}),
    # ... with the two consumers on a pair of tiles that see the same keys, reading one ring
    # (pingpong: and issuing their products in turn)
    "ws-share": dict(ws={"share": True}),
    "ws-share-s3": dict(ws={"share": True, "stages": 3}),
    "ws-share-bn128": dict(ws={"share": True, "block_n": 128}),
    "ws-share-overlap": dict(ws={"share": True, "overlap": True}),
    "ws-pingpong": dict(ws={"share": True, "overlap": True, "pingpong": True}),
    "ws-pingpong-s3": dict(ws={"share": True, "overlap": True, "pingpong": True, "stages": 3}),
}


def variant(name):
    """A config of VARIANTS, or ``file:PATH``: another copy of fwd.py (carried to the
    device) with its defaults, for A/B runs against an earlier version."""
    if name.startswith("file:"):
        return {"module": name[5:]}
    return VARIANTS[name]


def fwd_fn(cfg):
    """(forward function, config) for a variant."""
    if "module" not in cfg:
        return two_simplicial_fwd, cfg
    return load_module(cfg["module"]).two_simplicial_fwd, {k: v for k, v in cfg.items() if k != "module"}


def rand(*shape, gen, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


CHECK_SHAPES = ((1, 1500, 8, 1, 128, 128, 512, 32), (2, 1100, 4, 4, 128, 128, 300, 20),
                (1, 700, 6, 2, 96, 96, 17, 130), (1, 900, 4, 4, 254, 128, 512, 32))


def check(variants, gen, shapes=CHECK_SHAPES):
    """bf16 out / lse against float64 on reduced shapes (GQA and MHA, windows not multiples of 64)."""
    for B, S, Hq, Hkv, D, Dv, w1, w2 in shapes:
        q = rand(B, S, Hq, D, gen=gen)
        k1, v1, k2, v2 = (rand(B, S, Hkv, d, gen=gen) for d in (D, Dv, D, Dv))
        scale = D ** -0.5
        ro, rl = chunked_two_simplicial_attention(*(t.double() for t in (q, k1, v1, k2, v2)), w1, w2, scale)
        for name, cfg in variants.items():
            out = torch.full((B, S, Hq, Dv), float("nan"), device="cuda", dtype=torch.bfloat16)
            fwd, c = fwd_fn(cfg)
            try:
                o, lse = fwd(q, k1, v1, k2, v2, w1, w2, scale, False, config=c)
            except (ValueError, OutOfResources) as e:  # a variant for part of the shapes (ws)
                print(f"check {name:22s} B{B} S{S} Hq{Hq} Hkv{Hkv} D{D} Dv{Dv} {w1}x{w2}: not taken ({str(e)[:60]})")
                continue
            out.copy_(o)
            eo, el = rel(out, ro), rel(lse, rl)
            bad = not (eo < 1e-2 and el < 1e-2)
            print(f"check {name:22s} B{B} S{S} Hq{Hq} Hkv{Hkv} D{D} Dv{Dv} {w1}x{w2}: out {eo:.2e} lse {el:.2e}"
                  + ("  FAILED" if bad else ""), flush=True)


def time_case(case, case_variants, gen, rounds, rep):
    """Rows (one per variant, and cuDNN's) of one case: medians of ``rounds`` interleaved rounds.
    The case's tensors live in this call only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, S, Hq, Hkv, D, Dv, w1, w2 = CASES[case]
    form = FORMS.get(case, "trilinear")
    Dm = min(D, Dv)                                        # head dim the FLOPs (and cuDNN) use
    flops = 4 * Dm * n_triples(S, w1, w2) * B * Hq
    L = w1 * w2                                            # FLOP-matched cuDNN SDPA, same run
    flops_ref = 4 * S * L * Dm * Hq * B
    q = rand(B, S, Hq, D, gen=gen)
    k1, v1, k2, v2 = (rand(B, S, Hkv, d, gen=gen) for d in (D, Dv, D, Dv))
    sq, sk, sv = rand(B, Hq, S, Dm, gen=gen), rand(B, Hq, L, Dm, gen=gen), rand(B, Hq, L, Dm, gen=gen)

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(sq, sk, sv)
    fns, diffs, base = {}, {}, None
    for name, cfg in case_variants.items():
        fwd, c = fwd_fn(cfg)
        f = (lambda fwd=fwd, c=c: fwd(q, k1, v1, k2, v2, w1, w2, Dm ** -0.5, False, config=c, form=form))
        try:
            out = f()[0]
        except Exception as e:                             # e.g. out of shared memory, or out of scope
            print(f"{case} {name} failed: {str(e)[:200]}", flush=True)
            continue
        diffs[name] = 0.0 if base is None else rel(out, base)
        base = out if base is None else base
        fns[name] = f
    fns["sdpa-cudnn"] = sdpa
    times = {name: [] for name in fns}
    for _ in range(rounds):                                # interleaved: every variant once per round
        for name, f in fns.items():
            times[name].append(triton.testing.do_bench(f, warmup=50, rep=rep, return_mode="median"))
    ref_ms = statistics.median(times["sdpa-cudnn"])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        n_flops = flops if name != "sdpa-cudnn" else flops_ref
        rows.append(dict(case=case, variant=name, ms=ms, ms_rounds=ts, tflops=n_flops / ms / 1e9,
                         x_cudnn=ref_ms / ms * n_flops / flops_ref, rel_diff_vs_first=diffs.get(name)))
        print(f"time {case:10s} {name:22s} {ms:8.3f} ms {n_flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="default", help="comma-separated names of VARIANTS")
    ap.add_argument("--cases", default="gqa64,mha", help="comma-separated case[:variant+variant...] names")
    ap.add_argument("--rep", type=int, default=300, help="do_bench repeat time in ms")
    ap.add_argument("--quick-check", action="store_true", help="check on the first two shapes only")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    ap.add_argument("--out", help="write the table (and device, versions, command) to this JSON file")
    args = ap.parse_args()
    variants = {n: variant(n) for n in args.variants.split(",")}
    gen = torch.Generator(device="cuda").manual_seed(0)
    check(variants, gen, CHECK_SHAPES[:2] if args.quick_check else CHECK_SHAPES)
    rows = []
    for spec in args.cases.split(","):
        case, _, names = spec.partition(":")
        rows += time_case(case, {n: variant(n) for n in names.split("+")} if names else variants, gen, args.rounds,
                          args.rep)
        torch.cuda.empty_cache()
    from twosimplicial.ops.triton.fwd import _two_simplicial_fwd_kernel
    report_kernels([_two_simplicial_fwd_kernel])
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"medians of {args.rounds} rounds")
    print(f"{'case':10s} {'variant':22s} {'ms':>8s} {'TFLOP/s':>8s} {'x cuDNN':>8s}")
    for r in rows:
        print(f"{r['case']:10s} {r['variant']:22s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['x_cudnn']:8.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           date=datetime.date.today().isoformat(), command="python3 -m benchmarks.tuning."
                           "bench_fwd_variants " + " ".join(sys.argv[1:]), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""Run the Triton forward and backward once on one case, for a profiler (ncu) to watch.

    ncu -k regex:_two_simplicial_fwd_kernel -c 1 --section WarpStateStats ... \\
        python3 -m benchmarks.tuning.profile_once --case mha --seq 4096

The first call compiles (not profiled when ``-c 1`` names the second launch with
``--launch-skip 1``); the shapes are the benchmark's cases with a shorter sequence.
"""
from __future__ import annotations

import argparse
import math

import torch

from twosimplicial.ops.triton.bwd import two_simplicial_bwd
from twosimplicial.ops.triton.fwd import two_simplicial_fwd

CASES = {"gqa64": (2, 64, 1, 128), "mha": (1, 16, 16, 128), "mha-d64": (2, 16, 16, 64)}   # B, Hq, Hkv, D


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="mha", choices=sorted(CASES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--w1", type=int, default=512)
    ap.add_argument("--w2", type=int, default=32)
    args = ap.parse_args()
    B, Hq, Hkv, D = CASES[args.case]
    S = args.seq
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)
    q, k1, v1, k2, v2, do = mk(B, S, Hq, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), \
        mk(B, S, Hq, D)
    for _ in range(2):
        out, lse = two_simplicial_fwd(q, k1, v1, k2, v2, args.w1, args.w2, 1 / math.sqrt(D), False)
        two_simplicial_bwd(do, q, k1, v1, k2, v2, out, lse, args.w1, args.w2, 1 / math.sqrt(D), False)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

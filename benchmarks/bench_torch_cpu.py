"""Time and peak memory of the PyTorch path (``backend="torch"``), forward and backward.

Default shape is the issue's bound: B=1, S=8192, H=4, D=64, (w1, w2) = (512, 32), float32.
rss_peak_gb is the whole process's high-water mark (inputs, warm-up and run included).
FLOP convention (docs/math.md, Cost): 4*D per valid triple forward, 2.5x that backward.

    python benchmarks/bench_torch_cpu.py                 # the full S=8192 case
    python benchmarks/bench_torch_cpu.py --seq 1024      # quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import time
from pathlib import Path

import torch

from twosimplicial import two_simplicial_attention
from twosimplicial.models import n_triples


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # ru_maxrss is KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--w1", type=int, default=512)
    p.add_argument("--w2", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--form", default="trilinear", choices=["trilinear", "determinant"])
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    a = p.parse_args(argv)
    dt = getattr(torch, a.dtype)
    B, S, H, Hkv, D = a.batch, a.seq, a.heads, a.kv_heads or a.heads, a.dim
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D, dtype=dt, requires_grad=True)
    k1, v1, k2, v2 = (torch.randn(B, S, Hkv, D, dtype=dt, requires_grad=True) for _ in range(4))
    # warm-up on a prefix long enough for every chunk shape (oneDNN builds a kernel per GEMM shape)
    n = min(S, 4 * max(a.w1, a.w2))
    warm = [t[:, :n].detach().requires_grad_() for t in (q, k1, v1, k2, v2)]
    two_simplicial_attention(*warm, a.w1, a.w2, form=a.form, backend="torch").sum().backward()
    del warm
    base = rss_peak_gb()

    t0 = time.perf_counter()
    out = two_simplicial_attention(q, k1, v1, k2, v2, a.w1, a.w2, form=a.form, backend="torch")
    fwd_s = time.perf_counter() - t0
    fwd_peak = rss_peak_gb()
    t0 = time.perf_counter()
    out.backward(torch.randn_like(out))
    bwd_s = time.perf_counter() - t0
    peak = rss_peak_gb()

    flops = 4 * D * n_triples(S, a.w1, a.w2) * B * H * (2 if a.form == "determinant" else 1)
    row = {
        "shape": {"B": B, "S": S, "Hq": H, "Hkv": Hkv, "D": D, "w1": a.w1, "w2": a.w2, "dtype": a.dtype, "form": a.form},
        "fwd_s": round(fwd_s, 3), "bwd_s": round(bwd_s, 3),
        "fwd_gflops": round(flops / fwd_s / 1e9, 1), "bwd_gflops": round(2.5 * flops / bwd_s / 1e9, 1),
        "rss_before_gb": round(base, 3), "rss_peak_fwd_gb": round(fwd_peak, 3), "rss_peak_gb": round(peak, 3),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(row, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()

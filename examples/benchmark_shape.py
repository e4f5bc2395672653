"""Time 2-simplicial attention at your own shape, forward and backward.

On an NVIDIA GPU the Triton kernels run (``backend="auto"``, bfloat16 by default); elsewhere the
exact PyTorch path does (float32). Each time is the median of ``--repeats`` calls after
``--warmup`` calls (which also compile the kernels). FLOP convention (the project's, SPEC §4):

    forward FLOPs  = 4 * D * B * Hq * sum_i min(i+1, w1) * min(i+1, w2)     (the valid triples)
    backward FLOPs = 2.5 * forward FLOPs

The determinant form is counted at its input head dim ``D``, like the trilinear one. ``--sdpa``
also times dot-product attention (``torch.nn.functional.scaled_dot_product_attention``) of the
same FLOPs (for ``S`` much larger than the windows): query length ``S``, key length ``w1 * w2``,
the same heads and head dim.

    python examples/benchmark_shape.py                       # B=1 S=1024 Hq=4 Hkv=1 D=64 (w1, w2)=(256, 32)
    python examples/benchmark_shape.py --seq 8192 --heads 64 --kv-heads 1 --head-dim 128 --batch 2 --sdpa
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from twosimplicial import two_simplicial_attention
from twosimplicial.models import n_triples

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_fwd_bwd(f, inputs, device, args) -> tuple[float, float | None]:
    """Forward time (no autograd graph) and backward time (the gradient of one retained graph)."""
    def fwd():
        with torch.no_grad():
            f(*inputs)
    fwd_ms = median_ms(fwd, device, args.warmup, args.repeats)
    if args.no_backward:
        return fwd_ms, None
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = f(*leaves)
    grad_out = torch.randn_like(out)
    bwd_ms = median_ms(lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True), device,
                       args.warmup, args.repeats)
    return fwd_ms, bwd_ms


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="B (default: 1)")
    p.add_argument("--seq", type=int, default=1024, help="S (default: 1024)")
    p.add_argument("--heads", type=int, default=4, help="query heads Hq (default: 4)")
    p.add_argument("--kv-heads", type=int, default=1, help="key/value heads Hkv, a divisor of Hq (default: 1)")
    p.add_argument("--head-dim", type=int, default=64, help="D (default: 64)")
    p.add_argument("--w1", type=int, default=256, help="window of (k1, v1) (default: 256)")
    p.add_argument("--w2", type=int, default=32, help="window of (k2, v2) (default: 32)")
    p.add_argument("--form", default="trilinear", choices=["trilinear", "determinant"],
                   help="form of the logits (default: trilinear)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton for CUDA tensors when installed, else PyTorch (default: auto)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported (default: 5)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--sdpa", action="store_true", help="also time FLOP-matched dot-product attention")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "heads", "kv_heads", "head_dim", "w1", "w2", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    B, S, Hq, Hkv, D, w1, w2 = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.w1, args.w2
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)   # noqa: E731
    inputs = (rand(B, S, Hq, D), *(rand(B, S, Hkv, D) for _ in range(4)))             # q, k1, v1, k2, v2

    def attention(q, k1, v1, k2, v2):
        return two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, form=args.form, backend=args.backend)

    flops = 4 * D * B * Hq * n_triples(S, w1, w2)
    tflops = lambda ms, f: f / (ms * 1e-3) / 1e12                                      # noqa: E731
    fwd_ms, bwd_ms = time_fwd_bwd(attention, inputs, device, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}; {str(dtype).removeprefix('torch.')}; B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} "
          f"(w1, w2)=({w1}, {w2}) {args.form}")
    print("FLOPs: 4*D per valid triple forward (sum_i min(i+1,w1)*min(i+1,w2) triples per batch and head), "
          "backward 2.5x the forward")
    bwd_tflops = None if bwd_ms is None else tflops(bwd_ms, 2.5 * flops)
    result = {"device": name, "dtype": str(dtype), "shape": dict(B=B, S=S, Hq=Hq, Hkv=Hkv, D=D, w1=w1, w2=w2),
              "form": args.form, "forward_flops": flops,
              "two_simplicial": {"fwd_ms": fwd_ms, "fwd_tflops": tflops(fwd_ms, flops),
                                 "bwd_ms": bwd_ms, "bwd_tflops": bwd_tflops}}
    rows = [("2-simplicial", result["two_simplicial"])]
    if args.sdpa:
        L = w1 * w2
        sdpa_inputs = (rand(B, Hq, S, D), rand(B, Hkv, L, D), rand(B, Hkv, L, D))
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)  # noqa: E731
        s_fwd, s_bwd = time_fwd_bwd(sdpa, sdpa_inputs, device, args)
        s_flops = 4 * D * B * Hq * S * L
        result["sdpa"] = {"key_len": L, "forward_flops": s_flops, "fwd_ms": s_fwd, "fwd_tflops": tflops(s_fwd, s_flops),
                          "bwd_ms": s_bwd, "bwd_tflops": None if s_bwd is None else tflops(s_bwd, 2.5 * s_flops)}
        rows.append((f"SDPA, key length {L}", result["sdpa"]))
    for label, r in rows:
        bwd = "" if r["bwd_ms"] is None else f"   backward {r['bwd_ms']:9.2f} ms {r['bwd_tflops']:8.4g} TFLOP/s"
        print(f"{label:26s} forward {r['fwd_ms']:9.2f} ms {r['fwd_tflops']:8.4g} TFLOP/s{bwd}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

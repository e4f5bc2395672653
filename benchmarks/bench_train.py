"""Training throughput and model-FLOPs utilisation at the scaling study's sizes (GPU).

    python benchmarks/bench_train.py --config configs/scaling.toml --modes eager,default --out results.json

For each size of the sweep config and both architectures, the training step of ``train.py``
(bf16 autocast, forward and loss, backward, gradient clipping, fused AdamW) on random tokens
of the config's batch shape, in each mode: ``eager``, or a ``torch.compile`` mode of
``train.compile_mode``. Steps are timed after warm-up (which includes compilation) with a
device synchronisation at both ends, over ``--steps`` steps; the median of ``--rounds``
rounds, the modes of one size timed in turn within a round.

FLOPs per token: ``twosimplicial.models.flops_per_token`` (6 x matmul parameters including the
head + attention at 3.5x its forward FLOPs, both architectures' attention counted). MFU is
against the dense bf16 peak of the H100/H200 SXM datasheet (989.4 TFLOP/s) and, beside it,
against a bf16 8192^3 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from twosimplicial.models import TwoSimplicialLM, flops_per_token
from twosimplicial.studies.scaling import load_sweep
from twosimplicial.train import make_optimizer, model_config, train_config

PEAK_BF16 = 989.4e12


def matmul_ceiling() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0)


def make_step(spec, mode: str):
    cfg = spec.cfg
    t = train_config(cfg)
    data = cfg["data"]
    mcfg = model_config(cfg, data["vocab_size"], None, data["seq_len"])
    torch.manual_seed(0)
    model = TwoSimplicialLM(mcfg).cuda()
    fwd = model if mode == "eager" else torch.compile(model, fullgraph=True, mode=mode)
    opt, _ = make_optimizer(model, t, torch.device("cuda"))
    B, S = data["batch_size"], data["seq_len"]
    x = torch.randint(0, mcfg.vocab_size, (B, S), device="cuda")
    y = torch.randint(0, mcfg.vocab_size, (B, S), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, mcfg, B * S


def time_steps(step, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


# Kernel-name patterns of each share of a step's GPU time (--profile), first match wins.
KERNEL_KINDS = (
    ("2-simplicial attention", ("two_simplicial", "_bwd_rows", "_bwd_big_keys", "_delta")),
    ("dot-product attention", ("flash", "fmha", "cudnn", "attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "sm80")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("fused elementwise and reductions (inductor)", ("triton_",)),
)


def profile_step(step, n: int = 3) -> dict:
    """GPU time of ``n`` steps by kernel kind (KERNEL_KINDS, the rest as "other"), beside the
    wall time: the GPU's idle share is the launch and host overhead a small model pays."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    by_kind: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0.0)
        if not us:
            continue
        name = ev.key.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(pt in name for pt in pats)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 1e6 / n
        kernels.append((us / 1e6 / n, ev.key[:120], kind))
    busy = sum(by_kind.values())
    kernels.sort(reverse=True)
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_idle_share": max(0.0, 1 - busy / wall),
            "share_of_wall": {k: v / wall for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": nm, "kind": kd, "share_of_wall": t / wall} for t, nm, kd in kernels[:15]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/scaling.toml")
    p.add_argument("--modes", default="eager,default", help="comma list: eager and/or torch.compile modes")
    p.add_argument("--sizes", default="", help="comma list of size names (default: all)")
    p.add_argument("--archs", default="dot,simplicial")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="also profile each (size, arch, mode): GPU time by kernel kind and the idle share")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_train needs a CUDA GPU")
    sw = load_sweep(args.config)
    modes = args.modes.split(",")
    want = set(args.sizes.split(",")) if args.sizes else None
    specs = [s for s in sw.runs if s.seed == sw.sweep["seeds"][0] and s.arch in args.archs.split(",")
             and (want is None or s.size["name"] in want)]
    ceiling = matmul_ceiling()
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "matmul_bf16_8192_flops": ceiling, "peak_bf16_flops": PEAK_BF16, "config": args.config,
            "flops": "twosimplicial.models.flops_per_token: 6 x matmul params (head included) + 3.5 x attention forward",
            "steps": args.steps, "rounds": args.rounds}
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  bf16 matmul {ceiling / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    for spec in specs:
        steps, tokens, mcfg = {}, None, None
        for mode in modes:
            t0 = time.perf_counter()
            step, mcfg, tokens = make_step(spec, mode)
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            steps[mode] = (step, time.perf_counter() - t0)
        times = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                times[m].append(time_steps(steps[m][0], args.steps))
        fpt = flops_per_token(mcfg, spec.cfg["data"]["seq_len"])["total"]
        for m in modes:
            sec = statistics.median(times[m])
            tps = tokens / sec
            row = {"size": spec.size["name"], "arch": spec.arch, "mode": m, "tokens_per_s": tps,
                   "step_s_rounds": times[m], "warmup_s": steps[m][1], "flops_per_token": fpt,
                   "mfu_peak": tps * fpt / PEAK_BF16, "mfu_measured": tps * fpt / ceiling}
            if args.profile:
                row["profile"] = profile_step(steps[m][0])
            rows.append(row)
            print(f"{row['size']:>8} {row['arch']:>10} {m:>26}  {tps / 1e6:6.3f}M tok/s  MFU {row['mfu_peak']:5.1%} "
                  f"({row['mfu_measured']:5.1%} of measured)  warm-up {row['warmup_s']:5.1f} s", flush=True)
            if args.profile:
                pr = row["profile"]
                print("          GPU idle {:.0%}; ".format(pr["gpu_idle_share"]) + ", ".join(
                    f"{k} {v:.0%}" for k, v in pr["share_of_wall"].items()), flush=True)
        del steps
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))   # each size as it lands
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Device script for the Triton backward (twosimplicial/ops/triton/bwd.py): check, then time variants.

    python3 -m benchmarks.tuning.bench_bwd_variants --out $OUT/bwd.json [--quick] [--no-checks]
        [--variants '{"gqa64": [["v6", null], ["n32", {"BN": 32}], ["old", {"module": "path/to/old.py"}]],
                      "mha": [...]}']

``--variants`` times named tile configurations (keys of ``bwd_config``), or another copy of
bwd.py (``module``, a file carried to the device) for A/B comparisons in one run.

1. Correctness on a reduced problem: bf16/fp16/fp32 gradients vs float64 autograd through the
   memory-bounded torch path (``chunked``), relative errors; determinism (bitwise reruns).
2. Timing (bf16, the issue's ``gqa64`` and ``mha`` shapes, (w1, w2) = (512, 32)): the backward
   per tile configuration, per-kernel times from the profiler, and cuDNN SDPA backward
   FLOP-matched (q length S, kv length w1 * w2) in the same run. FLOPs: docs/math.md, Cost: 2.5 * 4 * D
   per valid triple.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

from twosimplicial.models import n_triples
from twosimplicial.ops.triton.bwd import two_simplicial_bwd


def inputs(B, S, Hq, Hkv, D, Dv, dtype, seed=0, mult=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, device="cuda", dtype=torch.float32) * mult).to(dtype)
    return mk(B, S, Hq, D), mk(B, S, Hkv, D), mk(B, S, Hkv, Dv), mk(B, S, Hkv, D), mk(B, S, Hkv, Dv), mk(B, S, Hq, Dv)


def fwd_out_lse(q, k1, v1, k2, v2, w1, w2, scale, form="trilinear"):
    try:
        from twosimplicial.ops.triton.fwd import two_simplicial_fwd
        return two_simplicial_fwd(q, k1, v1, k2, v2, w1, w2, scale, False, form=form)
    except Exception as e:  # the forward helper's kernel may be mid-edit: fall back to torch
        print("triton fwd unavailable:", repr(e)[:200])
        from twosimplicial.ops.chunked import chunked_two_simplicial_attention
        from twosimplicial.ops.forms import REGISTRY
        q, k1, k2 = REGISTRY[form].to_trilinear(q, k1, k2)
        out, lse = chunked_two_simplicial_attention(*(x.float() for x in (q, k1, v1, k2, v2)), w1, w2, scale)
        return out.to(q.dtype), lse.float()


def check(rows, B, S, Hq, Hkv, D, Dv, w1, w2, dtype, mult=1.0, triton_fwd=False):
    """Gradients vs float64 autograd; out/lse from the float64 path, or from the Triton
    forward (``triton_fwd``: the pairing used in training)."""
    from twosimplicial.ops.chunked import chunked_two_simplicial_attention
    q, k1, v1, k2, v2, do = inputs(B, S, Hq, Hkv, D, Dv, dtype, seed=S + Hq + D, mult=mult)
    scale = 1.0 / math.sqrt(D)
    xs = [x.double().requires_grad_() for x in (q, k1, v1, k2, v2)]
    out, lse = chunked_two_simplicial_attention(*xs, w1, w2, scale)
    ref = torch.autograd.grad(out, xs, do.double())
    out, lse = out.detach().to(dtype), lse.detach().float()
    if triton_fwd:
        out, lse = fwd_out_lse(q, k1, v1, k2, v2, w1, w2, scale)
    args = (do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, False)
    g1 = two_simplicial_bwd(*args)
    g2 = two_simplicial_bwd(*args)
    errs = [((a.double() - r).norm() / r.norm()).item() for a, r in zip(g1, ref)]
    det = all(torch.equal(a, b) for a, b in zip(g1, g2))
    finite = all(bool(torch.isfinite(a).all()) for a in g1)
    row = dict(kind="check", shape=[B, S, Hq, Hkv, D, Dv, w1, w2], dtype=str(dtype), mult=mult, triton_fwd=triton_fwd,
               rel_err=dict(zip(["dq", "dk1", "dv1", "dk2", "dv2"], errs)), deterministic=det, finite=finite)
    rows.append(row)
    print(f"check {row['shape']} {dtype} x{mult} fwd={'triton' if triton_fwd else 'f64'}: " + " ".join(f"{e:.1e}" for e in errs), "det", det, "finite", finite,
          flush=True)


def load_module(path):
    """Another copy of ``fwd.py`` or ``bwd.py`` (e.g. an earlier version), loaded as a module of
    the package ``twosimplicial.ops.triton`` so that its relative imports resolve."""
    import importlib.util

    import twosimplicial.ops.triton  # noqa: F401  (the package of the copy's relative imports)
    name = "twosimplicial.ops.triton._variant_" + path.replace("/", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def report_kernels(kernels):
    """Registers, spills and shared memory of every compiled version of ``kernels`` (Triton
    JITFunctions of this process), and what ptxas -v says about them (C7514: serialised wgmma)."""
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    for fn in kernels:
        for caches in fn.device_caches.values():
            for key, k in caches[0].items():
                line = (f"{fn.fn.__name__} regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared} "
                        f"warps {k.metadata.num_warps} stages {k.metadata.num_stages} key {str(key)[-160:]}")
                with tempfile.TemporaryDirectory() as d:
                    open(f"{d}/k.ptx", "w").write(k.asm["ptx"])
                    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                                       capture_output=True, text=True)
                    notes = [x.strip() for x in (r.stdout + r.stderr).splitlines() if "C75" in x or "spill" in x]
                print(line, "|", " ; ".join(notes)[:300], flush=True)


def kernel_times(fn):
    from torch.profiler import profile, ProfilerActivity
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    t = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            name = e.key[:40]
            t[name] = t.get(name, 0.0) + e.device_time_total / 1e3
    return {k: round(v, 3) for k, v in sorted(t.items(), key=lambda kv: -kv[1])[:6]}


CASES = {  # name: (B, S, Hq, Hkv, D, w1, w2), bf16, Dv = D
    "gqa64": (2, 8192, 64, 1, 128, 512, 32),
    "mha": (1, 8192, 16, 16, 128, 512, 32),
    # the weak window shapes of issue 18
    "w256x64": (1, 8192, 16, 16, 128, 256, 64),
    "w128x128": (1, 8192, 16, 16, 128, 128, 128),
    # the LM shapes of issue 18
    "lm-h4-d64": (16, 1024, 4, 4, 64, 512, 32),
    "lm-h8-d64": (8, 2048, 8, 8, 64, 512, 32),
    "lm-h2-d128": (16, 1024, 2, 2, 128, 512, 32),
    # the determinant form at the mha shape (native kernels, head dim D; FORMS below)
    "det": (1, 8192, 16, 16, 128, 512, 32),
}
FORMS = {"det": "determinant"}   # the form of a case (default: trilinear)


def time_case(rows, name, B, S, Hq, Hkv, D, w1, w2, configs):
    dtype = torch.bfloat16
    q, k1, v1, k2, v2, do = inputs(B, S, Hq, Hkv, D, D, dtype)
    scale = 1.0 / math.sqrt(D)
    form = FORMS.get(name, "trilinear")
    out, lse = fwd_out_lse(q, k1, v1, k2, v2, w1, w2, scale, form)
    flops = 2.5 * 4 * D * n_triples(S, w1, w2) * B * Hq
    first = None
    for cname, cfg in configs:
        bwd = two_simplicial_bwd
        if cfg and "module" in cfg:   # another version of bwd.py (a file path), for A/B runs
            cfg = dict(cfg)
            bwd = load_module(cfg.pop("module")).two_simplicial_bwd
            cfg = cfg or None
        fn = lambda: bwd(do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, False, config=cfg, form=form)
        try:
            grads = fn()
            if first is None:
                first, diff = grads, 0.0
            else:   # every variant must compute what the first one does (bf16 rounding apart)
                diff = max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(grads, first))
            del grads
            ms = triton.testing.do_bench(fn, warmup=100, rep=600, return_mode="median")
            kt = kernel_times(fn)
        except Exception as e:
            print(name, cname, "FAILED", repr(e)[:300], flush=True)
            continue
        rows.append(dict(kind="time", case=name, impl=f"twosimplicial[{cname}]", bwd_ms=ms,
                         bwd_tflops=flops / ms / 1e9, kernels=kt, rel_diff_vs_first=diff))
        print(f"{name:8s} {cname:28s} {ms:9.2f} ms {flops / ms / 1e9:7.1f} TFLOP/s (vs first {diff:.1e}) {kt}",
              flush=True)
    # cuDNN SDPA backward, FLOP-matched: q length S, kv length w1 * w2, same heads and D
    from torch.nn.attention import sdpa_kernel, SDPBackend
    L = w1 * w2
    qq = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, requires_grad=True)
    kk = torch.randn(B, Hq, L, D, device="cuda", dtype=dtype, requires_grad=True)
    vv = torch.randn(B, Hq, L, D, device="cuda", dtype=dtype, requires_grad=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
        g = torch.randn_like(o)
        fn = lambda: torch.autograd.grad(o, (qq, kk, vv), g, retain_graph=True)
        ms = triton.testing.do_bench(fn, warmup=100, rep=600, return_mode="median")
    sflops = 2.5 * 4 * D * S * L * B * Hq
    rows.append(dict(kind="time", case=name, impl="sdpa-cudnn", bwd_ms=ms, bwd_tflops=sflops / ms / 1e9))
    print(f"{name:8s} {'sdpa-cudnn':28s} {ms:9.2f} ms {sflops / ms / 1e9:7.1f} TFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bwd.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="timing only (the GPU tests check)")
    ap.add_argument("--configs", default="default")
    ap.add_argument("--variants", default=None,
                    help='JSON {case: [[name, cfg], ...], ...} for cases of CASES (gqa64, mha, w256x64, '
                         'w128x128, lm-*, det); cfg may name a "module" file')
    a = ap.parse_args()
    rows = []
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    # ceilings: bf16 matmul
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: x @ x, return_mode="median")
    print(f"bf16 matmul 8192^3: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s", flush=True)
    rows.append(dict(kind="ceiling", matmul_tflops=2 * 8192 ** 3 / ms / 1e9))
    del x
    checks = not a.no_checks
    checks and check(rows, 1, 1000, 4, 4, 64, 64, 256, 32, torch.bfloat16)
    checks and check(rows, 1, 777, 8, 1, 128, 128, 512, 32, torch.bfloat16)
    checks and check(rows, 1, 2048, 4, 2, 128, 128, 512, 32, torch.bfloat16, mult=30.0, triton_fwd=True)
    checks and check(rows, 1, 2048, 4, 2, 128, 128, 512, 32, torch.bfloat16, triton_fwd=True)
    # keys kernel: KBI positions x KBH heads x KBT offsets rows against KBN keys
    def sweep(kbh_all):
        v = {
            "default": None,
            "k32rows": dict(KBI=1, KBH=1, KBT=32),
            "k-n32": dict(KBN=32),
            "k-n128": dict(KBN=128),
            "k128rows-n32": dict(KBI=4 // kbh_all, KBH=kbh_all, KBT=32, KBN=32),
            "k-w4": dict(k_warps=4),
        }
        if a.configs == "final":   # rows kernel: 64-row tiles against 128 keys
            v = {"default": None, "rows64-n128": dict(BI=2 // kbh_all, BH=kbh_all, BT=32, BN=128)}
        return list(v.items()) if a.configs in ("sweep", "final") else [("default", None)]
    def save():   # after every case, atomically: a run stopped by a timeout keeps what it timed
        with open(a.out + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    var = json.loads(a.variants) if a.variants else None
    if not a.quick:
        for name in var or ("gqa64", "mha"):
            configs = var[name] if var else sweep((4 if a.configs == "sweep" else 2) if name == "gqa64" else 1)
            time_case(rows, name, *CASES[name], configs)
            save()
    from twosimplicial.ops.triton.bwd import _bwd_big_keys, _bwd_rows
    report_kernels([_bwd_big_keys, _bwd_rows])
    save()


if __name__ == "__main__":
    main()

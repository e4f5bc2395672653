"""PTX hashes of the Triton kernels, for proving that a refactor changed no generated code.

    python -m benchmarks.tuning.ptx_hash [--cases NAME,...] [--json FILE] [--dump DIR]
        [--ptxas] [--fwd-config JSON] [--bwd-config JSON]

Compiles the forward and the backward kernels for Hopper (sm_90) on a machine without a GPU:
a stand-in driver supplies the target and every launch becomes ``warmup`` (compile, launch
nothing), with the GPU's launch configurations and GPU-only constants. The host code runs as on
the GPU otherwise (plans, tile choices, descriptors), on CPU tensors. The PTX is normalised
before hashing (debug sections, ``.loc`` / ``.file`` line info and comments removed, the kernel's
name and its parameters renamed ``kernel`` / ``kernel_param_N``), so that renaming a file, a
kernel or a helper leaves the hash alone while any change of the generated code changes it.
Prints one line per (case, kernel) and writes the hashes as JSON; ``--dump`` also writes the
normalised PTX, to diff two runs.

``--ptxas`` also assembles each kernel for sm_90a with the ptxas that ships with triton and
prints its registers and spill bytes: an offline look at register pressure (e.g. across tile
configurations, ``--bwd-config '{"BI": 4, "BT": 16}'``; the configs override every case's). The
PTX of the installed triton is not the GPU's triton's, so the numbers are a guide for what to time,
not a measurement: the backward's rows kernel at the mha shape spilled 1272 bytes under triton
3.6 on the device and 1184 under triton 3.9 here. Run under the device's triton (a second
environment, docs/kernels.md, Tuning harnesses), it reports what the device's compiler does.

Run it before and after a change with the same triton: equal hashes mean the same kernels
(no change of speed or results possible). It compiles with whatever triton is installed; the
hashes of two triton versions are not comparable. Unset ``TRITON_INTERPRET`` first (it is
removed here), or the kernels would be interpreted, not compiled.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# name: (B, S, Hq, Hkv, D, Dv, w1, w2, dtype, allow_tf32, scale, forward config overrides)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = {
    "mha-64x16": (1, 1024, 4, 4, 64, 64, 64, 16, BF16, False, 0.125, {}),           # 4-position tiles: narrow blocks
    "mha-512x32": (1, 1024, 4, 4, 64, 64, 512, 32, BF16, False, 0.125, {}),         # 2-position tiles: edge product
    "mha-512x32-narrow": (1, 1024, 4, 4, 64, 64, 512, 32, BF16, False, 0.125, {"edge_dot": False}),
    "gqa64": (1, 1024, 64, 1, 128, 128, 512, 32, BF16, False, 0.125, {}),          # 1-position tiles
    "mha-d128": (1, 1024, 4, 4, 128, 128, 512, 32, BF16, False, 0.125, {}),       # the mha tiles
    "fp16": (1, 1024, 4, 4, 64, 64, 512, 32, FP16, False, 0.125, {}),
    "fp32-ieee": (1, 512, 4, 2, 64, 64, 128, 32, FP32, False, 0.125, {}),
    "fp32-tf32": (1, 512, 4, 2, 64, 64, 128, 32, FP32, True, 0.125, {}),
    "d48": (1, 512, 4, 2, 48, 48, 100, 20, BF16, False, 0.125, {}),                # pointer loads, masked head dim
    "w256x128": (1, 1024, 4, 4, 64, 64, 256, 128, BF16, False, 0.125, {}),         # 128-row tiles (ws > 64)
    "w300x200": (1, 1024, 4, 4, 64, 64, 300, 200, BF16, False, 0.125, {}),         # forward chunk loop (ws > T)
    "s1": (2, 1, 4, 2, 64, 64, 1, 1, BF16, False, 0.125, {}),                      # integer args of 1 specialised
    "negative-scale": (1, 1024, 4, 4, 64, 64, 512, 32, BF16, False, -0.125, {}),
    "wide-d254": (1, 512, 4, 4, 254, 128, 512, 32, BF16, False, 0.125, {}),        # determinant form's head
    "int64": (1, 1024, 4, 4, 64, 64, 512, 32, BF16, False, 0.125, {"int64_idx": True}),
    "det-mha": (1, 1024, 4, 4, 128, 128, 512, 32, BF16, False, 0.125, {}),         # the determinant form at D
    "det-gqa64": (1, 1024, 64, 1, 128, 128, 512, 32, BF16, False, 0.125, {}),
    "det-k1-small": (1, 512, 4, 2, 64, 64, 32, 100, BF16, False, 0.125, {}),       # sgn = -1
    # the warp-specialised Gluon forward (fwd_ws.py; forward only): its own rings; pairs of head
    # blocks with FA3's order and ping-pong; pairs of position blocks (MHA)
    "ws-gqa64": (1, 1024, 64, 1, 128, 128, 512, 32, BF16, False, 0.125, {"ws": {}}),
    "ws-gqa64-pingpong": (1, 1024, 64, 1, 128, 128, 512, 32, BF16, False, 0.125,
                          {"ws": {"share": True, "overlap": True, "pingpong": True}}),
    "ws-mha-share": (1, 1024, 4, 4, 64, 64, 512, 32, BF16, False, -0.125, {"ws": {"share": True}}),
    # the warp-specialised Gluon keys kernel of the backward (bwd_ws.py; that kernel only)
    "keys-ws-gqa64": (1, 1024, 64, 1, 128, 128, 512, 32, BF16, False, 0.125, {"keys_ws": {}}),
    "keys-ws-mha": (1, 1024, 4, 4, 128, 128, 512, 32, BF16, False, -0.125, {"keys_ws": {}}),
    "keys-ws-mha-d64": (1, 1024, 4, 4, 64, 64, 512, 32, FP16, False, 0.125, {"keys_ws": {}}),
    "keys-ws-s1": (2, 1, 4, 2, 64, 64, 1, 1, BF16, False, 0.125, {"keys_ws": {}}),   # integer args of 1 specialised
    "keys-ws-stage-pingpong": (1, 1024, 4, 4, 128, 128, 512, 32, BF16, False, -0.125,
                               {"keys_ws": {"stage": True, "stages": 3, "pingpong": True}}),
}
# cases named det-* compile the kernels' native determinant form (FORM = +-1); the others the trilinear
# the kernels of each phase, in launch order
FWD_NAMES = ("clean", "fwd")           # fwd.clean_values, then the forward
WS_NAMES = ("ws",)                     # the Gluon forward alone
KEYS_WS_NAMES = ("keys_ws",)           # the Gluon keys kernel alone
BWD_NAMES = ("delta", "keys", "rows", "sum_dks", "sum_dvs")


class StandIn:
    """The driver calls the host code and ``warmup`` make, without a GPU."""
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")


def normalise(ptx: str) -> str:
    """PTX without debug sections, line info and comments, the kernel named ``kernel``."""
    lines, in_debug = [], False
    for line in ptx.splitlines():
        line = line.split("//")[0].rstrip()
        s = line.strip()
        if s.startswith(".section") and ".debug" in s:
            in_debug = "}" not in s                      # a one-line section ends where it starts
            continue
        if in_debug:
            in_debug = s != "}"
            continue
        if not s or s.startswith((".loc", ".file")) or re.fullmatch(r"\$L__(tmp|func_end|func_begin)\d+:", s):
            continue
        lines.append(line)
    text = "\n".join(lines) + "\n"
    name = re.search(r"\.entry\s+([\w$]+)\s*\(", text).group(1)
    return re.sub(rf"\b{re.escape(name)}(?=\b|_param_)", "kernel", text)


class _Compile:
    """Stands for a kernel launcher: ``[grid](*args, **kw)`` compiles with ``warmup`` instead."""
    def __init__(self, fn, sink, gpu_constants):
        self.fn, self.sink, self.gpu_constants = fn, sink, gpu_constants

    def __getitem__(self, grid):
        def launch(*args, **kw):
            kw.update({k: v for k, v in self.gpu_constants.items() if k in kw})
            self.sink.append((self.fn.fn.__name__, self.fn.warmup(*args, grid=grid, **kw).asm["ptx"]))
        return launch


def _hook(sink):
    """Make the host code choose the GPU's configurations and kernels, and compile, not launch:
    returns (forward, backward) entry points."""
    from twosimplicial.ops.triton import bwd, fwd
    fwd_config, bwd_config = fwd.fwd_config, bwd.bwd_config
    fwd.fwd_config = lambda gqa, ws, D, Dv, interpret, **k: fwd_config(gqa, ws, D, Dv, False, **k)
    bwd.bwd_config = lambda device, *a, **k: bwd_config(torch.device("cuda"), *a, **k)
    fwd.kernel = lambda fn, device: _Compile(fn, sink, {})
    from twosimplicial.ops.triton import fwd_ws
    fwd_ws.kernel = fwd.kernel
    fwd_ws.sm_count = lambda device: 132           # the persistent Gluon grid: one program per SM of an H100 / H200
    from twosimplicial.ops.triton import bwd_ws
    bwd_ws.kernel = fwd.kernel
    # GPU-only constants the host code derives from the tensors' device: the delta kernel's
    # block of positions, the rows kernel's bf16 0/1-matrix products
    bwd.kernel = lambda fn, device: _Compile(fn, sink, {"BS": 64, "ONEHOT_BF16": True})
    return fwd.two_simplicial_fwd, bwd.two_simplicial_bwd


@functools.cache
def _ptxas() -> str:
    """The newest ptxas triton ships (the one that reads the PTX versions the installed triton writes)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

    def version(exe):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        return tuple(int(x) for x in re.search(r"release (\d+)\.(\d+)", out).groups())
    return max((os.path.join(bin_dir, n) for n in os.listdir(bin_dir) if n.startswith("ptxas")), key=version)


def ptxas_usage(ptx: str) -> str:
    """Registers and spill bytes of ``ptx`` for sm_90a (``ptxas -v``, :func:`_ptxas`)."""
    exe = _ptxas()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode:
        return "ptxas failed: " + text.strip().splitlines()[0]
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    warn = " (" + "; ".join(sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss", text)))) + ")" \
        if "Performance Loss" in text else ""
    return f"regs {regs.group(1)}, spills {spill.group(1)} / {spill.group(2)} bytes{warn}"


def run_case(name, fwd, bwd, sink, fwd_config=None, bwd_config=None):
    B, S, Hq, Hkv, D, Dv, w1, w2, dtype, tf32, scale, config = CASES[name]
    config = {**config, **(fwd_config or {})}
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    k1, k2 = (torch.randn(B, S, Hkv, D, generator=g).to(dtype) for _ in range(2))
    v1, v2 = (torch.randn(B, S, Hkv, Dv, generator=g).to(dtype) for _ in range(2))
    out = torch.randn(B, S, Hq, Dv, generator=g).to(dtype)
    hashes = {}
    form = "determinant" if name.startswith("det-") else "trilinear"
    phases = (("fwd", lambda: fwd(q, k1, v1, k2, v2, w1, w2, scale, tf32, config=config, form=form)),
              ("bwd", lambda: bwd(torch.randn_like(out), q, k1, v1, k2, v2, out, torch.zeros(B, Hq, S),
                                  w1, w2, scale, tf32, config=bwd_config, form=form)))
    if "ws" in config:   # the Gluon forward takes CUDA tensors only: its entry point, on the canonical problem
        from twosimplicial.ops.plan import make_plan
        from twosimplicial.ops.triton.fwd_ws import canonical_fwd_ws
        plan = make_plan(q.shape, v1.shape, w1, w2, dtype, tf32)
        counts = torch.zeros(2, B, Hkv, S, dtype=torch.int32)
        phases = (("ws", lambda: canonical_fwd_ws(plan, q, *plan.split(k1, v1, k2, v2), (counts[0], counts[1]), scale,
                                                  **config["ws"])), )
    if "keys_ws" in config:   # the Gluon keys kernel (CUDA tensors only): its entry point, on the canonical problem
        from twosimplicial.ops.plan import make_plan
        from twosimplicial.ops.triton.bwd import bwd_config
        from twosimplicial.ops.triton.bwd_ws import keys_ws
        plan = make_plan(q.shape, v1.shape, w1, w2, dtype, tf32)
        ks, vs, kb, vb = plan.split(k1, v1, k2, v2)
        cfg = bwd_config(torch.device("cuda"), plan.ws, plan.gqa, D, Dv, q.element_size())
        lse = torch.zeros(B, Hq, S)
        phases = (("keys_ws", lambda: keys_ws(q, ks, vs, kb, vb, out, lse, lse, torch.empty_like(kb),
                                              torch.empty_like(vb), plan.ws, plan.wb, scale,
                                              (cfg["KBI"], cfg["KBH"], cfg["KBT"]), **config["keys_ws"])), )
    for phase, call in phases:
        sink.clear()
        call()
        labels = {"fwd": FWD_NAMES, "bwd": BWD_NAMES, "ws": WS_NAMES, "keys_ws": KEYS_WS_NAMES}[phase]
        assert len(sink) == len(labels), [n for n, _ in sink]
        for label, (fn_name, ptx) in zip(labels, sink):
            norm = normalise(ptx)
            hashes[label] = dict(sha256=hashlib.sha256(norm.encode()).hexdigest()[:16], function=fn_name, ptx=norm,
                                 raw=ptx)
    return hashes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated names of CASES")
    ap.add_argument("--json", help="write {case: {kernel: hash}} here")
    ap.add_argument("--dump", help="write the normalised PTX of each (case, kernel) into this folder")
    ap.add_argument("--ptxas", action="store_true", help="print each kernel's registers and spills (sm_90a)")
    ap.add_argument("--fwd-config", type=json.loads, default=None, help="JSON overrides of every case's forward config")
    ap.add_argument("--bwd-config", type=json.loads, default=None, help="JSON overrides of bwd_config for every case")
    args = ap.parse_args(argv)
    driver.set_active(StandIn())
    sink = []
    fwd, bwd = _hook(sink)
    result = {"triton": triton.__version__, "hashes": {}}
    for name in args.cases.split(","):
        t = time.time()
        hashes = run_case(name, fwd, bwd, sink, args.fwd_config, args.bwd_config)
        result["hashes"][name] = {k: v["sha256"] for k, v in hashes.items()}
        for kernel, v in hashes.items():
            usage = "  " + ptxas_usage(v["raw"]) if args.ptxas else ""
            print(f"{name:20s} {kernel:6s} {v['sha256']}  ({v['function']}){usage}", flush=True)
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{name}.{kernel}.ptx"), "w") as f:
                    f.write(v["ptx"])
        print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

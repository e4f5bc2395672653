"""Kernel benchmark (issues 3 and 18): this library's 2-simplicial attention, forward and backward,
against FLOP-matched dot-product attention (torch SDPA, cuDNN) timed in the same run.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--cases issue|table1|all|NAME,...] [--quick]
        [--rounds N] [--impls twosimplicial,sdpa-cudnn,...] [--out DIR] [--tag NAME] [--budget-s S]
    ... --shapes model --preset small [--set simplicial_every=4 --set form=determinant] [--batch B] [--seq S]
    ... --shapes sweep --config configs/scaling.toml [--set sweep.sizes=...]
    ... --list                     # the selected cases: shapes, FLOPs, targets, estimated seconds
    ... --device cpu               # smoke mode: every case shrunk to a tiny shape, PyTorch path vs CPU SDPA

Cases (bf16, S = 8192 and windows (w1, w2) = (512, 32) unless named; the issue-18 table):
``gqa64`` B2 Hq64 Hkv1 D128; ``mha`` B1 H16 D128; ``mha-d64`` B2 H16 D64; ``gqa8`` B1 Hq32 Hkv4
D128; ``mha-w1024x16``, ``mha-w256x64``, ``mha-w128x128`` the mha shape with those windows;
``lm-b16-s1024-h4-d64``, ``lm-b8-s2048-h8-d64``, ``lm-b16-s1024-h2-d128`` (MHA); ``det`` the
determinant form at the mha shape, on the path the op takes (the kernels' native determinant:
docs/kernels.md, The determinant form at head dim D), ``det-transform`` the same through its
transform to a trilinear form of about 2D. Group ``table1``: ``table1-<w1>x<w2>``, the paper's window grid
at the gqa64 shape. Every case runs forward and backward. ``--shapes model`` makes one case
``model-<preset>-b<B>-s<S>`` from a ``twosimplicial.models.ModelConfig`` preset (+ ``--set
field=value``): the shape of its 2-simplicial layers (``simplicial_heads``, ``simplicial_kv_heads``,
``simplicial_head_dim``, ``w1``, ``w2``, ``form``), batch ``--batch`` (default 16k tokens / S) and
sequence ``--seq`` (default ``max_seq_len``). ``--shapes sweep`` makes one case ``sweep-<size>``
per size of a sweep config, at its ``[data]`` batch_size and seq_len.

Impls: ``twosimplicial`` (the public op ``two_simplicial_attention``, backend ``triton`` on a GPU,
``torch`` on a CPU); ``torch`` (the public op's PyTorch backend); ``sdpa-cudnn`` / ``sdpa-flash``
/ ``sdpa-efficient`` / ``sdpa-math``: torch SDPA with that backend, ``sdpa`` torch's own choice:
non-causal, q length S, kv length w1*w2, Hq heads for q, k and v, the same head dim: the
FLOP-matched dot-product baseline. Ratios are to ``--ref`` (``sdpa-cudnn``; ``sdpa`` on a CPU).

FLOPs (docs/kernels.md, FLOPs): ``4 * D`` per valid triple forward (``sum_i min(i+1,w1)
min(i+1,w2)`` triples per batch element and query head), 2.5x that backward; SDPA ``4*S*Lkv*D*H*B``
forward, 2.5x backward. D is the model's head dim for every form (``det``'s kernels run at about
2D: its TFLOP/s are useful work, comparable to ``mha``). A ratio is TFLOP/s over the reference's.

Times: the impls of a case are timed in ``--rounds`` interleaved rounds (ours, cuDNN, ..., ours,
cuDNN, ...), each a ``triton.testing.do_bench`` median (``--warmup-ms``, ``--rep-ms``); a row
reports the median over its rounds and keeps them all (``fwd_ms_rounds``, ``bwd_ms_rounds``, and
per-round ratios ``fwd_ratio_rounds``, ``bwd_ratio_rounds``: the run-to-run noise that
``compare_kernels.py`` uses). ``--quick``: 3 rounds, do_bench 10/50 ms, the issue's cases.

Output: ``<out>/<tag>.json`` (default tag ``<gpu>-<date>``), rewritten after every case, as
``{"device", "torch", "triton", "date", "flops", "method", "ratio_to", "package", "cases",
"rows": [{"case", "impl", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "fwd_ratio",
"bwd_ratio", "target_fwd", "target_bwd", ...}], "skipped"}``, and ``<out>/<tag>.png``: per case,
our forward and backward ratio to the reference with the issue's targets (forward / backward:
0.70 / 0.55 at the gqa64 and mha shapes, 0.55 / 0.45 for other trilinear shapes, 0.30 / 0.20 for
the determinant form).

Estimated time (``--list`` prints it per case; H100-level rates, cold Triton cache): compile about
12 s per case (25 s for the determinant form) plus, per round, ``6t + max(t, warmup) + max(t,
rep)`` per (impl, direction) of duration t. ``--budget-s`` skips the cases that would not fit.

``--tune`` first sweeps forward launch configurations on gqa64 / mha / mha-d64 and prints them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

try:
    from twosimplicial.models.flops import n_triples
except ImportError:      # a package from before n_triples (the BEFORE side of device_kernels_bench.sh): its own count
    from twosimplicial.models.flops import _mean_triples

    def n_triples(S: int, w1: int, w2: int) -> int:
        return round(_mean_triples(S, w1, w2) * S)
from twosimplicial.ops import forms
from twosimplicial.train import parse_value

FLOP_CONVENTION = ("forward 4*D FLOPs per valid triple (i, j, k) with i-w1 < j <= i, i-w2 < k <= i, per batch "
                   "element and query head, D the model's head dim for every form (useful FLOPs); backward 2.5x "
                   "the forward; FLOP-matched SDPA: non-causal, q length S, kv length w1*w2, Hq heads, same D, "
                   "4*B*Hq*S*w1*w2*D forward, 2.5x backward; ratio = TFLOP/s over the reference impl's, same run")


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    w1: int
    w2: int
    form: str = "trilinear"
    native: bool | None = None     # forms.Form.native forced on / off for the case; None: the registry's
    group: str = "issue"           # issue | table1 | model | sweep
    layers: int | None = None      # model / sweep: how many 2-simplicial layers have this shape
    target: tuple | None = None    # (forward, backward) ratio to cuDNN; None: the issue-18 rule below

    def __post_init__(self):
        if self.target is None:                            # kept by replace(), e.g. a tiny CPU shape
            object.__setattr__(self, "target", self.issue_target())

    @property
    def shape(self) -> str:
        f = "" if self.form == "trilinear" else f" {self.form}" + {None: "", True: " native", False: " transform"}[self.native]
        return f"B{self.B} S{self.S} Hq{self.Hq} Hkv{self.Hkv} D{self.D} {self.w1}x{self.w2}{f}"

    @property
    def flops(self) -> float:
        """Forward FLOPs of the 2-simplicial op by the convention (backward: 2.5x)."""
        return 4.0 * self.D * n_triples(self.S, self.w1, self.w2) * self.B * self.Hq

    @property
    def sdpa_flops(self) -> float:
        """Forward FLOPs of the FLOP-matched SDPA (kv length w1*w2; backward: 2.5x)."""
        return 4.0 * self.B * self.Hq * self.S * self.w1 * self.w2 * self.D

    def issue_target(self) -> tuple[float, float]:
        """The issue-18 targets (forward, backward ratio to cuDNN) for this case's shape and form."""
        if self.form != "trilinear":
            return TARGET_DET
        if (self.B, self.S, self.Hq, self.Hkv, self.D, self.w1, self.w2) in MAIN_SHAPES:
            return TARGET_MAIN
        return TARGET_TRILINEAR


TARGET_MAIN, TARGET_TRILINEAR, TARGET_DET = (0.70, 0.55), (0.55, 0.45), (0.30, 0.20)
MAIN_SHAPES = {(2, 8192, 64, 1, 128, 512, 32), (1, 8192, 16, 16, 128, 512, 32)}   # gqa64, mha

ISSUE = [
    Case("gqa64", 2, 8192, 64, 1, 128, 512, 32),
    Case("mha", 1, 8192, 16, 16, 128, 512, 32),
    Case("mha-d64", 2, 8192, 16, 16, 64, 512, 32),
    Case("gqa8", 1, 8192, 32, 4, 128, 512, 32),
    Case("mha-w1024x16", 1, 8192, 16, 16, 128, 1024, 16),
    Case("mha-w256x64", 1, 8192, 16, 16, 128, 256, 64),
    Case("mha-w128x128", 1, 8192, 16, 16, 128, 128, 128),
    Case("lm-b16-s1024-h4-d64", 16, 1024, 4, 4, 64, 512, 32),
    Case("lm-b8-s2048-h8-d64", 8, 2048, 8, 8, 64, 512, 32),
    Case("lm-b16-s1024-h2-d128", 16, 1024, 2, 2, 128, 512, 32),
    Case("det", 1, 8192, 16, 16, 128, 512, 32, form="determinant"),
    Case("det-transform", 1, 8192, 16, 16, 128, 512, 32, form="determinant", native=False),
]
TABLE1 = [(1024, 32), (512, 64), (128, 128), (256, 64), (512, 32), (1024, 16), (256, 32)]
CASES = {c.name: c for c in ISSUE}
for _w1, _w2 in TABLE1:
    CASES[f"table1-{_w1}x{_w2}"] = Case(f"table1-{_w1}x{_w2}", 2, 8192, 64, 1, 128, _w1, _w2, group="table1")
GROUPS = {"issue": [c.name for c in ISSUE], "table1": [n for n, c in CASES.items() if c.group == "table1"],
          "all": list(CASES)}
IMPLS = ("twosimplicial", "torch", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "sdpa")
QUICK = {"rounds": 3, "warmup_ms": 10.0, "rep_ms": 50.0}


def select(spec: str | None, available: dict[str, Case]) -> list[Case]:
    """``--cases``: comma-separated names and group names (issue, table1, all)."""
    if not spec:
        return list(available.values())
    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        names = [n for n in GROUPS[name] if n in available] if name in GROUPS else [name]
        for n in names:
            if n not in available:
                raise SystemExit(f"unknown case {n!r}; cases: {', '.join(available)}; groups: {', '.join(GROUPS)}")
            if available[n] not in out:
                out.append(available[n])
    return out


# --------------------------------------------------------------------------- shapes of a model
def model_case(cfg, name: str, batch: int | None, seq: int | None, group: str) -> Case:
    """The attention shape of ``cfg``'s 2-simplicial layers (as ``models.transformer.Block`` builds
    them) at batch ``batch`` and sequence ``seq`` (default ``max_seq_len``; batch default: 16k tokens)."""
    S = seq or cfg.max_seq_len
    B = batch or max(1, 16384 // S)
    layers = sum(k == "simplicial" for k in cfg.layer_kinds())
    return Case(name.format(B=B, S=S), B, S, cfg.simplicial_heads, cfg.simplicial_kv_heads, cfg.simplicial_head_dim,
                cfg.w1, cfg.w2, cfg.form, group=group, layers=layers)


def model_cases(preset: str, sets: list[str], batch: int | None, seq: int | None) -> dict[str, Case]:
    """``--shapes model``: one case from a ``ModelConfig`` preset with ``field=value`` overrides."""
    from twosimplicial.models import ModelConfig
    overrides = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects field=value, got {item!r}")
        key = key.strip()
        overrides[key[len("model."):] if key.startswith("model.") else key] = parse_value(value.strip())
    cfg = ModelConfig.from_preset(preset, **overrides)
    if not cfg.simplicial_every:
        print(f"note: preset {preset!r} has simplicial_every=0 (no 2-simplicial layer); the case is the shape "
              "its 2-simplicial layers take with --set simplicial_every=K", file=sys.stderr)
    c = model_case(cfg, f"model-{preset}-b{{B}}-s{{S}}", batch, seq, "model")
    return {c.name: c}


def sweep_cases(config: str, sets: list[str]) -> dict[str, Case]:
    """``--shapes sweep``: one case per size of a sweep config, at its ``[data]`` batch and sequence."""
    from twosimplicial.data import DataConfig
    from twosimplicial.studies.scaling import load_sweep
    from twosimplicial.train import model_config
    sw = load_sweep(config, sets)
    data = DataConfig.from_dict(dict(sw.base["data"]))
    out = {}
    for run in sorted(sw.runs, key=lambda r: r.arch != "simplicial"):     # a simplicial run of each size first
        name = f"sweep-{run.size['name']}"
        if name not in out:
            cfg = model_config(run.cfg, data.vocab_size, None, data.seq_len)
            out[name] = model_case(cfg, name, data.batch_size, data.seq_len, "sweep")
    return {n: out[n] for n in (f"sweep-{s['name']}" for s in sw.sweep["sizes"])}


@contextlib.contextmanager
def _native_path(c: Case):
    """While case ``c`` runs: its form on the Triton kernels' native path or not, as ``c.native``
    says (``forms.Form.native`` set, restored after); the registry's choice where it is None."""
    if c.native is None:
        yield
        return
    if not hasattr(forms.Form, "native"):         # an older package (the "before" of a comparison)
        if not c.native:                          # which has only the transform
            yield
            return
        raise RuntimeError("this twosimplicial has no native forms (forms.Form.native)")
    entry = forms.REGISTRY[c.form]
    forms.REGISTRY[c.form] = replace(entry, native=c.native)
    try:
        yield
    finally:
        forms.REGISTRY[c.form] = entry


def tiny(c: Case) -> Case:
    """The CPU smoke shape of a case: same name, form and GQA-ness, a few positions and dims."""
    gqa = min(c.Hq // c.Hkv, 2)
    return replace(c, B=1, S=48, Hkv=1, Hq=gqa, D=min(c.D, 16), w1=min(c.w1, 16), w2=min(c.w2, 8))


# --------------------------------------------------------------------------- estimate
# Conservative rates (TFLOP/s by the convention, about an H100's; H200 about 1.25x): ours forward /
# backward for trilinear shapes, for a small window past 64 (one 128-row tile per SM), and for the
# determinant form; SDPA by backend.
RATES = {"twosimplicial": (300.0, 160.0), "twosimplicial-ws128": (140.0, 70.0), "twosimplicial-det": (90.0, 24.0),
         "torch": (5.0, 2.5), "sdpa-cudnn": (480.0, 420.0), "sdpa": (480.0, 420.0),
         "sdpa-flash": (280.0, 250.0), "sdpa-efficient": (150.0, 120.0), "sdpa-math": (30.0, 20.0)}
COMPILE_S, COMPILE_DET_S, CASE_OVERHEAD_S = 12.0, 25.0, 1.5


def bench_s(t_ms: float, warmup_ms: float, rep_ms: float) -> float:
    """Seconds one do_bench call takes for a function of ``t_ms``: one call, five to estimate,
    the warm-up and the repetitions (at least one each)."""
    return (6 * t_ms + max(t_ms, warmup_ms) + max(t_ms, rep_ms)) / 1e3 + 0.02


def estimate_s(c: Case, impls, rounds: int, warmup_ms: float, rep_ms: float) -> float:
    total = CASE_OVERHEAD_S
    for impl in impls:
        key = impl
        if impl == "twosimplicial":
            key = "twosimplicial-det" if c.form != "trilinear" else (
                "twosimplicial-ws128" if min(c.w1, c.w2) > 64 else "twosimplicial")
            total += COMPILE_DET_S if c.form != "trilinear" else COMPILE_S
        fwd_rate, bwd_rate = RATES.get(key, RATES["sdpa-math"])
        fl = c.sdpa_flops if impl.startswith("sdpa") else c.flops
        t_f, t_b = fl / fwd_rate / 1e9, 2.5 * fl / bwd_rate / 1e9          # ms
        total += (t_f + t_b) * 2 / 1e3                                       # first call and the graph's forward
        total += rounds * (bench_s(t_f, warmup_ms, rep_ms) + bench_s(t_b, warmup_ms, rep_ms))
    return total


# --------------------------------------------------------------------------- timing
def make_timer(device: str, warmup_ms: float, rep_ms: float, cpu_reps: int = 2):
    if device == "cuda":
        import triton

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return timer

    def cpu_timer(fn):
        fn()
        ts = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return cpu_timer


def fwd_bwd_fns(fwd, inputs, do):
    """(forward closure, backward closure): the backward is autograd.grad on a graph retained
    once, so each call times the backward alone."""
    def fwd_fn():
        with torch.no_grad():
            fwd(*inputs)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fwd(*leaves)
    return fwd_fn, lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)


def impl_fns(c: Case, impls, device, dtype, gen):
    """``{impl: (forward FLOPs, fwd_fn, bwd_fn)}`` for the impls that accept this case."""
    from twosimplicial.ops import two_simplicial_attention

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    fns = {}
    ours = [i for i in impls if i in ("twosimplicial", "torch")]
    if ours:
        q = rand(c.B, c.S, c.Hq, c.D)
        k1, v1, k2, v2 = (rand(c.B, c.S, c.Hkv, c.D) for _ in range(4))
        do = rand(c.B, c.S, c.Hq, c.D)
        for impl in ours:
            backend = "torch" if impl == "torch" or device == "cpu" else "triton"
            f = (lambda *a, backend=backend:
                 two_simplicial_attention(*a, c.w1, c.w2, form=c.form, backend=backend))
            fns[impl] = (c.flops, *fwd_bwd_fns(f, (q, k1, v1, k2, v2), do))
    sdpas = [i for i in impls if i.startswith("sdpa")]
    if sdpas:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        L = c.w1 * c.w2
        sq, sk, sv, sdo = rand(c.B, c.Hq, c.S, c.D), rand(c.B, c.Hq, L, c.D), rand(c.B, c.Hq, L, c.D), \
            rand(c.B, c.Hq, c.S, c.D)
        backends = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
        for impl in sdpas:
            def f(a, b, v, backend=backends.get(impl)):
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(a, b, v)
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(a, b, v)
            try:
                fns[impl] = (c.sdpa_flops, *fwd_bwd_fns(f, (sq, sk, sv), sdo))
            except RuntimeError as e:                      # the backend refused this shape
                print(f"{c.name} {impl}: {str(e)[:160]}", file=sys.stderr)
    return fns


def tflops(ms, flops):
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def run_case(c: Case, impls, ref: str, timer, rounds: int, device, dtype, gen) -> list[dict]:
    """Rows of one case. The impls are timed in ``rounds`` interleaved rounds, each a timer median,
    and a row reports the median over its rounds: the GPU's clock drifts over a run (up to ~8% for
    the same kernel, docs/kernels.md, Measured), and interleaving puts that drift on every impl
    alike instead of on whichever was timed last. Ratios per round compare times of one round.
    A native case runs inside :func:`_native_path`."""
    with _native_path(c):
        return _run_case(c, impls, ref, timer, rounds, device, dtype, gen)


def _run_case(c: Case, impls, ref: str, timer, rounds: int, device, dtype, gen) -> list[dict]:
    fns = impl_fns(c, impls, device, dtype, gen)
    ms = {impl: ([], []) for impl in fns}
    for _ in range(rounds):
        for impl, (_, fwd_fn, bwd_fn) in fns.items():
            ms[impl][0].append(timer(fwd_fn))
            ms[impl][1].append(timer(bwd_fn))
    rows = []
    for impl, (fl, *_) in fns.items():
        fwd_r, bwd_r = ms[impl]
        r = {"case": c.name, "impl": impl, "fwd_ms": statistics.median(fwd_r), "bwd_ms": statistics.median(bwd_r),
             "fwd_flops": fl, "bwd_flops": 2.5 * fl}
        r["fwd_tflops"], r["bwd_tflops"] = tflops(r["fwd_ms"], fl), tflops(r["bwd_ms"], 2.5 * fl)
        r["fwd_ms_rounds"], r["bwd_ms_rounds"] = fwd_r, bwd_r
        rows.append(r)
    base = next((r for r in rows if r["impl"] == ref), None)
    for r in rows:
        if r["impl"] == ref:
            continue
        for k in ("fwd", "bwd"):
            ok = base is not None and r[f"{k}_tflops"] and base[f"{k}_tflops"]
            r[f"{k}_ratio"] = r[f"{k}_tflops"] / base[f"{k}_tflops"] if ok else None
            r[f"{k}_ratio_rounds"] = ([(r[f"{k}_flops"] / a) / (base[f"{k}_flops"] / b)
                                       for a, b in zip(r[f"{k}_ms_rounds"], base[f"{k}_ms_rounds"])] if ok else None)
        if r["impl"] == "twosimplicial":
            r["target_fwd"], r["target_bwd"] = c.target
            r["meets_fwd"] = None if r["fwd_ratio"] is None else r["fwd_ratio"] >= c.target[0]
            r["meets_bwd"] = None if r["bwd_ratio"] is None else r["bwd_ratio"] >= c.target[1]
    return rows


def tune(gen):
    """Forward launch configurations on the main shapes (printed, not saved)."""
    import triton
    from twosimplicial.ops.triton.fwd import two_simplicial_fwd
    grid = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, maxnreg=mr, prefetch_vs=pf)
            for bm, bn, w, st, mr, pf in ((64, 64, 4, 3, None, False), (64, 64, 4, 3, None, True),
                                          (64, 64, 4, 2, None, True), (64, 32, 4, 3, 168, False),
                                          (64, 32, 4, 4, 168, True), (128, 64, 8, 3, None, True))]
    for name in ("gqa64", "mha", "mha-d64", "table1-128x128"):
        c = CASES[name]
        q = torch.randn(c.B, c.S, c.Hq, c.D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k1, v1, k2, v2 = (torch.randn(c.B, c.S, c.Hkv, c.D, device="cuda", dtype=torch.bfloat16, generator=gen)
                          for _ in range(4))
        for cfg in grid:
            try:
                ms = triton.testing.do_bench(lambda: two_simplicial_fwd(q, k1, v1, k2, v2, c.w1, c.w2, c.D ** -0.5,
                                                                        False, config=cfg), return_mode="median")
                print(f"tune {name:14s} {cfg} {ms:8.3f} ms {c.flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
            except Exception as e:                         # e.g. out of shared memory
                print(f"tune {name:14s} {cfg} failed: {str(e)[:100]}", flush=True)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output
def plot(res: dict, path: str) -> None:
    """Per case, our forward and backward ratio to the reference, the targets as short lines over
    each bar (green bar: target met, red: not)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = [r for r in res["rows"] if r["impl"] == "twosimplicial"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(ours) + 2), 5))
    w = 0.38
    for n, r in enumerate(ours):
        for off, k, hatch in ((-w / 2, "fwd", None), (w / 2, "bwd", "//")):
            v, t = r.get(f"{k}_ratio"), r.get(f"target_{k}")
            if v is None:
                continue
            color = "tab:green" if t is not None and v >= t else "tab:red"
            ax.bar(n + off, v, w * 0.95, color=color, alpha=0.75, hatch=hatch, edgecolor="black", linewidth=0.5)
            ax.text(n + off, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            if t is not None:
                ax.hlines(t, n + off - w / 2, n + off + w / 2, colors="black", linewidth=2)
    ax.set_xticks(range(len(ours)), [r["case"] for r in ours], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"TFLOP/s ratio to {res['ratio_to']}")
    ax.set_xlim(-0.6, max(len(ours), 1) - 0.4)
    top = max([r.get(k) or 0 for r in ours for k in ("fwd_ratio", "bwd_ratio", "target_fwd", "target_bwd")] + [0.1])
    ax.set_ylim(0, 1.3 * top)
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label="forward"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="backward"),
                       Line2D([], [], color="black", linewidth=2, label="target (issue 18)"),
                       Patch(color="tab:green", alpha=0.75, label="target met"),
                       Patch(color="tab:red", alpha=0.75, label="not met")], fontsize=7, loc="upper center", ncol=5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"2-simplicial attention / FLOP-matched SDPA, {res['device']}, {res['dtype']}, {res['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(res: dict) -> None:
    fmt = lambda v, spec: f"{v:{spec}}" if v is not None else f"{'-':>{spec.split('.')[0]}s}"
    print(f"{'case':22s} {'impl':14s} {'fwd ms':>9s} {'fwd TF':>7s} {'bwd ms':>9s} {'bwd TF':>7s} "
          f"{'fwd x ref':>9s} {'bwd x ref':>9s}  target")
    for r in res["rows"]:
        t = f"{r['target_fwd']:.2f}/{r['target_bwd']:.2f} " + ("met" if r["meets_fwd"] and r["meets_bwd"] else
                                                                "NOT met") if "target_fwd" in r else ""
        print(f"{r['case']:22s} {r['impl']:14s} {fmt(r['fwd_ms'], '9.3f')} {fmt(r['fwd_tflops'], '7.1f')} "
              f"{fmt(r['bwd_ms'], '9.3f')} {fmt(r['bwd_tflops'], '7.1f')} {fmt(r.get('fwd_ratio'), '9.2f')} "
              f"{fmt(r.get('bwd_ratio'), '9.2f')}  {t}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="output file name without extension (default <gpu>-<date>)")
    ap.add_argument("--shapes", choices=("issue", "model", "sweep"), default="issue",
                    help="issue: the issue-18 cases and the paper's window grid; model: a ModelConfig preset's "
                         "2-simplicial layers; sweep: every size of a sweep config")
    ap.add_argument("--cases", default=None, help="comma-separated case names or groups (issue, table1, all); "
                                                  "default: all (issue with --quick)")
    ap.add_argument("--list", action="store_true", help="print the selected cases and exit")
    ap.add_argument("--preset", default=None, help="--shapes model: a ModelConfig preset")
    ap.add_argument("--config", default=None, help="--shapes sweep: a sweep config (TOML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model: ModelConfig field=value; sweep: section.key=value (as `twosimplicial sweep`)")
    ap.add_argument("--batch", type=int, default=None, help="--shapes model: batch (default 16k tokens / seq)")
    ap.add_argument("--seq", type=int, default=None, help="--shapes model: sequence length (default max_seq_len)")
    ap.add_argument("--impls", default=None, help="comma-separated (default twosimplicial,sdpa-cudnn,sdpa-flash; "
                                                  "with --quick or on a CPU: twosimplicial and the reference)")
    ap.add_argument("--ref", default=None, help="reference impl of the ratios (default sdpa-cudnn; sdpa on a CPU)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, do_bench 10/50 ms, the issue's cases, no flash")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case (default 5)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (default 25)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench rep (default 100)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip cases whose estimate would pass this")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: smoke mode (tiny shapes, float32, the PyTorch path against CPU SDPA)")
    ap.add_argument("--tune", action="store_true", help="sweep forward configurations first")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (QUICK["rounds"] if args.quick else 5)
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (QUICK["warmup_ms"] if args.quick else 25.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (QUICK["rep_ms"] if args.quick else 100.0)
    args.ref = args.ref or ("sdpa" if args.device == "cpu" else "sdpa-cudnn")
    if args.impls:
        args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    elif args.quick or args.device == "cpu":
        args.impls = ["twosimplicial", args.ref]
    else:
        args.impls = ["twosimplicial", "sdpa-cudnn", "sdpa-flash"]
    bad = [i for i in args.impls + [args.ref] if i not in IMPLS]
    if bad:
        ap.error(f"unknown impl(s) {bad}; impls: {', '.join(IMPLS)}")
    if args.ref not in args.impls:
        args.impls.append(args.ref)
    if args.shapes == "model" and not args.preset:
        ap.error("--shapes model needs --preset")
    if args.shapes == "sweep" and not args.config:
        ap.error("--shapes sweep needs --config")
    if args.shapes != "model" and (args.batch or args.seq):
        ap.error("--batch / --seq apply to --shapes model (a sweep's come from its [data] table)")
    if args.shapes == "issue" and args.set:
        ap.error("--set applies to --shapes model or sweep")
    return args


def available_cases(args) -> dict[str, Case]:
    if args.shapes == "model":
        return model_cases(args.preset, args.set, args.batch, args.seq)
    if args.shapes == "sweep":
        return sweep_cases(args.config, args.set)
    return CASES


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    avail = available_cases(args)
    cases = select(args.cases or ("issue" if args.quick and args.shapes == "issue" else None), avail)
    if args.list:
        print(f"{'case':22s} {'group':7s} {'shape':44s} {'fwd TFLOP':>9s} {'bwd TFLOP':>9s} {'target':>9s} "
              f"{'est. s':>6s}")
        total = 0.0
        for c in cases:
            est = estimate_s(c, args.impls, args.rounds, args.warmup_ms, args.rep_ms)
            total += est
            print(f"{c.name:22s} {c.group:7s} {c.shape:44s} {c.flops / 1e12:9.3f} {2.5 * c.flops / 1e12:9.3f} "
                  f"{c.target[0]:.2f}/{c.target[1]:.2f} {est:6.0f}")
        print(f"{len(cases)} cases, impls {','.join(args.impls)}, {args.rounds} rounds, do_bench "
              f"{args.warmup_ms:g}/{args.rep_ms:g} ms: about {total:.0f} s on a GPU (H100 rates, cold compile)")
        return None

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or --device cpu for the smoke mode")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    if args.tune:
        tune(gen)
    import twosimplicial
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    gpu = re.sub(r"[^a-z0-9]+", "-", (re.search(r"[HABL]\d{2,3}\w*", dev) or [dev])[0].lower()).strip("-")
    date = datetime.date.today().isoformat()
    run_cases = [tiny(c) for c in cases] if device == "cpu" else cases
    res = {"device": dev, "torch": torch.__version__, "triton": triton_version, "date": date,
           "dtype": str(dtype).replace("torch.", ""), "flops": FLOP_CONVENTION,
           "method": (f"median over {args.rounds} interleaved rounds of "
                      + ("triton.testing.do_bench medians (warmup {:g} ms, rep {:g} ms)".format(args.warmup_ms,
                                                                                               args.rep_ms)
                         if device == "cuda" else "CPU wall-clock medians") + "; ratios of TFLOP/s, same run"),
           "ratio_to": args.ref, "impls": args.impls, "smoke": device == "cpu",
           "package": os.path.dirname(os.path.abspath(twosimplicial.__file__)), "tag": args.tag,
           "argv": sys.argv[1:] if argv is None else list(argv),
           "cases": {c.name: {**asdict(c), "flops_fwd": c.flops, "flops_bwd": 2.5 * c.flops,
                              "sdpa_flops_fwd": c.sdpa_flops}
                     for c in run_cases},
           "rows": [], "skipped": [], "errors": {}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag or gpu + '-' + date}.json")

    def save():
        with open(path + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(path + ".tmp", path)

    # a timeout (SIGTERM) still leaves the JSON and PNG of the cases done
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if _main_thread() else None
    timer = make_timer(device, args.warmup_ms, args.rep_ms)
    threads = torch.get_num_threads()
    if device == "cpu":                   # smoke mode: one thread times steadily on a shared machine
        torch.set_num_threads(1)
    t0 = time.monotonic()
    try:
        for c in (bar := tqdm(run_cases, desc="cases", file=sys.stderr)):
            bar.set_postfix_str(c.name)
            if args.budget_s is not None and device == "cuda":
                est = estimate_s(c, args.impls, args.rounds, args.warmup_ms, args.rep_ms)
                if time.monotonic() - t0 + est > args.budget_s:
                    res["skipped"].append(c.name)
                    print(f"skip {c.name}: estimated {est:.0f} s past the {args.budget_s:g} s budget",
                          file=sys.stderr)
                    continue
            try:
                res["rows"] += run_case(c, args.impls, args.ref, timer, args.rounds, device, dtype, gen)
            except Exception as e:                 # e.g. out of memory or of shared memory: keep the other cases
                res["errors"][c.name] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{c.name} failed: {res['errors'][c.name]}", file=sys.stderr)
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
    finally:
        torch.set_num_threads(threads)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        res["seconds"] = round(time.monotonic() - t0, 1)
        save()
        if res["rows"]:
            plot(res, path[:-5] + ".png")
    print_table(res)
    if res["skipped"]:
        print("skipped (budget):", ", ".join(res["skipped"]))
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()

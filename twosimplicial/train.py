"""Training loop: one process, or many under ``torchrun`` (DDP, or FSDP2 with ``fully_shard``).

    twosimplicial train configs/cpu_smoke.toml --set train.max_steps=50 [--resume]

A config is TOML with four tables, merged over ``DEFAULTS`` (``--set section.key=value``
overrides one entry; the value is parsed as TOML, else taken as a string; every value is then
type-checked against its field, so ``--set train.compile=False`` is an error naming the key):

- ``[run]``: ``out_dir``, ``seed``, ``device`` ("auto" | "cpu" | "cuda");
- ``[model]``: ``preset`` plus any ``ModelConfig`` field; ``vocab_size``, ``output_size`` and
  ``max_seq_len`` are filled in from the data;
- ``[data]``: ``DataConfig`` (``twosimplicial.data.datasets``);
- ``[train]``: ``TrainConfig`` below.

Optimiser and schedule: AdamW; the learning rate warms up linearly over
``warmup_steps`` and then follows a cosine from the peak ``lr`` down to
``min_lr_ratio * lr`` at ``max_steps``. The paper (Roy et al. 2025) used peak 4e-3,
weight decay 0.0125, 4000 warm-up steps and decay to 1% of the peak; those are the
defaults here except the warm-up, which a short run must scale down (configs set it).
Weight decay applies to matrices (embeddings included), not to norm gains.

Run directory (self-contained: ``eval`` and ``generate`` need nothing else)::

    config.json      the resolved config, parameter counts, data_sha256 (corpus + tokenizer)
    metrics.jsonl    one JSON object a line: {"kind": "train", step, loss, lr, tokens, tokens_per_s,
                     time}, {"kind": "eval", step, tokens, <source>: {loss, accuracy, tokens}} and
                     {"kind": "config", step, changes: {key: [old, new]}} for a change on resume
    summary.json     written when the run ends
    data/            manifest, tokenizer and validation tokens of the code corpus (``lm`` runs)
    checkpoints/     step-XXXXXXX/ and ``latest`` (``twosimplicial.checkpoint``)
    tb/              TensorBoard, when installed

Resume (``resume=True``, ``--resume``): continues from the checkpoint ``latest`` names, or,
when that is missing or corrupt, from the newest intact one (with a warning); stops with an
error when no checkpoint is intact. Nothing in the run directory is changed before a checkpoint
has loaded. The loss curve is the one an uninterrupted run logs, bit for bit on CPU, whatever
``log_interval`` and ``ckpt_interval`` are. The config must be the run's own: a change to
``[model]``, ``[data]`` (other than ``cache_dir``), ``run.seed`` or any ``[train]`` key outside
``RESUMABLE_TRAIN_KEYS`` is refused with the list of differences. ``train.max_steps`` may only
grow; the schedule keeps the horizon the run started with, so extra steps run at the final
learning rate. Each accepted change is recorded in ``metrics.jsonl``. ``--resume`` on a finished
run changes nothing and returns its summary.

Ctrl-C (one process): the step in flight finishes, a checkpoint is saved and
``TrainingInterrupted`` names it; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import checkpoint
from .config_types import check_types
from .data import CodeCorpus, DataConfig, make_data, prepare_corpus
from .models import ModelConfig, TwoSimplicialLM, count_parameters


@dataclass
class TrainConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    lr: float = 4e-3                 # paper's peak
    min_lr_ratio: float = 0.01       # paper: cosine decay to 1% of the peak
    warmup_steps: int = 4000         # paper's; scale down for short runs
    weight_decay: float = 0.0125     # paper's
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0           # 0: off
    dtype: str = "bf16"              # autocast dtype on GPU ("bf16" | "fp32"); CPU runs in fp32
    compile: bool = False            # torch.compile(fullgraph=True) of the model (forward + its backward)
    compile_mode: str = "default"    # torch.compile mode: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune-no-cudagraphs"
    distributed: str = "ddp"         # "ddp" | "fsdp" (FSDP2 fully_shard), used under torchrun
    log_interval: int = 10
    eval_interval: int = 200         # 0: only at the end
    eval_batches: int = 20
    ckpt_interval: int = 500         # 0: only at the end
    keep_checkpoints: int = 2
    stop_at_step: int = 0            # stop (as if killed) after this step; 0: run to max_steps
    progress: bool = True

    def validate(self) -> None:
        check_types("train", self)
        for name in ("max_steps", "grad_accum", "log_interval", "eval_batches", "keep_checkpoints"):
            _pos_int(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "stop_at_step"):
            _pos_int(f"train.{name}", getattr(self, name), 0)
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"train.dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")


DEFAULTS = {
    "run": {"out_dir": "runs/default", "seed": 0, "device": "auto"},
    "model": {"preset": "tiny"},
    "data": {},
    "train": {},
}


# [train] keys that may differ on resume: they change how a run is watched, saved or executed,
# not what it computes (max_steps may only grow; see the module docstring).
RESUMABLE_TRAIN_KEYS = ("max_steps", "stop_at_step", "log_interval", "eval_interval", "ckpt_interval",
                        "keep_checkpoints", "progress", "compile", "compile_mode")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


class TrainingInterrupted(Exception):
    """Ctrl-C stopped a run; ``checkpoint`` is the checkpoint holding its last completed step."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}; last checkpoint: {checkpoint}")


def _pos_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


# --------------------------------------------------------------------------- config
def parse_value(text: str):
    """``--set`` values: TOML when it parses (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"s"``), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict, sets: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in DEFAULTS:
            raise ValueError(f"--set key must start with one of {sorted(DEFAULTS)}, got {key!r}")
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(value.strip())
    return cfg


def load_config(path: str | os.PathLike | None = None, sets: list[str] | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path, "rb") as f:
            user = tomllib.load(f)
        unknown = set(user) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown tables {sorted(unknown)}; expected {sorted(DEFAULTS)}")
        for k, v in user.items():
            cfg[k].update(v)
    return apply_overrides(cfg, sets or [])


def check_run(cfg: dict) -> None:
    """Validate the ``[run]`` table: only the keys of ``DEFAULTS["run"]``, an int seed, a path out_dir."""
    run = cfg["run"]
    unknown = set(run) - set(DEFAULTS["run"])
    if unknown:
        raise ValueError(f"unknown [run] keys {sorted(unknown)}; known: {sorted(DEFAULTS['run'])}")
    if isinstance(run["seed"], bool) or not isinstance(run["seed"], int):
        raise TypeError(f"run.seed must be an int, got {run['seed']!r}")
    if not 0 <= run["seed"] < 2**32:
        raise ValueError(f"run.seed must be in [0, 2**32), got {run['seed']!r}")
    if not isinstance(run["out_dir"], (str, os.PathLike)) or not str(run["out_dir"]):
        raise TypeError(f"run.out_dir must be a path string, got {run['out_dir']!r}")
    if run["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device must be 'auto', 'cpu' or 'cuda', got {run['device']!r}")
    for table in ("model", "data", "train"):
        if not isinstance(cfg[table], dict):
            raise TypeError(f"[{table}] must be a table, got {cfg[table]!r}")


def train_config(cfg: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(cfg["train"]) - names
    if unknown:
        raise ValueError(f"unknown [train] keys {sorted(unknown)}; known: {sorted(names)}")
    t = TrainConfig(**cfg["train"])
    t.validate()
    return t


def data_config(cfg: dict) -> DataConfig:
    return DataConfig.from_dict(dict(cfg["data"]))


def model_config(cfg: dict, vocab_size: int, output_size: int | None, seq_len: int) -> ModelConfig:
    m = dict(cfg["model"])
    preset = m.pop("preset", None)
    m["vocab_size"] = vocab_size
    if output_size is not None:
        m["output_size"] = output_size
        m.setdefault("tie_embeddings", output_size == vocab_size)
    try:
        mc = ModelConfig.from_preset(preset, **m) if preset else ModelConfig(**m)
    except (TypeError, ValueError) as e:                  # ModelConfig names the field; say which table
        raise type(e)(f"[model] {e}") from None
    if mc.max_seq_len < seq_len:
        mc = ModelConfig(**{**mc.to_dict(), "max_seq_len": seq_len})
    return mc


def lr_lambda(step: int, t: TrainConfig, horizon: int | None = None) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``horizon`` (default
    ``max_steps``; a run extended on resume keeps its first horizon), flat after it."""
    horizon = t.max_steps if horizon is None else horizon
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, horizon - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but CUDA is not available")
    if world == 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=torch.device(f"cuda:{d.local_rank}"))
        else:
            dist.init_process_group("gloo")
    return d, torch.device(f"cuda:{d.local_rank}" if use_cuda else "cpu")


def _barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


def _mean_across(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world_size
    return x


# --------------------------------------------------------------------------- checkpoints
def _full_state(model, optimizer, fsdp: bool):
    """Full (unsharded) model and optimiser state dicts with plain FQN keys."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def _load_full_state(model, optimizer, msd, osd, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(msd)
        optimizer.load_state_dict(osd)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, d: Dist, device,
                    fsdp: bool, keep: int) -> Path:
    """Write the checkpoint of ``step`` (every rank takes part; see ``twosimplicial.checkpoint``)."""
    msd, osd = _full_state(model, optimizer, fsdp)
    tmp = checkpoint.partial_dir(run_dir, step)
    if d.main:
        checkpoint.begin(run_dir, step)
        # clone: safetensors refuses tensors that share memory (a tied head); both names are kept
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in msd.items()},
                  str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save({"optimizer": osd, "scheduler": scheduler.state_dict(), **state, "step": step}, tmp / "state.pt")
    _barrier(d)
    torch.save(checkpoint.rng_state(device), tmp / f"rng-{d.rank}.pt")
    _barrier(d)
    path = checkpoint.commit(run_dir, step, keep) if d.main else run_dir / "checkpoints" / checkpoint.step_name(step)
    _barrier(d)
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a resume or an evaluation of ``run_dir`` loads (verified), or ``None`` if it has none."""
    return checkpoint.resolve(run_dir, warn=checkpoint.warn)


def load_model(run_dir: str | os.PathLike, device="cpu") -> tuple[TwoSimplicialLM, dict]:
    """The model of a run directory at its latest intact checkpoint, in eval mode, and the run's
    config (with ``cfg["checkpoint"] = {"name", "step"}`` added). The loading is
    ``TwoSimplicialLM.from_pretrained``'s."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if not isinstance(cfg, dict) or "model_resolved" not in cfg:
        raise ValueError(f"{run_dir} is not a run directory ({cfg_path} is not a run's config)")
    model = TwoSimplicialLM.from_pretrained(run_dir, device=device)
    src = model.pretrained_source
    cfg["checkpoint"] = {"name": Path(src["path"]).name, "step": src["step"]}
    return model, cfg


def run_corpus(run_dir: str | os.PathLike) -> CodeCorpus:
    """The tokenizer and validation tokens an ``lm`` run directory carries in ``data/``."""
    data_dir = Path(run_dir) / "data"
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no data/ directory (tokenizer and validation tokens): "
                                "it is not a language-model run, or it is incomplete")
    return CodeCorpus(data_dir)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_batches(model, batches, device, amp) -> dict:
    """Token-weighted NLL (nats) over ``batches`` (MoE aux loss excluded), and accuracy
    (argmax == target) for classification heads; targets of -100 are ignored."""
    nll, n, correct = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with amp:
            logits, _ = model(x)
        logits = logits.float()
        mask = y != -100
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        correct += ((logits.argmax(-1) == y) & mask).sum().item()
        n += mask.sum().item()
    return {"loss": nll / max(n, 1), "accuracy": correct / max(n, 1), "tokens": n}


def _autocast(device, t: TrainConfig):
    if device.type == "cuda" and t.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the loop
def _param_groups(model, weight_decay):
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, t: TrainConfig, device: torch.device, horizon: int | None = None):
    """The recipe's AdamW (decay on matrices only, fused on CUDA) and its warm-up + cosine schedule
    (``lr_lambda``; ``horizon`` defaults to ``t.max_steps``)."""
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.eps, fused=torch.device(device).type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, t, horizon))
    return optimizer, scheduler


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (atomically: a kill leaves the old or the new file)."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:           # blank, or a half-written last line of a killed run
            continue
        if rec["step"] <= step:
            keep.append(ln)
    checkpoint.write_atomic(path, "".join(ln + "\n" for ln in keep))


def _flat(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def config_changes(saved: dict, resolved: dict, step: int) -> dict:
    """Differences ``{key: [old, new]}`` between a run's saved config and the one it is resumed
    with; raises ``ValueError`` listing every difference that is not safe to make mid-run."""
    old = {**_flat("run", {"seed": saved["run"]["seed"]}), **_flat("model", saved["model_resolved"]),
           **_flat("data", saved["data"]), **_flat("train", saved["train"]), "data_sha256": saved.get("data_sha256")}
    new = {**_flat("run", {"seed": resolved["run"]["seed"]}), **_flat("model", resolved["model_resolved"]),
           **_flat("data", resolved["data"]), **_flat("train", resolved["train"]),
           "data_sha256": resolved["data_sha256"]}
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    allowed = {f"train.{k}" for k in RESUMABLE_TRAIN_KEYS} | {"data.cache_dir"}
    refused = [k for k in changes if k not in allowed]
    if "train.max_steps" in changes and changes["train.max_steps"][1] < max(changes["train.max_steps"][0], step):
        refused.append("train.max_steps")
    if refused:
        listing = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ValueError(f"cannot resume {resolved['run']['out_dir']} with a different config ({listing}). "
                         f"Only {', '.join('train.' + k for k in RESUMABLE_TRAIN_KEYS)} and data.cache_dir may "
                         "change on resume, and train.max_steps may only grow; start a new run (another "
                         "run.out_dir) to change the others")
    return changes


class _StopRequest:
    """Turns the first Ctrl-C into a request to stop after the current step (one process, main
    thread only); the second one raises ``KeyboardInterrupt`` as usual."""

    def __init__(self, active: bool):
        self.requested = False
        self.active = active and threading.current_thread() is threading.main_thread()
        self._old = None

    def __enter__(self):
        if self.active:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self._old)


def train(cfg: dict, resume: bool = False) -> dict:
    """Run (or resume) the training described by ``cfg`` (see ``load_config``); returns a summary.

    Everything is validated, and on resume the checkpoint is verified and loaded, before
    anything in the run directory is written."""
    check_run(cfg)
    t = train_config(cfg)
    data_cfg = data_config(cfg)
    seed = cfg["run"]["seed"]
    d, device = init_distributed(cfg["run"]["device"])
    run_dir = Path(cfg["run"]["out_dir"])
    fsdp = d.world_size > 1 and t.distributed == "fsdp"

    warn = checkpoint.warn if d.main else None
    if resume:
        ck = checkpoint.resolve(run_dir, d.rank, warn=warn)
        if ck is None:
            raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoint (start the run without --resume)")
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: its config.json is missing")
    else:
        ck = None
        if checkpoint.step_dirs(run_dir) or (run_dir / "checkpoints" / "latest").exists():
            raise FileExistsError(f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, "
                                  "or choose another run.out_dir")
    if d.main:
        prepare_corpus(data_cfg, progress=t.progress)    # build the corpus once, before the other ranks read it
    _barrier(d)
    data = make_data(data_cfg, seed=seed, rank=d.rank, world_size=d.world_size, progress=False)
    mcfg = model_config(cfg, data.vocab_size, data.output_size, data_cfg.seq_len)
    params = count_parameters(mcfg)
    resolved = {**cfg, "data": asdict(data_cfg), "train": asdict(t), "model_resolved": mcfg.to_dict(),
                "parameters": params, "world_size": d.world_size, "data_sha256": data.sha256()}

    state, rng, changes, horizon = None, None, {}, t.max_steps
    if ck is not None:
        saved = json.loads((run_dir / "config.json").read_text())
        state = checkpoint.load_pt(ck / "state.pt")
        changes = config_changes(saved, resolved, state["step"])
        rng = checkpoint.load_pt(ck / f"rng-{d.rank}.pt")
        horizon = state["schedule_steps"]
        if state["step"] >= t.max_steps:
            if warn:
                warn(f"{run_dir} finished at step {state['step']} (train.max_steps={t.max_steps}); nothing to do. "
                     "To train further, raise train.max_steps")
            summary = run_dir / "summary.json"
            return json.loads(summary.read_text()) if summary.is_file() else {"step": state["step"], "run_dir": str(run_dir)}

    torch.manual_seed(seed)                               # same init on every rank
    model = TwoSimplicialLM(mcfg).to(device)
    raw = model
    graphs = t.compile and t.compile_mode == "reduce-overhead" and device.type == "cuda"
    if t.compile:
        model.compile(fullgraph=True, mode=t.compile_mode)
    if d.world_size > 1:
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            for blk in model.blocks:
                fully_shard(blk)
            fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    optimizer, scheduler = make_optimizer(raw, t, device, horizon)
    amp = _autocast(device, t)

    step, tokens, elapsed = 0, 0, 0.0
    interval_loss = torch.zeros((), device=device)       # loss summed since the last log line
    interval_steps = 0
    metrics_path = run_dir / "metrics.jsonl"
    if ck is not None:
        msd = load_file(str(ck / "model.safetensors"))
        _load_full_state(raw, optimizer, msd, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        data.train.load_state_dict(state["loader"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        interval_loss.copy_(state["interval_loss"])
        interval_steps = state["interval_steps"]
        checkpoint.set_rng_state(rng, device)
    _barrier(d)                                           # every rank has loaded: now the run directory may change
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ck is not None:
            _truncate_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)          # fresh start: drop the log of a run killed before its first checkpoint
        if data.corpus is not None and not (run_dir / "data" / "manifest.json").is_file():
            data.corpus.copy_for_eval(run_dir / "data")
        checkpoint.write_atomic(run_dir / "config.json", json.dumps(resolved, indent=2))
    _barrier(d)

    tb = None
    if d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            pass
    metrics = open(metrics_path, "a") if d.main else None

    def log(rec: dict):
        if not d.main:
            return
        metrics.write(json.dumps(rec, allow_nan=False) + "\n")
        metrics.flush()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])
                elif isinstance(v, dict) and rec["kind"] == "eval":
                    for kk, vv in v.items():
                        tb.add_scalar(f"eval/{k}/{kk}", vv, rec["step"])

    if changes:
        log({"kind": "config", "step": step, "changes": changes})

    def run_eval():
        model.eval()
        res = {name: evaluate_batches(model, data.val_batches(name, t.eval_batches, data_cfg.batch_size), device, amp)
               for name in data.val_sources}
        model.train()
        log({"kind": "eval", "step": step, "tokens": tokens, **res})
        return res

    def save():
        return save_checkpoint(run_dir, step, raw, optimizer, scheduler,
                               {"loader": data.train.state_dict(), "tokens": tokens, "elapsed": elapsed,
                                "interval_loss": interval_loss.detach().cpu().clone(), "interval_steps": interval_steps,
                                "schedule_steps": horizon},
                               d, device, fsdp, t.keep_checkpoints)

    tokens_per_step = data_cfg.batch_size * data_cfg.seq_len * t.grad_accum * d.world_size
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=not (d.main and t.progress), dynamic_ncols=True)
    model.train()
    interval_t0 = time.perf_counter()
    last_eval, last_loss, saved_step = None, None, step
    with _StopRequest(active=d.world_size == 1) as stop_request:
        while step < stop:
            t0 = time.perf_counter()
            for micro in range(t.grad_accum):
                x, y = data.train.next_batch()
                if device.type == "cuda":                 # pinned: the copy does not wait for the GPU
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last = micro == t.grad_accum - 1
                sync = contextlib.nullcontext()
                if d.world_size > 1 and not last:
                    if fsdp:
                        model.set_requires_gradient_sync(False)
                    else:
                        sync = model.no_sync()
                elif fsdp:
                    model.set_requires_gradient_sync(True)
                if graphs:                                # CUDA graphs: a new replay may reuse the last one's buffers
                    torch.compiler.cudagraph_mark_step_begin()
                with sync, amp:
                    _, loss = model(x, y)
                (loss / t.grad_accum).backward()
                interval_loss += loss.detach() / t.grad_accum
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            interval_steps += 1
            elapsed += time.perf_counter() - t0
            bar.update(1)
            if step % t.log_interval == 0 or step == stop:
                mean_loss = _mean_across(interval_loss / interval_steps, d).item()
                now = time.perf_counter()
                tps = interval_steps * tokens_per_step / (now - interval_t0)
                last_loss = mean_loss
                log({"kind": "train", "step": step, "loss": mean_loss, "lr": lr, "tokens": tokens,
                     "tokens_per_s": tps, "time": elapsed})
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}")
                interval_loss.zero_()
                interval_steps, interval_t0 = 0, time.perf_counter()
            if t.eval_interval and step % t.eval_interval == 0 and step < t.max_steps:
                last_eval = run_eval()
                interval_t0 = time.perf_counter()
            if (t.ckpt_interval and step % t.ckpt_interval == 0) or step == t.max_steps or stop_request.requested:
                save()
                saved_step = step
                interval_t0 = time.perf_counter()
            if stop_request.requested:
                break
    bar.close()
    if step == t.max_steps:
        last_eval = run_eval()
    if metrics is not None:
        metrics.close()
    if tb is not None:
        tb.close()
    if stop_request.requested:
        raise TrainingInterrupted(step, run_dir / "checkpoints" / checkpoint.step_name(saved_step))
    summary = {"step": step, "tokens": tokens, "train_loss": last_loss, "eval": last_eval,
               "tokens_per_s": tokens / elapsed if elapsed else None, "train_time_s": elapsed,
               "parameters": params, "run_dir": str(run_dir), "world_size": d.world_size,
               "data_sha256": resolved["data_sha256"]}
    if d.main:
        checkpoint.write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    # every rank done with its collectives before any returns (and its caller tears the process group
    # down): a rank that left early made another abort in gloo's teardown, once in a CI run
    _barrier(d)
    return summary

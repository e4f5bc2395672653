"""Checkpoints of a training run: written atomically, verified by digest, loaded without unpickling code.

Layout of ``RUN/checkpoints/``::

    step-0000400/  model.safetensors   weights (safetensors: no code can hide in it)
                   state.pt            optimiser, scheduler, loader position, counters
                   rng-<rank>.pt       each process's RNG state, as tensors and numbers
                   manifest.json       SHA-256 of every file above, written last
    latest         the name of the newest complete checkpoint, replaced atomically

A checkpoint is built in a hidden ``.partial-step-XXXXXXX`` directory and renamed into place
once its manifest is written, then ``latest`` is pointed at it: a process killed at any moment
leaves either the old or the new checkpoint complete. Every load verifies the manifest, so a
flipped byte, a truncated file or a missing ``rng-<rank>.pt`` is an error naming the file, not
a run that resumes with garbage. ``.pt`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-XXXXXXX`` directory, oldest first (complete or not)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckdir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(out)


# --------------------------------------------------------------------------- writing
def partial_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".partial-{step_name(step)}"


def begin(run_dir: Path, step: int) -> Path:
    """A fresh, empty directory to write the checkpoint of ``step`` into (main process only)."""
    tmp = partial_dir(run_dir, step)
    if tmp.exists():                                  # left by a process killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, step: int, keep: int) -> Path:
    """Seal the partial checkpoint of ``step`` (manifest, rename, ``latest``), then prune older ones
    so that ``keep`` complete checkpoints remain (main process only, after every rank wrote)."""
    ckdir = Path(run_dir) / "checkpoints"
    tmp, final = partial_dir(run_dir, step), ckdir / step_name(step)
    write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()), step=step)
    if final.exists():                                # a checkpoint of this step from an abandoned later life
        old = ckdir / f".replaced-{step_name(step)}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    write_atomic(ckdir / "latest", final.name)        # the checkpoint counts once this lands
    older = [p for s, p in step_dirs(run_dir) if s < step]
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p)
    return final


# --------------------------------------------------------------------------- reading
def write_manifest(directory: str | os.PathLike, files, **fields) -> None:
    """Write ``directory/manifest.json``: the SHA-256 of each of ``files`` plus ``fields`` (last, atomically)."""
    directory = Path(directory)
    manifest = {"format": 1, **fields, "files": {name: file_sha256(directory / name) for name in files}}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))


def read_manifest(directory: str | os.PathLike) -> dict:
    """``directory``'s manifest (``CheckpointError`` when it is missing or unreadable)."""
    mf = Path(directory) / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (an incomplete checkpoint or save)")
    try:
        manifest = json.loads(mf.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise KeyError("files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e})") from None
    return manifest


def verify(path: str | os.PathLike, rank: int = 0, required: tuple[str, ...] | None = None) -> dict:
    """Check ``path`` against its manifest; return the manifest. Raises ``CheckpointError``.

    ``required``: the files the manifest must list (default: a training checkpoint's weights,
    state and this rank's RNG state)."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    for name in required if required is not None else ("model.safetensors", "state.pt", f"rng-{rank}.pt"):
        if name not in files:
            raise CheckpointError(f"{path}: the manifest lists no {name}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"{f}: SHA-256 does not match the manifest (the file is corrupt)")
    return manifest


def warn(message: str) -> None:
    """How a fallback to an older checkpoint is reported (stderr, one line)."""
    print(f"twosimplicial: warning: {message}", file=sys.stderr)


def resolve(run_dir: str | os.PathLike, rank: int = 0, warn=None) -> Path | None:
    """The checkpoint to load: the one ``latest`` names if it verifies, else the newest one on disk
    that verifies (reported through ``warn(message)``). ``None`` when there are no checkpoints at
    all; ``CheckpointError`` when there are some but none is complete and intact."""
    run_dir = Path(run_dir)
    latest = run_dir / "checkpoints" / "latest"
    problem = None
    if latest.is_file():
        name = latest.read_text().strip()
        if not _STEP_DIR.match(name):
            problem = f"{latest} holds {name!r}, not a checkpoint name"
        elif not (latest.parent / name).is_dir():
            problem = f"{latest} names {name}, which does not exist"
        else:
            try:
                verify(latest.parent / name, rank)
                return latest.parent / name
            except CheckpointError as e:
                problem = str(e)
    elif step_dirs(run_dir):
        problem = f"{latest} is missing"
    candidates = step_dirs(run_dir)
    if not candidates:
        if problem:
            raise CheckpointError(f"{problem}, and {run_dir / 'checkpoints'} holds no checkpoint")
        return None
    failures = []
    for _, p in reversed(candidates):
        try:
            verify(p, rank)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        if warn is not None:
            warn(f"{problem}; using the newest complete checkpoint on disk instead: {p.name}")
        return p
    raise CheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}: " + "; ".join([problem, *failures]))


def load_pt(path: str | os.PathLike) -> dict:
    """A ``.pt`` file of a checkpoint: tensors, numbers, strings and containers only. Anything else
    (a pickled object, which could run code) is refused, not unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds more than plain data ({str(e).splitlines()[0]})") from None


# --------------------------------------------------------------------------- RNG state as plain data
def rng_state(device: torch.device) -> dict:
    """Every RNG a training step may touch, as tensors and numbers (loadable with ``weights_only``)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)},
         "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)

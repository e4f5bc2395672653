"""Code corpus from the Python source files installed on this machine.

Pipeline (all offline, deterministic):
1. walk the roots (default: the standard library and site-packages) for ``*.py``, skipping
   symbolic links that lead out of their root;
2. read each file as UTF-8 (skip undecodable and oversized files), deduplicate by
   the SHA-256 of its bytes;
3. split by file: a file is in validation iff ``int(sha256[:8], 16) % 10_000 <
   val_fraction * 10_000``. The split depends on the file's content only, so it is
   stable across machines, walk orders and caps;
4. optionally cap the corpus at ``max_bytes``, taking files in hash order (a
   deterministic pseudo-random sample, not "the first packages alphabetically");
5. train a byte-level BPE on (up to ``tokenizer_sample_bytes`` of) the training files;
6. encode every file, append ``<|endoftext|>`` after each, and write the token
   streams as flat memory-mapped arrays ``train.bin`` / ``val.bin`` (uint16 when the
   vocabulary fits, else uint32) plus ``manifest.json`` with file and token counts.

The cache directory is keyed by a hash of the build parameters, so corpora built
with different settings never overwrite each other.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import file_sha256
from .tokenizer import eos_id, load_tokenizer, train_bpe

MANIFEST_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("TWOSIMPLICIAL_CACHE", Path.home() / ".cache" / "twosimplicial"))


def default_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = paths.get(key)
        if p and os.path.isdir(p) and p not in roots:
            roots.append(p)
    return roots


@dataclass
class CodeCorpusConfig:
    roots: list[str] = field(default_factory=list)   # empty: stdlib + site-packages
    vocab_size: int = 8192
    val_fraction: float = 0.02
    max_bytes: int = 0                                # 0: no cap
    max_file_bytes: int = 500_000                     # skip generated giants
    tokenizer_sample_bytes: int = 16_000_000

    def validate(self) -> None:
        v = self.vocab_size                       # 256 bytes + EOS + at least one merge (tokenizer.train_bpe)
        if isinstance(v, bool) or not isinstance(v, int) or v < 258:
            raise ValueError(f"vocab_size must be an int >= 258, got {v!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for name in ("max_bytes", "max_file_bytes", "tokenizer_sample_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not isinstance(self.roots, list) or not all(isinstance(r, str) for r in self.roots):
            raise TypeError(f"roots must be a list of directory paths, got {self.roots!r}")

    def resolved_roots(self) -> list[str]:
        roots = self.roots or default_roots()
        out = []
        for r in roots:
            rp = os.path.realpath(r)
            if not os.path.isdir(rp):
                raise ValueError(f"code corpus root is not a directory: {r!r}")
            if rp not in out:
                out.append(rp)
        # a root inside another (site-packages under the stdlib dir, as with pyenv) is walked once
        return [r for r in out if not any(r != o and r.startswith(o + os.sep) for o in out)]

    def key(self) -> str:
        d = asdict(self)
        d["roots"] = self.resolved_roots()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _is_val(digest: str, val_fraction: float) -> bool:
    return int(digest[:8], 16) % 10_000 < round(val_fraction * 10_000)


def collect_files(cfg: CodeCorpusConfig) -> tuple[list[tuple[str, str]], dict]:
    """Return ``[(sha256, path)]`` of unique, decodable files in hash order, and stats."""
    seen: dict[str, str] = {}
    stats = {"found": 0, "skipped_large": 0, "skipped_undecodable": 0, "duplicates": 0}
    for root in cfg.resolved_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                if not os.path.isfile(path):
                    continue
                if os.path.islink(path) and not os.path.realpath(path).startswith(root + os.sep):
                    continue                          # a link out of the tree: not this root's source
                stats["found"] += 1
                if os.path.getsize(path) > cfg.max_file_bytes:
                    stats["skipped_large"] += 1
                    continue
                with open(path, "rb") as f:
                    raw = f.read()
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats["skipped_undecodable"] += 1
                    continue
                digest = hashlib.sha256(raw).hexdigest()
                if digest in seen:
                    stats["duplicates"] += 1
                    continue
                seen[digest] = path
    files = sorted(seen.items())                      # hash order: deterministic, content-only
    if cfg.max_bytes:
        kept, total = [], 0
        for digest, path in files:
            size = os.path.getsize(path)
            if total + size > cfg.max_bytes:
                continue
            kept.append((digest, path))
            total += size
        files = kept
    return files, stats


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def build_code_corpus(cfg: CodeCorpusConfig, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the corpus; return its directory holding manifest.json."""
    cfg.validate()
    out = Path(cache_dir or default_cache_dir()) / f"code-{cfg.key()}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    files, stats = collect_files(cfg)
    split = {"train": [], "val": []}
    for digest, path in files:
        split["val" if _is_val(digest, cfg.val_fraction) else "train"].append(path)
    if not split["train"] or not split["val"]:
        raise ValueError(
            f"code corpus needs files in both splits; got {len(split['train'])} train and "
            f"{len(split['val'])} val files from roots {cfg.resolved_roots()} (raise val_fraction or add files)")

    def sample_texts():
        used = 0
        for path in split["train"]:
            text = _read(path)
            yield text
            used += len(text.encode())
            if cfg.tokenizer_sample_bytes and used >= cfg.tokenizer_sample_bytes:
                return

    tok = train_bpe(sample_texts(), cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eos = eos_id(tok)
    counts = {}
    for name, paths in split.items():
        tmp = out / f"{name}.bin.tmp"
        n_tokens, n_bytes = 0, 0
        with open(tmp, "wb") as f:
            bar = tqdm(total=len(paths), desc=f"encode {name}", unit="file", disable=not progress)
            for start in range(0, len(paths), 256):
                texts = [_read(p) for p in paths[start:start + 256]]
                n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                for enc in tok.encode_batch(texts):
                    ids = np.asarray(enc.ids + [eos], dtype=dtype)
                    f.write(ids.tobytes())
                    n_tokens += len(ids)
                bar.update(len(texts))
            bar.close()
        os.replace(tmp, out / f"{name}.bin")
        counts[name] = {"files": len(paths), "tokens": n_tokens, "bytes": n_bytes}
    manifest = {
        "version": MANIFEST_VERSION,
        "config": asdict(cfg),
        "roots": cfg.resolved_roots(),
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": "tokenizer.json",
        "splits": counts,
        "scan": stats,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")       # written last: its presence marks a complete build
    return out


EVAL_FILES = ("manifest.json", "tokenizer.json", "val.bin")


class CodeCorpus:
    """A built corpus: tokenizer, manifest and memory-mapped token arrays.

    A run directory holds a copy of the files evaluation needs (``EVAL_FILES``, via
    ``copy_for_eval``), so a run can be evaluated after the corpus cache is gone."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"no manifest.json in {self.dir}: build the corpus first")
        self.manifest = json.loads(mf.read_text())
        self.tokenizer = load_tokenizer(self.dir / self.manifest["tokenizer"])
        self.vocab_size = self.manifest["vocab_size"]
        self.eos_id = self.manifest["eos_id"]

    def tokens(self, split: str) -> np.memmap:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")

    def sha256(self) -> str:
        """Digest of the corpus and its tokenizer: equal digests mean the same tokens and the same ids."""
        parts = {name: file_sha256(self.dir / name) for name in ("tokenizer.json", "train.bin", "val.bin")}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def copy_for_eval(self, dest: str | Path) -> Path:
        """Copy the manifest, tokenizer and validation tokens into ``dest`` (a self-contained run's ``data/``)."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in EVAL_FILES:
            shutil.copyfile(self.dir / name, tmp / name)
        os.replace(tmp, dest)
        return dest

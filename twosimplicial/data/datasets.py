"""From a ``[data]`` config table to training loaders and validation batches.

Two tasks:
- ``lm``: next-token prediction on a mixture of the code corpus (``code``) and the
  arithmetic word problems (``math``), weights from ``weights``;
- ``match3``: causal token classification (vocabulary ``M``, two classes).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..config_types import check_types
from .code import CodeCorpus, CodeCorpusConfig, build_code_corpus
from .loader import MixtureLoader, TokenChunks
from .match3 import Match3Source, balanced_modulus
from .math import math_problems, math_token_stream


@dataclass
class DataConfig:
    task: str = "lm"                       # "lm" | "match3"
    seq_len: int = 256
    batch_size: int = 8                    # per process and micro-batch
    cache_dir: str = ""                    # "": $TWOSIMPLICIAL_CACHE or ~/.cache/twosimplicial
    # lm
    weights: dict = field(default_factory=lambda: {"code": 0.9, "math": 0.1})
    code_roots: list = field(default_factory=list)   # []: stdlib + site-packages
    code_max_bytes: int = 0
    code_max_file_bytes: int = 500_000
    vocab_size: int = 8192
    val_fraction: float = 0.02
    tokenizer_sample_bytes: int = 16_000_000
    math_problems: int = 20_000
    # match3
    match3_n: int = 32
    match3_M: int = 0                      # 0: balanced_modulus(match3_n)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown [data] keys {sorted(unknown)}; known: {sorted(names)}")
        cfg = cls(**d)
        check_types("data", cfg)
        for name in ("seq_len", "batch_size", "vocab_size", "match3_n"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
        for name in ("code_max_bytes", "code_max_file_bytes", "tokenizer_sample_bytes", "math_problems", "match3_M"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(cfg, name)}")
        if cfg.task not in ("lm", "match3"):
            raise ValueError(f"data.task must be 'lm' or 'match3', got {cfg.task!r}")
        if not isinstance(cfg.weights, dict):
            raise TypeError(f"data.weights must be a table of source -> weight, got {cfg.weights!r}")
        unknown = set(cfg.weights) - {"code", "math"}
        if unknown:
            raise ValueError(f"data.weights may name 'code' and 'math', got {sorted(unknown)}")
        for k, v in cfg.weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"data.weights.{k} must be a number, got {v!r}")
            if not v >= 0:
                raise ValueError(f"data.weights.{k} must be >= 0, got {v!r}")
        if cfg.task == "lm" and not sum(cfg.weights.values()) > 0:
            raise ValueError(f"data.weights must give some source a positive weight, got {cfg.weights!r}")
        if cfg.task == "match3":
            if "seq_len" in d and d["seq_len"] != cfg.match3_n:
                raise ValueError(f"data.seq_len is data.match3_n for task 'match3': got seq_len={d['seq_len']!r}, "
                                 f"match3_n={cfg.match3_n!r} (leave seq_len out)")
            cfg.seq_len = cfg.match3_n
            if cfg.match3_M == 0:
                cfg.match3_M = balanced_modulus(cfg.match3_n)
        return cfg

    def code_corpus_config(self) -> CodeCorpusConfig:
        return CodeCorpusConfig(roots=list(self.code_roots), vocab_size=self.vocab_size,
                                val_fraction=self.val_fraction, max_bytes=self.code_max_bytes,
                                max_file_bytes=self.code_max_file_bytes,
                                tokenizer_sample_bytes=self.tokenizer_sample_bytes)


@dataclass
class Data:
    cfg: DataConfig
    train: MixtureLoader
    val_sources: dict                      # name -> source with get_many (deterministic order)
    vocab_size: int
    output_size: int | None                # None: predict tokens (vocab_size); else number of classes
    corpus: CodeCorpus | None = None

    def sha256(self) -> str:
        """Digest of what the model is trained on: the corpus and tokenizer for ``lm`` (see
        ``CodeCorpus.sha256``), the generating settings for ``match3`` (its data are a pure
        function of them and the seed)."""
        if self.corpus is not None:
            return self.corpus.sha256()
        spec = {"task": self.cfg.task, "match3_n": self.cfg.match3_n, "match3_M": self.cfg.match3_M}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def val_batches(self, name: str, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        src = self.val_sources[name]
        n = min(n_batches * batch_size, len(src))
        out = []
        for start in range(0, n, batch_size):
            x, y = src.get_many(np.arange(start, min(start + batch_size, n)))
            out.append((torch.from_numpy(x), torch.from_numpy(y)))
        return out


def prepare_corpus(cfg: DataConfig, progress: bool = True) -> Path | None:
    """Build the code corpus if the task needs one (call on one process before ``make_data``)."""
    if cfg.task != "lm":
        return None
    return build_code_corpus(cfg.code_corpus_config(), cfg.cache_dir or None, progress=progress)


def make_data(cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1, progress: bool = True) -> Data:
    if cfg.task == "match3":
        train = {"match3": Match3Source(cfg.match3_n, cfg.match3_M, seed, "train")}
        val = {"match3": Match3Source(cfg.match3_n, cfg.match3_M, seed, "val")}
        loader = MixtureLoader(train, batch_size=cfg.batch_size, seed=seed, rank=rank, world_size=world_size)
        return Data(cfg, loader, val, vocab_size=cfg.match3_M, output_size=2)
    corpus = CodeCorpus(prepare_corpus(cfg, progress=progress))
    eos = corpus.eos_id
    train = {"code": TokenChunks(corpus.tokens("train"), cfg.seq_len, seed)}
    val = {"code": TokenChunks(corpus.tokens("val"), cfg.seq_len, seed, shuffle=False)}
    weights = {k: v for k, v in cfg.weights.items() if v > 0}     # names and values checked in from_dict
    if "math" in weights:
        train["math"] = TokenChunks(math_token_stream(corpus.tokenizer, cfg.math_problems, seed, eos),
                                    cfg.seq_len, seed)
        held = math_problems(max(1, cfg.math_problems // 20), seed, "eval")
        ids = []
        for enc in corpus.tokenizer.encode_batch([p.text for p in held]):
            ids.extend(enc.ids + [eos])
        val["math"] = TokenChunks(np.asarray(ids, dtype=np.uint32), cfg.seq_len, seed, shuffle=False)
    train = {k: v for k, v in train.items() if k in weights}
    loader = MixtureLoader(train, weights, batch_size=cfg.batch_size, seed=seed, rank=rank, world_size=world_size)
    return Data(cfg, loader, val, vocab_size=corpus.vocab_size, output_size=None, corpus=corpus)

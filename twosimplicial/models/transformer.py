"""A decoder-only language model whose every k-th layer is 2-simplicial.

    x = embed(idx)
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))     (pre-norm residual blocks)
    logits = head(norm(x))

``attn`` is causal dot-product attention with RoPE (``layers/attention.py``) or, on
layers ``k-1, 2k-1, ...`` for ``simplicial_every=k``, 2-simplicial attention with
windows ``(w1, w2)`` (``layers/two_simplicial.py``). ``mlp`` is SwiGLU or a top-k
mixture of SwiGLU experts. Positions enter only through the rotary embeddings, so
``forward(idx, start_pos=p)`` runs the same model as if ``idx`` began at position ``p``.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .. import checkpoint
from .._validate import check_id_range, check_instance, check_int, check_token_ids
from ..layers.attention import Attention
from ..layers.cache import KVCache
from ..layers.mlp import MoE, SwiGLU
from ..layers.two_simplicial import TwoSimplicialAttention
from .config import ModelConfig

# Files of a ``save_pretrained`` directory. The weights file has the layout of a training
# checkpoint's (``twosimplicial.checkpoint``), so either loads into the same model.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = checkpoint.MANIFEST
_CHECKPOINT_NAME = re.compile(r"^step-\d{7}$")
_WHAT_LOADS = ("a run directory (config.json + checkpoints/), a checkpoint directory "
               "(RUN/checkpoints/step-XXXXXXX) or a save_pretrained directory (config.json + model.safetensors "
               "+ manifest.json)")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if kind == "simplicial":
            self.attn = TwoSimplicialAttention(
                cfg.dim, cfg.simplicial_heads, cfg.simplicial_kv_heads, cfg.simplicial_head_dim,
                w1=cfg.w1, w2=cfg.w2, form=cfg.form, kv_offsets=cfg.kv_offsets,
                rotary=cfg.simplicial_rotary, rope_theta=cfg.rope_theta)
        else:
            self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MoE(cfg.dim, cfg.mlp_hidden, cfg.n_experts, cfg.moe_top_k)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x, start_pos=0, cache=None):
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        h = self.mlp(self.mlp_norm(x))
        aux = None
        if isinstance(h, tuple):                                   # MoE: (output, load-balancing loss)
            h, aux = h
        return x + h, aux


class TwoSimplicialLM(nn.Module):
    """``forward(idx [B, S] long, targets=None, *, cache=None, start_pos=None) -> (logits, loss)``.

    * ``logits``: ``[B, S, output_size]``.
    * ``loss``: ``None`` without targets, else mean cross-entropy over targets != -100,
      plus ``moe_aux_weight * aux`` for MoE models; ``aux`` (the mean over MoE layers of the
      load-balancing loss, 0 for dense models) is kept in ``self.last_aux_loss``.
    * ``cache``: a :class:`KVCache` from :meth:`new_cache`. The call then continues the
      sequence whose past the cache holds, at position ``cache.pos``, and advances it.
    * ``start_pos``: the absolute position of ``idx[:, 0]`` (default ``cache.pos`` or 0).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.output_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.last_aux_loss = torch.zeros(())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 / nanoGPT init: N(0, init_std) everywhere, and the projections that write into
        the residual stream (attention ``out_proj``, MLP ``down``) scaled by ``1/sqrt(2 * n_layers)``
        so the residual's variance does not grow with depth. Norm weights are 1."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:                                         # RMSNorm weights, biases
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith(("out_proj.weight", "down.weight", "mlp.down")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding (see ``twosimplicial.generate``)."""
        return KVCache([blk.attn.new_cache() for blk in self.blocks])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int | None = None):
        cfg = self.config
        check_token_ids("idx", idx)
        B, S = idx.shape
        if idx.device != self.embed.weight.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.embed.weight.device}")
        if targets is not None:
            check_token_ids("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if targets.device != idx.device:
                raise ValueError(f"targets is on {targets.device} but idx is on {idx.device}")
        if start_pos is not None:
            start_pos = check_int("start_pos", start_pos, 0)
        if cache is not None:
            check_instance("cache", cache, KVCache, "a KVCache (model.new_cache()) or None")
            if start_pos is not None and start_pos != cache.pos:
                raise ValueError(f"start_pos={start_pos} disagrees with the cache, which is at position {cache.pos}")
            start_pos = cache.pos
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.blocks)}; "
                                 "make it with model.new_cache()")
        start_pos = 0 if start_pos is None else start_pos
        if start_pos + S > cfg.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + S - 1} exceed max_seq_len={cfg.max_seq_len}")
        check_id_range("idx", idx, cfg.vocab_size)
        if targets is not None:
            check_id_range("targets", targets, cfg.output_size, ignore_index=-100)

        x = self.embed(idx)
        aux_losses = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, start_pos, None if cache is None else cache.layers[i])
            if aux is not None:
                aux_losses.append(aux)
        logits = self.head(self.norm(x))
        if cache is not None:
            cache.pos += S

        self.last_aux_loss = torch.stack(aux_losses).mean() if aux_losses else logits.new_zeros((), dtype=torch.float32)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            if aux_losses:
                loss = loss + self.config.moe_aux_weight * self.last_aux_loss
        return logits, loss

    # ----------------------------------------------------------------------- saving and loading
    def save_pretrained(self, directory: str | os.PathLike, *, tokenizer=None) -> Path:
        """Write the model to ``directory`` (created if needed), in the layout Hugging Face users expect:

        * ``model.safetensors``: the state dict (a tied head under both of its names, as in
          training checkpoints);
        * ``config.json``: the :class:`ModelConfig` as a dict (``ModelConfig.from_dict`` rebuilds it);
        * ``tokenizer.json``: ``tokenizer`` (a ``tokenizers.Tokenizer``), when given;
        * ``manifest.json``: the SHA-256 of each file above, written last.

        Every file is written under a temporary name and renamed into place, and an earlier
        save's manifest is removed first: a save interrupted at any moment leaves a directory
        that :meth:`from_pretrained` refuses, never one that mixes two models. Files an earlier
        save wrote and this one does not (its tokenizer) are removed. Returns the directory.
        """
        from tokenizers import Tokenizer

        from .. import __version__
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or None, got {type(tokenizer).__name__}")
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"directory {out} exists and is not a directory")
        if _is_run_dir(out) or _is_checkpoint_dir(out):
            raise ValueError(f"directory {out} is a training run's (or one of its checkpoints): save_pretrained "
                             "would overwrite its files; choose another directory")
        out.mkdir(parents=True, exist_ok=True)
        try:                                        # the files an earlier save wrote here
            earlier = checkpoint.read_manifest(out)["files"] if (out / MANIFEST_FILE).is_file() else {}
        except checkpoint.CheckpointError:
            earlier = {}
        (out / MANIFEST_FILE).unlink(missing_ok=True)

        # clone: safetensors refuses tensors that share memory (a tied head); both names are kept
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        tmp = out / f".{WEIGHTS_FILE}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / WEIGHTS_FILE)
        checkpoint.write_atomic(out / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2))
        files = [WEIGHTS_FILE, CONFIG_FILE]
        if tokenizer is not None:
            checkpoint.write_atomic(out / TOKENIZER_FILE, tokenizer.to_str())
            files.append(TOKENIZER_FILE)
        for name in earlier:
            if name not in files and Path(name).name == name:
                (out / name).unlink(missing_ok=True)
        checkpoint.write_manifest(out, files, library="twosimplicial", version=__version__)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "TwoSimplicialLM":
        """The model stored at ``path``, on ``device``, in eval mode. ``path`` is one of:

        * a run directory (``twosimplicial train``): its latest intact checkpoint, chosen and
          verified by ``twosimplicial.checkpoint.resolve`` (a missing or corrupt latest one falls
          back to the newest intact one, with a warning on stderr); the config is the run's;
        * a checkpoint directory ``RUN/checkpoints/step-XXXXXXX``: verified by its manifest;
          the config is ``RUN/config.json``'s;
        * a directory written by :meth:`save_pretrained`: verified by its manifest.

        A file whose digest does not match its manifest raises ``CheckpointError`` (a
        ``ValueError``) naming it. ``model.pretrained_source`` records what was loaded:
        ``{"kind": "run" | "checkpoint" | "saved", "path": <the weights' directory>,
        "step": <training step, None for a saved directory>}``. The tokenizer, where there is
        one, is ``RUN/data/tokenizer.json`` or ``<saved>/tokenizer.json``
        (``tokenizers.Tokenizer.from_file``).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from None
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: from_pretrained takes {_WHAT_LOADS}")
        if not p.is_dir():
            raise ValueError(f"{p} is not a directory: from_pretrained takes {_WHAT_LOADS}")
        if _is_run_dir(p):
            kind, config, config_file = "run", _model_config(p / CONFIG_FILE, run=True), p / CONFIG_FILE
            weights_dir = checkpoint.resolve(p, warn=checkpoint.warn)
            if weights_dir is None:
                raise FileNotFoundError(f"{p} holds no checkpoint yet (nothing in {p / 'checkpoints'})")
            step = int(checkpoint.read_manifest(weights_dir)["step"])
        elif _is_checkpoint_dir(p):
            kind, config_file = "checkpoint", p.parent.parent / CONFIG_FILE
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file} is missing: the checkpoint {p} takes its config from its run")
            step = int(checkpoint.verify(p)["step"])
            config, weights_dir = _model_config(config_file, run=True), p
        elif (p / CONFIG_FILE).is_file() or (p / MANIFEST_FILE).is_file():
            kind, config_file, weights_dir, step = "saved", p / CONFIG_FILE, p, None
            checkpoint.verify(p, required=(WEIGHTS_FILE, CONFIG_FILE))
            config = _model_config(config_file, run=False)
        else:
            raise ValueError(f"{p} is not {_WHAT_LOADS}")
        model = cls(config)
        weights = weights_dir / WEIGHTS_FILE
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise ValueError(f"{weights} does not fit the model of {config_file}: {str(e).strip()}") from None
        model.pretrained_source = {"kind": kind, "path": str(weights_dir), "step": step}
        return model.to(device).eval()


def _is_run_dir(p: Path) -> bool:
    """A training run's directory: ``checkpoints/``, or a config.json with the run's resolved model."""
    if (p / "checkpoints").is_dir():
        return True
    try:
        return "model_resolved" in json.loads((p / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _is_checkpoint_dir(p: Path) -> bool:
    return bool(_CHECKPOINT_NAME.match(p.name)) and p.parent.name == "checkpoints"


def _model_config(config_file: Path, *, run: bool) -> ModelConfig:
    """The ModelConfig of a run's config.json (its ``model_resolved``) or of a saved one (the whole file)."""
    try:
        d = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if run:
        if not isinstance(d, dict) or not isinstance(d.get("model_resolved"), dict):
            raise ValueError(f"{config_file}: a run's config must hold the model's config under 'model_resolved'")
        d = d["model_resolved"]
    if not isinstance(d, dict):
        raise ValueError(f"{config_file}: expected a JSON object of ModelConfig fields")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{config_file}: {e}") from None


def count_parameters(config_or_model) -> dict[str, int]:
    """Exact parameter counts from the config alone (or a model's config).

    * ``total``: every parameter (a tied head counted once).
    * ``active``: per token: MoE layers count the router and ``moe_top_k`` experts only.
    * ``non_embedding``: total minus the token-embedding table (an untied head stays: it is
      a matmul every token pays for).
    * ``active_non_embedding``: active minus the embedding table.
    * ``matmul``: the matrix parameters a token passes through (projections, active experts and
      router, the output head even when tied; no norms, no embedding lookup): what FLOP counts
      multiply (``twosimplicial.models.flops``).
    """
    cfg = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig or TwoSimplicialLM, got {type(config_or_model).__name__}")
    d, h = cfg.dim, cfg.mlp_hidden

    def attn_dot():
        D = cfg.head_dim                  # q, k, v, out projections (no biases)
        return d * cfg.n_heads * D + 2 * d * cfg.n_kv_heads * D + cfg.n_heads * D * d

    def attn_simplicial():
        D = cfg.simplicial_head_dim       # q, k1, v1, k2, v2, out projections
        return d * cfg.simplicial_heads * D + 4 * d * cfg.simplicial_kv_heads * D + cfg.simplicial_heads * D * d

    expert = 3 * d * h                    # SwiGLU: gate, up, down
    if cfg.n_experts:
        mlp_total = d * cfg.n_experts + cfg.n_experts * expert
        mlp_active = d * cfg.n_experts + cfg.moe_top_k * expert
    else:
        mlp_total = mlp_active = expert
    norms = 2 * d                         # two RMSNorms per block
    attn = sum(attn_simplicial() if k == "simplicial" else attn_dot() for k in cfg.layer_kinds())
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.output_size
    shared = embed + head + d + attn + cfg.n_layers * norms    # + final norm
    total = shared + cfg.n_layers * mlp_total
    active = shared + cfg.n_layers * mlp_active
    matmul = attn + cfg.n_layers * mlp_active + d * cfg.output_size
    return {"total": total, "active": active, "non_embedding": total - embed,
            "active_non_embedding": active - embed, "matmul": matmul}

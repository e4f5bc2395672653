"""Autoregressive sampling with a KV cache for both layer kinds.

The prompt is run once (prefill); each new token is then one forward step of a
single position that reads the cached keys/values (``model.new_cache()``): all past
positions for dot-product layers, only the last ``w1 - 1`` / ``w2 - 1`` for
2-simplicial layers. ``use_cache=False`` recomputes the whole sequence every step
(the reference the cache is tested against).

Past ``max_seq_len`` the context slides: the model sees the last ``max_seq_len``
tokens, at positions ``0 .. max_seq_len-1``, as it did in training. Every position
then shifts each step, so no cache can be reused and both modes recompute the window.
"""
from __future__ import annotations

import torch
from torch import nn

from ._validate import check_bool, check_instance, check_int, check_real, check_token_ids


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next tokens ``[B, 1]`` from last-position logits ``[B, V]``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
             return_logits: bool = False):
    """Extend ``idx [B, S]`` (long) by ``max_new_tokens`` sampled tokens.

    Args:
        model: a ``TwoSimplicialLM`` (anything with its ``forward``/``new_cache``/``config``).
        temperature: divides the logits; ``0`` means greedy (argmax).
        top_k: sample among the ``top_k`` most likely tokens only.
        use_cache: reuse keys/values (and 2-simplicial windows) across steps.
        generator: a ``torch.Generator`` for reproducible sampling.
        return_logits: also return the logits each new token was drawn from, ``[B, max_new_tokens, V]``.

    Returns:
        ``idx [B, S + max_new_tokens]`` (and the logits with ``return_logits``).
    """
    check_token_ids("idx", idx)                # the ids' range: the model's forward checks it
    if idx.shape[1] < 1:
        raise ValueError(f"idx must hold at least one token per row, got shape {tuple(idx.shape)}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    temperature = check_real("temperature", temperature, minimum=0, what="a number >= 0 (0 = greedy)")
    if top_k is not None:
        top_k = check_int("top_k", top_k, 1, what="None or an integer >= 1")
    check_bool("use_cache", use_cache)
    check_bool("return_logits", return_logits)
    if generator is not None:
        check_instance("generator", generator, torch.Generator, "a torch.Generator or None")
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None
    step_logits = []
    try:
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos >= max_len:
                cache = None                   # sliding from here on: nothing cached can be reused
            if cache is not None and cache.pos > 0:
                logits, _ = model(idx[:, -1:], cache=cache)             # one new position
            else:
                logits, _ = model(idx[:, -max_len:], cache=cache)       # prefill, no cache, or a sliding window
            last = logits[:, -1]
            step_logits.append(last)
            idx = torch.cat([idx, _sample(last, temperature, top_k, generator)], dim=1)
    finally:
        model.train(was_training)
    if return_logits:
        V = model.config.output_size
        return idx, (torch.stack(step_logits, 1) if step_logits else idx.new_zeros(idx.shape[0], 0, V).float())
    return idx

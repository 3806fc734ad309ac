"""Sampling continuations from the model: temperature, top-k, top-p, with a key/value cache.

The choices, stated once:

* ``temperature=0`` is greedy decoding (the most likely token, no randomness); otherwise the
  logits are divided by the temperature, then top-k and then top-p filtering apply. The
  logits are shifted by their maximum first and the temperature is taken as at least the
  smallest normal float32, so any positive temperature is safe: one as small as ``1e-320``
  samples among the most likely tokens only (greedy, ties drawn at random) instead of
  overflowing to ``inf`` and NaN probabilities.
* top-k keeps every token whose logit is at least the k-th largest (ties at the threshold are
  all kept); top-p keeps the smallest set of most likely tokens whose probability reaches p
  (always at least the most likely one).
* Randomness comes only from ``generator`` (a ``torch.Generator`` on the model's device), so a
  seed fixes the samples; the global RNG is never touched.
* The context is not slid: the prompt plus ``max_new_tokens`` must fit in ``block_size``
  (a ``ValueError`` says by how much it does not). Positions past ``block_size`` were never
  trained, and sliding would silently change what the model conditions on.
* Padded vocabulary entries (``pad_vocab_to``) are never sampled: only the first
  ``vocab_size`` logits are considered.
* With ``eos_id``, a sequence that has produced it keeps producing it (its remaining
  positions are ``eos_id``) and generation stops once every sequence has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


def check_sampling(
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
) -> None:
    """``ValueError`` naming the argument and its allowed range, before any work."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        high = vocab_size if vocab_size is not None else "V"
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer in [1, {high}] (or None: off), got {top_k!r}")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k must be an integer in [1, {vocab_size}] (or None: off), got {top_k}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None: off), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits [..., V]`` with the tokens outside top-k, then outside top-p, set to ``-inf``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already reach p; the first is always kept
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (int64 ``[B]``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # (z - max z) / T <= 0: never +inf (-inf where it overflows: probability 0); T below float32's
    # smallest normal number would round to 0 and give 0 / 0 at the maximum
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    logits = filter_logits(shifted / max(temperature, torch.finfo(torch.float32).tiny), top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def generate_tokens(
    model: Any,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """An iterator over the next token of every sequence (``[B]``), one step at a time (for
    streaming). Arguments are checked here, before the first forward pass. ``use_cache=False`` recomputes the
    whole sequence every step (the reference the cache is tested and timed against).
    """
    cfg = model.config
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be [B, T] token ids with T >= 1, got shape {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = idx.shape[1] + max_new_tokens
    if total > cfg.block_size:
        raise ValueError(
            f"the prompt ({idx.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) is {total} tokens, "
            f"beyond the model's context (block_size {cfg.block_size}); at most "
            f"{cfg.block_size - idx.shape[1]} new tokens fit after this prompt"
        )
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=cfg.vocab_size)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id must be in [0, {cfg.vocab_size}), got {eos_id}")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _steps(model, idx, max_new_tokens, sampling, eos_id, use_cache)


@torch.no_grad()
def _steps(
    model: Any,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: dict[str, Any],
    eos_id: int | None,
    use_cache: bool,
) -> Iterator[torch.Tensor]:
    vocab_size = model.config.vocab_size
    cache = model.new_cache(idx.shape[1] + max_new_tokens) if use_cache else None
    seq, step_input = idx, idx
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(step_input, cache) if use_cache else model(seq)
        logits = logits[:, -1, :vocab_size]  # padded ids are never candidates
        token = next_token(logits, **sampling)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        yield token
        if eos_id is not None and bool(done.all()):
            return
        step_input = token[:, None]
        if not use_cache:
            seq = torch.cat((seq, step_input), dim=1)


@torch.no_grad()
def generate(
    model: Any,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """``idx [B, T]`` followed by up to ``max_new_tokens`` sampled tokens (fewer when every
    sequence reached ``eos_id``). See the module docstring for the sampling rules."""
    steps = generate_tokens(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        eos_id=eos_id,
        use_cache=use_cache,
    )
    return torch.cat([idx, *(t[:, None] for t in steps)], dim=1)

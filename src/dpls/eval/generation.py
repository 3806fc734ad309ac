"""Text from a trained model: prompts, streamed samples, and what the samples look like.

The token-level sampler is `dpls.model.generate` (temperature, top-k, top-p, a key/value
cache). This module adds the tokenizer's side and the statistics studies report:

* a prompt is encoded after ``<|endoftext|>``, because every training document starts
  with it; an empty prompt is then that token alone (a new document);
* a sample ends at the first ``<|endoftext|>`` (the document is over) or after
  ``max_new_tokens``;
* text is streamed in whole characters: a token that ends inside a UTF-8 character is held
  back until the character is complete.

Generation metrics of a set of samples (token ids, the end-of-text token excluded):
``distinct_1/2/3`` (distinct n-grams over all n-grams of all samples, Li et al. 2016),
``repetition_4`` (the share of 4-grams that already occurred earlier in the same sample)
and ``mean_length`` (tokens before end-of-text, or all of them when none came).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpls.data import tokenizer as data_tokenizer  # looked up per call: tests replace load_tokenizer
from dpls.data.meta import DataMeta
from dpls.data.shards import read_shard
from dpls.model.generate import check_sampling, generate_tokens
from dpls.runs.checkpoint import load_model

GENERATION_METRICS = ("distinct_1", "distinct_2", "distinct_3", "repetition_4", "mean_length")


@dataclass(frozen=True)
class Sampling:
    """How to sample (checked on construction: a bad value is a ``ValueError`` before any work)."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 1337

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(
                f"seed must be an integer in [0, 2**64 - 1] (what torch.Generator takes), got {seed!r}"
            )


@dataclass
class Sample:
    """One sample: its token ids (after the prompt, end-of-text excluded), text and timing."""

    prompt: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ended: bool = False  # stopped at end-of-text (not at max_new_tokens)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        generated = len(self.tokens) + int(self.ended)
        return generated / self.seconds if self.seconds > 0 else float("nan")


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``<|endoftext|>`` then the prompt's tokens; a ``ValueError`` for an empty prompt when
    the tokenizer has no end-of-text token to start from."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable bytes from the command line arrive as surrogates
        raise ValueError(
            f"the prompt is not valid UTF-8 text (character {err.start}: {prompt[err.start : err.end]!r}); "
            "give UTF-8 text (or a UTF-8 file with --prompt-file)"
        ) from None
    eot = getattr(tokenizer, "eot", None)
    if eot is None:
        if not prompt:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        return list(tokenizer.encode(prompt))
    return [int(eot), *tokenizer.encode(prompt)]


def check_fits(model: Any, ids: Sequence[int], max_new_tokens: int) -> None:
    """The prompt plus ``max_new_tokens`` fits the model's context (``ValueError`` otherwise)."""
    block = model.config.block_size
    if len(ids) + max_new_tokens > block:
        room = block - len(ids)
        hint = f"at most {room} new tokens fit after it" if room > 0 else "shorten the prompt"
        raise ValueError(
            f"the prompt is {len(ids)} tokens (with <|endoftext|>) and max_new_tokens {max_new_tokens}: "
            f"{len(ids) + max_new_tokens} tokens exceed the model's context (block_size {block}); {hint}"
        )


def stream_sample(
    model: Any, tokenizer: Any, prompt: str, sampling: Sampling, generator: Any, device: Any = "cpu"
) -> Iterator[tuple[str, Sample]]:
    """Yield ``(new_text, sample_so_far)`` as tokens come; the last yield has the whole sample."""
    ids = prompt_ids(tokenizer, prompt)
    check_fits(model, ids, sampling.max_new_tokens)
    eot = getattr(tokenizer, "eot", None)
    steps = generate_tokens(
        model,
        torch.tensor([ids], dtype=torch.long, device=device),
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=generator,
        eos_id=eot,
    )
    sample = Sample(prompt=prompt)
    start = time.perf_counter()
    for token in steps:
        t = int(token[0])
        if t == eot:
            sample.ended = True
            break
        sample.tokens.append(t)
        text = tokenizer.decode(sample.tokens)
        if text.endswith("\ufffd"):  # inside a multi-byte character: wait for the rest
            continue
        new, sample.text = text[len(sample.text) :], text
        sample.seconds = time.perf_counter() - start
        yield new, sample
    sample.seconds = time.perf_counter() - start
    text = tokenizer.decode(sample.tokens)
    new, sample.text = text[len(sample.text) :], text
    yield new, sample


def sample_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    num_samples: int = 1,
    device: Any = "cpu",
) -> list[list[Sample]]:
    """``num_samples`` samples per prompt, in order, from one generator seeded with
    ``sampling.seed``: the same seed and model give the same samples."""
    gen = make_generator(sampling.seed, device)
    out = []
    for prompt in prompts:
        samples = []
        for _ in range(num_samples):
            *_, (_, sample) = stream_sample(model, tokenizer, prompt, sampling, gen, device)
            samples.append(sample)
        out.append(samples)
    return out


def make_generator(seed: int, device: Any = "cpu") -> Any:
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


# -- samples of a run, for studies -----------------------------------------------------------------


def validation_prompts(data_dir: str | Path, count: int, length: int) -> list[list[int]]:
    """The openings of the first ``count`` validation documents with at least ``length``
    tokens: ``<|endoftext|>`` and their first ``length`` tokens (fixed, so every arm of a
    study is given the same prompts). Fewer come back when the split has fewer such documents."""
    meta = DataMeta.load(data_dir, check_shards=False)
    eot = meta.eot_token
    prompts: list[list[int]] = []
    for name in meta.val_shards:
        tokens = read_shard(Path(data_dir) / name)
        for start in np.flatnonzero(tokens == eot):
            opening = tokens[start : start + 1 + length]
            if len(opening) == length + 1 and not (opening[1:] == eot).any():
                prompts.append([int(t) for t in opening])
                if len(prompts) == count:
                    return prompts
    return prompts


def run_samples(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    num_samples: int,
    prompt_tokens: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    device: Any = "cpu",
) -> dict[str, Any]:
    """``num_samples`` samples of a checkpoint, one per validation prompt, drawn in one batch
    with a generator seeded by ``seed`` (so arms given the same seed share their random
    numbers), and their generation metrics: what ``samples.json`` of a study run holds.

    Never an error after a study's training: too few validation documents give fewer
    samples, and none (or no room in the context) gives none; a tokenizer that cannot be
    loaded here (GPT-2's, offline) leaves the texts as token ids. A ``note`` says which.
    """
    eot = DataMeta.load(data_dir, check_shards=False).eot_token
    notes = []
    decode: Callable[[Sequence[int]], str]
    try:
        decode = data_tokenizer.load_tokenizer(data_dir).decode
    except (ValueError, OSError) as err:  # OSError: a download that cannot happen here
        notes.append(f"texts are token ids: the tokenizer could not be loaded ({err})")

        def decode(ids: Sequence[int]) -> str:
            return " ".join(str(i) for i in ids)

    prompts = validation_prompts(data_dir, num_samples, prompt_tokens)
    model = load_model(checkpoint, device=device)
    new = min(max_new_tokens, model.config.block_size - (prompt_tokens + 1))
    settings = {
        "num_samples": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new,
        "temperature": temperature,
        "seed": seed,
    }
    if not prompts:
        notes.append(f"no validation document has {prompt_tokens} tokens to prompt with")
    elif new < 1:
        notes.append(
            f"a prompt of {prompt_tokens} tokens leaves no room in block_size {model.config.block_size}"
        )
    if not prompts or new < 1:
        return {"settings": settings, "prompts": [], "samples": [], "metrics": {}, "notes": notes}
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    out = model.generate(
        idx, new, temperature=temperature, generator=make_generator(seed, device), eos_id=eot
    )
    samples = [row[: row.index(eot)] if eot in row else row for row in out[:, idx.shape[1] :].tolist()]
    return {
        "settings": settings,
        "prompts": [decode(p[1:]) for p in prompts],
        "samples": [decode(t) for t in samples],
        "metrics": generation_metrics(samples),
        "notes": notes,
    }


# -- what the samples look like ------------------------------------------------------------------


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def generation_metrics(samples: Iterable[Sequence[int]]) -> dict[str, float]:
    """Diversity and repetition of token sequences (see the module docstring); NaN where a
    measure has nothing to count (no n-gram of that length)."""
    samples = [list(s) for s in samples]
    out: dict[str, float] = {}
    for n in (1, 2, 3):
        grams = [g for s in samples for g in _ngrams(s, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else float("nan")
    repeated = total = 0
    for s in samples:
        seen: set[tuple[int, ...]] = set()
        for g in _ngrams(s, 4):
            repeated += g in seen
            total += 1
            seen.add(g)
    out["repetition_4"] = repeated / total if total else float("nan")
    out["mean_length"] = sum(len(s) for s in samples) / len(samples) if samples else float("nan")
    return out

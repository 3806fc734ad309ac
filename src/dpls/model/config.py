"""The model's configuration and the named presets.

One small typed config describes every model the project trains. Presets are plain
``ModelConfig`` values, so ``model_config("124m", attention="tpa")`` is all it takes to try a
variant; the trainer overrides ``vocab_size`` from the data directory's ``meta.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

ATTENTIONS = ("mha", "gqa", "tpa")


def swiglu_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """SwiGLU width: 8/3·n_embd (same parameters as a 4·n_embd GELU MLP), rounded up to
    ``multiple_of`` so the matmuls stay on tensor-core friendly sizes."""
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, no biases, tied embeddings by default.

    ``attention``: ``"mha"`` (``n_kv_head`` = ``n_head``), ``"gqa"`` (``n_kv_head`` divides
    ``n_head``) or ``"tpa"`` (Tensor Product Attention, T6: queries, keys and values built per
    token from rank-``tpa_q_rank`` / ``tpa_kv_rank`` factors). ``head_dim`` defaults to
    ``n_embd // n_head``; T6 configs decouple it to match parameter counts.

    ``qk_norm``: RMSNorm over each head's queries and keys before RoPE (Dehghani et al. 2023),
    the standard cure for attention logits that grow without bound at high learning rates;
    ``"mha"``/``"gqa"`` only. It exports as Hugging Face's Qwen3, whose attention has the same norms.

    ``pad_vocab_to``: the embedding and output layer get ``padded_vocab_size`` rows, the
    vocabulary rounded up to this multiple (GPT-2's 50257 → 50304 with 64: matmul shapes that
    suit tensor cores). ``vocab_size`` stays the tokenizer's; the padded logits are exactly
    ``-inf``, so no probability, loss or sample ever reaches a padded id. 1: no padding.

    ``logit_softcap``: the output logits become ``cap·tanh(z / cap)`` (Gemma 2's final-logit
    soft-capping; nanochat uses 15), before any loss, sampling or evaluation; the padded logits
    stay ``-inf``. None: off.
    """

    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention)
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: swiglu_hidden(n_embd)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "mha"
    tpa_q_rank: int = 6
    tpa_kv_rank: int = 2
    tie_embeddings: bool = True
    init_std: float = 0.02
    pad_vocab_to: int = 1
    qk_norm: bool = False
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "tpa_q_rank", "tpa_kv_rank")
        for name in (*positive, "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            fits = [
                h
                for h in range(1, min(self.n_embd, 64) + 1)
                if self.n_embd % h == 0 and (self.n_embd // h) % 2 == 0
            ]
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) into an even head size; "
                f"n_head values that fit: {', '.join(map(str, fits))} (or change n_embd)"
            )
        if self.resolved_head_dim < 2 or self.resolved_head_dim % 2:
            raise ValueError(
                f"head_dim (n_embd // n_head unless set) must be even and >= 2, since RoPE rotates "
                f"pairs of features; got {self.resolved_head_dim}"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv:
            raise ValueError(f"n_kv_head must be a positive divisor of n_head ({self.n_head}), got {kv}")
        if self.attention == "mha" and kv != self.n_head:
            raise ValueError(
                f"attention='mha' uses n_kv_head = n_head ({self.n_head}), got {kv}; use attention='gqa'"
            )
        if self.attention == "tpa" and kv != self.n_head:
            raise ValueError(
                f"attention='tpa' forms keys for every head: n_kv_head must be None or {self.n_head}"
            )
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be true or false, got {self.qk_norm!r}")
        if self.qk_norm and self.attention == "tpa":
            raise ValueError("qk_norm is implemented for attention='mha' and 'gqa', not 'tpa'")
        cap = self.logit_softcap
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int | float) or not (math.isfinite(cap) and cap > 0)
        ):
            raise ValueError(f"logit_softcap must be a finite number > 0 (or unset: off), got {cap!r}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be positive, got {self.intermediate_size}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: ``vocab_size`` rounded up to ``pad_vocab_to``."""
        return self.pad_vocab_to * math.ceil(self.vocab_size / self.pad_vocab_to)

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else swiglu_hidden(self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict (a checkpoint's saved config), rejecting unknown keys by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], fields, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown model config key {unknown[0]!r}{extra}; valid keys: {sorted(fields)}")
        return cls(**values)


_GPT2: dict[str, Any] = dict(
    vocab_size=50257, pad_vocab_to=64
)  # GPT-2's vocabulary, padded to 50304 as in nanoGPT

PRESETS: dict[str, ModelConfig] = {
    # ~1.9M parameters with the embedded corpus' 8192-token vocabulary: the CPU demo model.
    "tiny": ModelConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=128),
    # ~30M with an 8192 vocabulary (~51M with GPT-2's): quick single-GPU experiments.
    "small": ModelConfig(vocab_size=8192, block_size=1024, n_layer=8, n_head=8, n_embd=512),
    # GPT-2 / nanoGPT sizes, LLaMA-style (the T6 and DPLS papers' scale ladder).
    "124m": ModelConfig(**_GPT2, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "350m": ModelConfig(**_GPT2, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "760m": ModelConfig(**_GPT2, block_size=1024, n_layer=24, n_head=16, n_embd=1536),
    "1.3b": ModelConfig(**_GPT2, block_size=1024, n_layer=24, n_head=32, n_embd=2048),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied (validated like any ``ModelConfig``)."""
    if preset not in PRESETS:
        hint = difflib.get_close_matches(preset, PRESETS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown model preset {preset!r}{extra}; choose one of {list(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config key {unknown[0]!r}; valid keys: {sorted(fields)}")
    return dataclasses.replace(PRESETS[preset], **overrides)

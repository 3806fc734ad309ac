"""A LLaMA-style decoder, readable top to bottom.

RMSNorm → attention → residual, RMSNorm → SwiGLU → residual, repeated; a final RMSNorm and an
output projection tied to the token embedding. Parameter names are exactly those of Hugging
Face ``LlamaForCausalLM`` (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
..., ``model.norm.weight``) and RoPE uses the same ``rotate_half`` convention, so exporting an
``"mha"``/``"gqa"`` model is a plain copy of ``state_dict()``.

With tied embeddings there is no ``lm_head`` module: the logits are ``hidden @ embed_tokens.weight.T``
and ``state_dict()`` holds the matrix once, under ``model.embed_tokens.weight`` (Hugging Face
re-ties ``lm_head.weight`` to it on load).

Building on the ``meta`` device works: ``model.to_empty(device=...)`` then ``model.init_weights()``
(which also recomputes the RoPE tables, non-persistent buffers).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpls.model.cache import KVCache, LayerCache
from dpls.model.config import ModelConfig
from dpls.model.generate import generate


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (as in LLaMA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device | None = None):
    """cos, sin ``[length, head_dim]`` in float32, each frequency repeated over both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x``; ``cos``/``sin`` broadcast against it."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


@torch.no_grad()
def causal_logit_max(q: torch.Tensor, k: torch.Tensor, chunk_elements: int = 1 << 26) -> torch.Tensor:
    """The largest pre-softmax attention logit ``q·k/√D`` over causal pairs and heads.

    ``q`` ``[B, H, T, D]``, ``k`` ``[B, Hkv, T, D]`` (grouped heads repeated). SDPA never
    shows its scores, so this is one extra ``q @ kᵀ`` (no softmax, no backward), done only when
    asked (the trainer's log steps), a few sequences at a time to bound the ``[.., T, T]`` memory.
    """
    B, H, T, D = q.shape
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    per = max(1, chunk_elements // max(1, H * T * T))
    best = torch.full((), float("-inf"), device=q.device)
    for i in range(0, B, per):
        scores = (q[i : i + per].float() @ k[i : i + per].float().transpose(-2, -1)) / math.sqrt(D)
        best = torch.maximum(best, scores.masked_fill(future, float("-inf")).amax())
    return best


class LogitRecorder:
    """Mixin of the attention modules: with ``record_logit_max`` set (the trainer sets it on
    log steps only), a training forward stores its largest pre-softmax logit in ``logit_max``."""

    record_logit_max: bool = False
    logit_max: torch.Tensor | None = None

    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if self.record_logit_max:
            self.logit_max = causal_logit_max(q.detach(), k.detach())


class Attention(LogitRecorder, nn.Module):
    """Causal self-attention with grouped key/value heads (``n_kv_head == n_head``: plain MHA).

    With ``qk_norm``, queries and keys are RMS-normalised per head (one learned scale over the
    head dimension each) before RoPE, which bounds the attention logits' growth.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:  # generation: attend to the cached keys and values too
            mask, causal = cache.attention_mask(T, x.device)
            k, v = cache.extend(2, k, v)
        else:
            self._record(q, k)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=residual_std)
        if hasattr(self, "q_norm"):  # ones: no random numbers, so every other weight's init is unchanged
            nn.init.ones_(self.q_norm.weight)
            nn.init.ones_(self.k_norm.weight)


class TensorProductAttention(LogitRecorder, nn.Module):
    """Tensor Product Attention (T6, "Tensor Product Attention Is All You Need", 2025).

    Every token builds its own low-rank queries, keys and values: for each of q/k/v, an
    ``A`` projection gives head factors ``[H, R]`` and a ``B`` projection gives feature
    factors ``[R, D]``; the per-token head matrix is ``A @ B / R``. Only the factors would be
    cached at inference (the point of TPA). RoPE is linear in the feature axis, so rotating
    the ``B`` factors equals rotating the assembled queries and keys, and is cheaper.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, H, D = cfg.n_embd, cfg.n_head, cfg.resolved_head_dim
        self.n_head, self.head_dim = H, D
        self.q_rank, self.kv_rank = cfg.tpa_q_rank, cfg.tpa_kv_rank
        self.q_a_proj = nn.Linear(C, H * self.q_rank, bias=False)
        self.k_a_proj = nn.Linear(C, H * self.kv_rank, bias=False)
        self.v_a_proj = nn.Linear(C, H * self.kv_rank, bias=False)
        self.q_b_proj = nn.Linear(C, self.q_rank * D, bias=False)
        self.k_b_proj = nn.Linear(C, self.kv_rank * D, bias=False)
        self.v_b_proj = nn.Linear(C, self.kv_rank * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def _factors(
        self,
        a: nn.Linear,
        b: nn.Linear,
        x: torch.Tensor,
        rank: int,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head factors ``[B, T, H, R]`` and (rotated) feature factors ``[B, T, R, D]``."""
        B, T, _ = x.shape
        fa = a(x).view(B, T, self.n_head, rank)
        fb = b(x).view(B, T, rank, self.head_dim)
        if cos is not None and sin is not None:
            fb = apply_rope(fb, cos[:, None, :], sin[:, None, :])  # positions on T, shared over R
        return fa, fb

    @staticmethod
    def _product(fa: torch.Tensor, fb: torch.Tensor, rank: int) -> torch.Tensor:
        return (fa @ fb).div(rank).transpose(1, 2)  # [B, H, T, D]

    def _assemble(
        self,
        a: nn.Linear,
        b: nn.Linear,
        x: torch.Tensor,
        rank: int,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._product(*self._factors(a, b, x, rank, cos, sin), rank)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._assemble(self.q_a_proj, self.q_b_proj, x, self.q_rank, cos, sin)
        if cache is None:
            k = self._assemble(self.k_a_proj, self.k_b_proj, x, self.kv_rank, cos, sin)
            v = self._assemble(self.v_a_proj, self.v_b_proj, x, self.kv_rank)
            self._record(q, k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # generation: cache the rank-R factors of keys and values, not the keys and values
            mask, causal = cache.attention_mask(T, x.device)
            factors = (
                *self._factors(self.k_a_proj, self.k_b_proj, x, self.kv_rank, cos, sin),
                *self._factors(self.v_a_proj, self.v_b_proj, x, self.kv_rank),
            )
            ka, kb, va, vb = cache.extend(1, *factors)
            k, v = self._product(ka, kb, self.kv_rank), self._product(va, vb, self.kv_rank)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        # Head factors ~ N(0, 1) per token (for unit-RMS input); feature factors scaled by
        # sqrt(R) so A @ B / R has the same spread as a plain projection initialised with std.
        n_in = self.q_a_proj.in_features
        for proj in (self.q_a_proj, self.k_a_proj, self.v_a_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=1.0 / math.sqrt(n_in))
        nn.init.normal_(self.q_b_proj.weight, mean=0.0, std=std * math.sqrt(self.q_rank))
        for proj in (self.k_b_proj, self.v_b_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std * math.sqrt(self.kv_rank))
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=residual_std)


# activation_checkpointing -> whether block i recomputes its activations in the backward:
# every block, or every second one (torchtitan's layer-selective AC with frequency 2)
ACTIVATION_CHECKPOINTING: dict[str, Any] = {
    "none": lambda i: False,
    "full": lambda i: True,
    "selective": lambda i: i % 2 == 1,
}

# attention kind -> module; a new kind is a new entry, not a new branch
ATTENTION_CLASSES: dict[str, type[Attention | TensorProductAttention]] = {
    "mha": Attention,
    "gqa": Attention,
    "tpa": TensorProductAttention,
}


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.resolved_intermediate_size
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=residual_std)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = ATTENTION_CLASSES[cfg.attention](cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # Activation checkpointing (`Transformer.set_activation_checkpointing`): a training
        # forward keeps only the block's input and recomputes the rest in the backward.
        self.checkpointed = False

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if self.checkpointed and cache is None and torch.is_grad_enabled():
            # Non-reentrant: the autograd graph is the same as without it (same gradients, bit
            # for bit), and it composes with torch.compile and FSDP2 as torchtitan's does.
            return checkpoint(self._block, x, cos, sin, use_reentrant=False)
        return self._block(x, cos, sin, cache)

    def _block(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _pad_rows(module: nn.Embedding | nn.Linear, rows: int) -> Any:
    """``module`` with its weight grown to ``rows`` rows of zeros. Built unpadded first, so it
    draws the same random numbers as an unpadded model and every other weight's init is unchanged."""
    extra = rows - module.weight.shape[0]
    if extra > 0:
        weight = module.weight.detach()
        module.weight = nn.Parameter(torch.cat((weight, weight.new_zeros(extra, weight.shape[1]))))
        if isinstance(module, nn.Embedding):
            module.num_embeddings = rows
        else:
            module.out_features = rows
    return module


class Decoder(nn.Module):
    """The body (Hugging Face's ``LlamaModel``): embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = _pad_rows(nn.Embedding(cfg.vocab_size, cfg.n_embd), cfg.padded_vocab_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    def decoder_layers(self) -> list[DecoderLayer]:
        """``layers``, typed (iterating an ``nn.ModuleList`` gives plain modules)."""
        return [cast(DecoderLayer, layer) for layer in self.layers]


def parameter_count(config: ModelConfig) -> int:
    """The number of parameters of ``Transformer(config)``, counted on the ``meta`` device with no
    init and no RoPE tables: computing anything on ``meta`` loads torch's decompositions (seconds)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign,assignment]  # shapes only
    try:
        with torch.device("meta"):
            parts: list[nn.Module] = [Decoder(config)]
            if not config.tie_embeddings:
                parts.append(nn.Linear(config.n_embd, config.padded_vocab_size, bias=False))
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]
    return sum(p.numel() for part in parts for p in part.parameters())


class Transformer(nn.Module):
    """The language model: ``forward(idx [B, T] int64) -> logits [B, T, V]``.

    The trainer's fused losses use ``hidden_states(idx)`` and ``output_weight`` instead, so the
    ``[B, T, V]`` logits are never materialised (they then apply ``config.logit_softcap``
    themselves). With ``pad_vocab_to`` the logits have
    ``padded_vocab_size`` columns, the padded ones exactly ``-inf``; ``output_weight`` is the
    real rows only. ``generate`` samples continuations with a key/value cache.
    """

    # buffers (register_buffer), declared for the type checker
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    vocab_mask: torch.Tensor | None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_embeddings:
            self.lm_head = _pad_rows(
                nn.Linear(config.n_embd, config.vocab_size, bias=False), config.padded_vocab_size
            )
        cos, sin = rope_tables(config.resolved_head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # 0 for real ids, -inf for padded ones: added to the logits by the output matmul itself
        self.register_buffer("vocab_mask", self._vocab_mask(), persistent=False)
        self.init_weights()

    def _vocab_mask(self, device: torch.device | None = None) -> torch.Tensor | None:
        cfg = self.config
        if cfg.padded_vocab_size == cfg.vocab_size:
            return None
        mask = torch.zeros(cfg.padded_vocab_size, device=device)
        mask[cfg.vocab_size :] = float("-inf")
        return mask

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2-style init: N(0, init_std) everywhere, residual output projections scaled by
        1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth."""
        cfg = self.config
        std = cfg.init_std
        residual_std = std / math.sqrt(2 * cfg.n_layer)
        # Only the real rows are drawn (the same random numbers as an unpadded model); padded
        # rows are zero and stay so: their logits are masked, so they never receive a gradient.
        V = cfg.vocab_size
        nn.init.normal_(self.model.embed_tokens.weight[:V], mean=0.0, std=std)
        nn.init.zeros_(self.model.embed_tokens.weight[V:])
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight[:V], mean=0.0, std=std)
            nn.init.zeros_(self.lm_head.weight[V:])
        for layer in self.model.decoder_layers():
            layer.self_attn.init_weights(std, residual_std)
            layer.mlp.init_weights(std, residual_std)
            nn.init.ones_(layer.input_layernorm.weight)
            nn.init.ones_(layer.post_attention_layernorm.weight)
        nn.init.ones_(self.model.norm.weight)
        cos, sin = rope_tables(cfg.resolved_head_dim, cfg.block_size, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if self.vocab_mask is not None:
            mask = self._vocab_mask(self.vocab_mask.device)
            assert mask is not None  # a padded vocabulary has a mask
            self.vocab_mask.copy_(mask)

    @property
    def _padded_output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    @property
    def output_weight(self) -> torch.Tensor:
        """The ``[V, C]`` output projection (the token embedding when tied), real rows only:
        a contiguous view, so fused losses see exactly the unpadded vocabulary."""
        weight = self._padded_output_weight
        return weight if self.vocab_mask is None else weight[: self.config.vocab_size]

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, C]``; logits are ``hidden @ output_weight.T``.

        With ``cache`` (generation), ``idx`` continues the cached tokens: positions start at
        ``cache.pos`` and the cache is extended by T.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] token ids, got shape {tuple(idx.shape)}")
        start = 0 if cache is None else cache.pos
        end = start + idx.shape[1]
        if end > self.config.block_size:
            raise ValueError(f"sequence length {end} exceeds the model's block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.model.embed_tokens(idx)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        cap = self.config.logit_softcap
        if cap is None:
            return F.linear(self.hidden_states(idx, cache), self._padded_output_weight, self.vocab_mask)
        # soft-capped before the padding mask, so the padded logits stay exactly -inf
        logits = torch.tanh(F.linear(self.hidden_states(idx, cache), self._padded_output_weight) / cap) * cap
        return logits if self.vocab_mask is None else logits + self.vocab_mask

    def set_activation_checkpointing(self, mode: str) -> None:
        """``"full"``: every block keeps only its input during a training forward and
        recomputes the rest in the backward (memory for one more forward); ``"selective"``:
        every second block; ``"none"``. Losses and gradients are the same in every mode."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, got {mode!r}"
            )
        for i, layer in enumerate(self.model.layers):
            layer.checkpointed = ACTIVATION_CHECKPOINTING[mode](i)

    def record_attention_logits(self, enabled: bool) -> None:
        """Switch every attention layer's recording of its largest pre-softmax logit."""
        for layer in self.model.decoder_layers():
            layer.self_attn.record_logit_max = enabled
            layer.self_attn.logit_max = None

    def attention_logit_max(self) -> torch.Tensor | None:
        """The largest recorded pre-softmax logit over layers and heads (a 0-d tensor, on the
        device), or None when nothing was recorded; the layers' records are cleared."""
        layers = self.model.decoder_layers()
        found = [t for t in (layer.self_attn.logit_max for layer in layers) if t is not None]
        for layer in layers:
            layer.self_attn.logit_max = None
        return torch.stack(found).amax() if found else None

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for up to ``max_len`` tokens (default: ``block_size``)."""
        return KVCache(self.config.n_layer, self.config.block_size if max_len is None else max_len)

    @torch.no_grad()
    def generate(
        self,
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
        """``idx [B, T]`` followed by up to ``max_new_tokens`` sampled tokens, with a key/value
        cache. ``temperature=0`` is greedy; the rules are `dpls.model.generate`'s docstring."""
        return generate(
            self,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_id=eos_id,
            use_cache=use_cache,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counted once); ``non_embedding`` leaves out the token
        embedding and an untied output projection (Kaplan et al.'s N)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM / nanoGPT MFU estimate:
        ``6·N`` for every matmul weight (the output projection included, the embedding lookup
        not) plus ``12·L·H·D·T`` for the attention scores and their weighted sum."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        H, D = cfg.n_head, cfg.resolved_head_dim
        n_matmul = self.num_params(non_embedding=True) + cfg.padded_vocab_size * cfg.n_embd
        flops = 6 * n_matmul + 12 * cfg.n_layer * H * D * T
        if cfg.attention == "tpa":  # the per-token A @ B products that assemble q, k, v
            flops += 6 * cfg.n_layer * H * D * (cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank)
        return float(flops)

"""The bridge to Hugging Face ``LlamaForCausalLM``: a config dict (parameter names already match).

Kept free of ``transformers`` imports: the dict is what ``config.json`` holds and what
``LlamaConfig(**d)`` accepts, so the export needs no renaming and no model code of ours.
"""

from __future__ import annotations

from typing import Any

from dpls.model.config import ModelConfig

# parameters with one row per vocabulary entry: the padded rows (pad_vocab_to) are dropped on export
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_state_dict(model: Any) -> dict[str, Any]:
    """The model's ``state_dict()`` as ``LlamaForCausalLM`` holds it: the names are already
    the same; the rows of a padded vocabulary are dropped, since Llama has no mask for them
    (its logits then equal ours on every real token)."""
    V = model.config.vocab_size
    return {k: v[:V] if k in VOCAB_ROWS else v for k, v in model.state_dict().items()}


def to_hf_config(
    cfg: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """``config.json`` contents of the equivalent ``LlamaForCausalLM``.

    Only ``"mha"`` and ``"gqa"`` models have one: TPA's queries and keys are products of two
    projections of the input, which no Llama attention layer computes. ``bos_token_id`` /
    ``eos_token_id`` come from the tokenizer (``<|endoftext|>`` for both in our corpora).
    """
    if cfg.attention not in ("mha", "gqa"):
        raise ValueError(
            f"attention={cfg.attention!r} has no Hugging Face Llama equivalent; only 'mha' and 'gqa' export"
        )
    if cfg.qk_norm:
        raise ValueError(
            "qk_norm=true has no Hugging Face Llama equivalent (Llama attention has no query/key norm); "
            "only models trained without qk_norm export"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.resolved_intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters, older versions rope_theta: give both
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
    }

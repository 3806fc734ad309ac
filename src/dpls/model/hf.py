"""The bridge to Hugging Face: the stock class that computes the same function, its config and weights.

Kept free of ``transformers`` imports: the dict is what ``config.json`` holds, so the export needs
no model code of ours. Which class (each reproduces our logits to float32 rounding; checked in
``tests/eval/test_export_hf.py``):

* ``LlamaForCausalLM`` — the plain model: the parameter names are already Llama's, a plain copy.
* ``Qwen3ForCausalLM`` — ``qk_norm``: Qwen3's attention is Llama's plus an RMSNorm with a learned
  scale over each head's queries and keys, before RoPE, exactly as ours (same names:
  ``self_attn.q_norm.weight``, ``self_attn.k_norm.weight``); still a plain copy.
* ``VaultGemmaForCausalLM`` — ``logit_softcap``: the one stock class with Gemma 2's final-logit
  soft-cap (``final_logit_softcapping``) and Llama-shaped blocks (one norm before attention, one
  before the MLP: Gemma 2 and 3 also normalise each block's *output*, which no weights can undo).
  Its other differences are undone by the weights: its RMSNorms scale by ``1 + w`` (we store
  ``w − 1``), it multiplies the input embedding by ``c = √hidden_size`` (we store ``E / c``; with
  tied embeddings the output projection then sees ``E / c`` too, so the final norm's scale carries
  the ``c`` back: ``w·c − 1``), and its attention scale is ``query_pre_attn_scalar^−½`` (set to
  ``head_dim``), with no attention soft-cap and every layer of full (not sliding-window) attention.

``qk_norm`` together with ``logit_softcap`` has no stock class (Qwen3 has no soft-cap, VaultGemma no
query/key norm, Gemma 3 has both but normalises block outputs too), and TPA's queries and keys are
products of two projections, which no stock attention computes: those refuse to export.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpls.model.config import ModelConfig

# parameters with one row per vocabulary entry: the padded rows (pad_vocab_to) are dropped on export
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face class that computes ``cfg``'s model exactly, or `ValueError` saying why none does."""
    if cfg.attention not in ("mha", "gqa"):
        raise ValueError(
            f"attention={cfg.attention!r} has no Hugging Face equivalent; only 'mha' and 'gqa' export "
            "(TPA builds its queries and keys from products of two projections)"
        )
    if cfg.qk_norm and cfg.logit_softcap is not None:
        raise ValueError(
            "qk_norm=true together with logit_softcap has no Hugging Face equivalent (Qwen3 has the "
            "per-head query/key norm but no logit soft-cap, VaultGemma the soft-cap but no query/key "
            "norm, Gemma 3 both but also a norm after every block); a model with only one of them exports"
        )
    if cfg.logit_softcap is not None:
        return "VaultGemmaForCausalLM"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


# the model_type of each architecture (its transformers module is transformers.models.<model_type>)
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "VaultGemmaForCausalLM": "vaultgemma",
}


def embed_scale(cfg: ModelConfig, dtype: torch.dtype) -> float:
    """VaultGemma's input-embedding multiplier ``√hidden_size``, rounded as it computes it (in the
    weights' dtype), so ``(E / c)·c`` gives back ``E``."""
    return float(torch.tensor(math.sqrt(cfg.n_embd)).to(dtype).item())


def hf_state_dict(model: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` as its Hugging Face class (`hf_architecture`) holds it, in
    ``dtype``. The rows of a padded vocabulary are dropped (no stock class masks them; the logits of
    every real token are unchanged). For VaultGemma the norms and embedding are re-expressed as
    this module's docstring says."""
    cfg: ModelConfig = model.config
    V = cfg.vocab_size
    state = {k: (v[:V] if k in VOCAB_ROWS else v).detach() for k, v in model.state_dict().items()}
    if hf_architecture(cfg) == "VaultGemmaForCausalLM":
        state = _vaultgemma_weights(state, cfg, embed_scale(cfg, dtype))
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def _vaultgemma_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, c: float
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        value = value.double()
        if name == "model.embed_tokens.weight":
            value = value / c  # VaultGemma multiplies the looked-up rows by c
        elif name == "model.norm.weight" and cfg.tie_embeddings:
            value = value * c - 1.0  # the tied output projection sees E / c: the final norm restores c
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            value = value - 1.0  # its RMSNorm scales by 1 + w
        out[name.replace(".post_attention_layernorm.", ".pre_feedforward_layernorm.")] = value
    return out


def to_hf_config(
    cfg: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """``config.json`` contents of the equivalent Hugging Face model (`hf_architecture`).

    ``bos_token_id`` / ``eos_token_id`` come from the tokenizer (``<|endoftext|>`` for both in our
    corpora).
    """
    arch = hf_architecture(cfg)
    common = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
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
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
    }
    full = ["full_attention"] * cfg.n_layer
    if arch == "LlamaForCausalLM":
        return {**common, "hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1}
    if arch == "Qwen3ForCausalLM":
        return {**common, "hidden_act": "silu", "use_sliding_window": False, "layer_types": full}
    return {
        **common,
        "hidden_activation": "silu",
        "query_pre_attn_scalar": cfg.resolved_head_dim,  # attention scale head_dim^-1/2, as ours
        "attn_logit_softcapping": None,
        "final_logit_softcapping": cfg.logit_softcap,
        "layer_types": full,  # no sliding window anywhere; its mask is built anyway and needs a size:
        "sliding_window": cfg.block_size,  # the whole context, i.e. plain causal attention
        "pad_token_id": None,
    }

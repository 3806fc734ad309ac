"""The LLaMA-style decoder (MHA, GQA or Tensor Product Attention) and its presets."""

from __future__ import annotations

from dpls.model.cache import KVCache
from dpls.model.config import ATTENTIONS, PRESETS, ModelConfig, model_config, swiglu_hidden
from dpls.model.generate import generate
from dpls.model.hf import MODEL_TYPES, hf_architecture, hf_state_dict, to_hf_config
from dpls.model.transformer import ATTENTION_CLASSES, Transformer

__all__ = [
    "ATTENTIONS",
    "ATTENTION_CLASSES",
    "MODEL_TYPES",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "generate",
    "hf_architecture",
    "hf_state_dict",
    "model_config",
    "swiglu_hidden",
    "to_hf_config",
]

"""Will a run fit? An estimate of its memory before anything is built.

A run that cannot fit should fail in a second with numbers, not after minutes of setup
with an allocator message, nor (on CPU) by the out-of-memory killer. The estimate counts
what training certainly holds, so it errs low rather than refusing a run that would fit:

* parameters, their gradients and AdamW's two moments: 16 bytes per parameter (float32;
  a 1/N share per rank under FSDP2);
* activations kept for the backward, per layer and micro-batch: about ``34·T·C`` values
  per sequence (Korthikanti et al. 2022), plus ``5·heads·T²`` for attention scores where
  attention is materialised (CPU; CUDA uses fused attention that does not keep them); a block
  under activation checkpointing keeps only its input (``T·C``), and one block's activations
  exist again while it is recomputed;
* the logits ``[B, T, V]`` in float32, with their softmax and gradient (3 copies), unless
  the fused-linear loss never holds them.
"""

from __future__ import annotations

import os

import torch

from dpls.model import ModelConfig
from dpls.model.transformer import ACTIVATION_CHECKPOINTING, parameter_count
from dpls.train.config import ResolvedConfig

GIB = 1 << 30
WARN_SHARE = 0.8  # above this share of the free memory: a warning


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory of ``device`` now, and where the number comes from."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def estimate_bytes(
    cfg: ResolvedConfig, mc: ModelConfig, device: torch.device, world_size: int = 1
) -> dict[str, int]:
    """The parts of the estimate (bytes, on one rank) for a resolved config and model config."""
    params = parameter_count(mc)
    act_bytes = (
        2 if cfg.dtype in ("bfloat16", "float16") or (cfg.dtype == "auto" and device.type == "cuda") else 4
    )
    b, t, c, layers = cfg.batch_size, cfg.block_size, mc.n_embd, mc.n_layer
    scores = 5 * mc.n_head * t * t if device.type != "cuda" else 0
    per_layer = 34 * t * c + scores
    recomputed = sum(map(ACTIVATION_CHECKPOINTING[cfg.activation_checkpointing], range(layers)))
    kept = (layers - recomputed) * per_layer + recomputed * t * c + (per_layer if recomputed else 0)
    activations = b * kept * act_bytes
    logits = 0 if cfg.fused_linear_loss else 3 * b * t * mc.vocab_size * 4
    sharded = world_size if cfg.parallel == "fsdp" else 1  # FSDP2: 1/N per rank
    return {"parameters and AdamW": 16 * params // sharded, "activations": activations, "logits": logits}


def check_memory(
    cfg: ResolvedConfig, mc: ModelConfig, device: torch.device, world_size: int = 1
) -> list[str]:
    """``ValueError`` when the estimate exceeds the free memory; a note when it comes close."""
    parts = estimate_bytes(cfg, mc, device, world_size)
    need = sum(parts.values())
    have, source = available_bytes(device)
    detail = ", ".join(f"{k} {v / GIB:,.2f}" for k, v in parts.items())
    if need > have:
        raise ValueError(
            f"this run needs at least {need / GIB:,.1f} GiB ({detail} GiB) but only {have / GIB:,.1f} GiB "
            f"are {source}: lower batch_size (raise gradient_accumulation_steps to keep the global batch), "
            "block_size or the model size"
            + (", or set activation_checkpointing=full" if cfg.activation_checkpointing != "full" else "")
            + (
                ""
                if cfg.fused_linear_loss or parts["logits"] < parts["activations"]
                else ", or set fused_linear_loss=true"
            )
        )
    if need > WARN_SHARE * have:
        return [
            f"this run needs about {need / GIB:,.1f} GiB of the {have / GIB:,.1f} GiB {source} ({detail} GiB)"
        ]
    return []

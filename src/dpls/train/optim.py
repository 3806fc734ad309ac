"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning rate.

The learning rate is a pure function of the step (`cosine_lr`), so a resumed or forked
run needs nothing but the step to continue the schedule exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Devices with a fused AdamW kernel in every torch this project supports.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def cosine_lr(
    step: int, *, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int
) -> float:
    """nanoGPT's schedule at optimizer step ``step`` (0-based: the step about to be taken).

    Linear warmup over ``warmup_iters`` steps (reaching ``learning_rate`` at the end of it),
    then a half cosine down to ``min_lr`` at ``lr_decay_iters``, and ``min_lr`` after.
    """
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    span = max(1, lr_decay_iters - warmup_iters)
    progress = (step - warmup_iters) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (embeddings, linear weights) decay; vectors (norms, biases) do not.

    Decaying a norm's gain pulls it towards zero for no benefit; the usual GPT recipe
    (and nanoGPT's) decays only the parameters with two or more dimensions.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused on CPU and CUDA.

    The fused kernel is one pass over each parameter (about 4x faster than the default
    per-tensor loop on CPU), and it can skip a non-finite step on the device (its
    ``found_inf`` input): the trainer never waits for the device to decide.
    """
    fused = device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=learning_rate, betas=betas, fused=fused or None
    )


def set_hyperparameters(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
) -> None:
    """Apply hyperparameters to every group (a loaded optimizer state carries the saved ones).

    Weight decay goes to the first group only (the matrices of `param_groups`), so the
    split survives a fork that changes ``weight_decay``.
    """
    for i, group in enumerate(optimizer.param_groups):
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay if i == 0 else 0.0
        if betas is not None:
            group["betas"] = betas

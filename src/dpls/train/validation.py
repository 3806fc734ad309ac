"""Periodic validation: the metrics of the fixed validation set, every ``eval_interval`` steps.

`Validator` decides when (every ``eval_interval`` steps and at the last step; the loop also
validates the starting weights of a new run or fork) and runs `evaluate`: the model's
metrics over this rank's share of the set, summed over the ranks (`dpls.eval.metrics`, the
same implementation as ``dpls eval``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from dpls.data.loader import ValidationSet
from dpls.distributed import DistContext
from dpls.eval.metrics import MetricAccumulator
from dpls.train.plan import RunPlan
from dpls.train.step import Parts

# The validation metrics logged as val_<key> (MetricAccumulator's names; loss is CE).
VAL_KEYS: dict[str, str] = {
    "loss": "val_ce",
    "ppl": "val_ppl",
    "entropy": "val_entropy",
    "top1_acc": "val_top1_acc",
    "ece": "val_ece",
    "tokens": "val_tokens",
}


class Validator:
    """Validates the model of ``parts`` every ``eval_interval`` steps and at the last step."""

    def __init__(self, plan: RunPlan, parts: Parts) -> None:
        self.plan, self.parts = plan, parts
        self.interval, self.last = plan.cfg.eval_interval, plan.cfg.max_iters

    def should_validate(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last

    def run(self) -> dict[str, float]:
        """The ``val_*`` metrics of the current weights (every rank calls it)."""
        parts = self.parts
        return evaluate(parts.wrapped, self.plan.val_set, parts.ctx, parts.autocast, self.plan.cfg.block_size)


@torch.no_grad()
def evaluate(
    step_module: nn.Module,
    val_set: ValidationSet,
    ctx: DistContext,
    autocast: AbstractContextManager[Any],
    block_size: int,
) -> dict[str, float]:
    """Validation metrics over this rank's share of the fixed set, summed over the ranks.

    Every rank runs the same number of forwards (FSDP2 gathers parameters collectively): a
    rank with fewer batches runs extra ones on a dummy batch and does not count them.
    """
    acc = MetricAccumulator(temperatures=(), topk_entropies=False)  # the cheap setting: no grid, no top-k
    rounds = int(ctx.all_reduce_max(torch.tensor([len(val_set)])).item())
    was_training = step_module.training
    step_module.eval()
    batches = iter(val_set)
    vocab = None
    for _ in range(rounds):
        x, y = next(batches, (None, None))
        if x is None:  # this rank's batches are done: a dummy one, not counted
            x = torch.zeros(1, block_size, dtype=torch.long)
        with autocast:
            logits = step_module(x.to(ctx.device, non_blocking=True))
        vocab = logits.shape[-1]
        if y is not None:
            acc.update(logits, y.to(ctx.device, non_blocking=True))
    if acc.tokens == 0 and vocab is not None:  # no batch of its own: an empty state to sum
        acc.update(
            torch.empty(0, vocab, device=ctx.device), torch.empty(0, dtype=torch.long, device=ctx.device)
        )
    acc.reduce_(ctx.all_reduce_sum)
    step_module.train(was_training)
    metrics = acc.compute()
    return {name: metrics[k] for k, name in VAL_KEYS.items()}

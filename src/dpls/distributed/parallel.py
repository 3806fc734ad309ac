"""Data parallelism: DDP (replicate, all-reduce gradients) or FSDP2 (shard parameters).

Both are selected by name from ``WRAPPERS``; the trainer does

    model = wrap_model(model, ctx, parallel=cfg.parallel)
    for micro in range(accum):
        with no_sync(model, enabled=micro < accum - 1):
            loss.backward()

and never looks at which one it got. ``unwrap(model)`` gives back the plain module
(for saving, generation, ``flops_per_token``...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dpls.distributed.context import DistContext

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

Wrapper = Callable[[nn.Module, DistContext, "torch.dtype | None"], nn.Module]


def _wrap_ddp(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype | None) -> nn.Module:
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # gradient_as_bucket_view: grads alias the communication buckets — one copy less per step.
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of the outermost ``nn.ModuleList``s.

    Found structurally so any decoder (ours has ``model.layers``) works unchanged. Lists
    nested inside a block belong to that block (sharding them afterwards would be wrong:
    the block already owns their parameters).
    """
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(
            name == t or name.startswith(t + ".") for t in taken
        ):
            for child_name, child in module.named_children():
                blocks.append(child)
                taken.append(f"{name}.{child_name}" if name else child_name)
    return blocks


def _wrap_fsdp(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype | None) -> nn.Module:
    # FSDP imports DTensor (a second or more): only a sharded run pays for it
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    # Gradients are reduced in float32 whatever the compute dtype: averaging many
    # bf16 shards loses the low bits the optimizer needs.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the rest: embeddings, final norm (tied head)
    return model


def _wrap_none(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype | None) -> nn.Module:
    return model


WRAPPERS: dict[str, Wrapper] = {"ddp": _wrap_ddp, "fsdp": _wrap_fsdp, "none": _wrap_none}


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    parallel: str = "ddp",
    *,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) for data-parallel training.

    ``parallel``: ``"ddp"``, ``"fsdp"`` (FSDP2 ``fully_shard`` per block, then the root) or
    ``"none"``. Without a process group (a plain single-process run) the model comes back
    unchanged; under torchrun it is wrapped even with one process, so that
    ``torchrun --nproc_per_node=1`` measures the wrapper's overhead. ``param_dtype``
    (FSDP2 only) is the compute dtype of gathered parameters, e.g. ``torch.bfloat16``.
    """
    if parallel not in WRAPPERS:
        raise ValueError(f"parallel must be one of {sorted(WRAPPERS)}, got {parallel!r}")
    if param_dtype is not None and parallel != "fsdp":
        raise ValueError(f"param_dtype is an FSDP2 option; parallel={parallel!r} does not take it")
    if not ctx.is_distributed:
        return model
    wrong = next((p for p in model.parameters() if p.device != ctx.device), None)
    if wrong is not None and not (wrong.device.type == ctx.device.type == "cpu"):
        raise ValueError(
            f"move the model to {ctx.device} before wrap_model (found a parameter on {wrong.device})"
        )
    return WRAPPERS[parallel](model, ctx, param_dtype)


def is_fsdp(model: nn.Module) -> TypeGuard[FSDPModule]:
    from torch.distributed.fsdp import FSDPModule  # heavy: see _wrap_fsdp

    return isinstance(model, FSDPModule)


@contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skip the gradient all-reduce for the backward passes inside, when ``enabled``.

    Used for every micro-batch but the last of a gradient-accumulation step: the
    gradients accumulate locally and are reduced once. DDP: ``model.no_sync()``;
    FSDP2: ``set_requires_gradient_sync(False)`` (restored on exit); a plain module:
    nothing to skip.
    """
    if not enabled:
        yield
        return
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with nullcontext():
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP and ``torch.compile`` wrappers.

    FSDP2 shards in place (the module keeps its class and names), so it is returned as is;
    its parameters are then ``DTensor`` shards — use ``torch.distributed.checkpoint`` to save.
    """
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model

"""Argument checks shared by every loss entry point.

All checks run before any work and raise ``ValueError`` naming the argument and the allowed range.
Value checks on tensors (targets in range, per-token ε in [0, 1)) are combined into one reduction,
so a GPU input costs a single host sync and never reaches a device-side assert. A caller that has
checked the values itself (the trainer) skips that sync with `values_checked`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
LossOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # the loss, or (loss, nll)


_VALUES_CHECKED = contextvars.ContextVar("dpls_loss_values_checked", default=False)


@contextmanager
def values_checked() -> Iterator[None]:
    """Inside, loss calls trust the values of ``target`` and of a per-token ε tensor.

    Shapes, dtypes, devices and every scalar argument are still checked; only the scan of the
    tensors' values (the one host-device sync of a loss call) is left out. For a caller that
    guarantees them: the trainer checks every token id of its data against the vocabulary
    before the first step, and its per-token ε comes from `dpls.losses.adaptive`, in [0, 1)
    by construction.
    """
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


@dataclass
class LossArgs:
    """Flattened, validated arguments in the form every implementation takes."""

    target: torch.Tensor  # [N] int64
    epsilon: float | torch.Tensor  # float, or float32 [N] on the logits' device
    top_k: int
    ignore_index: int
    reduction: str
    batch_shape: torch.Size  # the target's shape, to restore for reduction="none"

    def unflatten(self, out: LossOutput) -> LossOutput:
        """An implementation's result in the caller's shape: per-token values (reduction="none",
        with or without the NLL beside the loss) take the target's shape again."""
        if self.reduction != "none":
            return out
        if isinstance(out, tuple):
            loss, nll = out
            return loss.reshape(self.batch_shape), nll.reshape(self.batch_shape)
        return out.reshape(self.batch_shape)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_scalar_epsilon(epsilon: float, name: str = "epsilon") -> float:
    if not _is_number(epsilon) or not math.isfinite(float(epsilon)) or not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {epsilon!r}")
    return float(epsilon)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def check_loss_args(
    logits_shape: torch.Size,
    logits_dtype: torch.dtype,
    device: torch.device,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int | None,
    ignore_index: int,
    reduction: str,
    *,
    name: str = "logits",
) -> LossArgs:
    """Validate everything about one loss call; ``top_k=None`` means "no top-k" (label smoothing)."""
    if not logits_dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a float tensor (float32, float16, bfloat16, float64), got {logits_dtype}"
        )
    if len(logits_shape) < 1 or logits_shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits_shape)}")
    v = int(logits_shape[-1])
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be an integer tensor, got {type(target).__name__}")
    if target.dtype not in _INT_TYPES:
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must match {name} shape without its last dimension "
            f"{tuple(logits_shape[:-1])}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {name} is on {device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    check_reduction(reduction)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= v):
        raise ValueError(f"top_k must be an int in [1, V={v}], got {top_k!r}")

    n = target.numel()
    eps_tensor: torch.Tensor | None = None
    if isinstance(epsilon, torch.Tensor):
        if not epsilon.dtype.is_floating_point:
            raise ValueError(f"epsilon tensor must be a float tensor, got dtype {epsilon.dtype}")
        if epsilon.dim() == 0:
            epsilon = epsilon.expand(target.shape)
        if tuple(epsilon.shape) != tuple(target.shape):
            raise ValueError(
                f"epsilon tensor must have the target's shape {tuple(target.shape)} (one ε per token), "
                f"got {tuple(epsilon.shape)}"
            )
        if epsilon.device != device:
            raise ValueError(f"epsilon is on {epsilon.device} but {name} is on {device}")
        eps_tensor = epsilon.detach().reshape(n).to(torch.float32)
        eps_out: float | torch.Tensor = eps_tensor
    else:
        eps_out = check_scalar_epsilon(epsilon)

    target1d = target.reshape(n)
    if n > 0 and not _VALUES_CHECKED.get():
        bad_target = ((target1d < 0) | (target1d >= v)) & (target1d != ignore_index)
        flags = [bad_target.any()]
        if eps_tensor is not None:
            flags.append(~((eps_tensor >= 0) & (eps_tensor < 1)).all())  # NaN fails too
        found = torch.stack(flags).tolist()  # the one host sync
        if found[0]:
            first = int(target1d[bad_target].flatten()[0])
            raise ValueError(
                f"target values must be in [0, V={v}) or equal ignore_index={ignore_index}, found {first}"
            )
        if eps_tensor is not None and found[1]:
            bad = eps_tensor[~((eps_tensor >= 0) & (eps_tensor < 1))][0].item()
            raise ValueError(f"epsilon values must be in [0, 1), found {bad}")
    return LossArgs(
        target=target1d.to(torch.int64),
        epsilon=eps_out,
        top_k=int(top_k) if top_k is not None else v,
        ignore_index=int(ignore_index),
        reduction=reduction,
        batch_shape=target.shape,
    )

"""The functional front: validate, flatten, dispatch to an implementation, restore the shape."""

from __future__ import annotations

from typing import Literal, overload

import torch

from dpls.losses.registry import check_impl_name, resolve_impl
from dpls.losses.softcap import check_softcap
from dpls.losses.softcap import softcap as apply_softcap
from dpls.losses.validation import check_loss_args


# The return type follows return_nll: the loss, or (loss, nll).
@overload
def dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: Literal[False] = ...,
    inplace_backward: bool = ...,
    softcap: float | None = ...,
) -> torch.Tensor: ...
@overload
def dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: Literal[True],
    inplace_backward: bool = ...,
    softcap: float | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: bool,
    inplace_backward: bool = ...,
    softcap: float | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = 0.1,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    return_nll: bool = False,
    inplace_backward: bool = False,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dynamic partial label smoothing (the definition: docs/losses.md).

    ``loss = lse(z) − (1 − ε)·z_y − (ε/k)·Σ_{j∈T} z_j`` per token, ``T`` the ``k`` largest logits
    (a constant: no gradient through the selection); gradient ``softmax(z) − q``.

    Args:
        logits: ``[..., V]`` float32 / float16 / bfloat16 (float64 is computed in float64).
        target: integer ``[...]``; entries equal to ``ignore_index`` contribute nothing.
        epsilon: a float in ``[0, 1)`` or a float tensor of the target's shape (one ε per token).
        top_k: ``k`` in ``[1, V]``; ``k = V`` is label smoothing, ``ε = 0`` is cross-entropy.
        reduction: ``"mean"`` over non-ignored tokens (0 if none), ``"sum"`` or ``"none"``
            (one float32 value per token, 0 at ignored ones).
        impl: ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"`` or any registered name.
        return_nll: also return the plain cross-entropy of the same tokens (same reduction,
            same pass, detached) — the number comparable across objectives.
        inplace_backward: let the implementation write the gradient into the logits' storage
            (only when nothing else needs the logits after the loss).
        softcap: ``cap`` > 0 to compute the loss of ``cap·tanh(logits / cap)`` (Gemma 2's final
            logit soft-capping; ``−inf`` stays masked), applied inside the implementation where
            it can; None: off.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a float tensor, got {type(logits).__name__}")
    check_impl_name(impl)
    cap = check_softcap(softcap)
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, epsilon, top_k, ignore_index, reduction
    )
    spec = resolve_impl(impl, logits.device, logits.dtype)
    logits2d = logits.reshape(-1, logits.shape[-1])
    extra = {}
    if cap is not None and spec.softcap:
        extra["softcap"] = cap
    elif cap is not None:  # an implementation that does not cap: hand it capped logits
        logits2d = apply_softcap(logits2d, cap)
    out = spec.fn(
        logits2d,
        args.target,
        args.epsilon,
        args.top_k,
        args.ignore_index,
        args.reduction,
        return_nll,
        inplace_backward,
        **extra,
    )
    return args.unflatten(out)


def label_smoothing_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """Standard label smoothing: DPLS with ``k = V`` (equals ``F.cross_entropy(label_smoothing=ε)``);
    ``softcap`` as in :func:`dpls_loss`."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a float tensor of shape [..., V]")
    return dpls_loss(
        logits,
        target,
        epsilon=epsilon,
        top_k=logits.shape[-1],
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
    )

"""Fused-linear DPLS: hidden states and the output weight in, loss out, never the whole ``[N, V]`` logits.

Rows are processed in chunks of ``chunk_size``: for each chunk the logits ``h W^T (+ b)`` are
formed in the input dtype (as the model's head would), the per-row statistics and the loss are
taken in float32, and — when a gradient will be needed — ``d logits = (softmax − q)·scale`` is
formed at once and folded into ``grad_hidden`` (rows of this chunk) and ``grad_weight`` /
``grad_bias`` (accumulated in float32). Peak extra memory is one chunk of logits plus the
gradients of the inputs, whatever ``N`` is.

For ``"mean"`` and ``"sum"`` the gradients are computed during the forward pass (the upstream
gradient is a scalar that backward only multiplies in), which saves recomputing the matmul. For
``"none"`` the upstream gradient differs per row, so backward walks the chunks again.

With ``softcap`` each chunk's logits are capped (``cap·tanh(z/cap)``) once formed, and their
gradient is multiplied by ``1 − (s/cap)²`` before it is folded into the input gradients.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from dpls.losses.chunked import (
    Smoothing,
    chunk_buffer,
    chunk_grad,
    chunk_stats,
    eps_rows,
    grad_weights,
    is_active,
    loss_rows,
    refuse_double_backward,
    row_scale,
)
from dpls.losses.reference import compute_dtype, reduce_rows, reference_dpls_loss
from dpls.losses.registry import check_impl_name, register_linear_impl, resolve_impl
from dpls.losses.softcap import check_softcap, softcap_, softcap_backward_
from dpls.losses.validation import check_loss_args

LINEAR_CHUNK_ELEMS = 1 << 22  # logits per chunk (16 MiB in float32): big enough for an efficient matmul


def default_chunk_size(n: int, v: int) -> int:
    return max(1, min(n, LINEAR_CHUNK_ELEMS // max(v, 1)))


def _walk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    eps: torch.Tensor,
    sm: Smoothing,
    chunk: int,
    scale: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    cap: float | None,
):
    """One pass over the row chunks: per-row stats, and with ``scale`` the input gradients."""
    n = hidden.shape[0]
    cd = compute_dtype(hidden.dtype)
    logp_y = torch.empty(n, dtype=cd, device=hidden.device)
    smooth = torch.empty_like(logp_y)
    need_h, need_w, need_b = need if scale is not None else (False, False, False)
    g_h = torch.empty_like(hidden) if need_h else None
    g_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
    g_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = hidden[s:e]
        z = chunk_buffer("logits", e - s, weight.shape[0], hidden.dtype, hidden.device)
        if bias is None:
            torch.mm(h, weight.T, out=z)
        else:
            torch.addmm(bias, h, weight.T, out=z)
        zf = z.to(cd)
        if cap is not None:
            softcap_(zf, cap)
        logp_buf = chunk_buffer("work", e - s, zf.shape[1], cd, zf.device)
        logp_y[s:e], smooth[s:e], sel = chunk_stats(zf, y[s:e], sm, logp_buf)
        if scale is None or not (need_h or need_w or need_b):
            continue
        weights = grad_weights(scale[s:e], eps[s:e], sm, sel, zf.shape[1])
        capped = None if cap is None else logp_buf.copy_(zf)  # log p is no longer needed
        d = chunk_grad(zf, zf, y[s:e], scale[s:e], weights, sm, sel)
        if cap is not None and capped is not None:
            softcap_backward_(d, capped, cap)
        d_in = d.to(hidden.dtype)  # the matmuls run in the model's dtype, as autograd would
        if g_h is not None:
            torch.mm(d_in, weight, out=g_h[s:e])
        if g_w is not None:
            g_w.add_(d_in.T @ h)
        if g_b is not None:
            g_b.add_(d.sum(0))
    return logp_y, smooth, g_h, g_w, g_b


class ChunkedLinearDPLS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, eps, sm, ignore_index, reduction, chunk, cap):
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        cd = compute_dtype(hidden.dtype)
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        eager = reduction != "none" and any(need)
        scale = row_scale(torch.ones((), device=hidden.device), valid, reduction, cd).expand(y.shape[0])
        with torch.no_grad():
            logp_y, smooth, g_h, g_w, g_b = _walk(
                hidden, weight, bias, y, eps, sm, chunk, scale if eager else None, need, cap
            )
            per_loss, per_nll = loss_rows(logp_y, smooth, eps, valid)
            loss = reduce_rows(per_loss, valid, reduction)
            nll = reduce_rows(per_nll, valid, reduction)
        ctx.eager, ctx.sm, ctx.reduction, ctx.chunk, ctx.need, ctx.cap = (
            eager,
            sm,
            reduction,
            chunk,
            need,
            cap,
        )
        if eager:
            ctx.save_for_backward(*_cast((g_h, g_w, g_b), weight))
        else:
            ctx.save_for_backward(hidden, weight, bias, y, valid, eps)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        refuse_double_backward("dpls_linear_loss (fused-linear)")
        if ctx.eager:
            grads = [None if t is None else t * grad_loss.to(t.dtype) for t in ctx.saved_tensors]
        else:
            hidden, weight, bias, y, valid, eps = ctx.saved_tensors
            scale = row_scale(grad_loss, valid, ctx.reduction, compute_dtype(hidden.dtype)).expand(y.shape[0])
            with torch.no_grad():
                grads = _walk(hidden, weight, bias, y, eps, ctx.sm, ctx.chunk, scale, ctx.need, ctx.cap)[2:]
                grads = _cast(grads, weight)
        return *grads, None, None, None, None, None, None, None


def _cast(grads, weight: torch.Tensor) -> list[torch.Tensor | None]:
    """Weight and bias gradients were accumulated in float32; hand them back in the weight's dtype."""
    g_h, g_w, g_b = grads
    return [g_h, None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(weight.dtype)]


def chunked_linear_dpls_loss(
    hidden, weight, bias, target, epsilon, top_k, ignore_index, reduction, return_nll, chunk, softcap=None
):
    n = hidden.shape[0]
    eps = eps_rows(epsilon, n, compute_dtype(hidden.dtype), hidden.device)
    sm = Smoothing(top_k=top_k, active=is_active(epsilon))
    chunk = chunk or default_chunk_size(n, weight.shape[0])
    loss, nll = ChunkedLinearDPLS.apply(
        hidden, weight, bias, target, eps, sm, ignore_index, reduction, chunk, softcap
    )
    return (loss, nll) if return_nll else loss


def reference_linear_dpls_loss(
    hidden, weight, bias, target, epsilon, top_k, ignore_index, reduction, return_nll, chunk, softcap=None
):
    """Materialise the logits and call the dense reference (for tests and comparisons)."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return reference_dpls_loss(
        logits, target, epsilon, top_k, ignore_index, reduction, return_nll, softcap=softcap
    )


register_linear_impl("chunked", chunked_linear_dpls_loss, priority=10, softcap=True)
register_linear_impl("reference", reference_linear_dpls_loss, priority=0, softcap=True)


# The return type follows return_nll, as dpls_loss's.
@overload
def dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: Literal[False] = ...,
    chunk_size: int | None = ...,
    softcap: float | None = ...,
) -> torch.Tensor: ...
@overload
def dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: Literal[True],
    chunk_size: int | None = ...,
    softcap: float | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    epsilon: float | torch.Tensor = ...,
    top_k: int = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    impl: str = ...,
    return_nll: bool,
    chunk_size: int | None = ...,
    softcap: float | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    epsilon: float | torch.Tensor = 0.1,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    return_nll: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DPLS of the logits ``hidden @ weight.T (+ bias)`` without materialising them (docs/losses.md).

    ``hidden`` is ``[..., C]``, ``weight`` ``[V, C]`` (the output embedding), ``bias`` ``[V]``;
    ``target`` has ``hidden``'s shape without the last dimension. The other keywords are those of
    :func:`dpls.losses.dpls_loss` (``softcap``: the loss of ``cap·tanh(logits / cap)``, capped
    chunk by chunk); ``chunk_size`` is the number of rows per chunk (default: about 4M logits per
    chunk).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, C] with C = hidden's last dimension; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor)
        or tuple(bias.shape) != (weight.shape[0],)
        or bias.dtype != weight.dtype
        or bias.device != weight.device
    ):
        raise ValueError(f"bias must be a [V={weight.shape[0]}] tensor like weight, got {bias!r:.80}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_impl_name(impl, linear=True)
    cap = check_softcap(softcap)
    logits_shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
    args = check_loss_args(
        logits_shape,
        hidden.dtype,
        hidden.device,
        target,
        epsilon,
        top_k,
        ignore_index,
        reduction,
        name="hidden @ weight.T",
    )
    spec = resolve_impl(impl, hidden.device, hidden.dtype, linear=True)
    if cap is not None and not spec.softcap:
        raise ValueError(f"impl={spec.name!r} of dpls_linear_loss does not support softcap")
    out = spec.fn(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        args.target,
        args.epsilon,
        args.top_k,
        args.ignore_index,
        args.reduction,
        return_nll,
        chunk_size,
        **({} if cap is None else {"softcap": cap}),
    )
    return args.unflatten(out)

"""DPLS fused with the output projection, for GPUs (``dpls_linear_loss(..., impl="triton")``).

Like Liger's fused linear cross-entropy: the rows are processed in chunks; each chunk's logits
``h @ Wᵀ (+ b)`` are made by a matmul, the row kernel turns them *in place* into their gradient, and
that gradient is immediately contracted into ``grad_hidden = dlogits @ W`` and
``grad_weight += dlogitsᵀ @ h``. Peak memory is one chunk of logits instead of ``[N, V]``.

For reductions "mean" and "sum" every gradient is finished in forward (backward only multiplies by
``grad_output``); for "none" the per-token ``grad_output`` is needed inside the chunk loop, so
forward computes only the losses and backward recomputes the chunks.
"""

from __future__ import annotations

import torch

from dpls.losses.adaptive import check_mode
from dpls.losses.softcap import check_softcap
from dpls.losses.triton_impl import (
    KernelConfig,
    check_first_order,
    is_available,
    launch_rows,
    reduce_rows,
    scale_inplace,
)
from dpls.losses.validation import check_loss_args

__all__ = [
    "default_chunk_size",
    "is_available",
    "triton_adaptive_dpls_linear_loss",
    "triton_dpls_linear_loss",
]

SECOND_BACKWARD_LINEAR = (
    "the fused-linear Triton DPLS loss (reduction 'mean' or 'sum') finishes grad_hidden and "
    "grad_weight in forward and hands them to the first backward, scaled in place to keep its memory "
    "small; a second backward through the same graph (retain_graph=True) is not supported. Run the "
    "forward again, or use reduction='none' (recomputed in backward) or impl='chunked'."
)
CHUNK_LOGITS = 1 << 27  # logits per chunk (256 MiB in bf16): big GEMMs, bounded memory


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk: a power of two with about ``CHUNK_LOGITS`` logits, at most ``n_rows``."""
    rows = max(1, CHUNK_LOGITS // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n_rows, rows))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = h @ weight.t()
    if bias is not None:
        logits += bias
    return logits


class _GradAccumulator:
    """``grad_weight`` / ``grad_bias`` summed over chunks in float32 (a bf16 sum would lose bits)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, need_w: bool, need_b: bool):
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if need_b and bias is not None
            else None
        )

    def add(self, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        if self.w is not None:
            if self.w.dtype == dlogits.dtype:
                self.w.addmm_(dlogits.t(), h)
            else:
                self.w += dlogits.t() @ h  # one rounding per chunk, float32 across chunks
        if self.b is not None:
            self.b += dlogits.sum(0, dtype=torch.float32)


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    chunk: int,
    *,
    scale: torch.Tensor | None,
    scale_mode: str,
    grad_hidden: torch.Tensor | None,
    acc: _GradAccumulator | None,
    config: KernelConfig | None,
    epsilon_mode: str = "constant",
    gamma: float = 1.0,
    eps_out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep over the row chunks: per-row loss/NLL, and the gradients when asked for
    (with an adaptive ``epsilon_mode``, ε_i is computed by the kernel and written to ``eps_out``)."""
    n_rows = hidden.shape[0]
    want_grad = grad_hidden is not None or acc is not None
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    nll = torch.empty_like(loss)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        eps = epsilon[start:end] if isinstance(epsilon, torch.Tensor) else epsilon
        row_scale = scale[start:end] if scale is not None and scale_mode == "row" else scale
        loss[start:end], nll[start:end] = launch_rows(
            logits,
            target[start:end],
            eps,
            top_k,
            ignore_index,
            grad=logits if want_grad else None,
            scale=row_scale,
            scale_mode=scale_mode,
            config=config,
            epsilon_mode=epsilon_mode,
            gamma=gamma,
            eps_out=eps_out[start:end] if eps_out is not None else None,
            softcap=softcap,
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if acc is not None:
            acc.add(logits, h)
    return loss, nll


class _TritonDPLSLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        target,
        eps_tensor,
        eps_value,
        top_k,
        ignore_index,
        reduction,
        chunk,
        grad_on,
        config,
        epsilon_mode,
        gamma,
        softcap,
    ):
        epsilon = eps_tensor if eps_tensor is not None else eps_value
        need_h, need_w, need_b = (grad_on and need for need in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        n_valid = (target != ignore_index).sum().to(torch.float32)
        finish_now = need_any and reduction != "none"
        grad_hidden = torch.empty_like(hidden) if finish_now and need_h else None
        acc = _GradAccumulator(weight, bias, need_w, need_b) if finish_now and (need_w or need_b) else None
        adaptive = epsilon_mode != "constant"
        eps_rows = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        loss_rows, nll_rows = _run_chunks(
            hidden, weight, bias, target, epsilon, top_k, ignore_index, chunk,
            scale=n_valid, scale_mode="mean" if reduction == "mean" else "one",
            grad_hidden=grad_hidden, acc=acc, config=config,
            epsilon_mode=epsilon_mode, gamma=gamma, eps_out=eps_rows if adaptive else None, softcap=softcap,
        )  # fmt: skip
        if adaptive:  # a recompute in backward reuses these ε_i (they are constants of the step)
            eps_tensor, eps_value = eps_rows, 0.0
        ctx.reduction = reduction
        if finish_now:
            ctx.grads = (
                grad_hidden,
                acc.w.to(weight.dtype) if acc is not None and acc.w is not None else None,
                acc.b.to(bias.dtype) if acc is not None and acc.b is not None else None,
            )
        elif need_any:  # reduction "none": recompute in backward with the per-token grad_output
            ctx.save_for_backward(hidden, weight, bias, target, eps_tensor)
            ctx.args = (eps_value, top_k, ignore_index, chunk, config, softcap)
        loss = reduce_rows(loss_rows, n_valid, reduction)
        nll = reduce_rows(nll_rows, n_valid, reduction)
        ctx.mark_non_differentiable(nll, eps_rows)
        return loss, nll, eps_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_eps):
        if ctx.reduction != "none":
            # The gradients finished in forward are handed out scaled in place (no copy: the memory
            # budget of this path), the factor decided on the device (no host sync).
            check_first_order(ctx, SECOND_BACKWARD_LINEAR)
            gh, gw, gb = ctx.grads
            if not torch.compiler.is_compiling():
                ctx.grads = None  # ctx would keep them alive as long as the loss tensor lives
            for g in (gh, gw, gb):
                if g is not None:
                    scale_inplace(g, grad_loss)
        else:  # recomputed from saved inputs: a second backward works
            check_first_order(ctx, None)
            hidden, weight, bias, target, eps_tensor = ctx.saved_tensors
            eps_value, top_k, ignore_index, chunk, config, softcap = ctx.args
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            gh = torch.empty_like(hidden) if need_h else None
            acc = _GradAccumulator(weight, bias, need_w, need_b) if need_w or need_b else None
            _run_chunks(
                hidden, weight, bias, target, eps_tensor if eps_tensor is not None else eps_value,
                top_k, ignore_index, chunk,
                scale=grad_loss.to(torch.float32).contiguous(), scale_mode="row",
                grad_hidden=gh, acc=acc, config=config, softcap=softcap,
            )  # fmt: skip
            gw = acc.w.to(weight.dtype) if acc is not None and acc.w is not None else None
            gb = acc.b.to(bias.dtype) if acc is not None and acc.b is not None else None
        return gh, gw, gb, *(None,) * 12


def triton_dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    reduction: str,
    return_nll: bool,
    chunk_size: int | None = None,
    *,
    config: KernelConfig | None = None,
    epsilon_mode: str = "constant",
    gamma: float = 1.0,
    return_epsilon: bool = False,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """DPLS of ``hidden [N, C] @ weight[V, C]ᵀ (+ bias)`` without ever holding the ``[N, V]`` logits.

    Arguments as in the linear registry (``dpls.losses.registry``), already validated. The logits
    of a chunk are made in the hidden states' dtype (bf16 stays bf16, as in the dense model).
    ``epsilon_mode`` ``"confidence"`` / ``"entropy"`` (base ``epsilon``, a float): ε_i is computed
    inside the kernel from the chunk's own first pass, as ``dpls.losses.adaptive`` defines it, with
    no extra matmul or read; ``return_epsilon`` appends those ε_i (float32 ``[N]``) to the result.
    ``softcap``: each chunk's logits are capped inside the kernel.
    """
    hidden = hidden.contiguous()
    target = target.to(torch.int64).contiguous()
    chunk = int(chunk_size) if chunk_size else default_chunk_size(hidden.shape[0], weight.shape[0])
    eps_tensor = epsilon if isinstance(epsilon, torch.Tensor) else None
    eps_value = 0.0 if eps_tensor is not None else float(epsilon)
    loss, nll, eps_rows = _TritonDPLSLinear.apply(
        hidden, weight, bias, target, eps_tensor, eps_value, int(top_k), int(ignore_index), reduction,
        chunk, torch.is_grad_enabled(), config, epsilon_mode, float(gamma), softcap,
    )  # fmt: skip
    out = (loss, nll) if return_nll else (loss,)
    if return_epsilon:
        out = (*out, eps_rows)
    return out if len(out) > 1 else loss


def triton_adaptive_dpls_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    epsilon: float,
    epsilon_mode: str,
    gamma: float = 1.0,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    config: KernelConfig | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused-linear DPLS with ε_i computed inside the kernel (``dpls.losses.adaptive``'s modes).

    Same values as ``dpls_linear_loss(..., epsilon=adaptive_epsilon_from_hidden(...))`` without the
    extra chunked matmul and read that computing ε_i first costs. Returns ``(loss, nll, eps)`` with
    ``eps`` the ε_i per token (the target's shape, float32, 0 at ignored tokens).
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("hidden and weight must be float tensors")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, C] with C = hidden's last dimension; got {tuple(weight.shape)}")
    if isinstance(epsilon, torch.Tensor):
        raise ValueError("epsilon must be a float base value for an adaptive epsilon_mode, got a tensor")
    check_mode(epsilon_mode, gamma)
    cap = check_softcap(softcap)
    logits_shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
    args = check_loss_args(
        logits_shape, hidden.dtype, hidden.device, target, epsilon, top_k, ignore_index, reduction,
        name="hidden @ weight.T",
    )  # fmt: skip
    if not is_available(hidden.device):
        raise ValueError(f"the Triton kernels cannot run on {hidden.device} (CUDA, or TRITON_INTERPRET=1)")
    loss, nll, eps = triton_dpls_linear_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, args.target, args.epsilon, args.top_k,
        args.ignore_index, args.reduction, True, chunk_size, config=config,
        epsilon_mode=epsilon_mode, gamma=gamma, return_epsilon=True, softcap=cap,
    )  # fmt: skip
    loss, nll = args.unflatten((loss, nll))
    return loss, nll, eps.reshape(target.shape)

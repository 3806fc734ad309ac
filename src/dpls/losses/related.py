"""Objectives related to DPLS, on the same chunked machinery, for comparisons (SPEC §1).

* :func:`prior_label_smoothing_loss` — the ε mass spread ∝ a distribution over the vocabulary
  (e.g. the training shards' token frequencies): ``q = (1−ε)·onehot(y) + ε·π``.
* :func:`confidence_penalty_loss` — ``CE − β·H(p)`` (Pereyra et al.): rewards flat predictions.
* :func:`z_loss` — ``mean lse²`` over valid tokens; an objective adds ``λ·z_loss`` to itself.
* :func:`dpls_kl_loss` — ``KL(q ‖ p) = loss − H(q)``: the textbook "label smoothing as KL" value.
  Same gradient as the loss, a different constant; use it only when a KL number is wanted.

All take logits ``[..., V]`` and a target of the batch shape, ignore ``ignore_index`` tokens,
and (except ``z_loss``) can return the plain CE from the same pass.
"""

from __future__ import annotations

import torch

from dpls.losses.chunked import ChunkedSoftTargetLoss, Smoothing, chunk_rows, row_scale, run_chunks
from dpls.losses.functional import dpls_loss
from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.validation import check_loss_args


def _restore(out, args, reduction: str, return_nll: bool):
    if reduction != "none":
        return out if return_nll else out[0]
    loss, nll = (t.reshape(args.batch_shape) for t in out)
    return (loss, nll) if return_nll else loss


def check_prior(prior: torch.Tensor, v: int, device: torch.device) -> torch.Tensor:
    """A ``[V]`` non-negative finite tensor with positive sum, normalised to a distribution (float64 sum)."""
    if not isinstance(prior, torch.Tensor) or not prior.is_floating_point() or tuple(prior.shape) != (v,):
        raise ValueError(
            f"prior must be a float tensor of shape [V={v}], got {getattr(prior, 'shape', prior)!r}"
        )
    p = prior.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError("prior must be finite, >= 0, with a positive sum")
    return p / p.sum()


def prior_label_smoothing_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_nll: bool = False,
):
    """Label smoothing whose ε mass follows ``prior`` (normalised here) instead of the uniform."""
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, epsilon, None, ignore_index, reduction
    )
    cd = compute_dtype(logits.dtype)
    pi = check_prior(prior, logits.shape[-1], logits.device).to(cd)
    n = args.target.shape[0]
    eps = (
        args.epsilon.to(cd)
        if isinstance(args.epsilon, torch.Tensor)
        else torch.full((n,), args.epsilon, dtype=cd, device=logits.device)
    )
    sm = Smoothing(top_k=logits.shape[-1], prior=pi)
    out = ChunkedSoftTargetLoss.apply(
        logits.reshape(n, -1), args.target, eps, sm, args.ignore_index, reduction, False
    )
    return _restore(out, args, reduction, return_nll)


class _ChunkedConfidencePenalty(torch.autograd.Function):
    """``CE − β·H(p)``; ``∂/∂z = p − onehot + β·p·(log p + H)``, recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, target, beta: float, ignore_index: int, reduction: str):
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        lse = torch.empty(n, dtype=cd, device=logits.device)
        ent = torch.empty_like(lse)

        def chunk(s: int, e: int) -> None:
            z = logits[s:e].to(cd)
            lse[s:e] = lse_c = torch.logsumexp(z, dim=-1)
            logp = z - lse_c[:, None]
            ent[s:e] = -(logp.exp() * logp).sum(-1)

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
            keep = valid.to(cd)
            nll_rows = (lse - logits.gather(1, y[:, None]).squeeze(1).to(cd)) * keep
            loss = reduce_rows(nll_rows - beta * ent * keep, valid, reduction)
            nll = reduce_rows(nll_rows, valid, reduction)
            if nll is loss:
                nll = nll.clone()
        ctx.save_for_backward(logits, y, valid, lse, ent)
        ctx.beta, ctx.reduction = beta, reduction
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        logits, y, valid, lse, ent = ctx.saved_tensors
        n, v = logits.shape
        cd = lse.dtype
        scale = row_scale(grad_loss, valid, ctx.reduction, cd).expand(n)
        grad = torch.empty_like(logits)

        def chunk(s: int, e: int) -> None:
            logp = logits[s:e].to(cd) - lse[s:e, None]
            g = logp.exp() * (1.0 + ctx.beta * (logp + ent[s:e, None]))
            g.mul_(scale[s:e, None])
            g[torch.arange(e - s, device=g.device), y[s:e]] -= scale[s:e]
            grad[s:e] = g

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
        return grad, None, None, None, None


def confidence_penalty_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_nll: bool = False,
):
    """``CE − β·H(p)`` per token, reduced over non-ignored tokens; ``beta`` ≥ 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a float >= 0, got {beta!r}")
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, 0.0, None, ignore_index, reduction
    )
    n = args.target.shape[0]
    out = _ChunkedConfidencePenalty.apply(
        logits.reshape(n, -1), args.target, float(beta), args.ignore_index, reduction
    )
    return _restore(out, args, reduction, return_nll)


class _ChunkedLogSumExp(torch.autograd.Function):
    """Row ``lse`` with a chunked backward (``∂lse/∂z = softmax``): no ``[N, V]`` temporaries."""

    @staticmethod
    def forward(ctx, logits):
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        lse = torch.empty(n, dtype=cd, device=logits.device)

        def chunk(s: int, e: int) -> None:
            lse[s:e] = torch.logsumexp(logits[s:e].to(cd), dim=-1)

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse = ctx.saved_tensors
        n, v = logits.shape
        grad = torch.empty_like(logits)

        def chunk(s: int, e: int) -> None:
            p = (logits[s:e].to(lse.dtype) - lse[s:e, None]).exp_()
            grad[s:e] = p.mul_(grad_lse[s:e, None].to(lse.dtype))

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
        return grad


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension, float32 (float64 for float64 input), chunked backward."""
    v = logits.shape[-1]
    return _ChunkedLogSumExp.apply(logits.reshape(-1, v)).reshape(logits.shape[:-1])


def z_loss(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``lse(z)²`` per non-ignored token, reduced (mean over valid tokens); multiply by λ yourself."""
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, 0.0, None, ignore_index, reduction
    )
    valid = args.target != args.ignore_index
    lse = logsumexp_rows(logits).reshape(-1)
    out = reduce_rows(lse.square() * valid.to(lse.dtype), valid, reduction)
    return out.reshape(args.batch_shape) if reduction == "none" else out


def soft_target_entropy(
    epsilon: float | torch.Tensor, top_k: int, target_in_top: torch.Tensor
) -> torch.Tensor:
    """``H(q)`` of the DPLS soft target, per token; depends on whether ``y`` is one of the top k."""
    eps = torch.as_tensor(epsilon, dtype=torch.float64, device=target_in_top.device)
    eps = eps.expand(target_in_top.shape)
    spread = eps / top_k

    def xlogx(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))

    in_top = -(xlogx(1 - eps + spread) + (top_k - 1) * xlogx(spread))
    out_top = -(xlogx(1 - eps) + top_k * xlogx(spread))
    return torch.where(target_in_top, in_top, out_top)


def dpls_kl_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = 0.1,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """``KL(q ‖ p) = dpls_loss − H(q)``: the same gradient as :func:`dpls_loss`, offset by ``H(q) ≥ 0``."""
    loss = dpls_loss(
        logits, target, epsilon=epsilon, top_k=top_k, ignore_index=ignore_index, reduction="none", impl=impl
    )
    v = logits.shape[-1]
    z = logits.detach().reshape(-1, v)
    y = target.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    z_y = z.gather(1, y_safe[:, None])
    above = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)

    def chunk(s: int, e: int) -> None:
        above[s:e] = (z[s:e] > z_y[s:e]).sum(-1)

    run_chunks(z.shape[0], chunk_rows(z.shape[0], v, device=z.device), chunk, z.device)
    h_q = soft_target_entropy(
        epsilon.reshape(-1) if isinstance(epsilon, torch.Tensor) else epsilon, top_k, above < top_k
    )
    kl = (loss.reshape(-1) - h_q.to(loss.dtype)) * valid.to(loss.dtype)
    out = reduce_rows(kl, valid, reduction)
    return out.reshape(target.shape) if reduction == "none" else out

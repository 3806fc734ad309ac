"""Objectives related to DPLS, on the same chunked machinery, for comparisons (docs/losses.md).

* :func:`prior_label_smoothing_loss` — the ε mass spread ∝ a distribution over the vocabulary
  (e.g. the training shards' token frequencies): ``q = (1−ε)·onehot(y) + ε·π``.
* :func:`confidence_penalty_loss` — ``CE − β·H(p)`` (Pereyra et al.): rewards flat predictions.
* :func:`z_loss` — ``mean lse²`` over valid tokens; an objective adds ``λ·z_loss`` to itself.
* :func:`dpls_kl_loss` — ``KL(q ‖ p) = loss − H(q)``: the textbook "label smoothing as KL" value.
  Same gradient as the loss, a different constant; use it only when a KL number is wanted.

All take logits ``[..., V]`` and a target of the batch shape, ignore ``ignore_index`` tokens,
and (except ``z_loss``) can return the plain CE from the same pass. Masked (``−inf``) logits
have ``p = 0`` and contribute ``0·log 0 = 0`` to every entropy. ``softcap`` (None: off) computes
each of them on ``cap·tanh(z / cap)`` (``dpls.losses.softcap``).
"""

from __future__ import annotations

import torch

from dpls.losses.chunked import (
    ChunkedSoftTargetLoss,
    Smoothing,
    chunk_rows,
    row_scale,
    run_chunks,
)
from dpls.losses.functional import dpls_loss
from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.softcap import check_softcap
from dpls.losses.softcap import softcap as apply_softcap
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
    softcap: float | None = None,
):
    """Label smoothing whose ε mass follows ``prior`` (normalised here) instead of the uniform."""
    cap = check_softcap(softcap)
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
        logits.reshape(n, -1), args.target, eps, sm, args.ignore_index, reduction, False, cap
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
            ent[s:e] = _entropy(z - lse_c[:, None])

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
            nll_rows = torch.where(valid, lse - logits.gather(1, y[:, None]).squeeze(1).to(cd), 0.0)
            loss = reduce_rows(nll_rows - beta * torch.where(valid, ent, 0.0), valid, reduction)
            nll = reduce_rows(nll_rows, valid, reduction)
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
        if torch.is_grad_enabled():  # create_graph=True: the same formula with differentiable ops
            logp = torch.log_softmax(torch.where(valid[:, None], logits.to(cd), 0.0), -1)
            g = _penalty_grad(logp, _entropy(logp)[:, None], ctx.beta, y) * scale[:, None]
            return g.to(logits.dtype), None, None, None, None
        grad = torch.empty_like(logits)

        def chunk(s: int, e: int) -> None:
            logp = logits[s:e].to(cd) - lse[s:e, None]
            g = _penalty_grad(logp, ent[s:e, None], ctx.beta, y[s:e]).mul_(scale[s:e, None])
            grad[s:e] = torch.where(scale[s:e, None] != 0, g, 0.0)  # ignored rows: 0, even if all −inf

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
        return grad, None, None, None, None


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """``−Σ p log p`` per row, with ``0·log 0 = 0`` at masked (``−inf``) logits."""
    return -(logp.exp() * torch.where(logp > -float("inf"), logp, 0.0)).sum(-1)


def _penalty_grad(logp: torch.Tensor, ent: torch.Tensor, beta: float, y: torch.Tensor) -> torch.Tensor:
    """``p − onehot(y) + β·p·(log p + H)``: the gradient of ``CE − β·H`` (0 where ``p = 0``)."""
    safe = torch.where(logp > -float("inf"), logp, 0.0)
    g = logp.exp() * (1.0 + beta * (safe + ent))
    onehot = torch.zeros_like(g).scatter_(1, y[:, None], 1.0)
    return g - onehot


def confidence_penalty_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_nll: bool = False,
    softcap: float | None = None,
):
    """``CE − β·H(p)`` per token, reduced over non-ignored tokens; ``beta`` ≥ 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a float >= 0, got {beta!r}")
    cap = check_softcap(softcap)
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, 0.0, None, ignore_index, reduction
    )
    n = args.target.shape[0]
    out = _ChunkedConfidencePenalty.apply(
        apply_softcap(logits.reshape(n, -1), cap), args.target, float(beta), args.ignore_index, reduction
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
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, exact double backward
            p = torch.softmax(logits.to(lse.dtype), -1)
            return (p * grad_lse.to(lse.dtype)[:, None]).to(logits.dtype)
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
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """``lse(z)²`` per non-ignored token, reduced (mean over valid tokens); multiply by λ yourself."""
    cap = check_softcap(softcap)
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, 0.0, None, ignore_index, reduction
    )
    valid = args.target != args.ignore_index
    lse = logsumexp_rows(apply_softcap(logits, cap)).reshape(-1)
    out = reduce_rows(lse.square() * valid.to(lse.dtype), valid, reduction)
    return out.reshape(args.batch_shape) if reduction == "none" else out


def soft_target_entropy(
    epsilon: float | torch.Tensor, k_eff: torch.Tensor, target_in_top: torch.Tensor
) -> torch.Tensor:
    """``H(q)`` of the DPLS soft target per token (float64): ``|T| = k_eff`` entries get ``ε/|T|``,
    the target ``1 − ε`` on top, so it depends on whether ``y`` is one of them."""
    eps = torch.as_tensor(epsilon, dtype=torch.float64, device=target_in_top.device)
    eps = eps.expand(target_in_top.shape)
    k = k_eff.to(torch.float64)
    spread = eps / k

    def xlogx(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))

    in_top = -(xlogx(1 - eps + spread) + (k - 1) * xlogx(spread))
    out_top = -(xlogx(1 - eps) + k * xlogx(spread))
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
    softcap: float | None = None,
) -> torch.Tensor:
    """``KL(q ‖ p) = dpls_loss − H(q)``: the same gradient as :func:`dpls_loss`, offset by ``H(q) ≥ 0``.

    ``q`` is the one the loss uses: ``T`` = the ``min(k, #finite)`` largest finite logits, ties to
    the lowest index, so whether the target is in ``T`` is decided by the same rule.
    """
    logits = apply_softcap(logits, check_softcap(softcap))  # the rank of y below is among capped logits
    loss = dpls_loss(
        logits, target, epsilon=epsilon, top_k=top_k, ignore_index=ignore_index, reduction="none", impl=impl
    )
    v = logits.shape[-1]
    z = logits.detach().reshape(-1, v)
    y = target.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    z_y = z.gather(1, y_safe[:, None])
    rank = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)  # y's place in the tie order
    n_finite = torch.empty_like(rank)
    cols = torch.arange(v, device=z.device)

    def chunk(s: int, e: int) -> None:
        zc, zy = z[s:e], z_y[s:e]
        before = (zc > zy) | ((zc == zy) & (cols < y_safe[s:e, None]))
        rank[s:e] = before.sum(-1)
        n_finite[s:e] = (zc > -float("inf")).sum(-1)

    with torch.no_grad():
        run_chunks(z.shape[0], chunk_rows(z.shape[0], v, device=z.device), chunk, z.device)
    k_eff = n_finite.clamp(1, top_k)
    in_top = (rank < k_eff) & (z_y.squeeze(1) > -float("inf"))
    eps = epsilon.reshape(-1) if isinstance(epsilon, torch.Tensor) else epsilon
    h_q = soft_target_entropy(eps, k_eff, in_top)
    kl = torch.where(valid, loss.reshape(-1) - h_q.to(loss.dtype), 0.0)
    out = reduce_rows(kl, valid, reduction)
    return out.reshape(target.shape) if reduction == "none" else out

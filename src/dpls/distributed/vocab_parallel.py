"""DPLS when the vocabulary is split across ranks (tensor-parallel output layer).

Each rank holds the logits of one contiguous vocabulary slice ``[vocab_start,
vocab_start + V_local)`` for the same ``N`` tokens. The loss of docs/losses.md,

    ℓ = lse(z) − (1 − ε)·z_y − (ε/|T|)·Σ_{j∈T} z_j ,   ∂ℓ/∂z = softmax(z) − q ,

with ``T`` the ``|T| = min(k, #finite)`` largest finite logits (masked ``−inf`` logits are never
smoothed onto), ties to the lowest global index,
needs four global quantities per row, and only those travel between ranks:

* the max and the sum of exponentials (all-reduce MAX, SUM) → ``lse``;
* the target logit, contributed by the one rank owning ``y`` (all-reduce SUM);
* the top-k threshold: each rank sends only its own ``k`` largest values ``[N, k]``
  (all-gather); the k-th largest of the union is the global k-th largest ``τ``, and the
  sum of the union's ``k`` largest is ``Σ_{j∈T} z_j``;
* ties at ``τ``: how many tied entries each rank has (all-gather of ``[N]`` counts), so
  every rank knows which of its own tied entries belong to ``T`` — lowest global index
  first, the same rule on every rank.

Backward needs no communication at all: each rank forms ``softmax − q`` for its slice
from the saved per-row max, sum of exponentials, ``τ`` and tie quota (the max is subtracted
before exponentiating, so the gradient is exact at any logit offset). Every rank returns the
same loss. The backward builds no graph: double backward raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dpls.losses.chunked import refuse_double_backward

REDUCTIONS = ("mean", "sum", "none")


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``[W, *t.shape]``: every rank's ``t`` in rank order (``t`` itself when alone)."""
    if not _distributed(group):
        return t.unsqueeze(0)
    world = dist.get_world_size(group)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))  # the concatenated layout every backend takes
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out.view(world, *t.shape)


def _slices(local_vocab: int, vocab_start: int, device: torch.device, group: Any) -> torch.Tensor:
    """``[W, 2]`` (start, size) of every rank's slice: checked once, the same way everywhere."""
    mine = torch.tensor([vocab_start, local_vocab], dtype=torch.int64, device=device)
    return _all_gather(mine, group)


def _validate(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    reduction: str,
    vocab_size: int,
    slices: torch.Tensor,
) -> None:
    # Only arguments identical on every rank (or already exchanged) decide an error, so
    # all ranks raise together instead of some waiting forever in a collective.
    if not local_logits.is_floating_point():
        raise ValueError(f"local_logits must be a float tensor, got dtype {local_logits.dtype}")
    if local_logits.dim() != 2:
        raise ValueError(f"local_logits must be [N, V_local], got shape {tuple(local_logits.shape)}")
    if target.dim() != 1 or target.shape[0] != local_logits.shape[0]:
        raise ValueError(
            f"target must be [N] matching local_logits' N={local_logits.shape[0]}, got shape {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    order = slices[:, 0].argsort()
    starts, sizes = slices[order, 0].tolist(), slices[order, 1].tolist()
    expected = 0
    for start, size in zip(starts, sizes):
        if start != expected or size < 1:
            raise ValueError(
                "vocabulary slices must tile [0, V) without gaps or overlaps; got (vocab_start, V_local) "
                f"per rank = {slices.tolist()}"
            )
        expected += size
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an int in [1, V={vocab_size}], got {top_k!r}")
    if isinstance(epsilon, torch.Tensor):
        if epsilon.numel() != target.numel():
            raise ValueError(
                f"epsilon as a tensor needs one value per token ({target.numel()}), got shape {tuple(epsilon.shape)}"
            )
        bad = ((epsilon < 0) | (epsilon >= 1) | ~torch.isfinite(epsilon)).any()
        if bool(bad):
            raise ValueError("epsilon values must lie in [0, 1)")
    elif not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"epsilon must lie in [0, 1), got {epsilon!r}")
    valid = target != ignore_index
    if bool(((target < 0) | (target >= vocab_size))[valid].any()):
        raise ValueError(
            f"target values must lie in [0, V={vocab_size}) or equal ignore_index={ignore_index}"
        )


class _VocabParallelDPLS(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        local_logits: torch.Tensor,
        target: torch.Tensor,
        eps: torch.Tensor,
        top_k: int,
        vocab_start: int,
        ignore_index: int,
        reduction: str,
        slices: torch.Tensor,
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = local_logits.float()
        n, v_local = x.shape
        valid = target != ignore_index

        # log-sum-exp over the whole vocabulary, kept as (row max, Σ exp(z − max))
        row_max = _all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX, group)
        shifted = x - row_max[:, None]
        sum_exp = _all_reduce(torch.exp(shifted).sum(-1), dist.ReduceOp.SUM, group)
        lse_rel = torch.log(sum_exp)  # lse − max

        # target logit (relative to the max), from the owning rank
        local_t = target.long() - vocab_start
        owned = valid & (local_t >= 0) & (local_t < v_local)
        zy_rel = torch.where(owned, shifted.gather(1, local_t.clamp(0, v_local - 1)[:, None]).squeeze(1), 0.0)
        zy_rel = _all_reduce(zy_rel, dist.ReduceOp.SUM, group)

        # global top-k from the local top-k values only
        k_local = min(top_k, v_local)
        cand = x.topk(k_local, dim=-1, sorted=False).values
        if k_local < top_k:  # equal sizes for all_gather; −inf pads are never counted in T
            cand = torch.cat([cand, cand.new_full((n, top_k - k_local), float("-inf"))], dim=1)
        union = _all_gather(cand, group).permute(1, 0, 2).flatten(1)  # [N, W·k], also for N = 0
        top = union.topk(top_k, dim=-1).values  # descending
        # T holds only finite logits: |T| = min(k, #finite), all of which are in ``top``
        k_fin = (top > -float("inf")).sum(-1)
        k_eff = k_fin.clamp(min=1)
        tau = top.gather(1, (k_eff - 1)[:, None]).squeeze(1)  # the smallest value in T
        top_rel = torch.where(top > -float("inf"), top - row_max[:, None], 0.0).sum(-1)

        # ties at τ: the quota of tied entries this rank contributes, lowest global index first
        n_gt = (union > tau[:, None]).sum(-1)
        need_eq = k_eff - n_gt
        eq_counts = _all_gather((x == tau[:, None]).sum(-1), group)  # [W, N]
        before = (slices[:, 0] < vocab_start).to(eq_counts.dtype)  # ranks holding lower ids
        prior = (eq_counts * before[:, None]).sum(0)
        my_eq = (x == tau[:, None]).sum(-1)
        take = (need_eq - prior).clamp(min=0).minimum(my_eq)

        loss = lse_rel - (1.0 - eps) * zy_rel - (eps / k_eff) * top_rel
        nll = lse_rel - zy_rel
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        loss = torch.where(valid, loss, zero)
        nll = torch.where(valid, nll, zero)
        n_valid = valid.sum()
        if reduction == "mean":
            denom = n_valid.clamp(min=1).float()
            loss_out, nll_out = loss.sum() / denom, nll.sum() / denom
        elif reduction == "sum":
            loss_out, nll_out = loss.sum(), nll.sum()
        else:
            loss_out, nll_out = loss, nll

        ctx.mark_non_differentiable(nll_out)  # a logged number, as in dpls.losses.dpls_loss
        ctx.save_for_backward(local_logits, target, eps, row_max, sum_exp, tau, take, k_eff, n_valid)
        ctx.top_k, ctx.vocab_start, ctx.ignore_index, ctx.reduction = (
            top_k,
            vocab_start,
            ignore_index,
            reduction,
        )
        return loss_out, nll_out

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, g_nll: torch.Tensor | None) -> tuple[Any, ...]:
        refuse_double_backward("vocab_parallel_dpls_loss")
        local_logits, target, eps, row_max, sum_exp, tau, take, k_eff, n_valid = ctx.saved_tensors
        x = local_logits.float()
        n, v_local = x.shape
        valid = target != ctx.ignore_index
        # per-row weight of the incoming gradient
        if ctx.reduction == "none":
            w = g_loss.float()
        else:
            scale = 1.0 / n_valid.clamp(min=1).float() if ctx.reduction == "mean" else 1.0
            w = (g_loss.float() * scale).expand(n)
        w = torch.where(valid, w, 0.0)

        # w·(softmax − q),  q = (1 − ε)·onehot(y) + (ε/k)·1[T]
        grad = torch.exp(x - row_max[:, None]) * (w / sum_exp)[:, None]
        grad = torch.where(valid[:, None], grad, 0.0)  # an ignored row of −inf: 0, not NaN
        local_t = target.long() - ctx.vocab_start
        owned = valid & (local_t >= 0) & (local_t < v_local)
        onehot_w = torch.where(owned, w * (1.0 - eps), 0.0)
        grad.scatter_add_(1, local_t.clamp(0, v_local - 1)[:, None], -onehot_w[:, None])
        eq = x == tau[:, None]
        in_top = (x > tau[:, None]) | (eq & (eq.cumsum(-1) <= take[:, None]))
        grad -= in_top * (w * eps / k_eff)[:, None]
        return grad.to(local_logits.dtype), None, None, None, None, None, None, None, None


def vocab_parallel_dpls_loss(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int,
    epsilon: float | torch.Tensor = 0.1,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_nll: bool = False,
    group: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DPLS loss of logits split by vocabulary across the ranks of ``group``.

    ``local_logits``: ``[N, V_local]``, this rank's columns ``[vocab_start, vocab_start +
    V_local)`` (slices may differ in size but must tile ``[0, V)``). ``target``: ``[N]``
    global ids, the same on every rank. The value and the keywords are those of
    ``dpls.losses.dpls_loss`` (``epsilon`` a float or one value per token); every rank gets
    the same loss, and backward fills each rank's ``local_logits.grad`` with its slice of
    ``softmax − q``. With ``return_nll`` the plain cross-entropy comes back too, detached
    (for logging, like ``dpls_loss``'s). Without a process group (or in a group of one) it is the plain loss.
    """
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("local_logits and target must be tensors")
    slices = _slices(local_logits.shape[-1], int(vocab_start), local_logits.device, group)
    vocab_size = int(slices[:, 1].sum())
    _validate(local_logits, target, epsilon, top_k, ignore_index, reduction, vocab_size, slices)
    if isinstance(epsilon, torch.Tensor):
        eps = epsilon.detach().reshape(-1).to(device=local_logits.device, dtype=torch.float32)
    else:
        eps = torch.full((target.numel(),), float(epsilon), dtype=torch.float32, device=local_logits.device)
    loss, nll = _VocabParallelDPLS.apply(
        local_logits, target, eps, top_k, int(vocab_start), ignore_index, reduction, slices, group
    )
    return (loss, nll) if return_nll else loss

"""Vocabulary-parallel DPLS equals the single-device definition (float64 reference).

The world-of-one tests (hypothesis, no process group) check the arithmetic; the 3-process
run (gloo) checks the exchanges: uneven slices, ties across ranks, ignored
tokens, per-token ε, k = 1 and k = V, every reduction, return_nll.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpls.distributed.testing import run_workers
from dpls.distributed.vocab_parallel import vocab_parallel_dpls_loss
from dpls.losses import dpls_loss

TOL = 1e-5


def reference_value(z, target, eps, k, reduction, ignore_index=-100):
    """The DPLS loss in float64, T = the k largest logits, ties broken towards the lower index.

    Differentiable in ``z`` (the selection T is a constant), so autograd gives the
    reference gradient.
    """
    n, v = z.shape
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(n)
    valid = target != ignore_index
    t = target.clamp(0, v - 1)
    order = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    loss = torch.logsumexp(z, -1) - (1 - eps) * z.gather(1, t[:, None]).squeeze(1)
    loss = (loss - eps / k * z.gather(1, order).sum(-1)) * valid
    if reduction == "mean":
        return loss.sum() / max(int(valid.sum()), 1)
    return loss.sum() if reduction == "sum" else loss


def reference(logits, target, eps, k, reduction="mean"):
    """(loss, nll) of the float64 definition; the nll is the ε = 0 loss."""
    z = logits.detach().double()
    return reference_value(z, target, eps, k, reduction), reference_value(z, target, 0.0, 1, reduction)


def make_case(seed, n, v, *, ties=False, ignore_frac=0.25, per_token_eps=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties at the threshold on several ranks
        logits = torch.randint(0, 3, (n, v), generator=g).float()
    else:
        logits = torch.randn(n, v, generator=g) * 3
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_frac] = -100
    eps = torch.rand(n, generator=g) * 0.9 if per_token_eps else 0.2
    return logits, target, eps


def _max_errors(logits, target, eps, k, reduction, start, stop, against="reference"):
    """This rank's errors (loss, nll, gradient on its slice) against the float64 definition,
    or against the single-device ``dpls.losses.dpls_loss`` (``against="dpls_loss"``)."""
    local = logits[:, start:stop].clone().requires_grad_(True)
    loss, nll = vocab_parallel_dpls_loss(
        local, target, vocab_start=start, epsilon=eps, top_k=k, reduction=reduction, return_nll=True
    )
    assert not nll.requires_grad  # logged, not trained on: as dpls_loss's
    weights = torch.linspace(0.5, 1.5, target.numel()) if reduction == "none" else torch.tensor(1.0)
    (loss * weights).sum().backward()
    if against == "reference":
        ref_loss, ref_nll = reference(logits, target, eps, k, reduction=reduction)
        z = logits.double().requires_grad_(True)
        (weights.double() * reference_value(z, target, eps, k, reduction)).sum().backward()
        ref_grad = z.grad
    else:
        z = logits.clone().requires_grad_(True)
        ref_loss, ref_nll = dpls_loss(
            z, target, epsilon=eps, top_k=k, reduction=reduction, impl="reference", return_nll=True
        )
        (weights * ref_loss).sum().backward()
        ref_grad = z.grad
    return (
        (loss.double() - ref_loss.double()).abs().max().item(),
        (nll.double() - ref_nll.double()).abs().max().item(),
        (local.grad.double() - ref_grad.double()[:, start:stop]).abs().max().item(),
    )


# (n, v, k, ties, per-token ε, reduction)
CASES = [
    (7, 13, 4, False, False, "mean"),
    (7, 13, 1, False, True, "sum"),
    (6, 13, 13, False, False, "none"),  # k = V: plain label smoothing
    (9, 13, 5, True, False, "mean"),  # ties straddling the slices
    (9, 13, 9, True, True, "none"),
    (5, 13, 3, False, True, "mean"),
]


def _worker(splits: list[int]) -> list[tuple[float, float, float]]:
    from dpls.distributed import init_distributed

    ctx = init_distributed("cpu")
    bounds = [0]
    for s in splits:
        bounds.append(bounds[-1] + s)
    start, stop = bounds[ctx.rank], bounds[ctx.rank + 1]
    errors = []
    for i, (n, v, k, ties, per_tok, red) in enumerate(CASES):
        assert v == bounds[-1]
        logits, target, eps = make_case(i, n, v, ties=ties, per_token_eps=per_tok)
        errs = torch.tensor(_max_errors(logits, target, eps, k, red, start, stop))
        # One tie rule everywhere (lowest global index): the single-device loss agrees even at ties.
        errs = errs.maximum(torch.tensor(_max_errors(logits, target, eps, k, red, start, stop, "dpls_loss")))
        errors.append(tuple(ctx.all_reduce_max(errs).tolist()))  # worst over the ranks
    # all ignored: loss 0, zero gradient, on every rank
    local = torch.randn(4, stop - start, requires_grad=True)
    loss = vocab_parallel_dpls_loss(local, torch.full((4,), -100), vocab_start=start, top_k=2)
    loss.backward()
    errors.append((abs(loss.item()), 0.0, local.grad.abs().max().item()))
    return errors


def test_matches_reference_across_ranks():
    splits = [5, 4, 4]  # 3 ranks, uneven slices (one spawn: process start-up is the cost)
    errors = run_workers(_worker, len(splits), splits)
    for case, (e_loss, e_nll, e_grad) in zip([*CASES, "all-ignored"], errors):
        assert e_loss < TOL and e_nll < TOL and e_grad < TOL, (case, e_loss, e_nll, e_grad)


@given(
    n=st.integers(1, 9),
    v=st.integers(1, 40),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
    per_tok=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_world_of_one_matches_reference(n, v, k_frac, seed, ties, per_tok, reduction):
    k = max(1, round(k_frac * v))
    logits, target, eps = make_case(seed, n, v, ties=ties, per_token_eps=per_tok)
    errs = _max_errors(logits, target, eps, k, reduction, 0, v)
    assert max(errs) < TOL, errs
    if not ties:
        errs = _max_errors(logits, target, eps, k, reduction, 0, v, against="dpls_loss")
        assert max(errs) < TOL, errs


def test_epsilon_zero_is_cross_entropy_and_k_v_is_label_smoothing():
    logits, target, _ = make_case(3, 8, 17)
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    got = vocab_parallel_dpls_loss(logits, target, vocab_start=0, epsilon=0.0, top_k=5)
    assert abs(got.item() - ce.item()) < TOL
    ls = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.3)
    got = vocab_parallel_dpls_loss(logits, target, vocab_start=0, epsilon=0.3, top_k=17)
    assert abs(got.item() - ls.item()) < TOL


def test_bfloat16_logits_get_bfloat16_gradient():
    logits, target, _ = make_case(4, 5, 11)
    local = logits.bfloat16().requires_grad_(True)
    loss = vocab_parallel_dpls_loss(local, target, vocab_start=0, top_k=3)
    loss.backward()
    assert loss.dtype == torch.float32 and local.grad.dtype == torch.bfloat16
    ref_loss, _ = reference(logits.bfloat16().float(), target, 0.1, 3)
    assert abs(loss.item() - ref_loss.item()) < TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 12}, "top_k"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": torch.full((4,), -0.1)}, "epsilon"),
        ({"epsilon": torch.zeros(3)}, "epsilon"),
        ({"reduction": "avg"}, "reduction"),
        ({"vocab_start": 2}, "tile"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"vocab_start": 0, "top_k": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        vocab_parallel_dpls_loss(torch.randn(4, 11), torch.tensor([1, 2, 3, -100]), **args)


def test_bad_tensors():
    with pytest.raises(ValueError, match="target values"):
        vocab_parallel_dpls_loss(torch.randn(2, 5), torch.tensor([1, 5]), vocab_start=0, top_k=2)
    with pytest.raises(ValueError, match="float"):
        vocab_parallel_dpls_loss(
            torch.ones(2, 5, dtype=torch.long), torch.tensor([1, 2]), vocab_start=0, top_k=2
        )
    with pytest.raises(ValueError, match="target must be"):
        vocab_parallel_dpls_loss(torch.randn(2, 5), torch.tensor([1, 2, 3]), vocab_start=0, top_k=2)

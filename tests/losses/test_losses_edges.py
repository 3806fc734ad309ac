"""The edges: masked (``−inf``) logits, a padded vocabulary, exact ties, large logit offsets,
second-order gradients and empty batches, every CPU implementation against the float64
definition of tests/loss_reference.py (``T`` = the ``min(k, #finite)`` largest finite logits,
ties to the lowest index)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dpls.losses.chunked as chunked
from dpls.distributed.vocab_parallel import vocab_parallel_dpls_loss
from dpls.losses import (
    adaptive_epsilon,
    confidence_penalty_loss,
    dpls_kl_loss,
    dpls_linear_loss,
    dpls_loss,
    label_smoothing_loss,
    z_loss,
)
from loss_reference import check_impl_against_reference, reference_dpls

IMPLS = ["reference", "chunked"]
INF = float("inf")


def _masked_logits():
    """Four rows of 8 logits whose last 3 columns are −inf (masked vocabulary entries)."""
    torch.manual_seed(0)
    z = torch.randn(4, 8)
    z[:, 5:] = -INF
    return z, torch.tensor([0, 1, 2, 3])


# ---- masked logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_logits_at_eps0_are_cross_entropy(impl):
    z, y = _masked_logits()
    got = dpls_loss(z, y, epsilon=0.0, top_k=3, impl=impl)
    torch.testing.assert_close(got, F.cross_entropy(z, y))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [5, 6, 8])  # the (k+1)-th or even the k-th largest is −inf
def test_k_beyond_the_finite_logits_smooths_over_the_finite_ones(impl, top_k):
    z, y = _masked_logits()
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.1, top_k=top_k, impl=impl)
    loss.backward()
    ref, _, ref_grad = reference_dpls(z, y, epsilon=0.1, top_k=top_k)
    assert math.isfinite(loss.item()) and abs(loss.item() - float(ref)) < 1e-6
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-7, rtol=1e-6)
    assert (x.grad[:, 5:] == 0).all()
    # k ≥ the finite count: label smoothing over the 5 real entries.
    if top_k >= 5:
        torch.testing.assert_close(loss, F.cross_entropy(z[:, :5], y, label_smoothing=0.1))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_per_token_epsilon_with_k_beyond_the_finite_logits(impl):
    z, y = _masked_logits()
    got = dpls_loss(z, y, epsilon=torch.zeros(4), top_k=8, impl=impl)
    torch.testing.assert_close(got, F.cross_entropy(z, y))
    vp = vocab_parallel_dpls_loss(z, y, vocab_start=0, epsilon=torch.zeros(4), top_k=8)
    torch.testing.assert_close(vp, F.cross_entropy(z, y))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("epsilon", [0.2, "per_token", 0.0])
@pytest.mark.parametrize(
    ("v", "top_k", "masked"), [(300, 4, 0.5), (300, 40, 0.9), (300, 300, 0.7), (40, 39, 0.3)]
)
def test_random_masks_match_float64_definition(impl, epsilon, v, top_k, masked):
    check_impl_against_reference(
        impl, n=40, v=v, top_k=top_k, epsilon=epsilon, masked=masked, reduction="none", seed=top_k
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_logits_many_chunks_and_inplace(monkeypatch, dtype):
    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 2000)
    for top_k in (3, 30, 200):
        check_impl_against_reference(
            "chunked", n=33, v=1200, top_k=top_k, masked=0.98, dtype=dtype, inplace_backward=True
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_of_all_masked_logits_give_zero(impl):
    z = torch.randn(3, 50)
    z[1] = -INF
    y = torch.tensor([4, -100, 7])
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.2, top_k=5, impl=impl)
    loss.backward()
    torch.testing.assert_close(loss, dpls_loss(z[[0, 2]], y[[0, 2]], epsilon=0.2, top_k=5, impl=impl))
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_masked_target_is_an_infinite_loss_with_a_finite_gradient(impl):
    z = torch.randn(2, 30)
    z[0, 3] = -INF
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, torch.tensor([3, 4]), epsilon=0.1, top_k=4, impl=impl, reduction="none")
    assert loss[0].item() == INF and math.isfinite(loss[1].item())
    loss[1].backward()
    assert torch.isfinite(x.grad).all()


# ---- a padded vocabulary changes nothing --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 10, 100])
def test_padded_vocabulary_equals_the_unpadded_one(impl, top_k):
    g = torch.Generator().manual_seed(top_k)
    z = torch.randn(24, 100, generator=g) * 3
    y = torch.randint(0, 100, (24,), generator=g)
    padded = torch.cat([z, torch.full((24, 28), -INF)], 1)
    eps = torch.rand(24, generator=g) * 0.5
    a, b = z.clone().requires_grad_(), padded.clone().requires_grad_()
    la = dpls_loss(a, y, epsilon=eps, top_k=top_k, impl=impl, return_nll=True)
    lb = dpls_loss(b, y, epsilon=eps, top_k=top_k, impl=impl, return_nll=True)
    la[0].backward()
    lb[0].backward()
    torch.testing.assert_close(lb, la, atol=0, rtol=1e-6)
    torch.testing.assert_close(b.grad[:, :100], a.grad, atol=1e-9, rtol=1e-6)
    assert (b.grad[:, 100:] == 0).all()
    # Label smoothing over the padded width is label smoothing over the real vocabulary.
    torch.testing.assert_close(
        label_smoothing_loss(padded, y, epsilon=0.1), F.cross_entropy(z, y, label_smoothing=0.1)
    )


def test_padded_vocabulary_in_every_related_objective():
    z = torch.randn(20, 60) * 2
    y = torch.randint(0, 60, (20,))
    y[3] = -100
    padded = torch.cat([z, torch.full((20, 4), -INF)], 1)
    for fn in (
        lambda x: confidence_penalty_loss(x, y, beta=0.3),
        lambda x: dpls_kl_loss(x, y, epsilon=0.2, top_k=5),
        lambda x: dpls_kl_loss(x, y, epsilon=0.2, top_k=x.shape[-1]),
        lambda x: z_loss(x, y),
    ):
        a, b = z.clone().requires_grad_(), padded.clone().requires_grad_()
        la, lb = fn(a), fn(b)
        assert torch.isfinite(lb)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la)
        torch.testing.assert_close(b.grad[:, :60], a.grad)
        assert (b.grad[:, 60:] == 0).all()
    for mode in ("confidence", "entropy"):
        torch.testing.assert_close(adaptive_epsilon(padded, 0.3, mode), adaptive_epsilon(z, 0.3, mode))


def test_padded_vocabulary_in_the_fused_linear_loss():
    """A model masks padded logits with a −inf bias: the fused-linear loss equals the unpadded one."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 16, generator=g, requires_grad=True)
    w = torch.randn(70, 16, generator=g)
    y = torch.randint(0, 64, (30,), generator=g)
    wp = w.clone().requires_grad_()
    bias = torch.zeros(70)
    bias[64:] = -INF
    for top_k in (5, 70):
        h.grad = wp.grad = None
        got = dpls_linear_loss(h, wp, y, bias=bias, epsilon=0.2, top_k=top_k, chunk_size=7)
        got.backward()
        gh, gw = h.grad.clone(), wp.grad.clone()
        h2 = h.detach().clone().requires_grad_()
        w2 = w[:64].clone().requires_grad_()
        want = dpls_loss(h2 @ w2.T, y, epsilon=0.2, top_k=min(top_k, 64), impl="reference")
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gh, h2.grad)
        torch.testing.assert_close(gw[:64], w2.grad)
        assert (gw[64:] == 0).all()


# ---- ties: one rule everywhere ------------------------------------------------------------------


def _tied_case(seed, n, v, levels):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, levels, (n, v), generator=g).float()
    y = torch.randint(0, v, (n,), generator=g)
    return z, y


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    v=st.sampled_from([7, 64, 400, 1100]),
    k_frac=st.floats(0.0, 1.0),
    levels=st.integers(1, 6),
    mask=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_exact_ties_and_masks_agree_with_the_definition(n, v, k_frac, levels, mask, seed):
    """Every implementation chooses the same k entries at exact ties (lowest index first), with
    or without masked entries, in every representation of T (sparse, dense, all)."""
    z, y = _tied_case(seed, n, v, levels)
    g = torch.Generator().manual_seed(seed + 1)
    off = torch.rand(n, v, generator=g) < mask
    off[torch.arange(n), y] = False
    z = z.masked_fill(off, -INF)
    k = max(1, min(v, round(k_frac * v)))
    ref_loss, _, ref_grad = reference_dpls(z, y, epsilon=0.6, top_k=k, reduction="sum")
    for impl in IMPLS:
        x = z.clone().requires_grad_()
        loss = dpls_loss(x, y, epsilon=0.6, top_k=k, impl=impl, reduction="sum")
        loss.backward()
        assert abs(loss.item() - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss))), impl
        assert (x.grad.double() - ref_grad).abs().max() <= 1e-6, impl
    vp = z.clone().requires_grad_()
    vocab_parallel_dpls_loss(vp, y, vocab_start=0, epsilon=0.6, top_k=k, reduction="sum").backward()
    assert (vp.grad.double() - ref_grad).abs().max() <= 1e-6


def test_reference_impl_breaks_ties_by_lowest_index():
    z = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    x = z.clone().requires_grad_()
    dpls_loss(x, torch.tensor([3]), epsilon=0.3, top_k=1, impl="reference").backward()
    q = torch.softmax(z, -1) - x.grad  # the soft target
    torch.testing.assert_close(q, torch.tensor([[0.3, 0.0, 0.0, 0.7]]))


@pytest.mark.parametrize(("y", "top_k"), [(2, 1), (0, 1), (1, 2), (2, 2), (3, 3)])
def test_kl_uses_the_same_tie_rule_as_the_gradient(y, top_k):
    z = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    target = torch.tensor([y])
    x = z.clone().requires_grad_()
    kl = dpls_kl_loss(x, target, epsilon=0.3, top_k=top_k)
    kl.backward()
    q = (torch.softmax(z, -1) - x.grad).double()  # the q the gradient uses
    logp = torch.log_softmax(z.double(), -1)
    want = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - logp), 0.0).sum()
    assert abs(kl.item() - want.item()) < 1e-6


# ---- precision at large logit offsets -------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_gradient_precision_does_not_depend_on_the_logit_offset(offset):
    for impl in IMPLS:
        err = check_impl_against_reference(impl, n=32, v=500, top_k=10, offset=offset).grad_err
        assert err < 2e-6, f"{impl}: relative gradient error {err:.2g} at offset {offset}"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 8, generator=g, dtype=torch.float64)
    w = torch.randn(500, 8, generator=g, dtype=torch.float64)
    bias = torch.full((500,), offset, dtype=torch.float64)
    y = torch.randint(0, 500, (32,), generator=g)
    z = h @ w.T + bias
    _, _, ref = reference_dpls(z, y, epsilon=0.1, top_k=10)
    hf = h.float().requires_grad_()
    dpls_linear_loss(hf, w.float(), y, bias=bias.float(), epsilon=0.1, top_k=10).backward()
    # compare d/dh against the float64 gradient of the float32 logits' definition
    zf = (hf.detach() @ w.float().T + bias.float()).double()
    _, _, ref32 = reference_dpls(zf, y, epsilon=0.1, top_k=10)
    want = ref32 @ w.float().double()
    err = float((hf.grad.double() - want).abs().max() / want.abs().max())
    assert err < 2e-6 and ref.abs().max() > 0
    vp = zf.float().requires_grad_()
    vocab_parallel_dpls_loss(vp, y, vocab_start=0, epsilon=0.1, top_k=10).backward()
    assert float((vp.grad.double() - ref32).abs().max() / ref32.abs().max()) < 2e-6


# ---- second-order gradients -----------------------------------------------------------------------


def _hvp(fn, z, vec):
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * vec).sum(), x)
    return g.detach(), hv


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("v", "top_k"), [(400, 3), (400, 100), (50, 50)])  # sparse, dense, all
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_matches_float64_hessian_vector_product(impl, v, top_k, reduction):
    g = torch.Generator().manual_seed(v + top_k)
    z = torch.randn(6, v, generator=g, dtype=torch.float64)
    z[:, -5:] = -INF
    y = torch.randint(0, v - 5, (6,), generator=g)
    y[1] = -100
    vec = torch.randn(6, v, generator=g, dtype=torch.float64)
    up = torch.randn(6, generator=g, dtype=torch.float64)

    def loss(x, i=impl):
        out = dpls_loss(x, y, epsilon=0.3, top_k=top_k, impl=i, reduction=reduction)
        return (out * up).sum() if reduction == "none" else out

    grad, hv = _hvp(loss, z, vec)
    ref_grad, ref_hv = _hvp(lambda x: loss(x, "reference"), z, vec)
    # independent check of the reference: H·v = scale·(p⊙v − p·(p·v)) per row
    p = torch.softmax(torch.where(y[:, None] != -100, z, 0.0), -1)
    scale = (up if reduction == "none" else torch.full((6,), 1 / 5, dtype=torch.float64)) * (y != -100)
    want = scale[:, None] * (p * vec - p * (p * vec).sum(-1, keepdim=True))
    torch.testing.assert_close(ref_hv, want)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(hv, want)
    assert hv.abs().max() > 0


def test_double_backward_through_related_losses():
    z = torch.randn(5, 30, dtype=torch.float64)
    y = torch.randint(0, 30, (5,))
    vec = torch.randn(5, 30, dtype=torch.float64)

    def dense_penalty(x):
        logp = torch.log_softmax(x, -1)
        return F.nll_loss(logp, y) + 0.4 * (logp.exp() * logp).sum(-1).mean()

    for fn, ref in (
        (lambda x: confidence_penalty_loss(x, y, beta=0.4), dense_penalty),
        (lambda x: z_loss(x, y), lambda x: torch.logsumexp(x, -1).square().mean()),
    ):
        _, hv = _hvp(fn, z, vec)
        _, want = _hvp(ref, z, vec)
        torch.testing.assert_close(hv, want)


def test_double_backward_is_refused_where_no_graph_is_built():
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(20, 4, requires_grad=True)
    y = torch.randint(0, 20, (8,))
    for reduction in ("mean", "none"):
        loss = dpls_linear_loss(h, w, y, top_k=3, reduction=reduction).sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, h, create_graph=True)
    z = torch.randn(8, 20, requires_grad=True)
    loss = vocab_parallel_dpls_loss(z, y, vocab_start=0, top_k=3)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)


# ---- empty batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_everywhere(reduction):
    y = torch.zeros(0, dtype=torch.long)
    for fn in (
        lambda x: dpls_loss(x, y, top_k=3, reduction=reduction, impl="chunked"),
        lambda x: dpls_loss(x, y, top_k=3, reduction=reduction, impl="reference"),
        lambda x: vocab_parallel_dpls_loss(x, y, vocab_start=0, top_k=3, reduction=reduction),
    ):
        x = torch.zeros(0, 10, requires_grad=True)
        out = fn(x)
        assert out.shape == ((0,) if reduction == "none" else ())
        assert (out == 0).all()
        out.sum().backward()
        assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_second_backward_with_retain_graph_gives_the_same_gradient(reduction):
    z = torch.randn(6, 400, requires_grad=True)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(400, 8)
    y = torch.randint(0, 400, (6,))
    for leaf, loss in (
        (z, dpls_loss(z, y, top_k=3, impl="chunked", reduction=reduction).sum()),
        (h, dpls_linear_loss(h, w, y, top_k=3, reduction=reduction).sum()),
    ):
        loss.backward(retain_graph=True)
        first = leaf.grad.clone()
        loss.backward()
        torch.testing.assert_close(leaf.grad, 2 * first)
    # With inplace_backward the logits are the gradient: a second backward is refused by autograd.
    x = z.detach() * 1.0
    x.requires_grad_()
    out = dpls_loss(x * 1.0, y, top_k=3, impl="chunked", inplace_backward=True)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()

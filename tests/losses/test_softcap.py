"""Logit soft-capping (``softcap``): every loss of ``cap·tanh(z/cap)``, against float64.

The float64 statement (``loss_reference.reference_dpls(..., softcap=)``) caps the logits first and
takes the gradient back through ``1 − tanh²``; the chunked implementation caps each chunk as it
reads it (forward and backward), the fused-linear one each chunk of logits it forms. The Triton
kernels' soft-cap is tested in ``test_triton_kernel.py`` (under the interpreter on a CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dpls.losses.chunked as chunked
from dpls.losses import (
    DPLSLoss,
    confidence_penalty_loss,
    dpls_kl_loss,
    dpls_linear_loss,
    dpls_loss,
    label_smoothing_loss,
    prior_label_smoothing_loss,
    register_impl,
    z_loss,
)
from dpls.losses.registry import _IMPLS
from dpls.losses.softcap import softcap
from loss_reference import check_impl_against_reference, distinct_logits, reference_dpls


def _capped(z: torch.Tensor, cap: float) -> torch.Tensor:
    """The capped logits as a plain differentiable expression (not the library's helper)."""
    return torch.where(z == -float("inf"), z, cap * torch.tanh(z / cap))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize(
    ("epsilon", "top_k", "reduction"),
    [(0.1, 10, "mean"), ("per_token", 3, "none"), (0.0, 10, "sum"), (0.2, 300, "mean"), (0.1, 1, "none")],
    ids=["eps", "per-token", "eps0-is-ce", "k=V-is-ls", "k=1"],
)
def test_softcap_matches_float64_definition(impl, epsilon, top_k, reduction):
    """Loss, CE and the gradient through tanh, with ignored tokens and masked (−inf) logits."""
    for cap in (2.0, 30.0):
        check_impl_against_reference(
            impl, n=40, v=300, top_k=top_k, epsilon=epsilon, reduction=reduction, softcap=cap, masked=0.05
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softcap_half_inputs_and_in_place_gradient(dtype):
    check_impl_against_reference(
        "chunked", n=24, v=200, top_k=7, dtype=dtype, softcap=4.0, inplace_backward=True
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_softcap_many_chunks_and_the_cpu_search(monkeypatch, threads):
    """Chunks of a few rows over the thread pool; V large enough for the compiled strip search (k+1 ≤ V/32)
    and for the quickselect path (k > V/16)."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 3000)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (20, 100):
            check_impl_against_reference("chunked", n=9, v=1200, top_k=k, softcap=3.0, epsilon="per_token")
        check_impl_against_reference("chunked", n=9, v=1200, top_k=20, softcap=3.0, inplace_backward=True)
    finally:
        torch.set_num_threads(old)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    v=st.integers(2, 400),
    k_frac=st.floats(0.0, 1.0),
    eps=st.sampled_from([0.0, 0.3, "per_token"]),
    cap=st.sampled_from([0.5, 3.0, 50.0]),
    ignore=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_softcap_any_shape(n, v, k_frac, eps, cap, ignore, seed):
    k = max(1, min(v, round(k_frac * v)))
    check_impl_against_reference(
        "chunked", n=n, v=v, top_k=k, epsilon=eps, softcap=cap, ignore_frac=ignore, seed=seed, scale=1.0
    )


def test_softcap_ties_are_those_of_the_capped_logits():
    """Equal raw logits stay equal once capped: T takes exactly k of them, lowest index first."""
    z = torch.randint(-2, 3, (20, 32), generator=torch.Generator().manual_seed(3)).float()
    y = torch.randint(0, 32, (20,))
    for impl in ("reference", "chunked"):
        x = z.clone().requires_grad_()
        loss = dpls_loss(x, y, epsilon=0.9, top_k=5, impl=impl, reduction="sum", softcap=1.5)
        loss.backward()
        ref_loss, _, ref_grad = reference_dpls(z, y, epsilon=0.9, top_k=5, reduction="sum", softcap=1.5)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_softcap_equals_capping_the_logits_first(impl):
    """The keyword is exactly 'the loss of the capped logits', for every front and the module."""
    z = distinct_logits(16, 90, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 90, (16,))
    y[::5] = -100
    for loss_of in (
        lambda x, **kw: dpls_loss(x, y, epsilon=0.2, top_k=7, impl=impl, **kw),
        lambda x, **kw: label_smoothing_loss(x, y, epsilon=0.2, **kw),
        lambda x, **kw: DPLSLoss(epsilon=0.2, top_k=7, impl=impl, **kw)(x, y),
    ):
        a = z.clone().requires_grad_()
        b = z.clone().requires_grad_()
        loss_of(a, softcap=2.5).backward()
        loss_of(_capped(b, 2.5)).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert torch.isclose(
        dpls_loss(z, y, softcap=2.5, top_k=7, impl=impl), dpls_loss(_capped(z, 2.5), y, top_k=7, impl=impl)
    )


def test_related_losses_take_softcap():
    """Prior-weighted LS (in the chunks), the confidence penalty, z-loss and the KL form."""
    gen = torch.Generator().manual_seed(2)
    z = distinct_logits(12, 60, generator=gen)
    y = torch.randint(0, 60, (12,), generator=gen)
    y[3] = -100
    prior = torch.rand(60, generator=gen)
    for loss_of in (
        lambda x, **kw: prior_label_smoothing_loss(x, y, prior, epsilon=0.2, **kw),
        lambda x, **kw: confidence_penalty_loss(x, y, beta=0.3, **kw),
        lambda x, **kw: z_loss(x, y, **kw),
        lambda x, **kw: dpls_kl_loss(x, y, epsilon=0.2, top_k=5, **kw),
    ):
        a = z.clone().requires_grad_()
        b = z.clone().requires_grad_()
        loss_a, loss_b = loss_of(a, softcap=1.5), loss_of(_capped(b, 1.5))
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
        loss_a.backward()
        loss_b.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_masked_logits_stay_masked():
    """−inf is outside the vocabulary, capped or not: never a probability, never smoothed onto."""
    z = distinct_logits(4, 40)
    z[:, 30:] = -float("inf")
    y = torch.tensor([0, 5, 9, 29])
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.3, top_k=40, softcap=2.0, reduction="sum")
    loss.backward()
    want = F.cross_entropy(_capped(z[:, :30], 2.0), y, label_smoothing=0.3, reduction="sum")
    torch.testing.assert_close(loss, want)
    assert torch.equal(x.grad[:, 30:], torch.zeros(4, 10))
    assert torch.equal(softcap(z, 2.0)[:, 30:], z[:, 30:])


def test_double_backward_goes_through_the_cap():
    z = distinct_logits(6, 50, dtype=torch.float64)
    y = torch.randint(0, 50, (6,))
    grads = []
    for impl in ("reference", "chunked"):
        x = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(dpls_loss(x, y, top_k=4, impl=impl, softcap=2.0), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        grads.append(gg)
    torch.testing.assert_close(grads[0], grads[1])


def _linear_case(n, c, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    return h, w, y


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize(("reduction", "eps"), [("mean", 0.2), ("none", "tensor"), ("sum", 0.0)])
def test_linear_softcap_matches_float64(impl, reduction, eps):
    """Fused-linear: the gradients of hidden and weight through the cap, chunk by chunk."""
    h, w, y = _linear_case(29, 12, 83)
    eps = torch.rand(29) * 0.5 if eps == "tensor" else eps
    g_out = torch.randn(29, dtype=torch.float64) if reduction == "none" else 1.3
    loss, nll = dpls_linear_loss(
        h,
        w,
        y,
        epsilon=eps,
        top_k=6,
        reduction=reduction,
        return_nll=True,
        chunk_size=5,
        softcap=2.0,
        impl=impl,
    )
    g = g_out.float() if isinstance(g_out, torch.Tensor) else g_out
    (loss * g).sum().backward()
    hd, wd = h.detach().double(), w.detach().double()
    ref_loss, ref_nll, dz = reference_dpls(
        hd @ wd.T, y, epsilon=eps, top_k=6, reduction=reduction, grad_output=g_out, softcap=2.0
    )

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    assert rel(loss.detach(), ref_loss) < 1e-5 and rel(nll, ref_nll) < 1e-5
    assert rel(h.grad, dz @ wd) < 1e-4 and rel(w.grad, dz.T @ hd) < 1e-4


def test_linear_softcap_half_precision_and_no_grad():
    h, w, y = _linear_case(24, 16, 70, dtype=torch.bfloat16)
    loss = dpls_linear_loss(h, w, y, top_k=5, chunk_size=7, softcap=3.0)
    with torch.no_grad():
        again = dpls_linear_loss(h, w, y, top_k=5, chunk_size=7, softcap=3.0)
    want = dpls_loss(_capped((h @ w.T).float(), 3.0), y, top_k=5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(loss.detach(), again)


def test_an_implementation_without_softcap_gets_capped_logits():
    """A registered implementation that does not cap is handed the capped logits by the front."""
    seen = []

    def plain(logits, target, epsilon, top_k, ignore_index, reduction, return_nll, inplace_backward):
        seen.append(logits.detach().clone())
        return chunked.chunked_dpls_loss(
            logits, target, epsilon, top_k, ignore_index, reduction, return_nll, inplace_backward
        )

    try:
        register_impl("test-plain", plain)
        z = distinct_logits(5, 30).requires_grad_()
        y = torch.randint(0, 30, (5,))
        loss = dpls_loss(z, y, top_k=3, impl="test-plain", softcap=2.0)
        loss.backward()
        torch.testing.assert_close(seen[0], _capped(z.detach(), 2.0))
        _, _, ref_grad = reference_dpls(z.detach(), y, top_k=3, softcap=2.0)
        torch.testing.assert_close(z.grad.double(), ref_grad, rtol=0, atol=1e-7)
    finally:
        _IMPLS.pop("test-plain", None)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "30"])
def test_bad_softcap_is_a_value_error(bad):
    z, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    for call in (
        lambda: dpls_loss(z, y, top_k=2, softcap=bad),
        lambda: dpls_linear_loss(torch.randn(3, 4), torch.randn(10, 4), y, top_k=2, softcap=bad),
        lambda: DPLSLoss(softcap=bad),
        lambda: z_loss(z, y, softcap=bad),
    ):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            call()

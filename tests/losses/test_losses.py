"""The loss implementations beyond the contract tests: chunking and threading, ties, in-place
gradients, float64 inputs, negative upstream gradients, argument checks and the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dpls.losses.chunked as chunked
from dpls.losses import DPLSLoss, dpls_loss, label_smoothing_loss, register_impl
from dpls.losses.registry import _IMPLS, available_impls, impl_names, resolve_impl
from loss_reference import check_impl_against_reference, distinct_logits, reference_dpls


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (2-3 rows each) so the chunk loop and its thread pool are exercised."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 700)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("epsilon", [0.1, "per_token"])
def test_chunked_many_chunks_any_thread_count(small_chunks, threads, epsilon):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_impl_against_reference("chunked", n=37, v=301, top_k=11, epsilon=epsilon, reduction="none")
        check_impl_against_reference("chunked", n=37, v=301, top_k=11, epsilon=epsilon, dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 4, 9, 31, 32])
def test_ties_give_exactly_k_entries_lowest_index_first(small_chunks, dtype, top_k):
    # Logits from {-2..2}: nearly every row ties at its k-th largest value.
    g = torch.Generator().manual_seed(top_k)
    z = torch.randint(-2, 3, (20, 32), generator=g).to(dtype)
    y = torch.randint(0, 32, (20,), generator=g)
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.9, top_k=top_k, impl="chunked", reduction="sum")
    loss.backward()
    ref_loss, _, ref_grad = reference_dpls(z, y, epsilon=0.9, top_k=top_k, reduction="sum")
    assert abs(loss.item() - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert (x.grad.double() - ref_grad).abs().max() <= tol
    # Exactly k entries per row carry the ε/k mass: −(grad − (softmax − (1−ε)·onehot)) = (ε/k)·1[T].
    p = torch.softmax(z.double(), -1)
    spread = -(x.grad.double() - (p - 0.1 * F.one_hot(y, 32).double()))
    assert ((spread > 0.45 / top_k).sum(-1) == top_k).all()


def test_float64_logits_are_computed_in_float64():
    z = torch.randn(16, 50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (16,))
    loss = dpls_loss(z, y, epsilon=0.2, top_k=5, impl="chunked")
    assert loss.dtype == torch.float64
    loss.backward()
    ref_loss, _, ref_grad = reference_dpls(z, y, epsilon=0.2, top_k=5)
    assert abs(loss.item() - float(ref_loss)) < 1e-12
    assert (z.grad - ref_grad).abs().max() < 1e-14


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_negative_and_zero_upstream_gradients(impl):
    z = distinct_logits(12, 40)
    y = torch.randint(0, 40, (12,))
    g = torch.randn(12, dtype=torch.float64)
    g[3] = 0.0
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.3, top_k=6, impl=impl, reduction="none")
    (loss * g.float()).sum().backward()
    _, _, ref_grad = reference_dpls(z, y, epsilon=0.3, top_k=6, reduction="none", grad_output=g)
    assert (x.grad.double() - ref_grad).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inplace_backward_half_and_per_token(small_chunks, dtype):
    check_impl_against_reference(
        "chunked", n=21, v=200, top_k=7, dtype=dtype, epsilon="per_token", inplace_backward=True
    )


def test_inplace_backward_reuses_the_logits_storage():
    leaf = distinct_logits(8, 30).requires_grad_()
    x = leaf * 1.0
    y = torch.randint(0, 30, (8,))
    seen = {}
    x.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    dpls_loss(x, y, top_k=3, impl="chunked", inplace_backward=True).backward()
    assert seen["ptr"] == x.data_ptr()


def test_empty_batch_and_custom_ignore_index():
    z = torch.randn(0, 10, requires_grad=True)
    loss = dpls_loss(z, torch.zeros(0, dtype=torch.long), top_k=3)
    assert loss.item() == 0.0
    z = distinct_logits(6, 10)
    y = torch.tensor([1, 7, 7, 2, 7, 0])
    got = dpls_loss(z, y, epsilon=0.0, top_k=3, ignore_index=7)
    want = F.cross_entropy(z, y, ignore_index=7)
    torch.testing.assert_close(got, want)


def test_nll_has_the_loss_shape_for_none_and_batch_dims():
    z = distinct_logits(12, 20).reshape(3, 4, 20)
    y = torch.randint(0, 20, (3, 4))
    loss, nll = dpls_loss(z, y, epsilon=0.1, top_k=4, reduction="none", return_nll=True)
    assert loss.shape == nll.shape == (3, 4)
    torch.testing.assert_close(
        nll, F.cross_entropy(z.reshape(12, 20), y.reshape(12), reduction="none").reshape(3, 4)
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda z, y: dpls_loss(z, y, epsilon=torch.full((3,), 0.1)), "epsilon"),  # wrong shape
        (lambda z, y: dpls_loss(z, y, epsilon=torch.tensor([0.1, float("nan"), 0.1, 0.1])), "epsilon"),
        (lambda z, y: dpls_loss(z, y, epsilon=torch.ones(4, dtype=torch.long)), "epsilon"),
        (lambda z, y: dpls_loss(z, y, epsilon=float("nan")), "epsilon"),
        (lambda z, y: dpls_loss(z, y, epsilon=True), "epsilon"),
        (lambda z, y: dpls_loss(z, y, top_k=True), "top_k"),
        (lambda z, y: dpls_loss(z, y, top_k=2.0), "top_k"),
        (lambda z, y: dpls_loss(z, y.float()), "target"),
        (lambda z, y: dpls_loss(z, y, ignore_index=None), "ignore_index"),
        (lambda z, y: dpls_loss(z.tolist(), y), "logits"),
        (lambda z, y: dpls_loss(z, y, impl=3), "impl"),
        (lambda z, y: label_smoothing_loss(z, y, epsilon=1.0), "epsilon"),
        (lambda z, y: label_smoothing_loss(z, y, reduction="max"), "reduction"),
        (lambda z, y: DPLSLoss(epsilon=2.0), "epsilon"),
        (lambda z, y: DPLSLoss(top_k=0), "top_k"),
        (lambda z, y: DPLSLoss(impl="nope"), "impl"),
    ],
)
def test_more_bad_arguments_name_themselves(call, name):
    z, y = torch.randn(4, 200), torch.randint(0, 200, (4,))
    with pytest.raises(ValueError, match=name):
        call(z, y)


def test_error_message_states_the_allowed_range():
    z, y = torch.randn(4, 10), torch.tensor([0, 1, 12, 2])
    with pytest.raises(ValueError, match=r"\[0, V=10\).*12"):
        dpls_loss(z, y, top_k=3)
    with pytest.raises(ValueError, match=r"\[1, V=10\]"):
        dpls_loss(z, y.clamp_max(9), top_k=11)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dpls_loss(z, y.clamp_max(9), top_k=3, epsilon=1.5)


def test_registry_auto_picks_highest_priority_and_custom_impls_plug_in():
    calls = []

    def fake(logits, target, epsilon, top_k, ignore_index, reduction, return_nll, inplace_backward):
        calls.append((logits.shape, top_k, reduction))
        return chunked.chunked_dpls_loss(
            logits, target, epsilon, top_k, ignore_index, reduction, return_nll, inplace_backward
        )

    try:
        register_impl("test-fake", fake, available=lambda d: d.type == "cpu", priority=10_000)
        assert "test-fake" in impl_names() and "test-fake" in available_impls("cpu")
        assert resolve_impl("auto", torch.device("cpu")).name == "test-fake"
        z = torch.randn(2, 3, 10)
        dpls_loss(z, torch.randint(0, 10, (2, 3)), top_k=2)
        assert calls == [((6, 10), 2, "mean")]  # flattened to [N, V] by the front
        register_impl("test-fake", fake, available=lambda d: False, priority=10_000)
        assert resolve_impl("auto", torch.device("cpu")).name == "chunked"
        with pytest.raises(ValueError, match="test-fake"):
            dpls_loss(z, torch.randint(0, 10, (2, 3)), top_k=2, impl="test-fake")
    finally:
        _IMPLS.pop("test-fake", None)


def test_import_stays_light_and_never_imports_triton():
    code = (
        "import sys, torch, dpls.losses as L\n"
        "L.dpls_loss(torch.randn(3, 9), torch.tensor([1, 2, 3]), top_k=2)\n"
        "L.dpls_linear_loss(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([1, 2, 3]), top_k=2)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers', 'matplotlib', 'datasets')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

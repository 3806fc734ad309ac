"""The loss contract (docs/losses.md) as tests: every pure-PyTorch implementation against the float64 definition, the exact
special cases (ε=0 is CE, k=V is label smoothing), ignored tokens, bad arguments, and the dynamic
parts (schedules, adaptive ε, objectives, the Hugging Face drop-in)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dpls.losses import DPLSLoss, dpls_linear_loss, dpls_loss, label_smoothing_loss
from dpls.losses.adaptive import adaptive_epsilon
from dpls.losses.objective import LossConfig, build_objective
from dpls.losses.schedules import EpsilonSchedule
from loss_reference import check_impl_against_reference, distinct_logits, reference_dpls

IMPLS = ["reference", "chunked"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("epsilon", [0.1, "per_token", 0.0])
def test_matches_float64_definition(impl, reduction, epsilon):
    check_impl_against_reference(impl, n=48, v=257, top_k=13, epsilon=epsilon, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 257])
def test_k_extremes(impl, top_k):
    check_impl_against_reference(impl, n=32, v=257, top_k=top_k, epsilon=0.2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(impl, dtype):
    check_impl_against_reference(impl, n=32, v=200, top_k=7, dtype=dtype)


def test_chunked_inplace_gradient_and_batch_shape():
    check_impl_against_reference("chunked", n=24, v=300, top_k=9, inplace_backward=True, batch_shape=(4, 6))


@given(
    n=st.integers(1, 40),
    v=st.integers(2, 300),
    k_frac=st.floats(0.0, 1.0),
    eps=st.floats(0.0, 0.9),
    ignore=st.floats(0.0, 1.0),
)
def test_chunked_any_shape(n, v, k_frac, eps, ignore):
    k = max(1, min(v, round(k_frac * v)))
    check_impl_against_reference("chunked", n=n, v=v, top_k=k, epsilon=eps, ignore_frac=ignore)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equal_v_is_label_smoothing_and_eps0_is_cross_entropy(impl):
    z = torch.randn(64, 100, dtype=torch.float64).float()
    y = torch.randint(0, 100, (64,))
    y[::7] = -100
    ls = dpls_loss(z, y, epsilon=0.15, top_k=100, impl=impl)
    torch.testing.assert_close(ls, F.cross_entropy(z, y, label_smoothing=0.15), rtol=1e-6, atol=1e-6)
    ce = dpls_loss(z, y, epsilon=0.0, top_k=5, impl=impl)
    torch.testing.assert_close(ce, F.cross_entropy(z, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        label_smoothing_loss(z, y, epsilon=0.15), F.cross_entropy(z, y, label_smoothing=0.15)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_and_zero_gradient(impl, reduction):
    z = torch.randn(8, 50, requires_grad=True)
    y = torch.full((8,), -100)
    loss = dpls_loss(z, y, top_k=5, impl=impl, reduction=reduction)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    assert torch.count_nonzero(z.grad) == 0


def test_return_nll_is_plain_cross_entropy_of_the_same_tokens():
    z = distinct_logits(40, 120)
    y = torch.randint(0, 120, (40,))
    loss, nll = dpls_loss(z, y, epsilon=0.3, top_k=10, return_nll=True)
    torch.testing.assert_close(nll, F.cross_entropy(z, y))
    ref_loss, _, _ = reference_dpls(z.double(), y, epsilon=0.3, top_k=10)
    assert math.isclose(loss.item(), float(ref_loss), rel_tol=1e-5)


def test_module_equals_functional():
    z = distinct_logits(16, 64)
    y = torch.randint(0, 64, (16,))
    module = DPLSLoss(epsilon=0.2, top_k=4)
    torch.testing.assert_close(module(z, y), dpls_loss(z, y, epsilon=0.2, top_k=4))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": torch.full((4,), 1.5)}, "epsilon"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 11}, "top_k"),
        ({"reduction": "avg"}, "reduction"),
        ({"impl": "fastest"}, "impl"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=name):
        dpls_loss(z, y, **{"top_k": 3, **kwargs})


def test_bad_targets_shapes_and_dtypes_are_value_errors():
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="target"):
        dpls_loss(z, torch.tensor([0, 1, 10, 2]), top_k=3)
    with pytest.raises(ValueError, match="target"):
        dpls_loss(z, torch.tensor([0, 1, -5, 2]), top_k=3)
    with pytest.raises(ValueError, match="shape"):
        dpls_loss(z, torch.zeros(5, dtype=torch.long), top_k=3)
    with pytest.raises(ValueError, match="logits"):
        dpls_loss(torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long), top_k=3)


def test_linear_loss_matches_logits_path():
    torch.manual_seed(1)
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(90, 16, requires_grad=True)
    y = torch.randint(0, 90, (30,))
    y[3] = -100
    loss = dpls_linear_loss(h, w, y, epsilon=0.1, top_k=7, chunk_size=8)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = dpls_loss(h2 @ w2.T, y, epsilon=0.1, top_k=7, impl="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_schedules_have_their_shapes():
    step = EpsilonSchedule(epsilon=0.1, start_step=10, shape="step")
    assert step(9) == 0.0 and step(10) == 0.1 and step(1000) == 0.1
    lin = EpsilonSchedule(epsilon=0.2, epsilon_final=0.0, start_step=0, end_step=100, shape="linear")
    assert lin(0) == pytest.approx(0.2) and lin(50) == pytest.approx(0.1) and lin(100) == pytest.approx(0.0)
    cos = EpsilonSchedule(epsilon=0.2, epsilon_final=0.0, start_step=0, end_step=100, shape="cosine")
    assert cos(0) == pytest.approx(0.2) and cos(50) == pytest.approx(0.1) and cos(25) > lin(25)
    warm = EpsilonSchedule(epsilon=0.2, start_step=0, end_step=100, shape="warmup")
    assert warm(0) < warm(50) < warm(100) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="end_step"):
        EpsilonSchedule(epsilon=0.1, start_step=5, end_step=5, shape="linear")


def test_adaptive_epsilon_gives_confident_tokens_less():
    z = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    conf = adaptive_epsilon(z, 0.2, "confidence", 1.0)
    p_max = torch.softmax(z, -1).max(-1).values
    torch.testing.assert_close(conf, 0.2 * (1 - p_max))
    ent = adaptive_epsilon(z, 0.2, "entropy", 2.0)
    assert ent[0] < ent[1] and ent[1] == pytest.approx(0.2)  # uniform row: H = log V


def test_objective_reports_ce_beside_the_objective_and_is_ce_before_start():
    z = distinct_logits(20, 50).requires_grad_()
    y = torch.randint(0, 50, (20,))
    obj = build_objective(
        LossConfig(loss="dpls", dpls_epsilon=0.1, dpls_top_k=5, dpls_schedule="step", dpls_start_step=3)
    )
    before = obj(z, y, step=2)
    assert before.epsilon == 0.0
    torch.testing.assert_close(before.loss, F.cross_entropy(z, y))
    after = obj(z, y, step=3)
    assert after.epsilon == pytest.approx(0.1)
    torch.testing.assert_close(after.ce, F.cross_entropy(z, y).detach())
    torch.testing.assert_close(after.loss, dpls_loss(z, y, epsilon=0.1, top_k=5))


def test_z_loss_adds_lambda_lse_squared():
    z = distinct_logits(10, 30)
    y = torch.randint(0, 30, (10,))
    base = build_objective(LossConfig(loss="ce"))(z, y, step=0).loss
    with_z = build_objective(LossConfig(loss="ce", z_loss=1e-2))(z, y, step=0).loss
    torch.testing.assert_close(with_z - base, 1e-2 * torch.logsumexp(z, -1).pow(2).mean())


def test_confidence_penalty_is_ce_minus_beta_entropy():
    z = distinct_logits(10, 30)
    y = torch.randint(0, 30, (10,))
    out = build_objective(LossConfig(loss="confidence_penalty", confidence_penalty_beta=0.3))(z, y, step=0)
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    torch.testing.assert_close(out.loss, F.cross_entropy(z, y) - 0.3 * entropy)


def test_hf_drop_in_shifts_labels_like_transformers():
    from types import SimpleNamespace

    from dpls.losses.hf import make_hf_loss

    logits = distinct_logits(2 * 9, 40).reshape(2, 9, 40)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, 4] = -100
    got = make_hf_loss(epsilon=0.1, top_k=5)(SimpleNamespace(logits=logits), labels)
    want = dpls_loss(logits[:, :-1], labels[:, 1:], epsilon=0.1, top_k=5)
    torch.testing.assert_close(got, want)

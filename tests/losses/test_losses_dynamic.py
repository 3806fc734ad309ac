"""Schedules, adaptive ε, the related objectives (prior LS, confidence penalty, z-loss, KL) and the
trainer-facing Objective, each against a float64 statement of its definition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dpls.losses import (
    EpsilonSchedule,
    LossConfig,
    adaptive_epsilon,
    adaptive_epsilon_from_hidden,
    build_objective,
    confidence_penalty_loss,
    dpls_kl_loss,
    dpls_loss,
    prior_label_smoothing_loss,
    z_loss,
)
from dpls.losses.objective import objective_names, register_objective
from dpls.losses.schedules import SHAPES
from loss_reference import distinct_logits, reference_dpls

# ---- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_is_cross_entropy_before_start(shape):
    s = EpsilonSchedule(epsilon=0.2, epsilon_final=0.05, start_step=10, end_step=30, shape=shape)
    assert [s(t) for t in range(10)] == [0.0] * 10
    assert all(0.0 <= s(t) < 1.0 for t in range(10, 60))


@pytest.mark.parametrize(
    ("shape", "at_start", "mid", "after_end"),
    [
        ("constant", 0.2, 0.2, 0.2),
        ("step", 0.2, 0.2, 0.2),
        ("linear", 0.2, 0.125, 0.05),
        ("cosine", 0.2, 0.125, 0.05),
        ("warmup", 0.05, 0.125, 0.2),
    ],
)
def test_shape_values_at_start_middle_and_after_end(shape, at_start, mid, after_end):
    s = EpsilonSchedule(epsilon=0.2, epsilon_final=0.05, start_step=10, end_step=30, shape=shape)
    assert s(10) == pytest.approx(at_start)
    assert s(20) == pytest.approx(mid)
    assert s(30) == pytest.approx(after_end) and s(10_000) == pytest.approx(after_end)


def test_cosine_is_high_early_and_monotone():
    cos = EpsilonSchedule(epsilon=0.3, epsilon_final=0.0, start_step=0, end_step=100, shape="cosine")
    lin = EpsilonSchedule(epsilon=0.3, epsilon_final=0.0, start_step=0, end_step=100, shape="linear")
    vals = [cos(t) for t in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert cos(20) > lin(20) and cos(80) < lin(80)
    assert cos(50) == pytest.approx(0.5 * 0.3 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon_final": -0.1}, "epsilon_final"),
        ({"shape": "exp"}, "shape"),
        ({"start_step": -1}, "start_step"),
        ({"shape": "cosine", "end_step": 0}, "end_step"),
        ({"shape": "warmup", "start_step": 5, "end_step": 3}, "end_step"),
    ],
)
def test_schedule_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EpsilonSchedule(**{"epsilon": 0.1, **kwargs})


# ---- adaptive ε --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["confidence", "entropy"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_adaptive_epsilon_matches_its_formula_in_chunks(monkeypatch, mode, gamma):
    import dpls.losses.chunked as chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 300)  # several chunks
    z = distinct_logits(30, 70, scale=2.0).reshape(5, 6, 70)
    p = torch.softmax(z.double(), -1)
    if mode == "confidence":
        stat = 1 - p.max(-1).values
    else:
        stat = -(p * p.log()).sum(-1) / math.log(70)
    got = adaptive_epsilon(z, 0.3, mode, gamma)
    assert got.shape == (5, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), 0.3 * stat.pow(gamma), rtol=1e-5, atol=1e-6)
    h = torch.randn(30, 8, dtype=torch.float64)
    w = torch.randn(70, 8, dtype=torch.float64)
    from_hidden = adaptive_epsilon_from_hidden(h, w, 0.3, mode, gamma, chunk_size=7)
    torch.testing.assert_close(from_hidden, adaptive_epsilon(h @ w.T, 0.3, mode, gamma))


def test_adaptive_constant_is_a_float_and_bad_modes_fail():
    assert adaptive_epsilon(torch.randn(3, 5), 0.1, "constant") == 0.1
    with pytest.raises(ValueError, match="epsilon_mode"):
        adaptive_epsilon(torch.randn(3, 5), 0.1, "margin")
    with pytest.raises(ValueError, match="gamma"):
        adaptive_epsilon(torch.randn(3, 5), 0.1, "entropy", -1.0)


# ---- related objectives --------------------------------------------------------------------------


def _grad(fn, z):
    x = z.clone().requires_grad_()
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


def test_prior_label_smoothing_matches_definition():
    z = distinct_logits(25, 60)
    y = torch.randint(0, 60, (25,))
    y[2] = -100
    prior = torch.rand(60) + 0.01
    loss, grad = _grad(lambda x: prior_label_smoothing_loss(x, y, prior, epsilon=0.2), z)
    zd = z.double().requires_grad_()
    pi = (prior / prior.sum()).double()
    q = 0.8 * F.one_hot(y.clamp_min(0), 60).double() + 0.2 * pi
    valid = (y != -100).double()
    ref = (-(q * torch.log_softmax(zd, -1)).sum(-1) * valid).sum() / valid.sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert (grad.double() - zd.grad).abs().max() < 1e-6
    # A uniform prior is ordinary label smoothing.
    uniform = prior_label_smoothing_loss(z, y, torch.ones(60), epsilon=0.2)
    torch.testing.assert_close(uniform, F.cross_entropy(z, y, label_smoothing=0.2))
    with pytest.raises(ValueError, match="prior"):
        prior_label_smoothing_loss(z, y, -torch.ones(60))
    with pytest.raises(ValueError, match="prior"):
        prior_label_smoothing_loss(z, y, torch.ones(59))


def test_confidence_penalty_gradient_and_none_reduction(monkeypatch):
    import dpls.losses.chunked as chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 200)
    z = distinct_logits(20, 40)
    y = torch.randint(0, 40, (20,))
    loss, grad = _grad(lambda x: confidence_penalty_loss(x, y, beta=0.4), z)
    zd = z.double().requires_grad_()
    logp = torch.log_softmax(zd, -1)
    ref = F.nll_loss(logp, y) + 0.4 * (logp.exp() * logp).sum(-1).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert (grad.double() - zd.grad).abs().max() < 1e-6
    per, nll = confidence_penalty_loss(z, y, beta=0.4, reduction="none", return_nll=True)
    assert per.shape == nll.shape == (20,)
    torch.testing.assert_close(nll, F.cross_entropy(z, y, reduction="none"))
    with pytest.raises(ValueError, match="beta"):
        confidence_penalty_loss(z, y, beta=-1.0)


def test_z_loss_value_and_gradient():
    z = distinct_logits(12, 30)
    y = torch.randint(0, 30, (12,))
    y[0] = -100
    val, grad = _grad(lambda x: z_loss(x, y), z)
    zd = z.double().requires_grad_()
    ref = torch.logsumexp(zd, -1)[1:].square().mean()
    ref.backward()
    assert abs(val.item() - ref.item()) < 1e-5 * ref.item()
    assert (grad.double() - zd.grad).abs().max() < 1e-5


@pytest.mark.parametrize("top_k", [1, 5, 30])
def test_kl_is_loss_minus_target_entropy(top_k):
    z = distinct_logits(40, 30)
    y = torch.randint(0, 30, (40,))
    eps = torch.rand(40) * 0.5
    kl = dpls_kl_loss(z, y, epsilon=eps, top_k=top_k, reduction="none")
    # Direct KL(q || p) in float64 from q built as in the definition.
    zd = z.double()
    top = zd.topk(top_k, -1).indices
    q = (1 - eps.double())[:, None] * F.one_hot(y, 30).double()
    q = q + torch.zeros_like(zd).scatter_(1, top, 1.0) * (eps.double() / top_k)[:, None]
    logp = torch.log_softmax(zd, -1)
    ref = (torch.where(q > 0, q * (q.clamp_min(1e-300).log() - logp), torch.zeros_like(q))).sum(-1)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
    assert (kl >= -1e-5).all()
    # Same gradient as the loss.
    _, g_kl = _grad(lambda x: dpls_kl_loss(x, y, epsilon=eps, top_k=top_k), z)
    _, g_loss = _grad(lambda x: dpls_loss(x, y, epsilon=eps, top_k=top_k), z)
    torch.testing.assert_close(g_kl, g_loss)


# ---- objectives ----------------------------------------------------------------------------------


def test_every_registered_objective_builds_and_reports_ce():
    z = distinct_logits(24, 50).reshape(4, 6, 50)
    y = torch.randint(0, 50, (4, 6))
    y[0, :3] = -100
    ce = F.cross_entropy(z.reshape(-1, 50), y.reshape(-1))
    assert set(objective_names()) >= {"ce", "ls", "dpls", "confidence_penalty", "prior_ls"}
    for name in objective_names():
        cfg = LossConfig(loss=name, dpls_top_k=5)
        obj = build_objective(cfg, token_prior=torch.rand(50) + 0.1)
        out = obj(z.clone().requires_grad_(), y, step=0)
        torch.testing.assert_close(out.ce, ce)
        assert not out.ce.requires_grad and out.loss.requires_grad
        assert isinstance(out.epsilon, float)


def test_ls_and_dpls_objectives_equal_their_losses():
    z = distinct_logits(30, 40)
    y = torch.randint(0, 40, (30,))
    ls = build_objective(LossConfig(loss="ls", label_smoothing=0.2))(z, y, step=5)
    torch.testing.assert_close(ls.loss, F.cross_entropy(z, y, label_smoothing=0.2))
    assert ls.epsilon == 0.2
    cfg = LossConfig(loss="dpls", dpls_epsilon=0.3, dpls_top_k=4, dpls_schedule="linear", dpls_end_step=10)
    out = build_objective(cfg)(z, y, step=5)
    assert out.epsilon == pytest.approx(0.15)
    ref, _, _ = reference_dpls(z, y, epsilon=0.15, top_k=4)
    assert abs(out.loss.item() - float(ref)) < 1e-5 * float(ref)


def test_adaptive_objective_reports_mean_epsilon_and_uses_it():
    z = distinct_logits(30, 40)
    y = torch.randint(0, 40, (30,))
    y[:10] = -100
    cfg = LossConfig(loss="dpls", dpls_epsilon=0.4, dpls_top_k=4, dpls_epsilon_mode="entropy", dpls_gamma=1.5)
    out = build_objective(cfg)(z, y, step=0)
    eps = adaptive_epsilon(z, 0.4, "entropy", 1.5)
    assert out.epsilon == pytest.approx(eps[10:].mean().item(), rel=1e-6)
    torch.testing.assert_close(out.loss, dpls_loss(z, y, epsilon=eps, top_k=4))


@pytest.mark.parametrize("loss", ["ce", "ls", "dpls", "confidence_penalty", "prior_ls"])
def test_from_hidden_equals_logits_path(loss):
    torch.manual_seed(3)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(45, 16, requires_grad=True)
    y = torch.randint(0, 45, (3, 7))
    y[1, 2] = -100
    cfg = LossConfig(
        loss=loss, dpls_top_k=6, dpls_epsilon_mode="confidence" if loss == "dpls" else "constant", z_loss=1e-3
    )
    obj = build_objective(cfg, token_prior=torch.arange(1, 46).float())
    a = obj.from_hidden(h, w, y, step=0)
    a.loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    b = obj(h @ w.T, y, step=0)
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.ce, b.ce, rtol=1e-5, atol=1e-6)
    assert float(a.epsilon) == pytest.approx(float(b.epsilon), rel=1e-5)  # a device tensor or a float
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)


def test_config_errors_are_raised_when_building():
    with pytest.raises(ValueError, match="loss must be one of"):
        build_objective(LossConfig(loss="focal"))
    with pytest.raises(ValueError, match="token_prior"):
        build_objective(LossConfig(loss="prior_ls"))
    with pytest.raises(ValueError, match="end_step"):
        build_objective(LossConfig(loss="dpls", dpls_schedule="cosine"))
    with pytest.raises(ValueError, match="epsilon_mode"):
        build_objective(LossConfig(loss="dpls", dpls_epsilon_mode="x"))
    with pytest.raises(ValueError, match="z_loss"):
        build_objective(LossConfig(loss="ce", z_loss=-1.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        build_objective(LossConfig(loss="ls", label_smoothing=1.0))
    with pytest.raises(ValueError, match="impl"):
        build_objective(LossConfig(loss="ce", loss_impl="cuda"))
    with pytest.raises(ValueError, match="dpls_top_k"):
        build_objective(LossConfig(loss="dpls", dpls_top_k=50))(
            torch.randn(2, 10), torch.zeros(2, dtype=torch.long), step=0
        )


def test_loss_config_from_any_config_and_new_objectives_register():
    from types import SimpleNamespace

    cfg = LossConfig.from_config(SimpleNamespace(loss="dpls", dpls_top_k=7, learning_rate=1e-3))
    assert cfg.loss == "dpls" and cfg.dpls_top_k == 7 and cfg.dpls_epsilon == 0.1
    assert LossConfig.from_config({"z_loss": 0.5}).z_loss == 0.5

    from dpls.losses.objective import _OBJECTIVES, Objective

    @register_objective("test-double-ce")
    class DoubleCE(Objective):
        def _loss(self, logits, target, step):
            ce = F.cross_entropy(logits, target)
            return 2 * ce, ce, 0.0

    try:
        z, y = torch.randn(4, 9), torch.randint(0, 9, (4,))
        out = build_objective(LossConfig(loss="test-double-ce"))(z, y, step=0)
        torch.testing.assert_close(out.loss, 2 * out.ce)
    finally:
        _OBJECTIVES.pop("test-double-ce")


@pytest.mark.parametrize(
    "key, bad",
    [
        ("dpls_epsilon", 1.0),
        ("dpls_epsilon_final", -0.1),
        ("label_smoothing", 1.5),
        ("dpls_top_k", 0),
        ("dpls_start_step", -1),
        ("dpls_schedule", "exponential"),
        ("dpls_epsilon_mode", "margin"),
        ("dpls_gamma", float("inf")),
        ("confidence_penalty_beta", -1.0),
        ("z_loss", float("nan")),
        ("loss_impl", "fast"),
    ],
)
def test_bad_loss_keys_are_named_as_the_training_keys(key, bad):
    """`dpls train --dpls_schedule=...` must hear about dpls_schedule, not the helper's `shape`."""
    from dpls.losses.objective import LossConfig, build_objective

    with pytest.raises(ValueError, match=rf"^{key} must be"):
        build_objective(LossConfig(loss="dpls", **{key: bad}))
    with pytest.raises(ValueError, match=r"^dpls_end_step must be > dpls_start_step=5 for the 'cosine'"):
        build_objective(LossConfig(loss="dpls", dpls_schedule="cosine", dpls_start_step=5, dpls_end_step=5))

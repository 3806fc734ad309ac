"""MetricAccumulator against hand-computed values and a dense float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpls.eval.metrics import METRIC_KEYS, TOPK_ENTROPIES, MetricAccumulator

LN2, LN5 = math.log(2.0), math.log(5.0)


def calibrated_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose targets follow the row's own softmax *exactly*: a perfectly calibrated predictor.

    p1 = (1/2, 1/4, 1/8, 1/8) × 8 tokens, p2 = uniform × 4, p3 = (5/8, 1/8, 1/8, 1/8) × 8.
    """
    groups = [
        ([1 / 2, 1 / 4, 1 / 8, 1 / 8], [0, 0, 0, 0, 1, 1, 2, 3]),
        ([1 / 4] * 4, [0, 1, 2, 3]),
        ([5 / 8, 1 / 8, 1 / 8, 1 / 8], [0, 0, 0, 0, 0, 1, 2, 3]),
    ]
    logits, targets = [], []
    for p, ys in groups:
        row = torch.tensor(p, dtype=torch.float64).log() + 3.0  # any shift: softmax is p
        logits += [row] * len(ys)
        targets += ys
    return torch.stack(logits).float(), torch.tensor(targets)


def reference(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """The metric definitions (docs/reference.md, section 6), dense, in float64 (adaptive ECE by sorting every token)."""
    z = logits.double()
    logp = z.log_softmax(-1)
    p = logp.exp()
    n, vocab = z.shape
    onehot = torch.nn.functional.one_hot(targets, vocab).double()
    ce = -(logp * onehot).sum(-1)
    conf, pred = p.max(-1)
    correct = (pred == targets).double()
    out = {
        "loss": ce.mean().item(),
        "entropy": -(p * logp).sum(-1).mean().item(),
        "top1_acc": correct.mean().item(),
        "brier": ((p - onehot) ** 2).sum(-1).mean().item(),
        "tokens": n,
    }
    for k in TOPK_ENTROPIES:
        top = z.topk(min(k, vocab), dim=-1).values.log_softmax(-1)
        out[f"entropy_top{k}"] = -(top.exp() * top).sum(-1).mean().item()
    idx = (conf * n_bins).long().clamp(max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        ece += abs((correct[m] - conf[m]).sum().item()) / n
    out["ece"] = ece
    # equal-mass bins over tokens sorted by confidence, a token on a cut shared proportionally
    order = conf.argsort()
    c_sorted, a_sorted = conf[order].numpy(), correct[order].numpy()
    cuts = n * np.arange(n_bins + 1) / n_bins
    pos = np.arange(n)
    ece_a = 0.0
    for b in range(n_bins):
        w = np.clip(np.minimum(pos + 1, cuts[b + 1]) - np.maximum(pos, cuts[b]), 0, None)
        ece_a += abs((w * (a_sorted - c_sorted)).sum()) / n
    out["ece_adaptive"] = ece_a
    return out


def test_keys_are_exactly_the_spec():
    acc = MetricAccumulator()
    acc.update(*calibrated_set())
    assert list(acc.compute()) == list(METRIC_KEYS)
    assert set(METRIC_KEYS) == {
        "loss", "ppl", "entropy", "entropy_top10", "entropy_top100", "entropy_top1000", "top1_acc",
        "ece", "ece_adaptive", "brier", "best_temperature", "loss_at_best_temperature", "tokens",
    }  # fmt: skip


def test_perfectly_calibrated_predictor_by_hand():
    logits, targets = calibrated_set()
    acc = MetricAccumulator()
    acc.update(logits, targets)
    m = acc.compute()
    # Σ −log p_y: group 1: 4·ln2 + 2·ln4 + 2·ln8 = 14 ln2; group 2: 4·ln4 = 8 ln2;
    # group 3: 5·ln(8/5) + 3·ln8 = 24 ln2 − 5 ln5.  20 tokens.
    loss = (46 * LN2 - 5 * LN5) / 20
    assert m["tokens"] == 20
    assert m["loss"] == pytest.approx(loss, rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    # calibrated in the strong sense: each row's targets follow its own p, so E[CE] = H
    assert m["entropy"] == pytest.approx(loss, rel=1e-6)
    for k in TOPK_ENTROPIES:  # k clipped to V = 4: the full distribution
        assert m[f"entropy_top{k}"] == pytest.approx(loss, rel=1e-6)
    # Brier averages to 1 − Σp² per row: (8·(1 − 11/32) + 4·(1 − 1/4) + 8·(1 − 28/64)) / 20
    assert m["brier"] == pytest.approx((8 * 21 / 32 + 4 * 3 / 4 + 8 * 36 / 64) / 20, rel=1e-6)
    assert m["top1_acc"] == pytest.approx((4 + 1 + 5) / 20)
    assert m["ece"] == pytest.approx(0.0, abs=1e-7)
    assert m["ece_adaptive"] == pytest.approx(0.0, abs=1e-7)
    # the model is its own best temperature
    assert m["best_temperature"] == pytest.approx(1.0, rel=1e-4)
    assert m["loss_at_best_temperature"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("scale", [2.0, 0.5, 3.0])
def test_scaled_logits_recover_the_scale_as_temperature(scale):
    logits, targets = calibrated_set()
    acc = MetricAccumulator()
    acc.update(logits * scale, targets)
    m = acc.compute()
    assert m["best_temperature"] == pytest.approx(scale, rel=1e-3)
    assert m["loss_at_best_temperature"] == pytest.approx((46 * LN2 - 5 * LN5) / 20, rel=1e-5)
    assert m["loss"] > m["loss_at_best_temperature"]


def test_temperature_matches_a_dense_float64_search():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(600, 300, generator=gen) * 3
    y = torch.distributions.Categorical(logits=z).sample()
    for scale in (0.4, 1.7, 6.0):
        zz = (z * scale).double()

        def ce(t: float, zz: torch.Tensor = zz) -> float:
            return torch.nn.functional.cross_entropy(zz / t, y).item()

        lo, hi = math.log(0.05), math.log(20.0)  # golden section on log T
        g = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            c, d = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, d) if ce(math.exp(c)) < ce(math.exp(d)) else (c, hi)
        t_ref = math.exp((lo + hi) / 2)
        acc = MetricAccumulator()
        acc.update(zz.float(), y)
        m = acc.compute()
        assert m["best_temperature"] == pytest.approx(t_ref, rel=3e-4)
        assert m["loss_at_best_temperature"] == pytest.approx(ce(t_ref), abs=5e-5)


def test_temperature_outside_grid_is_clipped_and_empty_grid_is_nan():
    logits, targets = calibrated_set()
    acc = MetricAccumulator(temperatures=[0.8, 1.0, 1.25])
    acc.update(logits * 4.0, targets)  # best T = 4: beyond the grid's hottest point
    assert acc.compute()["best_temperature"] == pytest.approx(1.25)
    acc = MetricAccumulator(temperatures=())
    acc.update(logits, targets)
    m = acc.compute()
    assert math.isnan(m["best_temperature"]) and math.isnan(m["loss_at_best_temperature"])
    assert m["loss"] == pytest.approx((46 * LN2 - 5 * LN5) / 20, rel=1e-6)


def test_topk_entropy_by_hand():
    # ten equal logits on top: the top-10 distribution is uniform, H = ln 10
    row = torch.tensor([0.0] * 10 + [-3.0, -5.0])
    acc = MetricAccumulator()
    acc.update(row.unsqueeze(0), torch.tensor([0]))
    m = acc.compute()
    assert m["entropy_top10"] == pytest.approx(math.log(10), rel=1e-6)
    w = np.array([1.0] * 10 + [math.exp(-3), math.exp(-5)])
    p = w / w.sum()
    assert m["entropy_top100"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6)  # k clipped to V
    assert m["entropy"] == pytest.approx(m["entropy_top1000"], rel=1e-7)


def test_skipping_topk_entropies_leaves_every_other_metric_unchanged():
    torch.manual_seed(3)
    logits, targets = torch.randn(64, 300) * 3, torch.randint(0, 300, (64,))
    full, cheap = MetricAccumulator(), MetricAccumulator(topk_entropies=False)
    full.update(logits, targets)
    cheap.update(logits, targets)
    a, b = full.compute(), cheap.compute()
    topk = {f"entropy_top{k}" for k in TOPK_ENTROPIES}
    assert all(math.isnan(b[k]) and math.isfinite(a[k]) for k in topk)
    assert {k: a[k] for k in a if k not in topk} == {k: b[k] for k in b if k not in topk}


@given(
    n=st.integers(1, 120),
    vocab=st.integers(2, 1100),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(n, vocab, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    acc = MetricAccumulator()
    acc.update(logits, targets)
    m = acc.compute()
    ref = reference(logits, targets)
    for key, value in ref.items():
        if key == "ece_adaptive":
            continue
        assert m[key] == pytest.approx(value, rel=2e-5, abs=2e-6), key
    # the histogram shares a fine bin straddling a cut in proportion; exact when no two
    # tokens share a fine bin, otherwise off by at most those tokens' share
    conf = logits.double().softmax(-1).max(-1).values
    fine = (conf * acc.fine_bins).long()
    shared = sum(c for c in torch.bincount(fine).tolist() if c > 1)
    assert abs(m["ece_adaptive"] - ref["ece_adaptive"]) <= 1e-6 + shared / n


@given(split=st.lists(st.integers(1, 40), min_size=1, max_size=6), chunk=st.sampled_from([7, 100, 1 << 24]))
def test_chunk_invariance(split, chunk):
    gen = torch.Generator().manual_seed(len(split))
    n = sum(split)
    logits = torch.randn(n, 50, generator=gen) * 2
    targets = torch.randint(0, 50, (n,), generator=gen)
    whole = MetricAccumulator()
    whole.update(logits, targets)
    parts = MetricAccumulator(chunk_elements=chunk)
    for x, y in zip(logits.split(split), targets.split(split)):
        parts.update(x, y)
    a, b = whole.compute(), parts.compute()
    for key in METRIC_KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    for adaptive in (False, True):
        got, want = parts.reliability(adaptive).to_dict(), whole.reliability(adaptive).to_dict()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)


def test_ignored_tokens_are_left_out():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 30, generator=gen)
    targets = torch.randint(0, 30, (4, 6), generator=gen)
    masked = targets.clone()
    masked[:, :2] = -100
    masked[3] = -100
    acc = MetricAccumulator()
    acc.update(logits, masked)
    keep = masked != -100
    only = MetricAccumulator()
    only.update(logits[keep], targets[keep])
    assert acc.compute() == pytest.approx(only.compute())
    assert acc.tokens == int(keep.sum()) == 12
    # another ignore_index, and an all-ignored batch adds nothing
    acc.update(logits, torch.full_like(targets, 5), ignore_index=5)
    assert acc.tokens == 12


def test_neg_inf_logits_count_as_zero_probability():
    a, b = MetricAccumulator(), MetricAccumulator()
    a.update(torch.tensor([[0.5, 2.0, -math.inf, -math.inf]]), torch.tensor([1]))
    b.update(torch.tensor([[0.5, 2.0]]), torch.tensor([1]))
    ma, mb = a.compute(), b.compute()
    for key in ("loss", "entropy", "brier", "top1_acc", "ece", "best_temperature", "entropy_top10"):
        assert math.isfinite(ma[key])
        assert ma[key] == pytest.approx(mb[key], rel=1e-6), key


def test_reliability_bins_and_entropy_histogram():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 40, generator=gen) * 3
    targets = torch.randint(0, 40, (300,), generator=gen)
    acc = MetricAccumulator()
    acc.update(logits, targets)
    bins = acc.reliability()
    assert len(bins.count) == 15 and sum(bins.count) == 300
    assert bins.lower[0] == 0.0 and bins.upper[-1] == 1.0
    p = logits.double().softmax(-1)
    conf, pred = p.max(-1)
    for i, (lo, hi) in enumerate(zip(bins.lower, bins.upper)):
        m = (conf >= lo) & (conf < hi)
        assert bins.count[i] == int(m.sum())
        if m.any():
            assert bins.confidence[i] == pytest.approx(conf[m].mean().item())
            assert bins.accuracy[i] == pytest.approx((pred[m] == targets[m]).double().mean().item())
        else:
            assert math.isnan(bins.confidence[i])
    adaptive = acc.reliability(adaptive=True)
    assert adaptive.count == pytest.approx([20.0] * 15)
    assert all(a <= b for a, b in zip(adaptive.confidence, adaptive.confidence[1:]))
    edges, counts = acc.entropy_histogram()
    assert edges[0] == 0.0 and edges[-1] == pytest.approx(math.log(40))
    assert sum(counts) == 300
    ent = -(p * p.log()).sum(-1)
    expected = np.histogram(ent.numpy(), bins=np.array(edges))[0]
    assert counts == pytest.approx(expected.tolist(), abs=1)  # float32 vs float64 on an edge


def test_reduce_sums_states_like_one_accumulator():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(80, 25, generator=gen)
    targets = torch.randint(0, 25, (80,), generator=gen)
    a, b, whole = MetricAccumulator(), MetricAccumulator(), MetricAccumulator()
    a.update(logits[:30], targets[:30])
    b.update(logits[30:], targets[30:])
    whole.update(logits, targets)
    other = torch.cat([t.reshape(-1) for t in b._state.values()])
    a.reduce_(lambda flat: flat + other)  # the collective: rank 0's state + rank 1's
    assert a.compute() == pytest.approx(whole.compute(), rel=1e-12)
    with pytest.raises(ValueError, match="at least one update"):
        MetricAccumulator().reduce_(lambda t: t)


def test_bad_input():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="floating-point"):
        acc.update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        acc.update(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="must match"):
        acc.update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no tokens"):
        acc.compute()
    acc.update(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="V=4"):
        acc.update(torch.zeros(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="temperatures"):
        MetricAccumulator(temperatures=[1.0, 0.0])
    with pytest.raises(ValueError, match="n_bins"):
        MetricAccumulator(n_bins=0)

"""MetricAccumulator against hand-computed values and a dense float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpls.eval.metrics import (
    EXTRA_METRIC_KEYS,
    METRIC_KEYS,
    TOPK_ENTROPIES,
    MetricAccumulator,
    frequency_bins,
    selective_metrics,
)
from metric_helpers import assert_metrics_close

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
    assert list(acc.compute()) == [*METRIC_KEYS, *EXTRA_METRIC_KEYS]
    assert set(METRIC_KEYS) == {
        "loss", "ppl", "entropy", "entropy_top10", "entropy_top100", "entropy_top1000", "top1_acc",
        "ece", "ece_adaptive", "brier", "best_temperature", "loss_at_best_temperature", "tokens",
    }  # fmt: skip
    assert set(EXTRA_METRIC_KEYS) == {
        "aurc", "auroc", "aurc_at_best_temperature", "auroc_at_best_temperature", "bits_per_byte",
        "ce_by_frequency",
    }  # fmt: skip
    m = acc.compute()  # without the tokens' bytes and the frequency bins: no such metric
    assert math.isnan(m["bits_per_byte"]) and m["ce_by_frequency"] is None


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
    assert_metrics_close({k: b[k] for k in b if k not in topk}, {k: a[k] for k in a if k not in topk}, rel=0)


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
    extras = dict(
        token_bytes=torch.randint(
            0, 4, (48,), generator=gen
        ).numpy(),  # shorter than V: ids past it have none
        frequency_bins=frequency_bins(torch.randint(0, 30, (50,), generator=gen).numpy(), n_bins=5),
    )
    whole = MetricAccumulator(**extras)
    whole.update(logits, targets)
    parts = MetricAccumulator(chunk_elements=chunk, **extras)
    for x, y in zip(logits.split(split), targets.split(split)):
        parts.update(x, y)
    a, b = whole.compute(), parts.compute()
    assert_metrics_close(b, a, rel=1e-9, abs=1e-12)
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
    assert_metrics_close(acc.compute(), only.compute())
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
    assert_metrics_close(a.compute(), whole.compute(), rel=1e-12)
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


# -- selective prediction, bits per byte, CE by training frequency ------------------------------------


def _binary_rows(confidences: list[float], right: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way rows whose top-1 confidence is each given value; the target is the top-1 or not."""
    logits = torch.tensor([[math.log(c / (1 - c)), 0.0] for c in confidences])
    return logits, torch.tensor([0 if r else 1 for r in right])


def test_selective_prediction_by_hand():
    """Confidences 0.9 ✓, 0.8 ✗, 0.7 ✓, 0.6 ✗. Accepting the most confident first, the risk at
    coverage 1..4 is 0, 1/2, 1/3, 2/4: AURC = (0 + 1/2 + 1/3 + 1/2)/4 = 1/3. Of the 4 (correct,
    incorrect) pairs the correct one is more confident in 3: AUROC = 3/4."""
    acc = MetricAccumulator()
    acc.update(*_binary_rows([0.9, 0.8, 0.7, 0.6], [True, False, True, False]))
    m = acc.compute()
    assert m["aurc"] == pytest.approx(1 / 3, rel=1e-12)
    assert m["auroc"] == pytest.approx(3 / 4, rel=1e-12)
    # two classes: temperature scaling keeps the order of the confidences, so nothing changes
    assert m["aurc_at_best_temperature"] == pytest.approx(1 / 3, rel=1e-12)
    assert m["auroc_at_best_temperature"] == pytest.approx(3 / 4, rel=1e-12)
    # a tie (one right, one wrong, same confidence): either order equally likely, so the risk at
    # coverage 1 is 1/2 in expectation and 1/2 at coverage 2; the pair counts 1/2 to AUROC
    acc = MetricAccumulator()
    acc.update(*_binary_rows([0.75, 0.75], [True, False]))
    assert (acc.compute()["aurc"], acc.compute()["auroc"]) == pytest.approx((0.5, 0.5))
    # all correct: zero risk everywhere, and AUROC is undefined (no incorrect token)
    acc = MetricAccumulator()
    acc.update(*_binary_rows([0.9, 0.6], [True, True]))
    assert acc.compute()["aurc"] == 0.0 and math.isnan(acc.compute()["auroc"])


def dense_selective(conf: torch.Tensor, correct: torch.Tensor) -> tuple[float, float]:
    """AURC by sorting every token (most confident first) and AUROC over every pair, in float64."""
    order = conf.argsort(descending=True)
    wrong = 1.0 - correct[order].double()
    aurc = (wrong.cumsum(0) / torch.arange(1, len(wrong) + 1)).mean().item()
    c, w = conf[correct.bool()], conf[~correct.bool()]
    pairs = (c[:, None] > w[None, :]).double() + 0.5 * (c[:, None] == w[None, :]).double()
    return aurc, pairs.mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_selective_prediction_matches_sorting_every_token(seed):
    """Raw and at the best temperature, against sorting all tokens by their own confidence. The
    histogram formula with one token per bin is exact; the accumulator's bins of 1e-4 make a few
    near-ties; after temperature scaling the grid's values are interpolated to the best
    temperature, which costs a little more."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(400, 30, generator=gen, dtype=torch.float64) * 2.5
    targets = torch.where(
        torch.rand(400, generator=gen) < 0.5, logits.argmax(-1), torch.randint(0, 30, (400,), generator=gen)
    )
    p = logits.softmax(-1)
    conf, correct = p.max(-1).values, (p.argmax(-1) == targets).double()
    aurc, auroc = dense_selective(conf, correct)
    order = conf.argsort()  # one bin per token, ascending confidence
    exact = selective_metrics(np.ones(400), correct[order].numpy())
    assert exact == pytest.approx((aurc, auroc), rel=1e-9)
    acc = MetricAccumulator()  # the default: bins of 1e-4, the temperature grid
    acc.update(logits.float(), targets)
    m = acc.compute()
    assert (m["aurc"], m["auroc"]) == pytest.approx((aurc, auroc), abs=1e-3)
    t = m["best_temperature"]
    aurc_t, auroc_t = dense_selective((logits / t).softmax(-1).max(-1).values, correct)
    assert m["aurc_at_best_temperature"] == pytest.approx(aurc_t, abs=2e-3)
    assert m["auroc_at_best_temperature"] == pytest.approx(auroc_t, abs=2e-3)


def test_selective_metrics_of_a_histogram():
    assert selective_metrics(np.zeros(3), np.zeros(3)) == pytest.approx((math.nan, math.nan), nan_ok=True)
    # bins ascending: (2 tokens, 0 right) then (2 tokens, 2 right): accept both right ones first
    aurc, auroc = selective_metrics(np.array([2.0, 2.0]), np.array([0.0, 2.0]))
    assert aurc == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4) and auroc == 1.0


def test_frequency_bins_are_quantiles_of_training_mass():
    """Counts 50, 30, 10, 5, 5, 0 (100 tokens) in 4 bins: id 0 starts at mass 0 (bin 0) and
    covers half, so bin 1 stays empty; id 1 starts at 0.5 (bin 2); the rest, and the unseen id 5,
    start at 0.8 or later (bin 3)."""
    bins = frequency_bins([50, 30, 10, 5, 5, 0], n_bins=4)
    assert bins.bin_of.tolist() == [0, 2, 3, 3, 3, 3]
    assert bins.types == [1, 0, 1, 4]
    assert bins.train_share == pytest.approx([0.5, 0.0, 0.3, 0.2])
    assert bins.frequency_min == [0.5, None, 0.3, 0.0] and bins.frequency_max == [0.5, None, 0.3, 0.1]
    # equal counts: ranked by id, deterministically
    assert frequency_bins([5, 5, 5, 5], n_bins=2).bin_of.tolist() == [0, 0, 1, 1]
    for bad in ([0, 0, 0], [-1, 3], []):
        with pytest.raises(ValueError):
            frequency_bins(bad)


def test_ce_by_frequency_is_a_partition_of_the_loss():
    """Per bin: the CE and accuracy of the targets whose id is in it; their token-weighted mean
    is the overall loss (ignored tokens are in neither)."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 40, 60, generator=gen) * 2
    targets = torch.randint(0, 60, (3, 40), generator=gen)
    targets[0, :7] = -100
    bins = frequency_bins(torch.randint(0, 100, (60,), generator=gen).numpy(), n_bins=10)
    acc = MetricAccumulator(frequency_bins=bins)
    acc.update(logits, targets)
    m = acc.compute()
    rows = m["ce_by_frequency"]
    assert [r["bin"] for r in rows] == list(range(10)) and sum(r["tokens"] for r in rows) == m[
        "tokens"
    ] == 113
    weighted = sum(r["tokens"] * r["ce"] for r in rows if r["tokens"]) / m["tokens"]
    assert weighted == pytest.approx(m["loss"], rel=1e-12)
    keep = targets != -100
    z, y = logits[keep].double(), targets[keep]
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    hit = (z.argmax(-1) == y).double()
    which = torch.from_numpy(bins.bin_of)[y]
    for r in rows:
        inside = which == r["bin"]
        assert r["tokens"] == int(inside.sum())
        if r["tokens"]:
            assert r["ce"] == pytest.approx(ce[inside].mean().item(), rel=1e-5)
            assert r["top1_acc"] == pytest.approx(hit[inside].mean().item())
        else:
            assert r["ce"] is None and r["top1_acc"] is None


def test_bits_per_byte_by_hand():
    """Uniform predictions over 4 ids cost ln 4 nats = 2 bits per token. Ids 1, 2, 3 spell 1, 3
    and 2 bytes of text, id 0 none (``<|endoftext|>``: left out of both sums). Targets 1, 2, 0, 3:
    3 tokens with text, 6 bits over 1 + 3 + 2 = 6 bytes: exactly 1 bit per byte."""
    acc = MetricAccumulator(token_bytes=[0, 1, 3, 2])
    acc.update(torch.zeros(4, 4), torch.tensor([1, 2, 0, 3]))
    assert acc.compute()["bits_per_byte"] == pytest.approx(1.0, rel=1e-7)
    with pytest.raises(ValueError, match="token_bytes has 5 entries"):
        MetricAccumulator(token_bytes=[1] * 5).update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        MetricAccumulator(token_bytes=[1, -1])

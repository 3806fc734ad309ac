"""Paired statistics: Student-t quantiles, paired / bootstrap / Welch intervals, their wording,
power (minimum detectable effect, seeds needed) and Holm's adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpls.study.stats import (
    EFFECT_LARGER,
    EFFECT_NOT_LARGER,
    EFFECT_UNDEFINED,
    holm,
    mean_sd,
    minimum_detectable_effect,
    paired_ci,
    paired_power,
    seeds_needed,
    t_quantile,
    welch_ci,
)

# Two-sided 95% (p = 0.975) and other quantiles from printed t tables (4 decimals).
T_TABLE = [
    (0.975, 1, 12.7062),
    (0.975, 2, 4.3027),
    (0.975, 3, 3.1824),
    (0.975, 4, 2.7764),
    (0.975, 5, 2.5706),
    (0.975, 10, 2.2281),
    (0.975, 30, 2.0423),
    (0.975, 120, 1.9799),
    (0.95, 3, 2.3534),
    (0.995, 5, 4.0321),
    (0.9, 1, 3.0777),
    (0.9995, 1, 636.6192),
]


@pytest.mark.parametrize(("p", "df", "expected"), T_TABLE)
def test_t_quantile_matches_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-5)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=5e-5)


def test_t_quantile_tends_to_normal():
    assert t_quantile(0.975, 1e9) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.975, 1e5) == pytest.approx(1.959994, abs=1e-5)
    assert t_quantile(0.5, 7) == 0.0


@given(p=st.floats(0.001, 0.999))
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution: t = tan(π(p − ½)); df = 2: t = (2p − 1)/√(2p(1 − p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-9)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="quantile probability"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="one arm value per baseline"):
        paired_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="method"):
        paired_ci([1.0, 2.0], [1.0, 2.0], method="jackknife")
    with pytest.raises(ValueError, match="finite"):
        paired_ci([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_ci([1.0, 2.0], [1.0, 2.0], confidence=1.5)


def test_paired_example_by_hand_excludes_zero():
    # Validation loss of three seeds; the arm and the baseline share each seed's data.
    baseline = [3.20, 3.30, 3.25]
    arm = [3.15, 3.26, 3.19]
    # d = arm − baseline = [−0.05, −0.04, −0.06]; mean = −0.15 / 3 = −0.05
    # deviations = [0, +0.01, −0.01]; sd = √((0 + 1e-4 + 1e-4) / 2) = 0.01
    # se = 0.01 / √3 = 0.0057735; t_{0.975,2} = 4.302653; half = 4.302653 · 0.0057735 = 0.0248414
    # interval = [−0.0748414, −0.0251586]: entirely below 0.
    r = paired_ci(arm, baseline)
    assert r.mean == pytest.approx(-0.05, abs=1e-12)
    assert r.se == pytest.approx(0.0057735, abs=1e-7)
    assert r.low == pytest.approx(-0.0748414, abs=1e-6)
    assert r.high == pytest.approx(-0.0251586, abs=1e-6)
    assert r.n == 3 and r.paired and r.method == "t"
    assert r.excludes_zero is True
    assert r.effect == EFFECT_LARGER


def test_paired_example_by_hand_includes_zero():
    baseline = [3.20, 3.30, 3.25]
    arm = [3.15, 3.28, 3.19]
    # d = [−0.05, −0.02, −0.06]; mean = −0.13 / 3 = −0.0433333
    # deviations = [−0.0066667, +0.0233333, −0.0166667]
    # squares = [4.4444e-5, 5.4444e-4, 2.7778e-4], sum = 8.6667e-4; var = 4.3333e-4; sd = 0.0208167
    # se = 0.0208167 / √3 = 0.0120185; half = 4.302653 · 0.0120185 = 0.0517114
    # interval = [−0.0950447, +0.0083781]: contains 0.
    r = paired_ci(arm, baseline)
    assert r.mean == pytest.approx(-0.0433333, abs=1e-6)
    assert r.low == pytest.approx(-0.0950447, abs=1e-6)
    assert r.high == pytest.approx(0.0083781, abs=1e-6)
    assert r.excludes_zero is False
    assert r.effect == EFFECT_NOT_LARGER


def test_one_seed_gives_undefined_interval():
    r = paired_ci([3.1], [3.2])
    assert r.mean == pytest.approx(-0.1)
    assert r.low is None and r.high is None and r.se is None
    assert r.excludes_zero is None
    assert r.effect == EFFECT_UNDEFINED
    assert r.to_dict()["effect"] == EFFECT_UNDEFINED
    assert paired_ci([3.1], [3.2], method="bootstrap").effect == EFFECT_UNDEFINED
    assert mean_sd([2.0]) == (2.0, None)


def test_bootstrap_interval():
    baseline = np.array([3.20, 3.30, 3.25, 3.22, 3.28])
    d = np.array([-0.05, -0.04, -0.06, -0.03, -0.07])
    r = paired_ci(baseline + d, baseline, method="bootstrap", n_boot=4000, seed=1)
    assert r.method == "bootstrap"
    assert r.mean == pytest.approx(d.mean())
    # A percentile interval of resampled means lies within the range of the differences ...
    assert d.min() - 1e-12 <= r.low <= r.mean <= r.high <= d.max() + 1e-12
    # ... is reproducible for a seed, and here entirely below zero.
    again = paired_ci(baseline + d, baseline, method="bootstrap", n_boot=4000, seed=1)
    assert (again.low, again.high) == (r.low, r.high)
    assert r.effect == EFFECT_LARGER
    # Identical differences: every resample has the same mean, the interval is that point.
    same = paired_ci([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], method="bootstrap")
    assert same.low == pytest.approx(1.0) and same.high == pytest.approx(1.0)


def test_welch_by_hand():
    # a = [1, 2, 3], b = [2, 4, 6]: mean difference −2; var_a/n = 1/3, var_b/n = 4/3, se = √(5/3)
    # Welch df = (5/3)² / ((1/3)²/2 + (4/3)²/2) = (25/9) / (17/18) = 50/17 ≈ 2.941
    r = welch_ci([1, 2, 3], [2, 4, 6])
    half = t_quantile(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert r.mean == pytest.approx(-2.0)
    assert r.se == pytest.approx(math.sqrt(5 / 3))
    assert (r.low, r.high) == pytest.approx((-2 - half, -2 + half))
    assert 3.1824 < t_quantile(0.975, 50 / 17) < 4.3027  # between df = 3 and df = 2
    assert not r.paired and r.method == "welch"
    assert welch_ci([1.0], [2.0, 3.0]).effect == EFFECT_UNDEFINED


@given(
    d=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12),
    shift=st.floats(-5, 5),
)
def test_paired_interval_properties(d, shift):
    base = np.linspace(1.0, 2.0, len(d))
    arm = base + np.asarray(d)
    r = paired_ci(arm, base)
    assert r.low <= r.mean + 1e-9 and r.mean <= r.high + 1e-9
    # Shifting every difference shifts the interval by the same amount (its width is unchanged).
    s = paired_ci(arm + shift, base)
    assert s.low == pytest.approx(r.low + shift, abs=1e-6)
    assert s.high == pytest.approx(r.high + shift, abs=1e-6)


def test_paired_t_p_value_by_hand():
    # The first hand example: t = mean / se = −0.05 / 0.0057735 = −8.660 on 2 df; two-sided
    # p = 2·P(T₂ > 8.660) = 1 − 8.660/√(2 + 8.660²) = 0.013072 (the t₂ CDF in closed form).
    r = paired_ci([3.15, 3.26, 3.19], [3.20, 3.30, 3.25])
    t = 0.05 / (0.01 / math.sqrt(3))
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert paired_ci([3.1], [3.2]).p_value is None


# G*Power's classic one-sample (paired) t test, two-sided α = 0.05, power 0.80: effect size
# d = 0.5 needs n = 34 (actual power 0.8078), d = 0.8 needs n = 15 (0.8213).
@pytest.mark.parametrize(("d", "n", "power"), [(0.5, 34, 0.8078), (0.8, 15, 0.8213)])
def test_power_and_seeds_needed_match_textbook_values(d, n, power):
    assert paired_power(d, 1.0, n) == pytest.approx(power, abs=2e-4)
    assert seeds_needed(d, 1.0) == n
    assert seeds_needed(-d * 3.0, 3.0) == n  # only |effect| / sd matters
    assert paired_power(d, 1.0, n - 1) < 0.8 <= paired_power(d, 1.0, n)


def test_minimum_detectable_effect_inverts_power_and_tends_to_the_normal_formula():
    for n in (2, 3, 6, 20):
        mde = minimum_detectable_effect(0.3, n)
        assert paired_power(mde, 0.3, n) == pytest.approx(0.8, abs=1e-9)
    # Many seeds: (z_{0.975} + z_{0.8})·sd/√n = (1.959964 + 0.841621)·sd/√n.
    assert minimum_detectable_effect(2.0, 10_000) == pytest.approx(2.801585 * 2.0 / 100, rel=1e-3)
    # Fewer seeds can only see larger effects; one seed sees nothing.
    assert (
        minimum_detectable_effect(1.0, 2)
        > minimum_detectable_effect(1.0, 3)
        > minimum_detectable_effect(1.0, 6)
    )
    assert minimum_detectable_effect(1.0, 1) is None and minimum_detectable_effect(None, 5) is None
    assert minimum_detectable_effect(0.0, 5) == 0.0


def test_seeds_needed_edges():
    assert seeds_needed(0.0, 1.0) is None  # no number of seeds finds a zero difference
    assert seeds_needed(1e-4, 1.0) is None  # over MAX_SEEDS
    assert seeds_needed(0.1, None) is None
    assert seeds_needed(0.1, 0.0) == 2
    with pytest.raises(ValueError, match="power"):
        seeds_needed(0.1, 1.0, power=1.0)


def test_holm_by_hand():
    # m = 4, sorted p: 0.005 ×4 = 0.02; 0.01 ×3 = 0.03; 0.03 ×2 = 0.06; 0.04 ×1 = 0.04 → 0.06 (monotone).
    out = holm([0.01, 0.04, 0.03, 0.005])
    assert [o["p_adjusted"] for o in out] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [o["significant"] for o in out] == [True, False, False, True]
    # Undefined comparisons take no part: the others are adjusted as a family of two.
    out = holm([None, 0.02, 0.03])
    assert out[0] == {"p": None, "p_adjusted": None, "significant": None}
    assert [o["p_adjusted"] for o in out[1:]] == pytest.approx([0.04, 0.04])
    assert holm([]) == []


@given(ps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_holm_never_lowers_a_p_value_and_keeps_the_order(ps):
    out = holm(ps)
    for p, o in zip(ps, out):
        assert p <= o["p_adjusted"] <= 1.0
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted = [out[i]["p_adjusted"] for i in order]
    assert adjusted == sorted(adjusted)


@given(sd=st.floats(1e-4, 100.0), n=st.integers(2, 60), confidence=st.sampled_from([0.9, 0.95, 0.99]))
def test_minimum_detectable_effect_is_defined_and_exact_for_any_spread(sd, n, confidence):
    mde = minimum_detectable_effect(sd, n, confidence=confidence)
    assert mde > 0
    assert paired_power(mde, sd, n, confidence=confidence) == pytest.approx(0.8, abs=1e-6)
    needed = seeds_needed(mde * 1.0001, sd, confidence=confidence)
    assert needed is not None and needed <= n

"""Paired differences over seeds, with a confidence interval that says how sure we are.

A study trains every arm once per seed from the same trunk, and one seed's arms see the
same tokens; so the honest comparison of an arm with the baseline is the per-seed
*difference* ``d_s = arm_s − baseline_s``, whose mean is estimated with a Student-t
interval (``mean(d) ± t_{(1+c)/2, n−1} · sd(d)/√n``) or, optionally, a percentile
bootstrap. Pairing removes the seed-to-seed variation both arms share, which is most of it.

The distributions come from `scipy.stats`: Student's t (and its noncentral form, for power),
and the seeded bootstrap. Power answers the question an interval that contains 0 leaves open:
was the study large enough to see an effect of the size that matters? `minimum_detectable_effect`
is the smallest true mean difference the study would find with 80% probability, and
`seeds_needed` how many seeds a given difference would need. `holm` adjusts the p-values of
several arms' comparisons on one question, so that "larger than its interval" keeps its
meaning when a study asks it once per arm.

With a single seed there is no spread to estimate: the interval is *undefined* (``None``),
reported as such, never a crash and never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as sps

# What the report says about a difference, by whether its interval excludes zero.
EFFECT_LARGER = "larger than its interval"
EFFECT_NOT_LARGER = "not larger than its interval"
EFFECT_UNDEFINED = "undefined (one seed: no interval)"

METHODS = ("t", "bootstrap")
POWER = 0.8  # the conventional power at which a minimum detectable effect is quoted
MAX_SEEDS = 100_000  # seeds_needed answers None above this (the effect is too small to chase)


def is_finite_number(x: Any) -> bool:
    """A real number that is not NaN or ±inf (a bool, None or a string is not one)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (t_{0.975,1} = 12.706)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile probability must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(sps.t.ppf(p, df))


# -- intervals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate of a difference (``arm − baseline``) with its confidence interval.

    ``low``/``high`` are ``None`` when the interval is undefined (fewer than two values).
    ``paired`` says whether the values were matched by seed; ``method`` is ``"t"``,
    ``"bootstrap"`` or ``"welch"`` (unpaired); ``se`` is the standard error of ``mean``;
    ``p_value`` is the two-sided t test's (None where undefined), which `holm` adjusts.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    se: float | None
    confidence: float
    method: str
    paired: bool
    p_value: float | None = None

    @property
    def defined(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool | None:
        """True when the whole interval lies on one side of zero; None when undefined."""
        if not self.defined:
            return None
        assert self.low is not None and self.high is not None
        return self.low > 0.0 or self.high < 0.0

    @property
    def effect(self) -> str:
        """The report's words for it: is the difference larger than its interval?"""
        excludes = self.excludes_zero
        if excludes is None:
            return EFFECT_UNDEFINED
        return EFFECT_LARGER if excludes else EFFECT_NOT_LARGER

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "effect": self.effect, "excludes_zero": self.excludes_zero}


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; None for a single value)."""
    x = _as_array(values, "values")
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {values!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite numbers, got {values!r}")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def paired_ci(
    arm: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence: float = 0.95,
    method: str = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean of the per-seed differences ``arm[i] − baseline[i]`` with a ``confidence`` interval.

    ``method="t"``: ``mean ± t_{(1+c)/2, n−1} · sd/√n``. ``method="bootstrap"``: the
    percentile interval of the mean over ``n_boot`` resamples of the differences (seeded,
    so a report is reproducible); with few seeds it is narrower than the t interval, which
    is why ``t`` is the default. One pair gives an undefined interval.
    """
    a, b = _as_array(arm, "arm"), _as_array(baseline, "baseline")
    if a.size != b.size:
        raise ValueError(f"paired_ci needs one arm value per baseline value, got {a.size} and {b.size}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_confidence(confidence)
    d = a - b
    n = int(d.size)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, None, None, n, None, confidence, method, paired=True)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    p_value = _t_test_p(mean, se, n - 1)
    if method == "t":
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
        low, high = mean - half, mean + half
    else:
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        low, high = _bootstrap_interval(d, confidence, n_boot, seed)
    return Interval(mean, low, high, n, se, confidence, method, paired=True, p_value=p_value)


def _t_test_p(mean: float, se: float, df: float) -> float:
    """Two-sided p-value of ``mean / se`` under Student's t (1.0 for a zero difference with no spread)."""
    if se == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return float(2.0 * sps.t.sf(abs(mean) / se, df))


def _bootstrap_interval(d: np.ndarray, confidence: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``d`` over ``n_boot`` seeded resamples (scipy's bootstrap)."""
    if np.all(d == d[0]):  # every resample has the same mean: the interval is that point
        return float(d[0]), float(d[0])
    res = sps.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_boot,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def welch_ci(arm: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95) -> Interval:
    """Difference of means of two unpaired samples with Welch's t interval.

    For runs that cannot be matched by seed (``dpls compare`` on runs made apart): wider
    than the paired interval, because the seed-to-seed variation no longer cancels.
    Undefined unless both samples have at least two values.
    """
    a, b = _as_array(arm, "arm"), _as_array(baseline, "baseline")
    _check_confidence(confidence)
    mean = float(a.mean() - b.mean())
    n = int(min(a.size, b.size))
    if a.size < 2 or b.size < 2:
        return Interval(mean, None, None, n, None, confidence, "welch", paired=False)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        p_value = _t_test_p(mean, 0.0, 1.0)
        return Interval(mean, mean, mean, n, 0.0, confidence, "welch", paired=False, p_value=p_value)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    p_value = _t_test_p(mean, se, df)
    return Interval(mean, mean - half, mean + half, n, se, confidence, "welch", paired=False, p_value=p_value)


# -- power: how large a difference could this study see? --------------------------------------


def paired_power(effect: float, sd: float, n: int, *, confidence: float = 0.95) -> float:
    """Probability that the two-sided paired t test at ``confidence`` finds a true mean
    difference ``effect`` with ``n`` pairs whose differences have standard deviation ``sd``
    (the noncentral t distribution with ``n − 1`` degrees of freedom)."""
    _check_confidence(confidence)
    if n < 2:
        raise ValueError(f"power needs at least 2 pairs, got n={n}")
    if not sd > 0:
        raise ValueError(f"power needs a positive standard deviation, got sd={sd}")
    df = n - 1
    crit = float(sps.t.ppf(0.5 + confidence / 2.0, df))
    nc = abs(effect) * math.sqrt(n) / sd
    upper = float(sps.nct.sf(crit, df, nc))
    # The wrong-sign tail is below Φ(−nc) (Z + nc < 0 is needed for it); scipy's noncentral t
    # returns NaN for it at a few df = 1 points where it is below 1e-15.
    lower = float(sps.nct.cdf(-crit, df, nc))
    if not math.isfinite(lower) and sps.norm.cdf(-nc) < 1e-12:
        lower = 0.0
    if not (math.isfinite(upper) and math.isfinite(lower)):
        raise ArithmeticError(f"power undefined for effect={effect}, sd={sd}, n={n}")
    return upper + lower


def minimum_detectable_effect(
    sd: float | None, n: int, *, confidence: float = 0.95, power: float = POWER
) -> float | None:
    """The smallest true |mean difference| found with probability ``power`` by ``n`` pairs of
    spread ``sd``: what the study could have seen. None with fewer than two pairs (no spread
    to go by); 0 where the differences did not vary at all."""
    _check_power(power)
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    if sd == 0.0:
        return 0.0
    hi = sd
    while paired_power(hi, sd, n, confidence=confidence) < power:
        hi *= 2.0
    return float(optimize.brentq(lambda e: paired_power(e, sd, n, confidence=confidence) - power, 0.0, hi))


def seeds_needed(
    effect: float, sd: float | None, *, confidence: float = 0.95, power: float = POWER
) -> int | None:
    """The fewest seeds (pairs) whose paired t test finds a true difference ``effect`` with
    probability ``power``, if the differences spread by ``sd`` as observed. None where no
    number of seeds would do (a zero effect, an unknown spread) or more than `MAX_SEEDS`."""
    _check_power(power)
    if sd is None or not math.isfinite(sd) or not math.isfinite(effect) or effect == 0.0:
        return None
    if sd == 0.0:
        return 2

    def enough(n: int) -> bool:
        return paired_power(effect, sd, n, confidence=confidence) >= power

    lo, hi = 1, 2  # power grows with n: enough(lo) is False (n = 1 has no test), find enough(hi)
    while not enough(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def _check_power(power: float) -> None:
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")


# -- several arms, one question -------------------------------------------------------------


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test of ``wins`` against ``losses`` (ties left out): the probability,
    with no difference, of a split at least this uneven. None with no untied pair. Six of six
    gives 0.031; five of five only 0.062."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be counts >= 0, got {wins} and {losses}")
    n = wins + losses
    return None if n == 0 else float(sps.binomtest(wins, n, 0.5).pvalue)


def holm(p_values: Sequence[float | None], *, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Holm's step-down adjustment of the p-values of several comparisons asked together.

    Sorted ascending, the i-th of m p-values (1-based) is multiplied by ``m − i + 1``, and the
    adjusted values are made non-decreasing; a comparison is significant where its adjusted p
    is below ``1 − confidence``. The family-wise error rate stays at ``1 − confidence``
    however many arms are compared. Entries that are None (undefined) take no part and stay
    undefined. Returns, in input order, ``{"p": raw, "p_adjusted": …, "significant": …}``.
    """
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(defined)
    adjusted: dict[int, float] = {}
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return [
        {
            "p": p,
            "p_adjusted": adjusted.get(i),
            "significant": None if p is None else adjusted[i] < alpha,
        }
        for i, p in enumerate(p_values)
    ]

"""Paired differences over seeds, with a confidence interval that says how sure we are.

A study trains every arm once per seed from the same trunk, and one seed's arms see the
same tokens; so the honest comparison of an arm with the baseline is the per-seed
*difference* ``d_s = arm_s − baseline_s``, whose mean is estimated with a Student-t
interval (``mean(d) ± t_{(1+c)/2, n−1} · sd(d)/√n``) or, optionally, a percentile
bootstrap. Pairing removes the seed-to-seed variation both arms share, which is most of it.

The Student-t quantile is computed here (the project does not depend on scipy): the t CDF
is a regularized incomplete beta function, evaluated with its continued fraction, and the
quantile is found by bisection on the CDF. It accepts non-integer degrees of freedom, which
the Welch interval of unpaired comparisons needs.

With a single seed there is no spread to estimate: the interval is *undefined* (``None``),
reported as such, never a crash and never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# What the report says about a difference, by whether its interval excludes zero.
EFFECT_LARGER = "larger than its interval"
EFFECT_NOT_LARGER = "not larger than its interval"
EFFECT_UNDEFINED = "undefined (one seed: no interval)"

METHODS = ("t", "bootstrap")


def is_finite_number(x: Any) -> bool:
    """A real number that is not NaN or ±inf (a bool, None or a string is not one)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# Above this many degrees of freedom the t distribution is the normal one to ~1e-7.
_NORMAL_DF = 1.0e7


# -- the Student-t distribution ------------------------------------------------------------


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz); converges for x < (a+1)/(a+b+2)."""
    tiny = 1.0e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 100_000):
        # Even term m(b−m)x / ((a+2m−1)(a+2m)), then odd term −(a+m)(a+b+m)x / ((a+2m)(a+2m+1)).
        for coef in (
            m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)),
        ):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1.0e-15:
            return value
    raise ArithmeticError(f"incomplete beta did not converge for x={x}, a={a}, b={b}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``x ∈ [0, 1]``."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    # The fraction converges fast on the near side of the mode; use the symmetry on the far side.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom (any real ``df > 0``)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if df > _NORMAL_DF:
        return _normal_cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t: the ``t`` with ``t_cdf(t, df) == p`` (e.g. t_{0.975,1} = 12.706)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile probability must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:  # symmetric
        return -t_quantile(1.0 - p, df)
    cdf = _normal_cdf if df > _NORMAL_DF else (lambda t: t_cdf(t, df))
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:  # bracket: the t quantile is at least the normal one, grows fast as df → 0
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1.0e-13 * hi:
            break
    return 0.5 * (lo + hi)


# -- intervals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate of a difference (``arm − baseline``) with its confidence interval.

    ``low``/``high`` are ``None`` when the interval is undefined (fewer than two values).
    ``paired`` says whether the values were matched by seed; ``method`` is ``"t"``,
    ``"bootstrap"`` or ``"welch"`` (unpaired); ``se`` is the standard error of ``mean``.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    se: float | None
    confidence: float
    method: str
    paired: bool

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
    if method == "t":
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
        low, high = mean - half, mean + half
    else:
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(v) for v in np.quantile(means, [alpha, 1.0 - alpha]))
    return Interval(mean, low, high, n, se, confidence, method, paired=True)


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
        return Interval(mean, mean, mean, n, 0.0, confidence, "welch", paired=False)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return Interval(mean, mean - half, mean + half, n, se, confidence, "welch", paired=False)

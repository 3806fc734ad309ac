"""Step schedules for ε: the smoothing in force at optimizer step ``t`` (dynamic smoothing).

Every shape gives ``ε = 0`` — exactly cross-entropy — before ``start_step``. From ``start_step``:

=========  =======================================================  =====================
shape      start_step ≤ t ≤ end_step                                 t > end_step
=========  =======================================================  =====================
constant   ``epsilon``                                               ``epsilon``
step       ``epsilon`` (the published recipe: CE, then DPLS)         ``epsilon``
linear     straight line ``epsilon`` → ``epsilon_final``             ``epsilon_final``
cosine     half cosine ``epsilon`` → ``epsilon_final`` (high early)  ``epsilon_final``
warmup     straight line ``epsilon_final`` → ``epsilon`` (rises)     ``epsilon``
=========  =======================================================  =====================

``constant`` and ``step`` give the same numbers; ``step`` names the recipe in which
``start_step > 0`` matters. ``linear``, ``cosine`` and ``warmup`` need ``end_step > start_step``
(``end_step = 0`` means "the run's max_iters", which the trainer fills in before building).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dpls.losses.validation import check_scalar_epsilon


def _constant(eps: float, final: float, frac: float) -> float:
    return eps


def _linear(eps: float, final: float, frac: float) -> float:
    return eps + (final - eps) * frac


def _cosine(eps: float, final: float, frac: float) -> float:
    return final + (eps - final) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _warmup(eps: float, final: float, frac: float) -> float:
    return final + (eps - final) * frac


# shape -> (value at fraction f of [start, end], value after end, needs an end)
SHAPES: dict[str, tuple[Callable[[float, float, float], float], Callable[[float, float], float], bool]] = {
    "constant": (_constant, lambda eps, final: eps, False),
    "step": (_constant, lambda eps, final: eps, False),
    "linear": (_linear, lambda eps, final: final, True),
    "cosine": (_cosine, lambda eps, final: final, True),
    "warmup": (_warmup, lambda eps, final: eps, True),
}


@dataclass(frozen=True)
class EpsilonSchedule:
    """``EpsilonSchedule(epsilon, epsilon_final, start_step, end_step, shape)(step) -> ε``."""

    epsilon: float = 0.1
    epsilon_final: float = 0.0
    start_step: int = 0
    end_step: int = 0
    shape: str = "constant"

    def __post_init__(self) -> None:
        check_scalar_epsilon(self.epsilon, "epsilon")
        check_scalar_epsilon(self.epsilon_final, "epsilon_final")
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if SHAPES[self.shape][2] and self.end_step <= self.start_step:
            raise ValueError(
                f"end_step must be > start_step={self.start_step} for the {self.shape!r} schedule, got "
                f"{self.end_step} (0 means max_iters and must be filled in before building the schedule)"
            )

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        during, after, has_end = SHAPES[self.shape]
        if has_end and step >= self.end_step:
            return float(after(self.epsilon, self.epsilon_final))
        span = max(self.end_step - self.start_step, 1)
        frac = (step - self.start_step) / span if has_end else 0.0
        return float(during(self.epsilon, self.epsilon_final, frac))

"""The one question a study is for, and how large a difference it could have seen.

A study declares one primary metric (``primary``: ``lr_sensitivity`` in a sweep, else
``final_val_ce``). The report answers it first: each arm against the baseline, with Holm's
correction across the arms (across arms × points of the other keys in a sweep of several),
so that "different" keeps its 5% error rate however many arms are compared. Every other
metric is exploratory: uncorrected, listed as such.

Power says what an interval that contains 0 leaves open. Every paired difference carries
its ``mde`` (the smallest true difference the study finds with 80% probability, from the
observed spread of the per-seed differences and the number of seeds), and the primary
comparisons ``seeds_needed``: for the observed difference, and for the study's ``min_effect``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpls.study.spec import SWEEP_PRIMARY as SENSITIVITY
from dpls.study.stats import POWER, holm, minimum_detectable_effect, seeds_needed
from dpls.study.summary import direction

NOT_SHOWN = "no difference shown"


def with_power(d: dict[str, Any]) -> dict[str, Any]:
    """An interval's dict with the spread of its per-seed differences (``sd``) and its minimum
    detectable effect at 80% power (``mde``; None for an unpaired interval or one seed)."""
    sd = None
    if d.get("paired") and d.get("se") is not None and d.get("n", 0) >= 2:
        sd = float(d["se"]) * math.sqrt(int(d["n"]))
    d["sd"] = sd
    d["mde"] = minimum_detectable_effect(sd, int(d.get("n", 0)), confidence=float(d["confidence"]))
    return d


def add_power(summary: Mapping[str, Any]) -> None:
    """Every paired difference of the report's metrics gets its ``sd`` and ``mde``."""
    for diffs in summary["differences"].values():
        for d in diffs.values():
            with_power(d)


def _comparisons(
    summary: Mapping[str, Any], metric: str
) -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(arm, point of the other swept keys or None, the difference's dict) of the primary metric."""
    base = summary["baseline"]
    sweep = summary.get("sweep")
    if metric == SENSITIVITY and sweep:
        out = []
        for part in sweep.get("slices") or [sweep]:
            for arm, a in part["arms"].items():
                if arm != sweep["baseline"] and a.get("difference"):
                    out.append((arm, part.get("at"), a["difference"]))
        return out
    return [
        (arm, None, diffs[metric])
        for arm, diffs in summary["differences"].items()
        if arm != base and metric in diffs
    ]


def _verdict(d: Mapping[str, Any], significant: bool | None, sign: int, metric: str) -> str:
    if significant is None:
        return "undefined (one seed: no interval)"
    if not significant:
        return NOT_SHOWN
    if metric == SENSITIVITY:
        return "less sensitive" if d["mean"] < 0 else "more sensitive"
    if sign == 0:
        return "higher" if d["mean"] > 0 else "lower"
    return "better" if d["mean"] * sign > 0 else "worse"


def primary_block(summary: Mapping[str, Any], metric: str, min_effect: float | None) -> dict[str, Any]:
    """The ``primary`` block of summary.json: per comparison of the primary metric its interval,
    ``mde``, ``seeds_needed`` (observed, min_effect) and Holm-adjusted conclusion; ``holm`` the
    family's adjusted p-values. The difference dicts themselves get ``seeds_needed`` and ``holm``."""
    confidence = float(summary["confidence"])
    sign = -1 if metric == SENSITIVITY else direction(metric)
    found = _comparisons(summary, metric)
    adjusted = holm([d.get("p_value") for _, _, d in found], confidence=confidence)
    comparisons = []
    for (arm, at, d), h in zip(found, adjusted, strict=True):
        if "mde" not in d:
            with_power(d)
        d["seeds_needed"] = {
            "observed": seeds_needed(float(d["mean"]), d["sd"], confidence=confidence),
            "min_effect": None
            if min_effect is None
            else seeds_needed(min_effect, d["sd"], confidence=confidence),
        }
        d["holm"] = h
        comparisons.append(
            {
                "arm": arm,
                "at": at,
                **{k: d.get(k) for k in ("mean", "low", "high", "n", "sd", "mde", "p_value", "seeds_needed")},
                "p_adjusted": h["p_adjusted"],
                "significant": h["significant"],
                "conclusion": _verdict(d, h["significant"], sign, metric),
            }
        )
    return {
        "metric": metric,
        "direction": sign,
        "min_effect": min_effect,
        "confidence": confidence,
        "power": POWER,
        "correction": "holm",
        "family": len(comparisons),
        "comparisons": comparisons,
        "holm": [
            {
                "arm": c["arm"],
                "at": c["at"],
                "p": c["p_value"],
                "p_adjusted": c["p_adjusted"],
                "significant": c["significant"],
                "conclusion": c["conclusion"],
            }
            for c in comparisons
        ],
    }


def _unit(metric: str) -> str:
    return " nats" if metric in (SENSITIVITY, "loss") or metric.endswith("_ce") else ""


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return (f"{x:+.3g}" if signed else f"{x:.3g}").replace("-", "−")


def power_sentence(c: Mapping[str, Any], metric: str, min_effect: float | None) -> str:
    """'This study could detect differences of 0.9 nats or more; the observed −0.086 would need
    about N seeds' for one comparison."""
    unit = _unit(metric)
    if c.get("mde") is None:
        return "with one seed (or unpaired runs) there is no spread to size the study by; run more seeds."
    need = (c.get("seeds_needed") or {}).get("observed")
    words = (
        f"this study could detect differences of {_num(c['mde'])}{unit} or more (80% power, {c['n']} seeds)"
    )
    if need is None:
        words += f"; the observed {_num(c['mean'], True)} is too small to chase with any number of seeds"
    elif need <= c["n"]:
        words += f"; the observed {_num(c['mean'], True)} needs {need} seeds, which it has"
    else:
        words += f"; the observed {_num(c['mean'], True)} would need about {need} seeds"
    wanted = (c.get("seeds_needed") or {}).get("min_effect")
    if min_effect is not None and wanted is not None:
        words += f", and the declared min_effect of {_num(min_effect)}{unit} about {wanted}"
    return words


def primary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report's first finding: the primary metric per arm, Holm-corrected, with power."""
    block = summary.get("primary")
    if not block:
        return []
    metric, base = block["metric"], summary["baseline"]
    conf = round(100 * block["confidence"])
    lines = [
        "## Primary question",
        "",
        f"Declared before looking: **{metric}**, each arm − **{base}**, paired by seed, {conf}% interval; "
        f"the arms' p-values Holm-corrected together ({block['family']} comparisons), so the chance of "
        f"any false 'different' stays at {100 - conf}%.",
        "",
    ]
    if not block["comparisons"]:
        return [*lines, f"No arm has a paired {metric} to compare.", ""]
    for c in block["comparisons"]:
        where = "" if not c.get("at") else " at " + ", ".join(f"{k}={v}" for k, v in c["at"].items())
        interval = (
            f"{_num(c['mean'], True)} [{_num(c['low'], True)}, {_num(c['high'], True)}]"
            if c.get("low") is not None
            else f"{_num(c['mean'], True)} [undefined]"
        )
        p = "" if c.get("p_adjusted") is None else f", Holm-adjusted p = {c['p_adjusted']:.3g}"
        lines.append(
            f"- **{c['arm']}**{where}: {interval}{p}: **{c['conclusion']}**; "
            f"{power_sentence(c, metric, block.get('min_effect'))}."
        )
    return [*lines, ""]

"""Markdown of a sweep's section, from the summary's ``sweep`` block alone: the per-arm table
(best value, LR sensitivity, loss spikes, largest stable value, the reading), the paired
difference of L(v) from the baseline at every value, and one paragraph of findings. The
README's sweep section reuses them, so it and the report say the same thing.

A block written before a field existed (``largest_stable_lr``, ``by_value``, ``conclusion``,
``spikes``) renders without it, as it did then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpls.study.stats import EFFECT_LARGER
from dpls.study.sweep import FLATTER_BECAUSE_WORSE, MORE_STABLE
from dpls.study.tables import fmt

CONCLUSION_WORDS = {
    MORE_STABLE: "more stable",
    FLATTER_BECAUSE_WORSE: "flatter because its best is worse",
    "no_difference": "no difference shown",
}


def _fmt(x: Any, signed: bool = False) -> str:
    """A number as the report writes it; a swept value that is not a number as it is."""
    return fmt(x, signed) if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _interval(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    if d.get("low") is None:
        return f"{_fmt(d['mean'], True)} [undefined: one seed]"
    cell = f"{_fmt(d['mean'], True)} [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]"
    return f"**{cell}**" if d.get("effect") == EFFECT_LARGER else cell


def _stable(value: Any) -> str:
    return "none" if value is None else _fmt(value)


def _spikes(counts: Any) -> str:
    """Loss spikes summed over a list of per-value counts ('–' when any is unknown)."""
    if not isinstance(counts, list) or not counts or any(c is None for c in counts):
        return "–"
    return str(sum(counts))


def sweep_table_lines(sweep: Mapping[str, Any]) -> list[str]:
    """Per arm: best value, the loss there, LR sensitivity, loss spikes, its paired difference,
    the largest stable value, diverged runs and the reading of the whole grid."""
    key, base = sweep["key"], sweep["baseline"]
    conf = round(100 * sweep["confidence"])
    new = any("largest_stable_lr" in a for a in sweep["arms"].values())
    head = f"| arm | best {key} | loss at best | LR sensitivity |"
    head += " loss spikes |" if new else ""
    head += f" Δ sensitivity vs {base} [{conf}% CI] |"
    head += f" largest stable {key} | diverged | reading |" if new else " diverged |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, a in sweep["arms"].items():
        edge = " (grid edge)" if a.get("best_at_edge") else ""
        diff = "—" if arm == base else _interval(a.get("difference"))
        row = f"| {arm} | {_fmt(a['best'])}{edge} | {_fmt(a['best_loss'])} | {_fmt(a['lr_sensitivity'])} |"
        row += f" {_spikes(a.get('spikes'))} |" if new else ""
        row += f" {diff} |"
        if new:
            stable = _stable(a.get("largest_stable_lr"))
            reading = "—" if arm == base else CONCLUSION_WORDS.get(a.get("conclusion") or "", "n/a")
            row += f" {stable} | {a['diverged']} of {a['runs']} | {reading} |"
        else:
            row += f" {a['diverged']} of {a['runs']} |"
        lines.append(row)
    return [*lines, ""]


def by_value_table_lines(sweep: Mapping[str, Any]) -> list[str]:
    """L(v) of the baseline at every value, each arm's paired difference from it, and the loss
    spikes of each arm there (summed over seeds; '–' unknown): the absolute reading."""
    key, base = sweep["key"], sweep["baseline"]
    arms = sweep["arms"]
    others = [a for a in arms if a != base and arms[a].get("by_value")]
    if not others or base not in arms:
        return []
    conf = round(100 * sweep["confidence"])
    head = [key, f"L(v) {base}", *(f"Δ {a} [{conf}% CI]" for a in others)]
    lines = [
        f"Paired difference of L(v) from **{base}** at every {key} (negative: lower loss than {base}; "
        "**bold**: the interval excludes 0):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, v in enumerate(sweep["values"]):
        row = [_fmt(v), _fmt(arms[base]["grid"][i]["mean"])]
        row += [_interval(arms[a]["by_value"][i]["difference"]) for a in others]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if any(c is not None for a in arms.values() for c in a.get("spikes") or []):
        head = [key, *arms]
        lines += [
            "Loss spikes per run, summed over seeds (the trainer's count; '–': runs logged before it):",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for i, v in enumerate(sweep["values"]):
            cells = [_fmt(v), *(_spikes([a["spikes"][i]]) for a in arms.values())]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _conclusion_sentence(arm: str, a: Mapping[str, Any], base: str, key: str) -> str:
    c = a.get("conclusion")
    best = a.get("best_difference")
    if c == MORE_STABLE:
        return (
            f"{arm} is more stable than {base} (lower loss at high {key}, Holm-corrected over those "
            f"values, or a larger stable {key} seed by seed)"
        )
    if c == FLATTER_BECAUSE_WORSE:
        return (
            f"{arm} is flatter than {base} because its best is worse (best loss {_interval(best)}), "
            "not because it is more stable"
        )
    return f"{arm}: no difference in stability from {base} shown"


def findings_paragraph(sweep: Mapping[str, Any]) -> str:
    """One paragraph that claims only what the intervals support."""
    key, base = sweep["key"], sweep["baseline"]
    arms = sweep["arms"]
    conf = round(100 * sweep["confidence"])
    parts: list[str] = []
    shown, not_shown, undefined = [], [], []
    for arm, a in arms.items():
        if arm == base:
            continue
        d = a.get("difference")
        if not d or d.get("low") is None:
            undefined.append(arm)
        elif d.get("effect") == EFFECT_LARGER:
            word = "lower" if d["mean"] < 0 else "higher"
            shown.append(f"{arm} has a {word} LR sensitivity than {base} ({_interval(d)})")
        else:
            not_shown.append(f"{arm} ({_interval(d)})")
    if shown:
        parts.append("; ".join(shown) + f": these {conf}% intervals exclude 0.")
    if not_shown:
        parts.append(
            f"For {', '.join(not_shown)} the difference in LR sensitivity from {base} is not larger than its "
            f"{conf}% interval: this study does not show that they are more or less stable than {base}."
        )
    if undefined:
        parts.append(
            f"For {', '.join(undefined)} there is no interval (one seed, or no seed with the whole grid): "
            "run more seeds before reading anything into the differences."
        )
    readings = [_conclusion_sentence(a, v, base, key) for a, v in arms.items() if v.get("conclusion")]
    if readings:
        parts.append(
            "Read from the whole grid (sensitivity is measured from each arm's own best, so an arm that "
            "trains worse everywhere looks flat): " + "; ".join(readings) + "."
        )
    total = sum(a["runs"] for a in arms.values())
    n_div = sum(a["diverged"] for a in arms.values())
    if n_div:
        by_arm = ", ".join(f"{a} {arms[a]['diverged']}" for a in arms if arms[a]["diverged"])
        parts.append(f"{n_div} of {total} runs diverged ({by_arm}).")
    else:
        parts.append(f"None of the {total} runs diverged; the sensitivity comes from degraded final losses.")
    stuck = sum(a.get("no_progress", 0) for a in arms.values())
    if stuck:
        parts.append(f"{stuck} of {total} runs made no progress (their final validation CE is about L_init).")
    edge = [a for a, v in arms.items() if v.get("best_at_edge")]
    if edge:
        parts.append(
            f"The best {key} of {', '.join(edge)} lies at the edge of the grid, so the grid does not bracket "
            "it: part of a difference in sensitivity there may be a shifted optimum, not stability."
        )
    best = ", ".join(f"{a} {_fmt(v['best'])}" for a, v in arms.items())
    parts.append(f"Best {key} per arm: {best}.")
    return " ".join(parts)


def _one_key_lines(sweep: Mapping[str, Any]) -> list[str]:
    return [*sweep_table_lines(sweep), *by_value_table_lines(sweep), findings_paragraph(sweep), ""]


def sweep_section_lines(sweep: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> list[str]:
    """The report's "Learning-rate sensitivity" section (markdown lines); with several swept
    keys, one subsection per point of the other keys."""
    key = sweep["key"]
    others = sweep.get("others") or {}
    grid = f"{key} in {{{', '.join(_fmt(v) for v in sweep['values'])}}}"
    grid += "".join(f" × {k} in {{{', '.join(_fmt(v) for v in vals)}}}" for k, vals in others.items())
    lines = [
        "## Learning-rate sensitivity",
        "",
        f"Every arm trained from the same initial weights and batches per seed at each {grid}. L(v) is the "
        "final validation CE; a diverged run counts as L_init, the validation CE of its initial weights. "
        f"LR sensitivity (Wortsman et al. 2023) is {sweep['sensitivity']}, per seed, then the mean over "
        "seeds (lower: flatter). The difference from the baseline is paired by seed; **bold**: its "
        f"interval excludes 0. The largest stable {key} is {sweep.get('stable', 'n/a')}. An arm is read "
        f"as more stable only where it is better than the baseline in absolute terms at the high {key}s, "
        f"or keeps a larger stable {key}.",
        "",
    ]
    if not others:
        lines += _one_key_lines(sweep)
    else:
        labels = [s["label"] for s in sweep["slices"]]
        head = [
            "arm",
            *(f"LR sensitivity at {lab}" for lab in labels),
            *(f"largest stable at {lab}" for lab in labels),
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, a in sweep["arms"].items():
            cells = [arm, *(_fmt(a["lr_sensitivity"].get(lab)) for lab in labels)]
            cells += [_stable(a["largest_stable_lr"].get(lab)) for lab in labels]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for s in sweep["slices"]:
            lines += [f"### At {s['label']}", "", *_one_key_lines(s)]
    if sweep.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in sweep["notes"]), ""]
    for caption, file in (plots or {}).items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return lines

"""Markdown pieces of the report, from summary.json alone: number formatting, interval cells,
the findings sentences and the tables. The README's generated sections reuse them, so a
section and its report always say the same thing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from dpls.study.stats import EFFECT_LARGER
from dpls.study.summary import direction


def data_line(summary: Mapping[str, Any]) -> str | None:
    """One sentence on the data the numbers were measured on (None when nothing is known)."""
    data = summary.get("data") or {}
    prints = data.get("corpus_fingerprints") or []
    if not prints:
        return None
    where = ", ".join(data.get("sources") or []) or "?"
    if data.get("python"):
        where += f" ({', '.join(data['python'])})"
    if len(prints) == 1:
        line = f"Data: {where}, corpus fingerprint `{prints[0]}`"
        if data.get("runs_without_fingerprint"):
            line += f" ({data['runs_without_fingerprint']} runs record none)"
        return line + "."
    return (
        f"Data: the runs were trained on {len(prints)} different corpora "
        f"({', '.join(f'`{p}`' for p in prints)}; {where}): their numbers are not comparable."
    )


def fmt(x: float | None, signed: bool = False, digits: int = 4) -> str:
    """``digits`` significant digits, in plain notation from 1e-4 up (thousands separated)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    sign = "+" if signed else ""
    if x != 0 and abs(x) < 1e-4:
        return f"{x:{sign}.{digits - 1}e}"
    if abs(x) >= 10**digits:
        return f"{x:{sign},.0f}"
    return f"{x:{sign}.{digits}g}"


def hms(seconds: float) -> str:
    """A duration as H:MM:SS."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def interval_cell(d: Mapping[str, Any]) -> str:
    if d["low"] is None:
        return f"{fmt(d['mean'], True)} [undefined]"
    cell = f"{fmt(d['mean'], True)} [{fmt(d['low'], True)}, {fmt(d['high'], True)}]"
    return f"**{cell}**" if d["effect"] == EFFECT_LARGER else cell


def _sentence(arm: str, baseline: str, diffs: Mapping[str, Mapping[str, Any]]) -> str:
    def describe(m: str, d: Mapping[str, Any]) -> str:
        verdict = {True: "better", False: "worse", None: ""}[d["better"]]
        return f"{m} ({fmt(d['mean'], True)}{', ' + verdict if verdict else ''})"

    larger = [describe(m, d) for m, d in diffs.items() if d["effect"] == EFFECT_LARGER]
    undefined = [m for m, d in diffs.items() if d["low"] is None]
    rest = [m for m, d in diffs.items() if d["effect"] != EFFECT_LARGER and d["low"] is not None]
    parts = [f"**{arm}** − **{baseline}**:"]
    if undefined and not larger and not rest:
        parts.append(f"with one seed no difference has an interval ({', '.join(undefined)}); run more seeds.")
        return " ".join(parts)
    parts.append(
        f"larger than their interval: {', '.join(larger)}."
        if larger
        else "no difference is larger than its interval."
    )
    if rest:
        parts.append(f"Not larger than their interval: {', '.join(rest)}.")
    if undefined:
        parts.append(f"Undefined (one seed): {', '.join(undefined)}.")
    return " ".join(parts)


def findings_lines(summary: Mapping[str, Any]) -> list[str]:
    """How the differences were taken, then one sentence per arm: which are larger than their
    interval. With a declared primary metric these are the exploratory rest: the primary metric
    is left out (it has its own, corrected, finding) and the lines say they are uncorrected."""
    base = summary["baseline"]
    others = [a for a in summary["arms"] if a != base]
    conf = round(100 * summary["confidence"])
    primary = (summary.get("primary") or {}).get("metric")
    how = (
        f"paired by seed, {conf}% {'t' if summary['method'] == 't' else summary['method']} interval"
        if summary["paired"]
        else f"unpaired, {conf}% Welch interval"
    )
    lines = []
    if primary:
        lines += [
            f"Exploratory: every metric other than the primary **{primary}**, each interval uncorrected for "
            "the others. Read them as description and as questions for a next study, not as findings.",
            "",
        ]
    lines += [
        f"Differences are arm − **{base}**, {how}; **bold**: larger than its interval "
        "(the interval excludes 0).",
        "",
    ]
    diffs = {a: {m: d for m, d in summary["differences"][a].items() if m != primary} for a in others}
    lines += [f"- {_sentence(a, base, diffs[a])}" for a in others] + [""]
    lines += [
        "Each interval covers its own metric; with a dozen metrics per arm, about one in "
        f"{round(1 / (1 - summary['confidence']))} intervals excludes 0 by chance alone, "
        "and with few seeds the t interval is wide (t₀.₉₇₅ = 12.7 for two seeds, 4.30 for three).",
        "",
    ]
    return lines


def evaluation_table_lines(summary: Mapping[str, Any]) -> list[str]:
    """Each arm's mean ± sd per metric, and each arm's difference from the baseline with its interval."""
    base = summary["baseline"]
    arms = list(summary["arms"])
    others = [a for a in arms if a != base]
    header = ["metric", *arms, *(f"Δ {a}" for a in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in summary["metrics"]:
        row = [m + {1: " ↑", -1: " ↓"}.get(direction(m), "")]
        for a in arms:
            s = summary["arms"][a]["metrics"].get(m)
            row.append(
                "n/a"
                if s is None
                else fmt(s["mean"]) + ("" if s["sd"] is None else f" ± {fmt(s['sd'], digits=2)}")
            )
        for a in others:
            d = summary["differences"][a].get(m)
            row.append("n/a" if d is None else interval_cell(d))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def code_cell(text: str) -> str:
    """Text in a markdown table cell, exactly: HTML-escaped, line breaks shown as ⏎."""
    body = html.escape(text).replace("|", "&#124;").replace("\n", "⏎")
    return f"<code>{body}</code>" if body else "(nothing)"


def samples_lines(summary: Mapping[str, Any]) -> list[str]:
    """The "Samples" section: each prompt's continuation by every arm, side by side."""
    block = summary.get("samples")
    if not block:
        return []
    arms = list(block["arms"])
    settings = block.get("settings", {})
    lines = [
        "## Samples",
        "",
        f"The openings ({settings.get('prompt_tokens', '?')} tokens) of the first validation documents, "
        f"continued by every arm's seed-{block['seed']} run with the same random numbers "
        f"(temperature {settings.get('temperature', '?')}, at most {settings.get('max_new_tokens', '?')} "
        "new tokens, ending at <|endoftext|>). The `generation/` rows of the evaluation table measure "
        f"{settings.get('num_samples', '?')} such samples per run: distinct n-grams over all n-grams "
        "(distinct_1/2/3), the share of 4-grams repeated within a sample (repetition_4) and the "
        "mean length in tokens before <|endoftext|>.",
        "",
        "| prompt | " + " | ".join(arms) + " |",
        "|" + "---|" * (len(arms) + 1),
    ]
    for i, prompt in enumerate(block["prompts"]):
        cells = [code_cell(prompt), *(code_cell(block["arms"][a][i]) for a in arms)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]

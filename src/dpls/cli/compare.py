"""`dpls compare RUN_DIR... --out DIR`: the study report for runs made outside a study.

Runs are grouped by their loss configuration (``config.toml``) and matched by ``seed``;
when the seeds do not pair up, the intervals are unpaired (Welch) and the report says so.
A study directory, or a folder of run directories, may be given in place of runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpls._io import exclusive_lock
from dpls.cli import UsageError
from dpls.cli._common import doc_parser, usage_errors


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = doc_parser(subparsers, name, help_text, __doc__)
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (or a study / a folder of runs)"
    )
    p.add_argument("--out", required=True, type=Path, help="where report.md, summary.json and the plots go")
    p.add_argument(
        "--baseline", default=None, help="arm the differences are taken against (default: the CE runs)"
    )
    p.add_argument("--method", choices=("t", "bootstrap"), default="t", help="paired interval (default: t)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default: 0.95)")
    p.add_argument("--title", default=None, help="heading of report.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dpls.study.report import iter_runs, write_report

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        raise UsageError(f"not a directory: {', '.join(missing)}")
    if not 0.0 < args.confidence < 1.0:
        raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")
    runs = iter_runs(args.runs)
    if not runs:
        raise UsageError(f"no run directories (with metrics.jsonl or config.toml) in {', '.join(args.runs)}")
    with usage_errors(), exclusive_lock(args.out, "out"):  # one writer: its files and manifest
        report = write_report(
            runs,
            args.out,
            baseline=args.baseline,
            confidence=args.confidence,
            method=args.method,
            title=args.title,
        )
    print(report)
    return 0

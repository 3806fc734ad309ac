"""`dpls lm-eval CHECKPOINT --tasks ...`: downstream tasks through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dpls.cli import UsageError
from dpls.cli._common import add_device_options
from dpls.runs.layout import EVAL_DIR, run_dir_of


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of examples or a fraction, got {text!r}"
        ) from None
    return int(value) if value >= 1 and value.is_integer() else value


def _batch_size(text: str) -> int | str:
    try:
        return text if text.startswith("auto") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    from dpls.eval.lm_eval import DEFAULT_TASKS

    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Export the checkpoint to Hugging Face format (cached beside it) and run "
            "lm-evaluation-harness tasks on it with the harness's own 'hf' model class. "
            "Writes results.json and results.md into --out."
        ),
    )
    parser.add_argument("checkpoint", help="a checkpoint or run directory, or an exported HF directory")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated harness task names (default: %(default)s)",
    )
    parser.add_argument("--limit", type=_limit, default=None, help="examples per task (< 1: a fraction)")
    parser.add_argument(
        "--include_path", "--include-path", dest="include_path", default=None, help="extra task YAML folder"
    )
    parser.add_argument(
        "--num_fewshot",
        "--num-fewshot",
        dest="num_fewshot",
        type=int,
        default=None,
        help="few-shot examples per prompt (default: each task's own)",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=_batch_size,
        default=8,
        help="requests per forward pass, or 'auto' (default: %(default)s)",
    )
    add_device_options(parser, dtype_help="weights' precision in the harness (default: %(default)s)")
    parser.add_argument(
        "--out",
        default=None,
        help="results directory (default: RUN/eval/lm_eval, inside the run); only an earlier "
        "dpls lm-eval's results there are replaced",
    )
    parser.add_argument("--seed", type=int, default=1234, help="harness seeds: sampling, few-shot choice")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dpls.eval.lm_eval import results_table, run_lm_eval

    if args.out is None:  # into the run, never the current folder
        args.out = str(run_dir_of(Path(args.checkpoint)) / EVAL_DIR / "lm_eval")
    try:
        results = run_lm_eval(
            args.checkpoint,
            args.tasks,
            limit=args.limit,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            out_dir=args.out,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    except ConnectionError as err:  # task data not cached and no network: not a usage error
        print(f"dpls lm-eval: error: {err}", file=sys.stderr)
        return 1
    print(results_table(results))
    print(f"wrote {args.out}/results.json, {args.out}/results.md")
    return 0

"""`dpls eval CHECKPOINT --out metrics.json`: loss, perplexity, entropy, calibration and plots."""

from __future__ import annotations

import argparse
from typing import Any

from dpls.cli._common import add_device_options, usage_errors


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Evaluate a checkpoint (or the latest checkpoint of a run directory) on the fixed validation "
            "set and write its metrics (docs/reference.md) as JSON, with a reliability diagram and an entropy "
            "histogram beside it."
        ),
    )
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    parser.add_argument(
        "--out",
        default=None,
        help="metrics file to write (default: RUN/eval/metrics.json for a run directory, "
        "RUN/eval/step_NNNNNNN.json for a checkpoint); only files an earlier dpls eval wrote are replaced",
    )
    parser.add_argument("--tokens", type=int, default=None, help="evaluate at most N validation tokens")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the run's data_dir)")
    parser.add_argument("--block-size", type=int, default=None, help="sequence length (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    add_device_options(parser, dtype_help="forward-pass precision")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dpls.eval.evaluate import default_out, evaluate_checkpoint, format_metrics, output_paths

    if args.out is None:
        args.out = str(default_out(args.checkpoint))
    with usage_errors():
        metrics = evaluate_checkpoint(
            args.checkpoint,
            data_dir=args.data_dir,
            tokens=args.tokens,
            batch_size=args.batch_size,
            block_size=args.block_size,
            device=args.device,
            dtype=args.dtype,
            out=args.out,
            plots=not args.no_plots,
        )
    print(format_metrics(metrics))
    written = output_paths(args.out)
    if args.no_plots:
        written = {k: v for k, v in written.items() if k in ("metrics", "bins")}
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0

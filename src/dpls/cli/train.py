"""`dpls train [CONFIG.toml] [--key=value ...]`: pretraining (also under torchrun).

The keys are the fields of `dpls.train.config.TrainConfig`; ``dpls train --help`` lists them
with their defaults. Any ``--key`` is accepted here and checked by the config, so an
unknown key gets the config's message naming the closest valid one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dpls._io import write_failure
from dpls.cli import UsageError

USAGE = "dpls train [CONFIG.toml] [--key=value | --key value ...]"
DESCRIPTION = """\
Pretrain a model on a prepared data directory with CE, label smoothing, DPLS, ...

Values come from the defaults, then the TOML file, then --key=value overrides.
--resume_dir=RUN alone continues RUN from its latest checkpoint; with another --out_dir
it forks RUN's latest checkpoint into a new run (the published recipe:
  dpls train --resume_dir=runs/ce --loss=dpls --out_dir=runs/dpls --max_iters=...).
Several GPUs: torchrun --nproc_per_node=N -m dpls train ...
"""


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    from dpls.train.config import help_text as keys_help

    # Options are not declared to argparse ("+" is this parser's prefix, so every "--key=value"
    # arrives as a plain argument): the config parses them, with typed conversion and the
    # closest-key message for typos.
    parser = subparsers.add_parser(
        name,
        help=help_text,
        usage=USAGE,
        description=DESCRIPTION,
        epilog="keys:\n" + keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="+",
        add_help=False,
    )
    parser.add_argument("args", nargs="*", metavar="[CONFIG.toml] [--key=value ...]")
    parser.set_defaults(func=run, _parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if any(a in ("-h", "--help") for a in args.args):
        args._parser.print_help()
        return 0
    from dpls.runs.checkpoint import CheckpointError, checkpoint_step, latest_checkpoint
    from dpls.train.config import load_config
    from dpls.train.trainer import InvalidRun, TrainingError, read_run_summary, train

    try:
        cfg = load_config(overrides=args.args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        run_dir = train(cfg)
    except InvalidRun as err:
        raise UsageError(str(err)) from None
    except (TrainingError, CheckpointError, OSError) as err:
        failed = write_failure(err)
        if isinstance(err, OSError) and failed is None:
            raise
        print(f"dpls train: error: {_written_out(err, failed, cfg.out_dir)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # in the loop the trainer saves first; during setup there may be nothing
        latest = latest_checkpoint(cfg.out_dir)
        if latest is None:
            print("dpls train: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        else:
            print(
                f"dpls train: interrupted; continue from {latest.name} with --resume_dir={cfg.out_dir}",
                file=sys.stderr,
            )
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports for the job
        return 0
    summary = read_run_summary(run_dir)
    val = summary["val"]
    latest = latest_checkpoint(run_dir)
    reached = checkpoint_step(latest) if latest is not None else 0
    if reached < cfg.max_iters:  # a stop signal: saved and returned early
        tail = f"; last val_ce {val['val_ce']:.4f} at step {val['step']}" if val else ""
        print(
            f"dpls train: stopped at step {reached} of {cfg.max_iters} (checkpoint saved){tail}; "
            f"continue with: dpls train --resume_dir={run_dir}"
        )
        return 0
    tail = f"; final val_ce {val['val_ce']:.4f} at step {val['step']}" if val else ""
    print(f"dpls train: done: {run_dir}{tail}")
    return 0


def _written_out(err: BaseException, failed: str | None, run_dir: str) -> str:
    """The error in one line; when a file could not be written (disk full, ``ulimit -f``),
    what happened and how the run goes on: it is resumable from its last checkpoint."""
    from dpls.runs.checkpoint import latest_checkpoint

    text = " ".join(str(err).split())
    if failed is None:
        return text
    latest = latest_checkpoint(run_dir)
    how = (
        f"the run is resumable from {latest.name}: make room (or raise the limit), then dpls train --resume_dir={run_dir}"
        if latest is not None
        else "no checkpoint was saved yet: make room (or raise the limit), then run the same command again"
    )
    return f"{failed}; {how}" if isinstance(err, OSError) else f"{text} — {failed}; {how}"

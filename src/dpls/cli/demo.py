"""`dpls demo` (first version): the embedded corpus, a tiny CE run, and a DPLS fork of it.

1. ``dpls prepare stdlib`` into ``OUT/data`` (skipped when it is already there);
2. a CE run of the ``tiny`` model into ``OUT/ce``;
3. the published recipe's fork, ``--resume_dir=OUT/ce --loss=dpls``, into ``OUT/dpls``.

Rerunning it reuses finished runs and resumes interrupted ones. A few minutes on two CPU
cores; the full paired study with statistics is ``dpls study``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dpls.cli import UsageError


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Prepare the embedded corpus, train a tiny model with CE, then fork it with DPLS.",
    )
    parser.add_argument("--out", default="runs/demo", help="where data and runs go (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=120, help="CE steps; the DPLS fork trains as many again")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def demo_config(out: Path, steps: int, device: str) -> dict[str, Any]:
    """The training keys both runs share: a tiny model that learns visibly in a few minutes."""
    return {
        "data_dir": str(out / "data"),
        "model": "tiny",
        "block_size": 128,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3,
        "min_lr": 2e-4,
        "warmup_iters": max(1, steps // 10),
        "lr_decay_iters": 2 * steps,
        "eval_interval": max(1, steps // 2),
        "eval_tokens": 8192,
        "log_interval": max(1, steps // 10),
        "checkpoint_interval": steps,
        "keep_checkpoints": 2,
        "device": device,
    }


def _train(values: dict[str, Any]) -> Path:
    """Train a run, or reuse it when finished, or resume it when it was interrupted."""
    from dpls.train.checkpoint import latest_checkpoint, read_trainer_state
    from dpls.train.config import load_config
    from dpls.train.trainer import InvalidRun, train

    run_dir = Path(values["out_dir"])
    latest = latest_checkpoint(run_dir)
    if latest is not None and int(read_trainer_state(latest)["step"]) >= int(values["max_iters"]):
        print(f"dpls demo: {run_dir} is already trained")
        return run_dir
    overrides = {"resume_dir": str(run_dir), "max_iters": values["max_iters"]} if latest else values
    try:
        return train(load_config(overrides=overrides))
    except (InvalidRun, ValueError) as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from dpls.train.trainer import read_run_summary

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    data = out / "data"
    started = time.perf_counter()
    if not (data / "meta.json").is_file():
        from dpls.data import prepare_stdlib

        print(f"dpls demo: preparing the standard-library corpus in {data}")
        prepare_stdlib(data)
    shared = demo_config(out, args.steps, args.device)
    ce = _train({**shared, "out_dir": str(out / "ce"), "loss": "ce", "max_iters": args.steps})
    fork = {
        **shared,
        "out_dir": str(out / "dpls"),
        "resume_dir": str(ce),
        "loss": "dpls",
        "dpls_epsilon": 0.1,
        "dpls_top_k": 100,
        "max_iters": 2 * args.steps,
    }
    dpls_run = _train(fork)
    print(f"dpls demo: done in {time.perf_counter() - started:.0f} s")
    for name, run_dir in (("ce", ce), ("dpls", dpls_run)):
        val = read_run_summary(run_dir)["val"]
        tail = f"val_ce {val['val_ce']:.4f} at step {val['step']}" if val else "no validation yet"
        print(f"  {name:5s} {run_dir}  ({tail})")
    return 0

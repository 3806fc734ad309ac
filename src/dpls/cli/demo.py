"""`dpls demo`: the whole method in a few minutes on a laptop CPU, as a real paired study.

1. the embedded corpus (this Python's standard library) is prepared into ``OUT/data``,
   with a small training slice (6,144 tokens) and the whole validation split: the
   data-limited regime, where CE overfits and smoothing has the most to offer;
2. a tiny model trains with cross-entropy for two epochs: the shared trunk;
3. CE, label smoothing and DPLS arms fork from it for eight more epochs, three seeds each
   (one seed's arms see the same batches);
4. every arm is evaluated (every evaluation metric) and ``OUT/report/report.md`` gives each
   arm's paired difference from CE with its 95% interval, with plots.

It runs the same study as ``dpls study studies/demo.toml``, built in; rerunning it skips
everything already finished. The last line printed is the path of report.md.

``--readme README.md`` then regenerates the README's demo section (findings, the evaluation
table and the validation-CE plot) from this report; ``make readme`` does it from a fresh run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from dpls.cli import UsageError

# The demo study: a smaller studies/data_limited_cpu.toml (three arms, eight epochs per arm),
# so that it finishes in about two minutes on two CPU cores, prepare included, and still
# answers something: in this regime CE overfits and the arms' differences in validation CE
# are larger than their intervals. `studies/demo.toml` holds the same keys (a test keeps
# them equal).
DEMO_STUDY: dict[str, Any] = {
    "name": "demo",
    "out_dir": "runs/demo",
    # a small vocabulary (4x cheaper logits); a small training slice, the validation split whole
    "prepare": {"source": "stdlib", "vocab_size": 2048, "max_train_tokens": 6_144},
    "fork_step": 24,  # 2 epochs of 12 steps
    "iters_per_arm": 96,  # 8 more epochs
    "seeds": 3,
    "baseline": "ce",
    "train": {
        "model": "tiny",
        "block_size": 128,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_iters": 12,
        "eval_interval": 12,
        "eval_tokens": 8_192,
        "log_interval": 6,
        "checkpoint_interval": 1_000,
        "keep_checkpoints": 1,
    },
    "arms": [
        {"name": "ce", "loss": "ce"},
        {"name": "ls", "loss": "ls", "label_smoothing": 0.1},
        {"name": "dpls", "loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 20},
    ],
    "eval": {"tokens": 32_768},
}


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="study directory (default: %(default)s)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--readme",
        default=None,
        metavar="README.md",
        help="afterwards, regenerate this README's demo section (between its demo-report markers) "
        "from the report, and copy the summary and plot into docs/demo/ beside it",
    )
    parser.set_defaults(func=run)
    return parser


def demo_study(out: str | Path, device: str | None = None) -> dict[str, Any]:
    """The demo study as a study table, with its output directory (and device) set."""
    study = copy.deepcopy(DEMO_STUDY)
    study["out_dir"] = str(out)
    if device is not None:
        study["train"]["device"] = device
    return study


def run(args: argparse.Namespace) -> int:
    from dpls.study.readme import check_readme, load_average, provenance, update_readme
    from dpls.study.runner import StudyStopped, plan_study, run_study
    from dpls.study.spec import parse_spec

    started, load_start = time.perf_counter(), load_average()
    try:
        plan = plan_study(parse_spec(demo_study(args.out, args.device)))
        if args.readme is not None:
            check_readme(args.readme)  # before the work, not after it
    except ValueError as err:
        raise UsageError(str(err)) from err
    print(plan.describe(), flush=True)
    try:
        report = run_study(plan, progress=not args.quiet)
    except ValueError as err:  # bad input found on the way (e.g. by the trainer's checks)
        raise UsageError(str(err)) from err
    except StudyStopped as err:
        print(f"dpls demo: stopped: {err}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process ended by it
    seconds = time.perf_counter() - started
    print(f"dpls demo: finished in {seconds:.0f} s")
    if args.readme is not None and report is not None:
        prov = provenance(seconds, args.out, load_start=load_start)
        readme = update_readme(args.readme, report.parent, prov)
        print(f"dpls demo: regenerated the demo section of {readme}")
    if report is not None:
        print_samples(report.parent)
    print(report)
    return 0


def print_samples(report_dir: Path) -> None:
    """One sample per arm, from the report's Samples section: text, not only numbers."""
    from dpls.study.readme import SUMMARY

    block = json.loads((report_dir / SUMMARY).read_text()).get("samples")
    if not block or not block["prompts"]:
        return

    def line(text: str) -> str:
        return text.replace("\n", "⏎") or "(nothing)"

    width = max(len(a) for a in ("prompt", *block["arms"]))
    print(
        f"One sample per arm (seed {block['seed']}, the same random numbers), continuing a validation document:"
    )
    print(f"  {'prompt':>{width}}: {line(block['prompts'][0])}")
    for arm, samples in block["arms"].items():
        print(f"  {arm:>{width}}: {line(samples[0])}")

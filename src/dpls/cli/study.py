"""`dpls study STUDY_FILE [--out DIR] [--dry-run] [--executor KIND] [--workers N] [--wait]`: a paired comparison of loss arms.

Trains a CE trunk once, forks every arm × seed from the same trunk checkpoint (one seed's
arms see the same tokens), evaluates each finished arm and writes report.md with the
paired differences from the baseline arm and their 95% intervals. Rerunning the same
command skips everything already finished, so an interrupted study just continues.

Where the jobs run (or the study file's [executor] table):
  --executor sequential   one after another in this process (the default)
  --executor local        --workers N at once on this machine, cores or GPUs split between them
  --executor slurm        every job a Slurm job through submitit (pip install 'dpls[slurm]');
                          returns once submitted (rerun to collect) unless --wait
  --executor ray          Ray tasks on a running cluster or a local one (pip install 'dpls[ray]')
Every number of a study is the same whichever executor ran it, given the same torch threads
per run. Several GPUs per run the old way: `torchrun --nproc_per_node=N -m dpls study STUDY_FILE`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dpls.cli._common import doc_parser, usage_errors
from dpls.study.executor_spec import EXECUTORS


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = doc_parser(subparsers, name, help_text, __doc__)
    p.add_argument("study_file", type=Path, metavar="STUDY_FILE", help="the study's TOML file (see studies/)")
    p.add_argument("--out", type=Path, default=None, help="study directory (default: the file's out_dir)")
    p.add_argument("--dry-run", action="store_true", help="check the file and print the plan; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="where the jobs run (default: the file's [executor], else sequential)",
    )
    p.add_argument("--workers", type=int, default=None, metavar="N", help="jobs at once (local, slurm, ray)")
    p.add_argument(
        "--wait", action="store_true", help="slurm: stay until every job has ended, then write the report"
    )
    p.add_argument(
        "--readme",
        default=None,
        metavar="README.md",
        help="afterwards, regenerate this README's section of the study (between its "
        "study-report:NAME markers) from the report, and copy the summary and plot into "
        "docs/studies/NAME/ beside it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dpls.study.readme import check_readme, load_average, provenance, regime_words, update_readme
    from dpls.study.runner import StudyIncomplete, StudyStopped, plan_study, run_study
    from dpls.study.spec import load_spec

    started, load_start = time.perf_counter(), load_average()
    with usage_errors():
        spec = load_spec(args.study_file, out_dir=args.out)
        executor = spec.executor.with_command_line(args.executor, args.workers, args.wait)
        plan = plan_study(spec)
        if args.readme is not None:
            check_readme(args.readme, spec.name)  # before the work, not after it
    if args.dry_run:
        print(plan.describe())
        print(f"  executor: {executor.kind}" + (f", {executor.workers} workers" if executor.workers else ""))
        return 0
    try:
        with usage_errors():  # bad input found on the way (e.g. by the trainer's checks)
            report = run_study(plan, progress=not args.no_progress, executor=executor)
    except StudyStopped as err:
        print(f"dpls study: stopped: {err}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process ended by it
    except StudyIncomplete as err:
        print(f"dpls study: {err}", file=sys.stderr)
        if err.report is not None:
            print(err.report)
        return 1
    if args.readme is not None and report is not None:
        seconds = time.perf_counter() - started
        prov = provenance(seconds, plan.study_dir, f"make readme-{spec.name}", load_start)
        readme = update_readme(args.readme, report.parent, prov, study=spec.name, regime=regime_words(plan))
        print(f"dpls study: finished in {seconds:.0f} s; regenerated the {spec.name} section of {readme}")
    if report is not None:
        print(report)
    return 0

"""Evaluating one finished run: ``dpls eval`` of its final checkpoint, lm-eval tasks, samples.

In a ``[sweep]`` study only the runs at the reference value are evaluated: the swept value
where the baseline arm's mean final validation CE is lowest (the sweep section itself reads
the training logs). That value is known once every baseline run has trained, so an
evaluation job of a sweep depends on all of them and finds out when it is ready whether it
has anything to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dpls._io import write_json_atomic
from dpls.eval.evaluate import evaluate_checkpoint, resolve_device
from dpls.eval.generation import run_samples
from dpls.eval.lm_eval import run_lm_eval
from dpls.study.jobs import DONE, SKIPPED, Job, JobResult
from dpls.study.plan import StudyRun
from dpls.study.records import load_run
from dpls.study.spec import EvalSpec, SweepSpec
from dpls.study.state import LM_EVAL_FILE, SAMPLES_FILE
from dpls.study.sweep import reference_point, summarize_sweep

EVAL_LOG = "eval.log"  # RUN/eval.log


@dataclass
class SweepReference:
    """The grid point the report's per-metric sections compare the arms at: the baseline's best
    (lowest mean final validation CE over seeds), from the baseline's runs (value, seed, folder)."""

    sweep: SweepSpec
    baseline: str
    baseline_runs: Sequence[tuple[Any, int, Path]]
    _value: list[Any] = field(default_factory=list, repr=False)  # computed once, when asked

    def value(self) -> Any:
        if not self._value:
            self._value.append(self._compute())
        return self._value[0]

    def _compute(self) -> Any:
        records = []
        for value, seed, run_dir in self.baseline_runs:
            if run_dir.is_dir():
                records.append(load_run(run_dir, arm=self.baseline, seed=seed))
                records[-1].value = value
        if not records:
            return self.sweep.points()[0]
        block = summarize_sweep(
            {self.baseline: records},
            self.sweep.key,
            list(self.sweep.values),
            self.baseline,
            others=self.sweep.to_dict().get("others"),
        )
        return reference_point(block)


def flatten_lm_eval(results: dict[str, Any]) -> dict[str, float]:
    """The harness's result dict → ``{"task/metric": value}`` (filters other than "none" kept in the name)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if (
                "," not in key
                or "_stderr" in key
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                continue
            metric, filt = key.split(",", 1)
            out[f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


@dataclass
class EvalJob(Job):
    kind: ClassVar[str] = "eval"

    name: str
    deps: tuple[str, ...]
    study_run: StudyRun
    spec: EvalSpec
    data_dir: Path
    reference: SweepReference | None = None  # a sweep: evaluated only at the reference value
    show_progress: bool = False

    def chainable(self) -> bool:
        return self.reference is None  # a sweep's: known once the baseline's runs have trained

    def needed(self) -> bool:
        """False for a sweep run away from the reference value, or a diverged run."""
        if self.study_run.diverged is not None:
            return False
        return self.reference is None or repr(self.study_run.value) == repr(self.reference.value())

    def is_evaluated(self) -> bool:
        folder = self.study_run.eval_file.parent
        return (
            self.study_run.eval_file.is_file()
            and (not self.spec.lm_eval_tasks or (folder / LM_EVAL_FILE).is_file())
            and (not self.spec.samples or (folder / SAMPLES_FILE).is_file())
        )

    def is_done(self) -> bool:
        if self.is_evaluated():
            return True
        if not (self.study_run.is_trained() or self.study_run.diverged is not None):
            return False  # not ready: whether it is needed may not be known yet
        return not self.needed()

    def run(self) -> JobResult:
        if not self.needed():
            return JobResult(SKIPPED, "not evaluated (see the sweep section)")
        run, ev = self.study_run, self.spec
        checkpoint, folder = run.final_checkpoint, run.eval_file.parent
        if not run.eval_file.is_file():
            kwargs: dict[str, Any] = {
                "tokens": ev.tokens,
                "out": run.eval_file,
                "progress": self.show_progress,
            }
            if ev.batch_size is not None:
                kwargs["batch_size"] = ev.batch_size
            evaluate_checkpoint(checkpoint, **kwargs)
        if ev.lm_eval_tasks and not (folder / LM_EVAL_FILE).is_file():
            options: dict[str, Any] = {"limit": ev.lm_eval_limit, "include_path": ev.lm_eval_include_path}
            if ev.lm_eval_batch_size is not None:
                options["batch_size"] = ev.lm_eval_batch_size
            results = run_lm_eval(checkpoint, list(ev.lm_eval_tasks), out_dir=folder / "lm_eval", **options)
            write_json_atomic(folder / LM_EVAL_FILE, flatten_lm_eval(results))
        if ev.samples and not (folder / SAMPLES_FILE).is_file():
            samples = run_samples(
                checkpoint,
                self.data_dir,
                num_samples=ev.samples,
                prompt_tokens=ev.sample_prompt_tokens,
                max_new_tokens=ev.sample_tokens,
                seed=run.seed or 0,  # every arm of a seed draws the same random numbers
                device=resolve_device("auto"),
            )
            write_json_atomic(folder / SAMPLES_FILE, samples)
        return JobResult(DONE)

    @property
    def log(self) -> Path:
        return self.study_run.run_dir / EVAL_LOG

    @property
    def run_dir(self) -> Path:
        return self.study_run.run_dir

    def describe(self) -> str:
        return f"evaluating {self.study_run.name}"

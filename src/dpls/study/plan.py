"""What a study will do: its runs, where each starts, and every check made before any work.

Layout of the study directory::

    STUDY/study_state.json          which run is which arm and seed, and what is finished
    STUDY/study.toml                the study file as it was run
    STUDY/data/                     the prepared corpus (with ``prepare = "stdlib"``)
    STUDY/trunk/                    the CE trunk (a run directory)
    STUDY/forks/seed<S>/            the fork point of seed S (see "Seeds" below)
    STUDY/arms/<arm>/seed<S>/       one arm × seed run; its evaluation in eval/
    STUDY/report/report.md          the answer (plus summary.json and the plots)

**Pairing.** Every arm of one seed forks from the same checkpoint, whose saved data
position the trainer carries into the fork, so they train on the same batches in the same
order and differ only in the loss keys. **Seeds.** After the fork nothing random is left
but the data order, so the seeds must see different data: the seed with offset ``i``
continues the trunk's data stream after skipping ``i`` arm budgets of it. Offsets are
handed out in the order seeds first appear and kept in ``study_state.json``, so adding,
removing or reordering seeds later never moves a seed that already has runs. Keys of
``[trunk]`` are the trunk's alone: the arms get ``[train]``'s value or the default for them.

**From scratch and sweeps.** Without ``fork_step`` and ``[trunk]`` there is no trunk: every
run trains from initialisation, seeded by its seed, so all runs of one seed start from the
same weights and read the same batches, whatever the arm and the swept value. A ``[sweep]``
makes every arm × value × seed a run, in ``STUDY/arms/<arm>/<key>_<value>/seed<S>/``. Such
runs stop as *diverged* when their training CE stays above the initial validation CE for
`DIVERGENCE_WINDOW` logged steps in a row; that is a result, kept by a rerun.

**Checked before any work** (also by ``--dry-run``): the study folder is new, empty or this
study's own; every run that still has work is planned by the trainer's own `plan_run`
(model, data, loss keys, memory) with the configuration it will train with; a run already
on disk matches the plan in every key that changes what it computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpls._io import check_output_dir
from dpls.data.meta import DataMeta
from dpls.eval.lm_eval import parse_tasks
from dpls.model.config import PRESETS
from dpls.runs.checkpoint import (
    checkpoint_name,
    is_complete,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
)
from dpls.runs.layout import CHECKPOINTS_DIR, EVAL_DIR, EVAL_FILE, read_diverged
from dpls.study.checks import (
    check_prepare_options,
    check_prepared,
    check_run_on_disk,
    check_study_copy,
    check_study_folder,
    check_train_config,
)
from dpls.study.report import REPORT_FILES
from dpls.study.spec import StudySpec, point_dir, point_keys
from dpls.study.state import is_study_dir, read_state
from dpls.train.config import TrainConfig, load_config, read_run_config

STUDY_COPY = "study.toml"
REPORT_DIR = "report"
# Logged steps in a row above the initial loss that make a from-scratch or swept run diverged
# (the trainer's divergence_window; a [train] value replaces it).
DIVERGENCE_WINDOW = 5


class StudyStopped(RuntimeError):
    """A run stopped before its last step (SIGTERM): the study stops too; rerun to continue."""


@dataclass
class StudyRun:
    """One training run of the study: the trunk, or an arm × (swept value) × seed."""

    name: str  # "trunk" or "<arm>/seed<S>" ("<arm>/<key>_<value>/seed<S>" in a sweep)
    run_dir: Path
    values: dict[str, Any]  # training keys given to the trainer (the rest come from the trunk)
    final_step: int
    arm: str | None = None
    seed: int | None = None
    seed_offset: int = 0  # arm budgets the seed's fork point is along the trunk's data stream
    value: Any = None  # the swept key's value ([sweep] studies)

    @property
    def diverged(self) -> dict[str, Any] | None:
        """The run's divergence record (a finished result), or None."""
        return read_diverged(self.run_dir)

    @property
    def final_checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR / checkpoint_name(self.final_step)

    @property
    def eval_file(self) -> Path:
        return self.run_dir / EVAL_DIR / EVAL_FILE

    def is_trained(self) -> bool:
        return is_complete(self.final_checkpoint)

    def train_config(self, fork_from: Path | None) -> TrainConfig:
        """The configuration the trainer gets: resumed in place after an interruption, else
        forked from ``fork_from``, else new (the trunk, or a run from scratch)."""
        if latest_checkpoint(self.run_dir) is not None:
            return load_config(overrides={"resume_dir": str(self.run_dir)})
        if fork_from is not None:
            return load_config(overrides={**self.values, "resume_dir": str(fork_from)})
        return load_config(overrides=self.values)


@dataclass
class StudyPlan:
    """Everything a study will do, checked before any of it starts (``dpls study --dry-run`` prints it)."""

    spec: StudySpec
    study_dir: Path
    data_dir: Path
    fork_step: int
    iters_per_arm: int
    tokens_per_step: int
    trunk: StudyRun | None  # None: an existing checkpoint is the trunk, or none (from scratch)
    fork_checkpoint: Path | None  # the existing checkpoint, or None until the trunk is trained
    arms: list[StudyRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed_offsets: dict[int, int] = field(default_factory=dict)  # every seed the study has known

    @property
    def trunk_dir(self) -> Path | None:
        if self.trunk is not None:
            return self.trunk.run_dir
        if self.fork_checkpoint is None:  # from scratch
            return None
        return self.fork_checkpoint.parent.parent

    @property
    def from_scratch(self) -> bool:
        return self.trunk is None and self.fork_checkpoint is None

    def trunk_checkpoint(self) -> Path:
        if self.fork_checkpoint is not None:
            return self.fork_checkpoint
        assert self.trunk is not None
        return self.trunk.final_checkpoint

    def fork_source(self, run: StudyRun) -> Path | None:
        """The checkpoint ``run`` forks from: none from scratch, the trunk's for offset 0, else its
        seed's fork point (made by the study's fork job)."""
        if self.from_scratch or run is self.trunk:
            return None
        if run.seed_offset == 0:
            return self.trunk_checkpoint()
        return fork_dir(self, run.seed or 0)

    def describe(self) -> str:
        s = self.spec
        total = (self.fork_step if self.trunk else 0) + len(self.arms) * self.iters_per_arm
        lines = [
            f"study {s.name!r} → {self.study_dir}",
            f"  data: {self.data_dir}" + (f" (prepared from {s.prepare} unless there)" if s.prepare else ""),
            f"  {self.tokens_per_step:,} tokens per step",
            f"  trunk: {self._trunk_words()}",
        ]
        grid = (
            "".join(f" × {k} {list(v)}" for k, v in [(s.sweep.key, s.sweep.values), *s.sweep.others])
            if s.sweep
            else ""
        )
        start = "from step 0" if self.from_scratch else f"after step {self.fork_step}"
        lines.append(
            f"  arms: {len(s.arms)}{grid} × seeds {list(s.seeds)}, each {self.iters_per_arm} steps "
            f"({self.iters_per_arm * self.tokens_per_step:,} tokens) {start}; "
            f"baseline {s.baseline!r}"
        )
        for a in s.arms:
            keys = ", ".join(f"{k}={v!r}" for k, v in a.loss.items())
            lines.append(f"    - {a.name}: {keys}")
        ev = s.eval
        lm = ""
        if ev.lm_eval_tasks:
            lm = f"; lm-eval {', '.join(ev.lm_eval_tasks)}"
            lm += f" (limit {ev.lm_eval_limit})" if ev.lm_eval_limit else ""
        gen = f"; {ev.samples} samples of {ev.sample_tokens} tokens" if ev.samples else ""
        which = " at the baseline's best value" if s.sweep else ""
        lines.append(
            f"  eval: {f'{ev.tokens:,}' if ev.tokens else 'all'} validation tokens per run{which}{lm}{gen}"
        )
        lines.append(f"  {len(self.arms) + (self.trunk is not None)} training runs, {total:,} steps in all")
        lines.append(
            f"  primary question: {s.primary}" + (f" (min_effect {s.min_effect:g})" if s.min_effect else "")
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _trunk_words(self) -> str:
        if self.trunk is not None:
            return (
                f"{self.trunk.run_dir} — CE for {self.fork_step} steps "
                f"({self.fork_step * self.tokens_per_step:,} tokens)"
            )
        if self.from_scratch:
            return "none — every run trains from initialisation (one seed: same weights, same batches)"
        return f"the existing checkpoint {self.fork_checkpoint} (step {self.fork_step})"


def fork_dir(plan: StudyPlan, seed: int) -> Path:
    """Where the fork point of ``seed`` (offset > 0) lives: a checkpoint under STUDY/forks/."""
    return plan.study_dir / "forks" / f"seed{seed}" / CHECKPOINTS_DIR / checkpoint_name(plan.fork_step)


# -- planning -------------------------------------------------------------------------------


def _tokens_per_step(cfg: TrainConfig) -> int:
    block = cfg.block_size
    if block is None:
        if cfg.model not in PRESETS:
            raise ValueError(f"unknown model preset {cfg.model!r}; choose one of {list(PRESETS)}")
        block = PRESETS[cfg.model].block_size
    return int(cfg.batch_size * block * cfg.gradient_accumulation_steps)


def plan_study(spec: StudySpec) -> StudyPlan:
    """Resolve the study into its runs and check every one of them; writes nothing."""
    study_dir = spec.out_dir
    data_dir = spec.data_dir if spec.data_dir is not None else study_dir / "data"
    check_study_folder(study_dir, spec.name, keep=[data_dir])
    check_study_copy(study_dir / STUDY_COPY, spec.source)
    if spec.prepare is None and not (data_dir / "meta.json").is_file():
        raise ValueError(f"data_dir {data_dir} is not a prepared data directory (no meta.json)")
    if spec.prepare is not None:
        check_prepare_options(spec.prepare, dict(spec.prepare_options))
        if (data_dir / "meta.json").is_file():
            check_prepared(data_dir, spec.prepare, dict(spec.prepare_options))

    # The trunk: a new CE run, or an existing checkpoint.
    fork_checkpoint: Path | None = None
    if spec.trunk.checkpoint is not None:
        fork_checkpoint = resolve_checkpoint(spec.trunk.checkpoint)
        step = int(read_trainer_state(fork_checkpoint)["step"])
        if spec.fork_step is not None and spec.fork_step != step:
            raise ValueError(
                f"fork_step = {spec.fork_step}, but the trunk checkpoint {fork_checkpoint} is at step {step}"
            )
        fork_step = step
        base_cfg = TrainConfig.from_dict(spec.train, base=read_run_config(fork_checkpoint)).validate()
    else:
        fork_step = spec.fork_step or 0  # 0: from scratch
        base_cfg = TrainConfig.from_dict({**spec.train}).validate()

    tokens_per_step = _tokens_per_step(base_cfg)
    if spec.iters_per_arm is not None:
        iters = spec.iters_per_arm
    else:
        assert spec.tokens_per_arm is not None
        iters = math.ceil(spec.tokens_per_arm / tokens_per_step)
    offsets = _seed_offsets(study_dir, spec.seeds)
    plan = StudyPlan(
        spec=spec,
        study_dir=study_dir,
        data_dir=data_dir,
        fork_step=fork_step,
        iters_per_arm=iters,
        tokens_per_step=tokens_per_step,
        trunk=_trunk_run(spec, study_dir, data_dir, fork_step, fork_step + iters, fork_checkpoint),
        fork_checkpoint=fork_checkpoint,
        seed_offsets=offsets,
    )
    plan.arms = _arm_runs(spec, plan, fork_step + iters)
    _check_runs(plan)
    plan.notes += _notes(plan)
    return plan


def _trunk_run(
    spec: StudySpec, study_dir: Path, data_dir: Path, fork_step: int, final_step: int, checkpoint: Path | None
) -> StudyRun | None:
    """The CE trunk to train, or None (an existing checkpoint, or from scratch)."""
    if checkpoint is not None or spec.from_scratch:
        return None
    values: dict[str, Any] = {"loss": "ce", **spec.train, **spec.trunk.train}
    values.setdefault("lr_decay_iters", final_step)  # trunk + arm: one LR schedule
    values.update(data_dir=str(data_dir), out_dir=str(study_dir / "trunk"), max_iters=fork_step)
    TrainConfig.from_dict(values).validate()
    return StudyRun("trunk", study_dir / "trunk", values, fork_step)


def _arm_runs(spec: StudySpec, plan: StudyPlan, final_step: int) -> list[StudyRun]:
    """Every arm × (swept value) × seed, seed by seed in file order."""
    # Keys set for the trunk only go back to [train]'s value or the default in the arms
    # (a fork otherwise keeps every key of the checkpoint it starts from).
    defaults = TrainConfig()
    trunk_only = {k: getattr(defaults, k) for k in spec.trunk.train if k not in spec.train}
    sweep_values: list[Any] = spec.sweep.points() if spec.sweep else [None]
    runs = []
    for seed in spec.seeds:
        for arm in spec.arms:
            for value in sweep_values:
                where = (
                    Path(arm.name) / (point_dir(value, spec.sweep.key) if spec.sweep else "") / f"seed{seed}"
                )
                run_dir = plan.study_dir / "arms" / where
                values = {
                    **trunk_only,
                    **spec.train,
                    **arm.loss,
                    **(point_keys(value, spec.sweep.key) if spec.sweep else {}),
                    "seed": seed,
                    "out_dir": str(run_dir),
                    "max_iters": final_step,
                }
                if spec.sweep or spec.from_scratch:  # divergence is a result here, not a crash
                    values.setdefault("divergence_window", DIVERGENCE_WINDOW)
                values["data_dir"] = str(plan.data_dir)
                TrainConfig.from_dict(values).validate()  # types and ranges of every key, before any work
                offset = plan.seed_offsets[seed]
                runs.append(
                    StudyRun(where.as_posix(), run_dir, values, final_step, arm.name, seed, offset, value)
                )
    return runs


def _check_runs(plan: StudyPlan) -> None:
    """Every check that needs no work: runs on disk against the plan, every run with work left
    against the trainer's own planning (once per arm and swept value), lm-eval tasks, the report folder."""
    spec = plan.spec
    runs = [*([plan.trunk] if plan.trunk else []), *plan.arms]
    for run in runs:
        check_run_on_disk(run.run_dir, run.values, run.seed, run.seed_offset, _fork_point_if_any(plan, run))
    if (plan.data_dir / "meta.json").is_file():  # else prepared by the study: checked after preparing
        check_runs_with_trainer(plan)
    if spec.eval.lm_eval_tasks:
        parse_tasks(list(spec.eval.lm_eval_tasks))
        if spec.eval.lm_eval_include_path is not None and not spec.eval.lm_eval_include_path.is_dir():
            raise ValueError(
                f"[eval] lm_eval_include_path {spec.eval.lm_eval_include_path} is not a directory"
            )
    check_output_dir(plan.study_dir / REPORT_DIR, REPORT_FILES, "the study's report folder")


def _fork_point_if_any(plan: StudyPlan, run: StudyRun) -> Path | None:
    if run.seed is None or run.seed_offset == 0 or plan.from_scratch:
        return None
    return fork_dir(plan, run.seed)


def check_runs_with_trainer(plan: StudyPlan) -> None:
    """Plan every run that has work left as ``dpls train`` would, with the configuration it will
    train with (one seed per arm and swept value: the seeds differ in nothing the check reads).
    A fork whose source is not trained yet is checked as a new run of the same keys, which
    continue the trunk's model."""
    checked: set[tuple[Any, Any]] = set()
    for run in [*([plan.trunk] if plan.trunk else []), *plan.arms]:
        if (run.arm, repr(run.value)) in checked or run.is_trained() or run.diverged is not None:
            continue
        checked.add((run.arm, repr(run.value)))
        source = plan.fork_source(run)
        if source is not None and not is_complete(source):
            source = plan.trunk_checkpoint() if is_complete(plan.trunk_checkpoint()) else None
        what = "the trunk" if run is plan.trunk else f"arm {run.name}"
        try:
            cfg = run.train_config(source)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        check_train_config(cfg, what)


def _notes(plan: StudyPlan) -> list[str]:
    notes = []
    if len(plan.spec.seeds) == 1:
        notes.append("one seed: the report can give differences but no intervals")
    if not (plan.data_dir / "meta.json").is_file():
        return notes
    corpus = DataMeta.load(plan.data_dir).train_tokens
    iters, per_step = plan.iters_per_arm, plan.tokens_per_step
    if plan.from_scratch:  # each seed reads its own shuffle of the corpus
        needed = iters * per_step
        if needed > corpus:
            notes.append(
                f"each run reads {needed:,} tokens of a {corpus:,}-token corpus (≈ {needed / corpus:.1f} epochs)"
            )
        return notes
    last = max(plan.seed_offsets[s] for s in plan.spec.seeds)
    needed = (plan.fork_step + (1 + last) * iters) * per_step
    if needed > corpus:
        notes.append(
            f"the trunk and the seeds' arm budgets need {needed:,} tokens of a {corpus:,}-token corpus "
            f"(≈ {needed / corpus:.1f} epochs): seeds also see data the trunk or other seeds saw"
        )
    return notes


def _seed_offsets(study_dir: Path, seeds: Sequence[int]) -> dict[int, int]:
    """Each seed's offset: the one the study state records, else the next free one.

    Every seed ever run keeps its offset, so a seed added later can never share a data
    stretch with an existing one, and a reordered list changes nothing on disk.
    """
    known: dict[int, int] = {}
    if is_study_dir(study_dir):
        state = read_state(study_dir)
        if state.seed_offsets:
            known = {int(s): int(o) for s, o in state.seed_offsets.items()}
        else:  # written before offsets were recorded: they were the positions in `seeds`
            known = {int(s): i for i, s in enumerate(state.seeds)}
    free = max(known.values(), default=-1) + 1
    for seed in seeds:
        if seed not in known:
            known[seed], free = free, free + 1
    return known

"""Run a study: one CE trunk, every arm × seed forked from it, each evaluated, then the report.

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
removing or reordering seeds later never moves a seed that already has runs. On a corpus
with enough data the seeds therefore train on disjoint, unseen tokens; on a small one (many
epochs) on differently aligned stretches of the stream. The fork point of a seed with
offset ``i > 0`` is a copy of the trunk checkpoint (files hard-linked, not copied) whose
only change is the data position in ``trainer_state.json``. Keys of ``[trunk]`` are the
trunk's alone: the arms get ``[train]``'s value or the default for them.

**Rerun.** A run is finished when its final checkpoint and its evaluation exist; a rerun
skips it. A run interrupted mid-way (a crash, or SIGTERM/SIGINT, after which the study
stops) is resumed in place from its latest checkpoint. If the study file changed in a way
that contradicts what is on disk (any training key of a run, other than where its files
go and how it logs), the study stops before doing anything and says which key differs.

**From scratch and sweeps.** Without ``fork_step`` and ``[trunk]`` there is no trunk: every
run trains from initialisation, seeded by its seed, so all runs of one seed start from the
same weights and read the same batches (the data order follows the seed), whatever the arm
and the swept value. A ``[sweep]`` makes every arm × value × seed a run, in
``STUDY/arms/<arm>/<key>_<value>/seed<S>/``. Such runs stop as *diverged* when their training
CE stays above the initial validation CE for `DIVERGENCE_WINDOW` logged steps in a row (or the
skipped-steps limit trips); ``diverged.json`` records it, the study goes on, and a rerun
keeps the result instead of retraining.

Several GPUs: ``torchrun --nproc_per_node=N -m dpls study FILE``: every rank trains,
rank 0 prepares data, writes the state, evaluates and writes the report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dpls._io import write_json_atomic
from dpls.runs.layout import EVAL_DIR, EVAL_FILE, config_path, read_toml
from dpls.study.spec import StudySpec, load_spec
from dpls.study.state import (
    DIVERGED,
    DONE,
    LM_EVAL_FILE,
    PENDING,
    SAMPLES_FILE,
    TRAINED,
    RunEntry,
    StudyState,
    is_study_dir,
    read_state,
    write_state,
)

STUDY_COPY = "study.toml"
REPORT_DIR = "report"
# Logged steps in a row above the initial loss that make a from-scratch or swept run diverged
# (the trainer's divergence_window; a [train] value replaces it).
DIVERGENCE_WINDOW = 5

# Training keys NOT compared between the plan and a run already on disk: where files go
# and how progress is shown. Any other difference would make the run answer another question.
_NOT_COMPARED = frozenset(
    {
        "out_dir",
        "data_dir",
        "resume_dir",
        "run_name",
        "device",
        "compile",
        "loss_impl",
        "progress",
        "tensorboard",
        "swanlab",
        "swanlab_project",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "max_skipped_steps",
    }
)


class StudyStopped(RuntimeError):
    """A run stopped before its last step (SIGTERM): the study stops too; rerun to continue."""


@dataclass
class Job:
    """One training run of the study (the trunk, or an arm × seed fork)."""

    name: str  # "trunk" or "<arm>/seed<S>"
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
        from dpls.runs.layout import read_diverged

        return read_diverged(self.run_dir)

    @property
    def final_checkpoint(self) -> Path:
        from dpls.runs.checkpoint import checkpoint_name
        from dpls.runs.layout import CHECKPOINTS_DIR

        return self.run_dir / CHECKPOINTS_DIR / checkpoint_name(self.final_step)

    @property
    def eval_file(self) -> Path:
        return self.run_dir / EVAL_DIR / EVAL_FILE


@dataclass
class StudyPlan:
    """Everything a study will do, checked before any of it starts (``dpls study --dry-run`` prints it)."""

    spec: StudySpec
    study_dir: Path
    data_dir: Path
    fork_step: int
    iters_per_arm: int
    tokens_per_step: int
    trunk: Job | None  # None: an existing checkpoint is the trunk
    fork_checkpoint: Path | None  # the existing checkpoint, or None until the trunk is trained
    arms: list[Job] = field(default_factory=list)
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

    def describe(self) -> str:
        s = self.spec
        total = (self.fork_step if self.trunk else 0) + len(self.arms) * self.iters_per_arm
        lines = [
            f"study {s.name!r} → {self.study_dir}",
            f"  data: {self.data_dir}" + (f" (prepared from {s.prepare} unless there)" if s.prepare else ""),
            f"  {self.tokens_per_step:,} tokens per step",
        ]
        if self.trunk is not None:
            lines.append(
                f"  trunk: {self.trunk.run_dir} — CE for {self.fork_step} steps "
                f"({self.fork_step * self.tokens_per_step:,} tokens)"
            )
        elif self.from_scratch:
            lines.append(
                "  trunk: none — every run trains from initialisation (one seed: same weights, same batches)"
            )
        else:
            lines.append(f"  trunk: the existing checkpoint {self.fork_checkpoint} (step {self.fork_step})")
        grid = f" × {s.sweep.key} {list(s.sweep.values)}" if s.sweep else ""
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
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- planning -------------------------------------------------------------------------------


def _tokens_per_step(cfg: Any) -> int:
    from dpls.model.config import PRESETS

    block = cfg.block_size
    if block is None:
        if cfg.model not in PRESETS:
            raise ValueError(f"unknown model preset {cfg.model!r}; choose one of {list(PRESETS)}")
        block = PRESETS[cfg.model].block_size
    return int(cfg.batch_size * block * cfg.gradient_accumulation_steps)


def plan_study(spec: StudySpec) -> StudyPlan:
    """Resolve the study into training jobs and check every one of them; writes nothing."""
    from dpls.runs.checkpoint import read_trainer_state, resolve_checkpoint
    from dpls.train.config import TrainConfig, read_run_config

    study_dir = spec.out_dir
    data_dir = spec.data_dir if spec.data_dir is not None else study_dir / "data"
    if spec.prepare is None and not (data_dir / "meta.json").is_file():
        raise ValueError(f"data_dir {data_dir} is not a prepared data directory (no meta.json)")
    notes: list[str] = []
    if spec.prepare is not None:
        _check_prepare_options(spec.prepare, dict(spec.prepare_options))
        if (data_dir / "meta.json").is_file():
            _check_prepared(data_dir, spec.prepare, dict(spec.prepare_options))

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
        saved = read_run_config(fork_checkpoint)
        base_cfg = TrainConfig.from_dict(spec.train, base=saved).validate()
    else:
        fork_step = spec.fork_step or 0  # 0: from scratch
        base_cfg = TrainConfig.from_dict({**spec.train}).validate()

    tokens_per_step = _tokens_per_step(base_cfg)
    if spec.iters_per_arm is not None:
        iters = spec.iters_per_arm
    else:
        assert spec.tokens_per_arm is not None
        iters = math.ceil(spec.tokens_per_arm / tokens_per_step)
    final_step = fork_step + iters

    trunk: Job | None = None
    if fork_checkpoint is None and not spec.from_scratch:
        values: dict[str, Any] = {"loss": "ce", **spec.train, **spec.trunk.train}
        values.setdefault("lr_decay_iters", final_step)  # trunk + arm: one LR schedule
        values.update(data_dir=str(data_dir), out_dir=str(study_dir / "trunk"), max_iters=fork_step)
        TrainConfig.from_dict(values).validate()
        trunk = Job("trunk", study_dir / "trunk", values, fork_step)

    # Keys set for the trunk only go back to [train]'s value or the default in the arms
    # (a fork otherwise keeps every key of the checkpoint it starts from).
    defaults = TrainConfig()
    trunk_only = {k: getattr(defaults, k) for k in spec.trunk.train if k not in spec.train}
    offsets = _seed_offsets(study_dir, spec.seeds)
    sweep_values: tuple[Any, ...] = spec.sweep.values if spec.sweep else (None,)
    jobs = []
    for seed in spec.seeds:
        for arm in spec.arms:
            for value in sweep_values:
                where = Path(arm.name) / (f"{spec.sweep.key}_{value}" if spec.sweep else "") / f"seed{seed}"
                run_dir = study_dir / "arms" / where
                values = {
                    **trunk_only,
                    **spec.train,
                    **arm.loss,
                    **({spec.sweep.key: value} if spec.sweep else {}),
                    "seed": seed,
                    "out_dir": str(run_dir),
                    "max_iters": final_step,
                }
                if spec.sweep or spec.from_scratch:  # divergence is a result here, not a crash
                    values.setdefault("divergence_window", DIVERGENCE_WINDOW)
                values["data_dir"] = str(data_dir)
                TrainConfig.from_dict(values).validate()  # types and ranges of every key, before any work
                jobs.append(
                    Job(where.as_posix(), run_dir, values, final_step, arm.name, seed, offsets[seed], value)
                )

    if (data_dir / "meta.json").is_file():  # else prepared by the study: checked after preparing
        checked: set[tuple[Any, Any]] = set()
        for job in [*([trunk] if trunk else []), *jobs]:
            if (job.arm, job.value) not in checked:  # one seed of each arm (and swept value) suffices
                checked.add((job.arm, job.value))
                _check_arm_before_work(
                    job.values, data_dir, "the trunk" if job is trunk else f"arm {job.name}"
                )

    if spec.eval.lm_eval_tasks:
        from dpls.eval.lm_eval import parse_tasks

        parse_tasks(list(spec.eval.lm_eval_tasks))
        if spec.eval.lm_eval_include_path is not None and not spec.eval.lm_eval_include_path.is_dir():
            raise ValueError(
                f"[eval] lm_eval_include_path {spec.eval.lm_eval_include_path} is not a directory"
            )
    from dpls._io import check_output_dir
    from dpls.study.report import REPORT_FILES

    check_output_dir(study_dir / REPORT_DIR, REPORT_FILES, "the study's report folder")  # not after training
    if len(spec.seeds) == 1:
        notes.append("one seed: the report can give differences but no intervals")
    if (data_dir / "meta.json").is_file():
        from dpls.data.meta import DataMeta

        corpus = DataMeta.load(data_dir).train_tokens
        needed = (fork_step + (1 + max(offsets[s] for s in spec.seeds)) * iters) * tokens_per_step
        if spec.from_scratch:  # each seed reads its own shuffle of the corpus
            needed = iters * tokens_per_step
            if needed > corpus:
                notes.append(
                    f"each run reads {needed:,} tokens of a {corpus:,}-token corpus (≈ {needed / corpus:.1f} epochs)"
                )
        elif needed > corpus:
            notes.append(
                f"the trunk and the seeds' arm budgets need {needed:,} tokens of a {corpus:,}-token corpus "
                f"(≈ {needed / corpus:.1f} epochs): seeds also see data the trunk or other seeds saw"
            )
    return StudyPlan(
        spec=spec,
        study_dir=study_dir,
        data_dir=data_dir,
        fork_step=fork_step,
        iters_per_arm=iters,
        tokens_per_step=tokens_per_step,
        trunk=trunk,
        fork_checkpoint=fork_checkpoint,
        arms=jobs,
        notes=notes,
        seed_offsets=offsets,
    )


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


# -- the fork point of each seed --------------------------------------------------------------


def advance_position(
    epoch: int, position: int, micro_steps: int, num_windows: int, global_batch: int
) -> tuple[int, int]:
    """The loader's (epoch, position) after ``micro_steps`` more batches of ``global_batch`` windows.

    Mirrors `TokenLoader.next_batch`: a batch that would run past the end of the epoch's
    order starts the next epoch instead (the tail windows of each epoch are skipped).
    """
    if micro_steps <= 0:
        return epoch, position
    per_epoch = num_windows // global_batch
    left = max(num_windows - position, 0) // global_batch  # batches still fitting in this epoch
    if micro_steps <= left:
        return epoch, position + micro_steps * global_batch
    extra = micro_steps - left  # the first of these starts a new epoch
    return epoch + 1 + (extra - 1) // per_epoch, ((extra - 1) % per_epoch + 1) * global_batch


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fork_dir(plan: StudyPlan, seed: int) -> Path:
    from dpls.runs.checkpoint import checkpoint_name
    from dpls.runs.layout import CHECKPOINTS_DIR

    return plan.study_dir / "forks" / f"seed{seed}" / CHECKPOINTS_DIR / checkpoint_name(plan.fork_step)


def seed_fork_point(plan: StudyPlan, seed: int, world_size: int = 1) -> Path:
    """The checkpoint the arms of ``seed`` fork from (made if missing).

    The seed with offset 0 forks from the trunk checkpoint itself; offset ``i`` from a copy
    whose data position is ``i`` arm budgets further along the trunk's data stream.
    """
    from dpls.runs.checkpoint import TRAINER_STATE, is_complete, read_trainer_state

    source = plan.trunk_checkpoint()
    seed_index = plan.seed_offsets[seed]
    if seed_index == 0:
        return source
    dest = _fork_dir(plan, seed)
    if is_complete(dest):
        return dest
    state = read_trainer_state(source)
    loader = dict(state["loader"])
    cfg = read_toml(config_path(source))
    batch, accum = int(cfg["batch_size"]), int(cfg["gradient_accumulation_steps"])
    micro_global = batch * world_size  # windows one micro-step takes over all ranks
    micro_steps = seed_index * plan.iters_per_arm * (accum // world_size)
    loader["epoch"], loader["position"] = advance_position(
        int(loader["epoch"]), int(loader["position"]), micro_steps, int(loader["num_windows"]), micro_global
    )
    tmp = dest.with_name(dest.name + ".tmp-study")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != TRAINER_STATE:
            _link_or_copy(f, tmp / f.name)
    (tmp / TRAINER_STATE).write_text(
        json.dumps({**state, "loader": loader, "study_seed_offset": seed_index}, indent=1)
    )
    os.replace(tmp, dest)
    return dest


# -- running ------------------------------------------------------------------------------------


# Keys the study sets itself, and what the user sets that they follow from.
_DERIVED = {
    "lr_decay_iters": "fork_step + the arms' budget (iters_per_arm or tokens_per_arm), unless [train] sets it",
    "max_iters": "fork_step (the trunk) and fork_step + the arms' budget (the arms)",
}


def _check_arm_before_work(values: dict[str, Any], data_dir: Path, what: str) -> None:
    """What the trainer would refuse only after the trunk and earlier arms trained: loss keys
    (evaluated once on the data's vocabulary) and enough data for a batch and a validation set."""
    import torch

    from dpls.data.loader import TokenLoader, validation_batches
    from dpls.data.meta import DataMeta
    from dpls.losses.objective import build_objective
    from dpls.model import model_config
    from dpls.train.config import TrainConfig
    from dpls.train.plan import TOKEN_PRIOR_OBJECTIVES

    try:
        cfg = TrainConfig.from_dict(values).validate()
        vocab = DataMeta.load(data_dir, check_shards=False).vocab_size
        prior = torch.ones(vocab, dtype=torch.float64) if cfg.loss in TOKEN_PRIOR_OBJECTIVES else None
        objective = build_objective(cfg.to_loss_config(), token_prior=prior)
        objective(torch.zeros(1, vocab), torch.zeros(1, dtype=torch.long), step=0)
        block = (
            cfg.block_size or model_config(cfg.model, vocab_size=vocab, **cfg.model_overrides()).block_size
        )
        TokenLoader(data_dir, "train", cfg.batch_size, block, 0, 0, 1)
        cfg = replace(cfg, block_size=block)  # TrainConfig is frozen
        validation_batches(data_dir, block, cfg.batch_size, cfg.resolved_eval_tokens)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _check_on_disk(job: Job, plan: StudyPlan) -> None:
    """A run already in the study directory must be the one planned (else stop before any work)."""
    from dpls.runs.checkpoint import is_complete, read_trainer_state

    if job.seed is not None and job.seed_offset > 0 and is_complete(fork := _fork_dir(plan, job.seed)):
        had = read_trainer_state(fork).get("study_seed_offset")
        if had != job.seed_offset:
            raise ValueError(
                f"{fork} is the fork point of seed {job.seed} at offset {had}, but the study state "
                f"gives offset {job.seed_offset}; use another out_dir (--out) or remove {fork.parent.parent}"
            )
    cfg_file = config_path(job.run_dir)
    if not cfg_file.is_file():
        return
    saved = read_toml(cfg_file)
    for key, value in job.values.items():
        if key not in _NOT_COMPARED and key in saved and saved[key] != value and key in _DERIVED:
            raise ValueError(
                f"{job.run_dir} was trained to {key}={saved[key]!r}, which the study derives from "
                f"{_DERIVED[key]}; the study file now gives {value!r}: those settings changed since. "
                "Restore them, or use another out_dir (--out) for the new study"
            )
        if key not in _NOT_COMPARED and key in saved and saved[key] != value:
            raise ValueError(
                f"{job.run_dir} was trained with {key}={saved[key]!r} but the study now says "
                f"{key}={value!r}; use another out_dir (--out) or remove that run"
            )


def _is_trained(job: Job) -> bool:
    from dpls.runs.checkpoint import is_complete

    return is_complete(job.final_checkpoint)


def _train_job(job: Job, fork_from: Path | None) -> None:
    """Train ``job``: fresh (trunk), forked from ``fork_from``, or resumed in place after a crash."""
    from dpls.runs.checkpoint import latest_checkpoint
    from dpls.train.config import load_config
    from dpls.train.trainer import train

    if latest_checkpoint(job.run_dir) is not None:  # interrupted earlier: continue in place
        cfg = load_config(overrides={"resume_dir": str(job.run_dir)})
    elif fork_from is not None:
        cfg = load_config(overrides={**job.values, "resume_dir": str(fork_from)})
    else:
        cfg = load_config(overrides=job.values)
    train(cfg)
    if not _is_trained(job):  # the trainer saved and returned early: it was asked to stop
        raise StudyStopped(
            f"{job.name} stopped before step {job.final_step} (its progress is saved); "
            "rerun the same study to continue"
        )


def _flatten_lm_eval(results: dict[str, Any]) -> dict[str, float]:
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


def _evaluate_job(job: Job, plan: StudyPlan, progress: bool) -> None:
    from dpls.eval.evaluate import evaluate_checkpoint

    ev = plan.spec.eval
    if not job.eval_file.is_file():
        kwargs: dict[str, Any] = {"tokens": ev.tokens, "out": job.eval_file, "progress": progress}
        if ev.batch_size is not None:
            kwargs["batch_size"] = ev.batch_size
        evaluate_checkpoint(job.final_checkpoint, **kwargs)
    lm_file = job.eval_file.parent / LM_EVAL_FILE
    if ev.lm_eval_tasks and not lm_file.is_file():
        from dpls.eval.lm_eval import run_lm_eval

        kwargs = {
            "limit": ev.lm_eval_limit,
            "include_path": ev.lm_eval_include_path,
            "out_dir": job.eval_file.parent / "lm_eval",
        }
        if ev.lm_eval_batch_size is not None:
            kwargs["batch_size"] = ev.lm_eval_batch_size
        results = run_lm_eval(job.final_checkpoint, list(ev.lm_eval_tasks), **kwargs)
        write_json_atomic(lm_file, _flatten_lm_eval(results))
    samples_file = job.eval_file.parent / SAMPLES_FILE
    if ev.samples and not samples_file.is_file():
        from dpls.eval.evaluate import resolve_device
        from dpls.eval.generation import run_samples

        samples = run_samples(
            job.final_checkpoint,
            plan.data_dir,
            num_samples=ev.samples,
            prompt_tokens=ev.sample_prompt_tokens,
            max_new_tokens=ev.sample_tokens,
            seed=job.seed or 0,  # every arm of a seed draws the same random numbers
            device=resolve_device("auto"),
        )
        write_json_atomic(samples_file, samples)


def _is_done(job: Job, plan: StudyPlan) -> bool:
    if not (_is_trained(job) and job.eval_file.is_file()):
        return False
    ev, folder = plan.spec.eval, job.eval_file.parent
    return (not ev.lm_eval_tasks or (folder / LM_EVAL_FILE).is_file()) and (
        not ev.samples or (folder / SAMPLES_FILE).is_file()
    )


def _initial_state(plan: StudyPlan) -> StudyState:
    spec = plan.spec
    trunk_dir = plan.trunk_dir
    if trunk_dir is None:  # from scratch: no trunk
        rel = ""
    else:
        rel = (
            os.path.relpath(trunk_dir, plan.study_dir) if plan.trunk is not None else str(trunk_dir.resolve())
        )
    state = StudyState(
        name=spec.name,
        baseline=spec.baseline,
        seeds=list(spec.seeds),
        arms=[a.name for a in spec.arms],
        fork_step=plan.fork_step,
        trunk_dir=rel,
        seed_offsets={str(s): o for s, o in sorted(plan.seed_offsets.items())},
        runs=[
            RunEntry(j.arm or "", j.seed or 0, os.path.relpath(j.run_dir, plan.study_dir), value=j.value)
            for j in plan.arms
        ],
        sweep={"key": spec.sweep.key, "values": list(spec.sweep.values)} if spec.sweep else None,
    )
    return state


class _Progress:
    """One overall line per stage: where the study stands, elapsed time and a rough ETA."""

    def __init__(self, plan: StudyPlan, enabled: bool) -> None:
        self.name = plan.spec.name
        self.total = len(plan.arms) + (plan.trunk is not None)
        self.enabled = enabled
        self.started = time.perf_counter()
        self.done_steps = 0
        self.left_steps = (plan.fork_step if plan.trunk is not None else 0) + len(
            plan.arms
        ) * plan.iters_per_arm
        self.trained_time = 0.0

    def line(self, index: int, what: str, of: int | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = ""
        if self.done_steps and self.trained_time > 0 and self.left_steps > 0:
            eta = f", ETA ~{_hms(self.trained_time / self.done_steps * self.left_steps)} of training"
        print(
            f"[study {self.name}] {index}/{of or self.total} {what} (elapsed {_hms(elapsed)}{eta})",
            flush=True,
        )

    def trained(self, steps: int, seconds: float) -> None:
        self.done_steps += steps
        self.trained_time += seconds


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_study(study: str | Path | StudySpec | StudyPlan, *, progress: bool = True) -> Path | None:
    """Run (or continue) a study; returns the path of its report.md (None on ranks other than 0).

    ``study``: a STUDY.toml path, a parsed `StudySpec`, or a `StudyPlan`. Everything is
    checked before the first run starts; finished runs are skipped.
    """
    from dpls.distributed import init_distributed, launched_by_torchrun

    plan = (
        study
        if isinstance(study, StudyPlan)
        else plan_study(study if isinstance(study, StudySpec) else load_spec(study))
    )
    spec = plan.spec
    for job in ([plan.trunk] if plan.trunk else []) + plan.arms:
        _check_on_disk(job, plan)

    ctx = init_distributed() if launched_by_torchrun() else None
    main = ctx is None or ctx.is_main
    world_size = 1 if ctx is None else ctx.world_size
    study_dir = plan.study_dir
    bar = _Progress(plan, main)  # plain lines: shown even without progress bars

    def sync() -> None:
        if ctx is not None:
            ctx.barrier()

    # -- the study directory, its state, the data -----------------------------------------------
    if main:
        if spec.prepare is not None and not (plan.data_dir / "meta.json").is_file():
            bar.line(0, f"preparing the {spec.prepare} corpus into {plan.data_dir}")
            _preparer(spec.prepare)(plan.data_dir, **spec.prepare_options, progress=progress)
        study_dir.mkdir(parents=True, exist_ok=True)
        if spec.source is not None and spec.source.resolve() != (study_dir / STUDY_COPY).resolve():
            shutil.copy2(spec.source, study_dir / STUDY_COPY)
        state = read_state(study_dir) if (study_dir / "study_state.json").is_file() else _initial_state(plan)
        fresh = _initial_state(plan)
        known = {(r.arm, r.seed, r.value): r for r in state.runs}
        fresh.runs = [
            known.get((r.arm, r.seed, r.value), r) for r in fresh.runs
        ]  # keep statuses, follow the spec
        fresh.trunk_status = state.trunk_status
        fresh.spec = read_toml(spec.source) if spec.source is not None else {}
        state = fresh
        write_state(study_dir, state)
    sync()

    # -- the trunk -------------------------------------------------------------------------------
    index = 0
    if plan.trunk is not None:
        index += 1
        if _is_trained(plan.trunk):
            bar.line(index, "trunk already trained: skipped")
        else:
            bar.line(index, f"training the CE trunk to step {plan.fork_step}")
            t0 = time.perf_counter()
            _train_job(plan.trunk, None)
            bar.trained(plan.fork_step, time.perf_counter() - t0)
        bar.left_steps -= plan.fork_step
        if main:
            state.trunk_status = DONE
            write_state(study_dir, state)

    # -- the arms ------------------------------------------------------------------------------
    from dpls.train.trainer import Diverged

    fork_points: dict[int, Path] = {}
    for job in plan.arms:
        index += 1
        entry = state.entry(job.arm or "", job.seed or 0, job.value) if main else None
        if _is_trained(job):
            bar.line(index, f"{job.name}: already trained, skipped")
        elif (record := job.diverged) is not None:
            bar.line(index, f"{job.name}: diverged at step {record.get('step')} before, kept as a result")
        else:
            seed = job.seed or 0
            if seed not in fork_points and not plan.from_scratch:
                if main:
                    seed_fork_point(plan, seed, world_size)
                sync()
                fork_points[seed] = seed_fork_point(plan, seed, world_size)
            bar.line(index, f"training {job.name} from step {plan.fork_step} to {job.final_step}")
            t0 = time.perf_counter()
            try:
                _train_job(job, fork_points.get(seed))
            except Diverged as err:  # a result: recorded in diverged.json; the study goes on
                bar.line(index, f"{job.name}: diverged at step {err.step}; recorded, the study goes on")
            bar.trained(plan.iters_per_arm, time.perf_counter() - t0)
        bar.left_steps -= plan.iters_per_arm
        if entry is not None and job.diverged is not None:
            entry.status = DIVERGED
            write_state(study_dir, state)
        elif entry is not None and entry.status == PENDING:
            entry.status = TRAINED
            write_state(study_dir, state)

    # Evaluation and the report are rank 0's, without a process group (a checkpoint read
    # inside one would wait for the other ranks' collectives).
    sync()
    if ctx is not None:
        ctx.destroy()
    if not main:
        return None

    # -- evaluation and the report ------------------------------------------------------------------
    reference = _reference_value(plan) if spec.sweep else None
    for i, job in enumerate(plan.arms, 1):
        entry = state.entry(job.arm or "", job.seed or 0, job.value)
        if entry.status == DIVERGED or job.diverged is not None:  # nothing to evaluate
            entry.status = DIVERGED
            continue
        if spec.sweep and repr(job.value) != repr(reference):  # the sweep section reads training logs
            continue
        if _is_done(job, plan):
            entry.status = DONE
            continue
        bar.line(i, f"evaluating {job.name}", of=len(plan.arms))
        _evaluate_job(job, plan, progress)
        entry.status = DONE
        write_state(study_dir, state)
    write_state(study_dir, state)
    from dpls.study.report import write_report

    report = write_report(
        study_dir, study_dir / REPORT_DIR, baseline=spec.baseline, title=f"Study {spec.name}"
    )
    bar.line(bar.total, f"report written: {report}")
    return report


def _reference_value(plan: StudyPlan) -> Any:
    """The swept value the report's per-metric sections compare the arms at: the baseline's best
    (lowest mean final validation CE over seeds). Only runs there are evaluated with ``dpls eval``."""
    from dpls.study.report import load_run
    from dpls.study.sweep import summarize_sweep

    assert plan.spec.sweep is not None
    base = plan.spec.baseline
    records = []
    for job in plan.arms:
        if job.arm == base and job.run_dir.is_dir():
            records.append(load_run(job.run_dir, arm=base, seed=job.seed))
            records[-1].value = job.value
    values = list(plan.spec.sweep.values)
    if not records:
        return values[0]
    best = summarize_sweep({base: records}, plan.spec.sweep.key, values, base)["arms"][base]["best"]
    return values[0] if best is None else best


def _preparer(source: str) -> Any:
    from dpls.data.prepare import prepare_fineweb_edu, prepare_stdlib

    return {"stdlib": prepare_stdlib, "fineweb-edu": prepare_fineweb_edu}[source]


def _check_prepared(data_dir: Path, source: str, options: dict[str, Any]) -> None:
    """Data already there must be what the study asks for (the keys it names, at least)."""
    from dpls.data.meta import DataMeta

    meta = DataMeta.load(data_dir)
    settings = meta.settings or {}
    if settings.get("source", meta.source) != source:
        raise ValueError(f"{data_dir} holds {meta.source!r} data, but the study asks to prepare {source!r}")
    for key, value in options.items():
        if key in settings and settings[key] != value:
            raise ValueError(
                f"{data_dir} was prepared with {key}={settings[key]!r}, but the study asks for "
                f"{key}={value!r}; use another data_dir (or --out) or remove that directory"
            )


def _check_prepare_options(source: str, options: dict[str, Any]) -> None:
    """The ``[prepare]`` keys must be keywords of the preparer (named in the error if not)."""
    import inspect

    from dpls.study.spec import closest_hint

    params = inspect.signature(_preparer(source)).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "progress"]
    for key in options:
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} in [prepare] for source {source!r}; {closest_hint(key, valid)}"
            )

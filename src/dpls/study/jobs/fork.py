"""The fork point of a seed after the first: the trunk checkpoint, further along its data stream.

The seed with offset ``i > 0`` forks from a copy of the trunk checkpoint (files hard-linked,
not copied) whose only change is the data position in ``trainer_state.json``: ``i`` arm
budgets further along the trunk's stream. The copy is made in a fresh temporary folder and
renamed into place, so two processes making it at once, or a kill at any moment, leave
either no fork point or a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dpls._io import mkdtemp_beside
from dpls.runs.checkpoint import TRAINER_STATE, is_complete, read_trainer_state
from dpls.runs.layout import config_path, read_toml
from dpls.study.jobs import DONE, Job, JobResult


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


def make_fork_point(source: Path, dest: Path, seed_offset: int, arm_steps: int, world_size: int = 1) -> Path:
    """The checkpoint at ``dest``: ``source`` moved ``seed_offset`` × ``arm_steps`` optimizer steps
    along its data stream (as ``world_size`` ranks read it). Made if missing."""
    if is_complete(dest):
        return dest
    state = read_trainer_state(source)
    loader = dict(state["loader"])
    cfg = read_toml(config_path(source))
    batch, accum = int(cfg["batch_size"]), int(cfg["gradient_accumulation_steps"])
    micro_global = batch * world_size  # windows one micro-step takes over all ranks
    micro_steps = seed_offset * arm_steps * (accum // world_size)
    loader["epoch"], loader["position"] = advance_position(
        int(loader["epoch"]), int(loader["position"]), micro_steps, int(loader["num_windows"]), micro_global
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_beside(dest)
    try:
        for f in source.iterdir():
            if f.is_file() and f.name != TRAINER_STATE:
                _link_or_copy(f, tmp / f.name)
        (tmp / TRAINER_STATE).write_text(
            json.dumps({**state, "loader": loader, "study_seed_offset": seed_offset}, indent=1)
        )
        os.replace(tmp, dest)
    except OSError:
        if not is_complete(dest):  # not another process's copy, renamed there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass
class ForkJob(Job):
    kind: ClassVar[str] = "fork"
    inline: ClassVar[bool] = True  # hard links and one small file

    name: str
    deps: tuple[str, ...]
    source: Path  # the trunk checkpoint
    dest: Path  # STUDY/forks/seed<S>/checkpoints/step_N
    seed: int
    seed_offset: int
    arm_steps: int
    world_size: int = 1  # ranks each arm trains with (the data position depends on it)

    def is_done(self) -> bool:
        return is_complete(self.dest)

    def run(self) -> JobResult:
        make_fork_point(self.source, self.dest, self.seed_offset, self.arm_steps, self.world_size)
        return JobResult(DONE)

    def describe(self) -> str:
        return f"the fork point of seed {self.seed} ({self.seed_offset} arm budgets along the trunk's data)"

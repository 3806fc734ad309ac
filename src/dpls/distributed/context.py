"""Who am I in a torchrun job, and the few collectives the trainer needs.

`init_distributed()` reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and starts the default process group:
NCCL when the device is CUDA, gloo on CPU. Without those variables (a plain
``dpls train``) it starts nothing and returns a world of one, and every collective
below is the identity, so the trainer calls them unconditionally instead of
sprinkling ``if distributed:`` over the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# device type -> process-group backend. A registry, not an if-chain: a new
# accelerator is one line here.
BACKENDS: dict[str, str] = {"cuda": "nccl", "cpu": "gloo"}

# Environment variables that mark a torchrun (or torch.distributed.launch) process.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistContext:
    """This process's place in the job; a world of one when not launched by torchrun.

    ``backend`` is ``None`` exactly when no process group was started.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, prints and renames checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists (torchrun launched us, even with one process)."""
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    # -- collectives (identity in a world of one) --------------------------------------

    def _reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        out = t.detach().clone()
        if not self.is_distributed:
            return out
        # NCCL only reduces device tensors; gloo only host ones. Move, reduce, move back.
        moved = out.to(self.device) if out.device != self.device else out
        dist.all_reduce(moved, op=op)
        return moved.to(t.device) if moved.device != t.device else moved

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks, as a new tensor (the input is left alone)."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over all ranks, as a new tensor; integer tensors become float32."""
        if not (t.is_floating_point() or t.is_complex()):
            t = t.float()
        return self._reduce(t, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of ``t`` over all ranks (e.g. "did any rank see a non-finite loss")."""
        return self._reduce(t, dist.ReduceOp.MAX)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one.

        How ranks agree to skip a non-finite step or to stop after a SIGTERM that reached
        only some of them: a decision taken alone would leave the others waiting in a
        collective forever.
        """
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        """Wait for every rank; a no-op in a world of one."""
        if not self.is_distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (must be picklable); identity in a world of one."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def destroy(self) -> None:
        """Tear the process group down (safe to call twice, or without one)."""
        destroy()
        self.backend = None


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """``None`` → CUDA if there is one, else CPU; a bare ``"cuda"`` → this rank's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    allowed = f"device must be one of {sorted(BACKENDS)} (optionally with an index), got {device!r}"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(allowed) from err
    if dev.type not in BACKENDS:
        raise ValueError(allowed)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are present."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Start the process group described by torchrun's environment, or a world of one without it.

    ``device``: ``"cuda"``, ``"cpu"``, ``"cuda:1"`` or ``None`` (CUDA when available).
    Under torchrun a bare ``"cuda"`` means GPU ``LOCAL_RANK``. Calling it again when a
    process group already exists returns a context for that group instead of failing.
    """
    if not launched_by_torchrun():
        partial = [n for n in _TORCHRUN_ENV if n in os.environ]
        if partial and os.environ.get("WORLD_SIZE", "1") != "1":
            missing = [n for n in _TORCHRUN_ENV if n not in os.environ]
            raise ValueError(
                f"distributed environment is incomplete: {partial} set but {missing} missing; "
                "launch with torchrun, or unset them for a single process"
            )
        return DistContext(device=_resolve_device(device, 0))

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    dev = _resolve_device(device, local_rank)
    backend = BACKENDS[dev.type]
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not mid-step
        dist.init_process_group(**kwargs)
    else:
        backend = dist.get_backend()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def destroy() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Surviving faults in a job of many ranks: agreed stops, and hooks that inject faults in tests.

A signal or a non-finite loss may reach only some ranks; if those acted alone, the others
would wait forever in the next collective. So a rank only *notes* the event, and every
rank asks ``ctx.any_rank(noted)`` at the same point of the step, and all act together.

Test hooks: environment variables, read once when a run starts (`Faults.from_env`), so a test
sets them for a subprocess or before calling ``train``:

* ``DPLS_INJECT_NAN_AT_STEP=7`` (or ``7,9`` or ``7-11``): the loss of those optimizer steps
  becomes NaN on every rank — exercises non-finite step skipping;
* ``DPLS_INJECT_ENOSPC_AT_STEP=20`` (same syntax): the checkpoint written at that step
  fails with ``OSError(ENOSPC)`` after part of it is written — exercises atomic saving;
* ``DPLS_INJECT_RANK``: restrict either injection to one rank (default: all ranks).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from dpls._io import exception_chain

if TYPE_CHECKING:
    import torch

ENV_NAN = "DPLS_INJECT_NAN_AT_STEP"
ENV_ENOSPC = "DPLS_INJECT_ENOSPC_AT_STEP"
ENV_RANK = "DPLS_INJECT_RANK"


def parse_steps(spec: str) -> frozenset[int]:
    """``"7"``, ``"7,9"``, ``"7-11"`` (inclusive) or a mix → the set of steps; ``""`` → none."""
    steps: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"step list must look like '7', '7,9' or '7-11', got {spec!r}") from None
        if b < a:
            raise ValueError(f"step range {part!r} runs backwards")
        steps.update(range(a, b + 1))
    return frozenset(steps)


@dataclass(frozen=True)
class Faults:
    """The faults injected into one run: read from the environment once, then asked every step."""

    nan_steps: frozenset[int] = frozenset()
    enospc_steps: frozenset[int] = frozenset()
    rank: int | None = None  # only this rank; None: every rank

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        """The hooks of the module docstring; a malformed value is a `ValueError` naming it."""
        steps = {}
        for env in (ENV_NAN, ENV_ENOSPC):
            try:
                steps[env] = parse_steps(environ.get(env, ""))
            except ValueError as err:
                raise ValueError(f"{env}: {err}") from None
        only = environ.get(ENV_RANK, "").strip()
        if only and not only.isdigit():
            raise ValueError(f"{ENV_RANK} must be a rank number, got {only!r}")
        return cls(steps[ENV_NAN], steps[ENV_ENOSPC], int(only) if only else None)

    def _armed(self, steps: frozenset[int], step: int, rank: int | None) -> bool:
        return step in steps and (self.rank is None or rank is None or self.rank == rank)

    def nan(self, loss: torch.Tensor, step: int, rank: int | None = None) -> torch.Tensor:
        """``loss`` turned into NaN (keeping its graph) when ``step`` is one of ``nan_steps``."""
        if self._armed(self.nan_steps, step, rank):
            return loss * float("nan")
        return loss

    def enospc(self, step: int, rank: int | None = None) -> None:
        """Raise ``OSError(ENOSPC)`` when ``step`` is one of ``enospc_steps``.

        Called inside the checkpoint write, after something has been written: a real full
        disk fails midway, and the point of the test is that the half-written folder never
        replaces a good checkpoint.
        """
        if self._armed(self.enospc_steps, step, rank):
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_ENOSPC}={step})")


def is_out_of_space(err: BaseException) -> bool:
    """True for ENOSPC / EDQUOT anywhere in the exception chain (DCP wraps per-rank errors)."""
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(e)
        for e in exception_chain(err)
    )


class StopRequest:
    """Notes SIGTERM / SIGINT instead of dying, so the loop can save and exit at a step boundary.

    ``with StopRequest() as stop:`` ... every rank passes ``stop.requested`` to the step's
    collective (``ctx.any_rank``), so all ranks stop together. The previous handlers come
    back on exit. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

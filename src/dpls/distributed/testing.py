"""Run a function on N local CPU processes joined by gloo: how the distributed tests run.

`run_workers(fn, world_size, *args)` spawns ``world_size`` processes with torchrun's
environment variables set, so ``fn`` sees exactly what a torchrun-launched trainer sees
(``init_distributed()`` works unchanged). ``fn(*args)`` runs on every rank; rank 0's
return value is returned. A failure on any rank is re-raised here with its traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from dpls.distributed.context import destroy


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # N processes on few cores: oversubscription only slows them down
    try:
        result = fn(*args)
        queue.put((rank, True, result if rank == 0 else None))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        destroy()


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> Any:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return rank 0's result.

    ``fn`` must be importable by name (a module-level function) because the workers are
    spawned, not forked: forking a process that already runs torch threads can deadlock.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world_size:
        if not queue.empty():
            rank, ok, value = queue.get()
            results[rank] = (ok, value)
            if not ok:
                break
            continue
        if time.monotonic() > deadline:
            break
        if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
            time.sleep(0.2)
            if queue.empty():
                break
        time.sleep(0.02)
    for p in procs:
        p.join(timeout=5 if len(results) == world_size else 1)
        if p.is_alive():
            p.kill()
            p.join()
    failed = {r: v for r, (ok, v) in results.items() if not ok}
    if failed:
        rank, tb = min(failed.items())
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(
            f"ranks {missing} of {world_size} gave no result (exit codes {codes}; timeout {timeout_s}s)"
        )
    return results[0][1]

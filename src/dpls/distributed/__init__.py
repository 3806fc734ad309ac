"""Many processes, one model: torchrun context, DDP / FSDP2 wrapping, vocabulary-parallel loss.

See docs/distributed.md for how to launch and what happens on faults.
"""

from __future__ import annotations

from typing import Any

from dpls.distributed.context import DistContext, destroy, init_distributed, launched_by_torchrun
from dpls.distributed.faults import StopRequest, maybe_inject_enospc, maybe_inject_nan
from dpls.distributed.parallel import is_fsdp, no_sync, unwrap, wrap_model

__all__ = [
    "DistContext",
    "StopRequest",
    "destroy",
    "init_distributed",
    "is_fsdp",
    "launched_by_torchrun",
    "maybe_inject_enospc",
    "maybe_inject_nan",
    "no_sync",
    "unwrap",
    "vocab_parallel_dpls_loss",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    # The vocabulary-parallel loss pulls in the loss library; load it on first use.
    if name == "vocab_parallel_dpls_loss":
        from dpls.distributed.vocab_parallel import vocab_parallel_dpls_loss

        return vocab_parallel_dpls_loss
    raise AttributeError(f"module 'dpls.distributed' has no attribute {name!r}")

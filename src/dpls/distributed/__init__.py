"""Many processes, one model: torchrun context, DDP / FSDP2 wrapping, vocabulary-parallel loss.

See docs/distributed.md for how to launch and what happens on faults.
"""

from __future__ import annotations

from dpls.distributed.context import DistContext, destroy, init_distributed, launched_by_torchrun
from dpls.distributed.faults import Faults, StopRequest
from dpls.distributed.parallel import is_fsdp, no_sync, unwrap, wrap_model
from dpls.distributed.vocab_parallel import vocab_parallel_dpls_loss

__all__ = [
    "DistContext",
    "Faults",
    "StopRequest",
    "destroy",
    "init_distributed",
    "is_fsdp",
    "launched_by_torchrun",
    "no_sync",
    "unwrap",
    "vocab_parallel_dpls_loss",
    "wrap_model",
]

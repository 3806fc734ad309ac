"""Performance comparisons, reported as ratios measured in one run (``dpls bench loss|train``).

Contenders are a registry (name → builder of one forward+backward step):
`dpls.bench.loss.register_loss_contender` adds one, and `dpls.bench.contenders_gpu` brings
the GPU kernels (ours, Liger's, Cut Cross-Entropy's when installed). Every implementation in the
loss registry (reference, chunked, triton...) is a contender automatically. Names are imported
on first use (they pull in torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.bench.loss import bench_loss
    from dpls.bench.train import bench_train

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "bench_loss": ".loss",
    "bench_train": ".train",
}

__all__ = ["bench_loss", "bench_train"]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

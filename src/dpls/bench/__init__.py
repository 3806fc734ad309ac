"""Performance comparisons, reported as ratios measured in one run (``dpls bench loss|train``).

Contenders are a registry (name → builder of one forward+backward step), so other modules add
their own without touching this package: a module ``dpls/bench/contenders_<anything>.py`` is
imported by :func:`dpls.bench.loss.load_contenders` and calls
:func:`dpls.bench.loss.register_loss_contender` (e.g. Liger's or Cut Cross-Entropy's kernels
when installed). Every implementation in the loss registry (reference, chunked, triton...) is a
contender automatically.
"""

from __future__ import annotations

__all__ = ["bench_loss", "bench_train"]


def bench_loss(*args, **kwargs):
    from dpls.bench.loss import bench_loss as run

    return run(*args, **kwargs)


def bench_train(*args, **kwargs):
    from dpls.bench.train import bench_train as run  # written alongside the trainer

    return run(*args, **kwargs)

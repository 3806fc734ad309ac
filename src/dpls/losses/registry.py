"""Registry of loss implementations: name → function, plus when it can run.

Every implementation takes the flattened, already validated arguments (docs/ARCHITECTURE.md)::

    fn(logits2d [N, V], target1d [N] int64, epsilon (float | float32 tensor [N]), top_k,
       ignore_index, reduction, return_nll, inplace_backward) -> loss | (loss, nll)

An implementation registered with ``softcap=True`` also takes ``softcap=cap`` (a float > 0, given
only when soft-capping is on) and caps the logits itself, as it reads them; for any other, the
front caps the logits first (``dpls.losses.softcap``).

``impl="auto"`` picks the available implementation with the highest priority for the input's
device and dtype; the GPU kernels are candidates only for CUDA tensors (under TRITON_INTERPRET=1
they also run on the CPU, for tests, but only when named). GPU kernels live in their own modules
and are imported only when a CUDA tensor (or an explicit request) needs them, so
``import dpls.losses`` never imports triton.

The fused-linear entry point has a twin registry (``register_linear_impl``) with signature::

    fn(hidden2d [N, C], weight [V, C], bias [V] | None, target1d [N] int64, epsilon, top_k,
       ignore_index, reduction, return_nll, chunk_size) -> loss | (loss, nll)

(with ``softcap=cap`` likewise, for those registered with ``softcap=True``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

LossImpl = Callable[..., Any]


@dataclass(frozen=True)
class ImplSpec:
    name: str
    fn: LossImpl
    available: Callable[[torch.device], bool]
    priority: int
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every float dtype
    softcap: bool = False  # takes softcap=cap and caps the logits as it reads them

    def runs_on(self, device: torch.device, dtype: torch.dtype | None = None) -> bool:
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            return False
        try:
            return bool(self.available(device))
        except Exception:  # an optional backend that cannot even be probed is simply unavailable
            return False


_IMPLS: dict[str, ImplSpec] = {}
_LINEAR_IMPLS: dict[str, ImplSpec] = {}

# Implementations that live in optional modules: name -> (module, function attribute).
# They are imported on first need (a CUDA input, or an explicit request under TRITON_INTERPRET=1).
_LAZY: dict[str, tuple[str, str]] = {"triton": ("dpls.losses.triton_impl", "triton_dpls_loss")}
_LAZY_LINEAR: dict[str, tuple[str, str]] = {
    "triton": ("dpls.losses.triton_linear", "triton_dpls_linear_loss")
}
_LAZY_PRIORITY = 100
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_lazy_failed: dict[str, str] = {}


def _always(device: torch.device) -> bool:
    return True


def _register(
    table: dict[str, ImplSpec],
    name: str,
    fn: LossImpl,
    available: Callable[[torch.device], bool],
    priority: int,
    dtypes: tuple[torch.dtype, ...] | None,
    softcap: bool,
) -> LossImpl:
    table[name] = ImplSpec(name, fn, available, priority, dtypes, softcap)
    return fn


def register_impl(
    name: str,
    fn: LossImpl,
    *,
    available: Callable[[torch.device], bool] = _always,
    priority: int = 0,
    dtypes: tuple[torch.dtype, ...] | None = None,
    softcap: bool = False,
) -> LossImpl:
    """Make ``fn`` selectable as ``dpls_loss(..., impl=name)``; re-registering a name replaces it.
    ``softcap=True``: ``fn`` takes ``softcap=cap`` and caps the logits itself."""
    return _register(_IMPLS, name, fn, available, priority, dtypes, softcap)


def register_linear_impl(
    name: str,
    fn: LossImpl,
    *,
    available: Callable[[torch.device], bool] = _always,
    priority: int = 0,
    dtypes: tuple[torch.dtype, ...] | None = None,
    softcap: bool = False,
) -> LossImpl:
    """Make ``fn`` selectable as ``dpls_linear_loss(..., impl=name)``; re-registering a name replaces it.
    ``softcap=True``: ``fn`` takes ``softcap=cap`` and caps the logits it forms itself."""
    return _register(_LINEAR_IMPLS, name, fn, available, priority, dtypes, softcap)


def _tables(linear: bool) -> tuple[dict[str, ImplSpec], dict[str, tuple[str, str]]]:
    """(registered, lazily importable) implementations of the plain or the fused-linear loss."""
    return (_LINEAR_IMPLS, _LAZY_LINEAR) if linear else (_IMPLS, _LAZY)


def _failure_key(name: str, linear: bool) -> str:
    return f"linear:{name}" if linear else name


def _load_lazy(name: str, linear: bool) -> None:
    """Import an optional implementation's module and register it (if it did not register itself)."""
    table, lazy = _tables(linear)
    key = _failure_key(name, linear)
    if name in table or name not in lazy or key in _lazy_failed:
        return
    module_name, attr = lazy[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # triton missing, no driver, module not written yet...
        _lazy_failed[key] = f"{type(err).__name__}: {err}"
        return
    if name in table:  # the module registered itself on import
        return
    fn = getattr(module, attr, None)
    if fn is None:
        _lazy_failed[key] = f"{module_name} has no {attr}"
        return
    available = getattr(module, "is_available", _always)
    (register_linear_impl if linear else register_impl)(
        name, fn, available=available, priority=_LAZY_PRIORITY, dtypes=_TRITON_DTYPES, softcap=True
    )


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``): tests only."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def impl_names(linear: bool = False) -> list[str]:
    """Every name ``impl=`` accepts (lazy ones included, whether or not they can run here)."""
    table, lazy = _tables(linear)
    return ["auto", *sorted(set(table) | set(lazy))]


def check_impl_name(impl: str, linear: bool = False) -> None:
    names = impl_names(linear)
    if not isinstance(impl, str) or impl not in names:
        raise ValueError(f"impl must be one of {names}, got {impl!r}")


def resolve_impl(
    impl: str, device: torch.device, dtype: torch.dtype | None = None, *, linear: bool = False
) -> ImplSpec:
    """The implementation ``impl`` names, or for "auto" the best one that runs on ``device``/``dtype``."""
    check_impl_name(impl, linear)
    table, lazy = _tables(linear)
    if impl == "auto":
        # The lazy implementations are GPU kernels: off CUDA they run only under Triton's
        # interpreter, which is for tests and far too slow to be chosen automatically.
        on_gpu = device.type == "cuda"
        if on_gpu:
            for name in lazy:
                _load_lazy(name, linear)
        candidates = [
            s for s in table.values() if (on_gpu or s.name not in lazy) and s.runs_on(device, dtype)
        ]
        if not candidates:
            raise ValueError(f"no loss implementation runs on device {device} with dtype {dtype}")
        return sorted(candidates, key=lambda s: -s.priority)[0]
    if impl in lazy and (device.type == "cuda" or interpreting()):
        _load_lazy(impl, linear)
    spec = table.get(impl)
    if spec is None:
        why = _lazy_failed.get(_failure_key(impl, linear), "it needs a CUDA device (or TRITON_INTERPRET=1)")
        raise ValueError(f"impl={impl!r} is not available here: {why}")
    if not spec.runs_on(device, dtype):
        raise ValueError(f"impl={impl!r} does not run on device {device} with dtype {dtype}")
    return spec


def available_impls(device: torch.device | str = "cpu", *, linear: bool = False) -> list[str]:
    """Names of the implementations that can run on ``device`` now (importing lazy ones if needed)."""
    device = torch.device(device)
    table, lazy = _tables(linear)
    if device.type == "cuda" or interpreting():
        for name in lazy:
            _load_lazy(name, linear)
    return sorted(s.name for s in table.values() if s.runs_on(device))

"""The compiled CPU top-k search (``cpu_top_k.c``): built at first use, loaded with ctypes.

Why C: on CPU, finding the ``k`` largest of each row with NumPy takes several full passes over
the logits (strip maxima, a comparison, a scan for its hits), each a round trip through memory.
The C kernel visits each row once while it sits in the core's cache, which is what brings a
DPLS training step to the speed of a cross-entropy step (benchmarks/RESULTS.md).

The library is compiled with the system C compiler (``$CC``, else Python's own, else ``cc``)
into ``$DPLS_CACHE_DIR`` (default ``~/.cache/dpls``), named by a hash of the source, the
compiler and the platform, so a changed source or another machine never loads a stale build;
a compiled file is written under a temporary name and renamed, so concurrent processes never
see half of one. Beside it, ``<name>.so.json`` records its size and SHA-256: a cached library
is loaded only when it matches (a truncated or replaced file would crash the process inside
``dlopen`` or at the first call, with no Python error to catch), and is rebuilt otherwise.
Without a compiler, with ``DPLS_CPU_KERNEL=0``, or when the library cannot be built or lacks
its function, :func:`load` returns None (with a warning) and the loss uses the NumPy search,
which computes the same thing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dpls._io import write_json_atomic

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_top_k.c")
STRIPS = 8  # the kernel's strip count (``#define STRIPS`` in the source): it needs V // STRIPS ≥ k + 1
FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpls"
    return Path(os.environ.get("DPLS_CACHE_DIR") or default) / "kernels"


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, Python's build compiler, or ``cc``; None if none is found."""
    for cmd in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        words = shlex.split(cmd) if cmd else []
        if words and shutil.which(words[0]):
            return words
    return None


def _signature(path: str | Path) -> dict[str, Any]:
    """Size and SHA-256 of a built library: what its sidecar records and a load checks."""
    data = Path(path).read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def verified(path: Path) -> bool:
    """``path`` is a library this module built, unchanged since (its sidecar says so)."""
    try:
        return json.loads(sidecar(path).read_text()) == _signature(path)
    except (OSError, ValueError):
        return False


def build(cc: list[str], out_dir: Path) -> Path:
    """Compile the kernel (once per source, compiler and platform) and return the library's path.

    A cached library whose size or hash differs from its sidecar (truncated, replaced, or
    built before sidecars existed) is built again."""
    tag = "\0".join([SOURCE.read_text(), " ".join(cc + FLAGS), platform.platform(), platform.machine()])
    path = out_dir / f"cpu_top_k-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.so"
    if verified(path):
        return path
    if path.exists():  # no record: built by an older dpls; a record that differs: damaged
        level = logging.WARNING if sidecar(path).exists() else logging.INFO
        log.log(level, "the cached CPU top-k kernel %s does not match its record; building it again", path)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [*cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120
        )
        write_json_atomic(sidecar(path), _signature(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_status = "not loaded yet"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, or the build failed: logged)."""
    global _status
    if os.environ.get("DPLS_CPU_KERNEL", "1") == "0":
        _status = "NumPy (DPLS_CPU_KERNEL=0)"
        return None
    cc = compiler()
    if cc is None:
        _status = "NumPy (no C compiler found)"
        log.info("no C compiler found: the CPU top-k search uses NumPy")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc, cache_dir())))
        fn = lib.dpls_top_k_rows
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        detail = getattr(err, "stderr", "") or err
        _status = f"NumPy (the C kernel did not build with {cc[0]})"
        log.warning("the CPU top-k kernel could not be built or loaded (%s); using NumPy", detail)
        return None
    _status = f"C kernel (built with {cc[0]})"
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    fn.restype = i64
    return lib


def describe() -> str:
    """Which CPU top-k search the loss uses here, for benchmark headers."""
    load()
    return _status


def top_k_rows(
    z: np.ndarray, k: int, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(cols [rows, k], spread [rows] float64, peak [rows] float32, exact [rows] bool)`` for a
    contiguous float32 ``[rows, V]`` array with ``V // STRIPS ≥ k + 1`` (see ``cpu_top_k.c``), or
    None when the kernel is not available. Rows with ``exact`` set need the exact path; their
    other outputs are unspecified."""
    lib = load()
    if lib is None:
        return None
    rows, v = z.shape
    if v // STRIPS < k + 1 or z.dtype != np.float32 or not z.flags.c_contiguous:
        raise ValueError(
            f"the kernel needs contiguous float32 rows with V // {STRIPS} ≥ k + 1, got {z.dtype} {z.shape}, k = {k}"
        )
    cols = np.empty((rows, k), dtype=np.int64)
    spread = np.empty(rows, dtype=np.float64)
    peak = np.empty(rows, dtype=np.float32)
    exact = np.empty(rows, dtype=np.uint8)
    outputs = (cols.ctypes.data, spread.ctypes.data, peak.ctypes.data, exact.ctypes.data)
    # ctypes releases the GIL for the call: the chunk threads run it in parallel
    done = lib.dpls_top_k_rows(z.ctypes.data, rows, v, k, cap, *outputs)
    if done < 0:
        raise MemoryError("the CPU top-k kernel could not allocate its scratch memory")
    return cols, spread, peak, exact.view(bool)

"""Building and loading the compiled CPU top-k search (``dpls.losses.cpu_kernel``): cached by
source, compiler and platform; disabled by ``DPLS_CPU_KERNEL=0``; without a compiler, or when the
build fails, the loss takes the NumPy search and still computes the definition."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch

import dpls.losses.chunked as chunked
from dpls.losses import cpu_kernel, dpls_loss
from loss_reference import reference_dpls


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """``load`` forgets its cached answer before and after the test; builds go to a tmp dir."""
    monkeypatch.setenv("DPLS_CACHE_DIR", str(tmp_path))
    cpu_kernel.load.cache_clear()
    yield tmp_path
    cpu_kernel.load.cache_clear()


def _needs_compiler(tmp_path) -> list[str]:
    """The compiler, where it can build a shared library at all (else this machine runs NumPy)."""
    cc = cpu_kernel.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine: the NumPy search is what runs here")
    probe = tmp_path / "probe.c"
    probe.write_text("#include <math.h>\nint probe(void) { return isnan(0.0); }\n")
    built = subprocess.run(
        [*cc, *cpu_kernel.FLAGS, str(probe), "-o", str(tmp_path / "probe.so")], capture_output=True
    )
    if built.returncode != 0:
        pytest.skip(f"{cc[0]} cannot build a shared library here: the NumPy search is what runs here")
    return cc


def test_a_build_is_reused_and_a_changed_source_is_rebuilt(tmp_path, monkeypatch):
    cc = _needs_compiler(tmp_path)
    source = tmp_path / "cpu_top_k.c"
    shutil.copy(cpu_kernel.SOURCE, source)
    monkeypatch.setattr(cpu_kernel, "SOURCE", source)
    first = cpu_kernel.build(cc, tmp_path / "out")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(cc, tmp_path / "out") == first
    assert first.stat().st_mtime_ns == stamp  # not compiled again
    source.write_text(source.read_text() + "\n/* changed */\n")
    second = cpu_kernel.build(cc, tmp_path / "out")
    assert second != first and second.exists()
    assert not list((tmp_path / "out").glob("*.tmp"))  # no half-written files left behind


def test_the_kernel_loads_where_a_compiler_exists(fresh_load, tmp_path):
    cc = _needs_compiler(tmp_path)
    assert cpu_kernel.load() is not None, "a working C compiler is here, so the kernel must build"
    assert cpu_kernel.describe() == f"C kernel (built with {cc[0]})"
    assert list(fresh_load.glob("kernels/cpu_top_k-*.so"))


def _loss_is_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 4096, generator=g) * 3
    y = torch.randint(0, 4096, (20,), generator=g)
    want, _, want_grad = reference_dpls(z, y, epsilon=0.1, top_k=50, reduction="mean")
    x = z.clone().requires_grad_()
    loss = dpls_loss(x, y, epsilon=0.1, top_k=50, impl="chunked")
    loss.backward()
    assert abs(loss.item() - float(want)) <= 1e-6 * abs(float(want))
    assert (x.grad.double() - want_grad).abs().max() <= 1e-7


def test_disabled_by_the_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("DPLS_CPU_KERNEL", "0")
    assert cpu_kernel.load() is None
    assert cpu_kernel.describe() == "NumPy (DPLS_CPU_KERNEL=0)"
    assert cpu_kernel.top_k_rows(np.zeros((2, 1024), np.float32), 3, 16) is None
    _loss_is_the_definition()


def test_without_a_compiler_the_numpy_search_runs(fresh_load, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
    assert cpu_kernel.load() is None
    assert cpu_kernel.describe() == "NumPy (no C compiler found)"
    _loss_is_the_definition()


def test_a_failed_build_is_logged_and_the_numpy_search_runs(fresh_load, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: ["false"])  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert cpu_kernel.load() is None
    assert "could not be built" in caplog.text
    assert cpu_kernel.describe().startswith("NumPy (the C kernel did not build")
    _loss_is_the_definition()


def test_float64_and_strided_chunks_take_the_numpy_search(monkeypatch):
    calls = []
    real = chunked.numpy_top_k_rows
    monkeypatch.setattr(chunked, "numpy_top_k_rows", lambda *a: calls.append(a[0].dtype) or real(*a))
    z = torch.randn(4, 2048, dtype=torch.float64)
    assert chunked.strip_search(z, 10) is not None
    assert chunked.strip_search(torch.randn(4, 4096)[:, ::2], 10) is not None
    assert calls == [torch.float64, torch.float32]


def test_the_kernel_refuses_inputs_outside_its_precondition(fresh_load, tmp_path):
    _needs_compiler(tmp_path)
    z = np.zeros((2, 1024), np.float32)
    with pytest.raises(ValueError, match="V // 8"):
        cpu_kernel.top_k_rows(z, 1024 // 8, 1000)  # k + 1 strip maxima cannot exist
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_kernel.top_k_rows(np.zeros((2, 2048), np.float32)[:, ::2], 3, 16)


def _built(cc, folder):
    """The kernel built into ``folder``, and its bytes."""
    path = cpu_kernel.build(cc, folder)
    return path, path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "no record"])
def test_a_damaged_cached_library_is_rebuilt_before_it_is_loaded(fresh_load, tmp_path, damage):
    """Loading a truncated library crashes the process (a bus error inside dlopen): the cache
    is checked against the size and hash recorded at build time, and rebuilt on any doubt."""
    cc = _needs_compiler(tmp_path)
    folder = fresh_load / "kernels"
    path, good = _built(cc, folder)
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(good)))
    else:
        cpu_kernel.sidecar(path).unlink()
    assert not cpu_kernel.verified(path)
    assert cpu_kernel.build(cc, folder) == path
    assert cpu_kernel.verified(path) and path.stat().st_size == len(good)
    assert cpu_kernel.load() is not None  # checked above: only a verified file reaches dlopen
    _loss_is_the_definition()


def test_a_library_without_the_kernel_function_falls_back_to_numpy(fresh_load, tmp_path, caplog):
    """A valid shared library under the kernel's name whose record matches (forged), but without
    ``dpls_top_k_rows``: a warning and the NumPy search, never an AttributeError."""
    cc = _needs_compiler(tmp_path)
    path, _ = _built(cc, fresh_load / "kernels")
    other = tmp_path / "other.c"
    other.write_text("int other(void) { return 1; }\n")
    subprocess.run([*cc, *cpu_kernel.FLAGS, str(other), "-o", str(path)], check=True, capture_output=True)
    cpu_kernel.sidecar(path).write_text(json.dumps(cpu_kernel._signature(path)))
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert cpu_kernel.load() is None
    assert "dpls_top_k_rows" in caplog.text
    _loss_is_the_definition()

"""Repository hygiene: every source file is seen by the linter and by pytest's collection."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return str(exe)
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; `make test` installs it with the test extra")
    return found


@pytest.mark.parametrize("folder", ["src", "tests"])
def test_linter_sees_every_python_file(folder: str) -> None:
    out = subprocess.run(
        [_ruff(), "check", "--show-files", folder], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    seen = {Path(line.strip()).resolve() for line in out.splitlines() if line.strip().endswith(".py")}
    every = {p.resolve() for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    missed = sorted(str(p.relative_to(ROOT)) for p in every - seen)
    assert not missed, f"ruff does not check these files (an excluded folder name?): {missed}"


def test_pytest_collects_every_test_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    every = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    missed = sorted(every - collected)
    assert not missed, f"pytest does not collect these test files: {missed}"

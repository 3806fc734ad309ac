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


def _lazy_packages() -> list[Path]:
    src = ROOT / "src" / "dpls"
    return sorted(p for p in src.rglob("__init__.py") if "lazy_exports(globals()" in p.read_text())


@pytest.mark.parametrize("init", _lazy_packages(), ids=lambda p: str(p.parent.relative_to(ROOT / "src")))
def test_lazy_exports_match_their_type_checking_imports(init: Path) -> None:
    """One lazy-export style: the names a type checker sees (the ``if TYPE_CHECKING:`` imports),
    ``__all__`` and the runtime table agree, and every name imports from the module it names."""
    import ast
    import importlib
    from importlib.util import resolve_name

    package = ".".join(init.parent.relative_to(ROOT / "src").parts)
    module = importlib.import_module(package)
    tree = ast.parse(init.read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1, f"{package}: expected one `if TYPE_CHECKING:` block"
    seen = {
        alias.asname or alias.name: node.module
        for node in blocks[0].body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    runtime = {name: resolve_name(where, package) for name, where in module._EXPORTS.items()}
    assert seen == runtime, f"{package}: TYPE_CHECKING imports and _EXPORTS differ"
    assert set(module.__all__) - {"__version__"} == set(runtime), f"{package}: __all__ and _EXPORTS differ"
    submodules = {p.stem for p in init.parent.glob("*.py")} | {
        p.parent.name for p in init.parent.glob("*/__init__.py")
    }
    shadowed = sorted(set(runtime) & submodules)  # importing the submodule would replace the export
    assert not shadowed, f"{package}: exports named like a submodule: {shadowed}"
    for name, where in runtime.items():
        assert getattr(module, name) is getattr(importlib.import_module(where), name)


def test_the_version_is_written_once() -> None:
    """pyproject.toml takes the version from ``dpls.__version__`` (setuptools' dynamic version)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dpls.__version__"}

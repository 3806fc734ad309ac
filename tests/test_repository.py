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


# -- the shape of the code: functions a reader can hold in mind, imports at the top ------------------

MAX_FUNCTION_LINES = 80
# The Triton kernels are exempt: a kernel is one launch, its passes written out.
LONG_FUNCTIONS_ALLOWED = {"src/dpls/losses/_triton_kernels.py"}


def _source_shapes() -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """Over src/: every function over MAX_FUNCTION_LINES as
    ``(path:name, length)``, every import statement and the imports inside functions (``path:line``)."""
    import ast

    long: list[tuple[str, int]] = []
    imports: list[str] = []
    inner: set[str] = set()
    for path in sorted((ROOT / "src").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append((f"{rel}:{node.name}", length))
                inner |= {
                    f"{rel}:{n.lineno}" for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)
                }
            if isinstance(node, ast.Import | ast.ImportFrom):
                imports.append(f"{rel}:{node.lineno}")
    return long, imports, sorted(inner)


def test_no_function_is_longer_than_80_lines() -> None:
    long, _, _ = _source_shapes()
    found = [f"{name} ({n} lines)" for name, n in long if name.split(":")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert not found, f"split these into named steps: {found}"


def test_imports_are_at_the_top_of_modules() -> None:
    """At most 10% of import statements sit inside functions: optional dependencies, heavy libraries
    a light module must not load (``import dpls``, reading a config) and each CLI command's library."""
    _, imports, inner = _source_shapes()
    assert len(inner) <= 0.10 * len(imports), (
        f"{len(inner)} of {len(imports)} imports inside functions: {inner}"
    )


def _calls(name: str) -> list[tuple[str, str]]:
    """(file, source of the call) for every call of ``name`` in src/dpls."""
    import ast

    found = []
    for path in sorted((ROOT / "src" / "dpls").rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.append((str(path.relative_to(ROOT)), ast.get_source_segment(text, node) or ""))
    return found


def test_every_progress_bar_stays_off_when_stderr_is_not_a_terminal() -> None:
    """A log file must not fill with carriage returns: every tqdm bar is built with
    ``disable=None`` when progress is asked for (tqdm's "only on a terminal")."""
    bars = _calls("tqdm")
    assert bars, "no tqdm call found: the scan is broken"
    wrong = [(f, call) for f, call in bars if "disable=None if" not in call]
    assert not wrong, f"progress bars drawn even when stderr is not a terminal: {wrong}"


def test_every_figure_is_written_through_save_figure() -> None:
    """Figures are recorded as dpls's before they appear (`dpls._io.owned_output`), so a kill
    mid-write never leaves a PNG that a rerun takes for the user's: one writer does it."""
    writers = {f for f, _ in _calls("savefig")}
    assert writers == {"src/dpls/eval/plots.py"}, writers

"""Lazy public names for a package: each is imported from its module on first use.

Packages whose modules pull in heavy libraries (torch.distributed, transformers, matplotlib)
re-export their names through this, so that ``import dpls`` and reading a config stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level ``__getattr__`` and ``__dir__`` (PEP 562).

    ``namespace`` is the package's ``globals()``; ``exports`` maps each public name to the
    module that defines it, relative to the package (``".metrics"``). A name is imported
    once and then cached in ``namespace``; ``dir()`` lists the package's ``__all__``.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__

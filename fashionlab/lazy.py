"""Packages whose public names load on first use (PEP 562): importing the package, or one of
its submodules (which imports the package first), costs nothing until a name is asked for.

What each package keeps off start-up: `fashionlab` torch, matplotlib and Optuna for the
command line; `fashionlab.study` matplotlib in every worker process; the MLflow integration
MLflow itself in every study and search that logs nowhere.

    __getattr__, __dir__ = lazy_exports(__name__, {"run_study": "run", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose public names live in its
    submodules: `exports` maps each name to the submodule (relative to the package) that
    defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__

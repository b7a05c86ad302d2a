"""Names a package exports but imports only on first use (so ``import pipeline.refine`` does not load torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``where[name]`` (a module path) on first use.

    Example, in a stage package's ``__init__``:
    ``__getattr__ = lazy_attributes(__name__, {"run": "pipeline.fuse.stage"})``.
    """

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

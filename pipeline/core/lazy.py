"""Names a package exports but imports only on first use (so ``import pipeline.refine`` does not load torch)."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
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


def import_in_background(modules: Iterable[str]) -> threading.Thread | None:
    """Import ``modules`` in a daemon thread and return it (None: nothing to import).

    For libraries that take a second to load (Open3D, trimesh): a run loads the
    later stages' modules while an earlier stage leaves a core idle (COLMAP's
    single-threaded mapping), instead of when each stage starts. An import that
    fails here is left to the stage's own import, which reports it. Callers
    join the thread before importing anything themselves (two threads
    importing modules that import each other can see a half-loaded module).
    """
    names = list(dict.fromkeys(modules))
    if not names:
        return None

    def load() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the stage's own import reports it
                pass

    thread = threading.Thread(target=load, name="recon-preload", daemon=True)
    thread.start()
    return thread

"""The sfm stage: photos (or a user's COLMAP model) → undistorted, normalized sparse model (pycolmap).

``SfmConfig`` (settings), ``run`` (the stage), ``map_once`` (one incremental mapping of a feature database).
"""

from __future__ import annotations

import importlib

from pipeline.sfm.config import SfmConfig

__all__ = ['SfmConfig', 'run', 'map_once']

_LAZY = {'run': 'pipeline.sfm.stage', 'map_once': 'pipeline.sfm.stage'}


def __getattr__(name: str):
    """The heavy names (``run``, ``map_once``) are imported on first use, so loading the config stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

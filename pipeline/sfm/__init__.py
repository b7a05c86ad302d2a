"""The sfm stage: photos (or a user"s COLMAP model) → undistorted, normalized sparse model (pycolmap).

``SfmConfig`` (settings), ``run`` (the stage), ``map_once`` (one incremental mapping of a feature database).
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_attributes
from pipeline.sfm.config import SfmConfig

__all__ = ["SfmConfig", "run", "map_once"]

_LAZY = {"run": "pipeline.sfm.stage", "map_once": "pipeline.sfm.stage"}

__getattr__ = lazy_attributes(__name__, _LAZY)
"""``run`` and the core function are imported on first use, so loading the config stays light."""

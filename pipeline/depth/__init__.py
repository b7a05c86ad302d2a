"""The depth stage: an initial depth map per view (plane sweep, user priors or a TorchScript model), anchored to the
sparse points.

``DepthConfig`` and ``MvsConfig`` (settings), ``run`` (the stage), ``compute_depth_maps`` (the work, without the stage
plumbing).
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_attributes
from pipeline.depth.config import DepthConfig, MvsConfig

__all__ = ["DepthConfig", "MvsConfig", "run", "compute_depth_maps"]

_LAZY = {"run": "pipeline.depth.stage", "compute_depth_maps": "pipeline.depth.stage"}

__getattr__ = lazy_attributes(__name__, _LAZY)
"""``run`` and the core function are imported on first use, so loading the config stays light."""

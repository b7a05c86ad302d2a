"""The refine stage: multiview, anchoring, smoothness and photometric losses on a δz pyramid, then an acceptance gate.

``RefineConfig`` (settings), ``run`` (the stage), ``refine_depth_maps`` (the optimisation on in-memory maps).
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_attributes
from pipeline.refine.config import RefineConfig

__all__ = ["RefineConfig", "run", "refine_depth_maps"]

_LAZY = {"run": "pipeline.refine.stage", "refine_depth_maps": "pipeline.refine.stage"}

__getattr__ = lazy_attributes(__name__, _LAZY)
"""``run`` and the core function are imported on first use, so loading the config stays light."""

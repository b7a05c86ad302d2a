"""The refine stage: multiview, anchoring, smoothness and photometric losses on a δz pyramid, then an acceptance gate.

``RefineConfig`` (settings), ``run`` (the stage), ``refine_depth_maps`` (the optimisation on in-memory maps).
"""

from __future__ import annotations

import importlib

from pipeline.refine.config import RefineConfig

__all__ = ['RefineConfig', 'run', 'refine_depth_maps']

_LAZY = {'run': 'pipeline.refine.stage', 'refine_depth_maps': 'pipeline.refine.stage'}


def __getattr__(name: str):
    """The heavy names (``run``, ``refine_depth_maps``) are imported on first use, so loading the config stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The depth stage: an initial depth map per view (plane sweep, user priors or a TorchScript model), anchored to the sparse points.

``DepthConfig`` and ``MvsConfig`` (settings), ``run`` (the stage), ``compute_depth_maps`` (the work, without the stage plumbing).
"""

from __future__ import annotations

import importlib

from pipeline.depth.config import DepthConfig, MvsConfig

__all__ = ['DepthConfig', 'MvsConfig', 'run', 'compute_depth_maps']

_LAZY = {'run': 'pipeline.depth.stage', 'compute_depth_maps': 'pipeline.depth.stage'}


def __getattr__(name: str):
    """The heavy names (``run``, ``compute_depth_maps``) are imported on first use, so loading the config stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

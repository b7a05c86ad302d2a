"""The fuse stage: TSDF fusion of the depth maps into a cleaned, vertex-coloured mesh (Open3D).

``FuseConfig`` (settings), ``run`` (the stage), ``fuse_depth_maps`` (fusion of in-memory frames).
"""

from __future__ import annotations

import importlib

from pipeline.fuse.config import FuseConfig

__all__ = ['FuseConfig', 'run', 'fuse_depth_maps']

_LAZY = {'run': 'pipeline.fuse.stage', 'fuse_depth_maps': 'pipeline.fuse.tsdf'}


def __getattr__(name: str):
    """The heavy names (``run``, ``fuse_depth_maps``) are imported on first use, so loading the config stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The fuse stage: TSDF fusion of the depth maps into a cleaned, vertex-coloured mesh (Open3D).

``FuseConfig`` (settings), ``run`` (the stage), ``fuse_depth_maps`` (fusion of in-memory frames).
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_attributes
from pipeline.fuse.config import FuseConfig

__all__ = ["FuseConfig", "run", "fuse_depth_maps"]

_LAZY = {"run": "pipeline.fuse.stage", "fuse_depth_maps": "pipeline.fuse.tsdf"}

__getattr__ = lazy_attributes(__name__, _LAZY)
"""``run`` and the core function are imported on first use, so loading the config stays light."""

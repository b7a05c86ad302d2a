"""The export stage: the mesh in the photos" frame as GLB/PLY/OBJ, with the cameras.

``ExportConfig`` (settings), ``run`` (the stage), ``export_mesh_files`` (export of one mesh file).
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_attributes
from pipeline.export.config import ExportConfig

__all__ = ["ExportConfig", "run", "export_mesh_files"]

_LAZY = {"run": "pipeline.export.stage", "export_mesh_files": "pipeline.export.stage"}

__getattr__ = lazy_attributes(__name__, _LAZY)
"""``run`` and the core function are imported on first use, so loading the config stays light."""

"""The export stage: the mesh in the photos' frame as GLB/PLY/OBJ, with the cameras.

``ExportConfig`` (settings), ``run`` (the stage), ``export_mesh_files`` (export of one mesh file).
"""

from __future__ import annotations

import importlib

from pipeline.export.config import ExportConfig

__all__ = ['ExportConfig', 'run', 'export_mesh_files']

_LAZY = {'run': 'pipeline.export.stage', 'export_mesh_files': 'pipeline.export.stage'}


def __getattr__(name: str):
    """The heavy names (``run``, ``export_mesh_files``) are imported on first use, so loading the config stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

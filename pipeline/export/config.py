"""Settings of the export stage (mesh formats, decimation, frame); light to import: checked when the config loads."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.core.settings import at_least, setting


class MeshFormat(str, enum.Enum):
    ply = "ply"
    obj = "obj"
    glb = "glb"
    stl = "stl"


class ExportFrame(str, enum.Enum):
    normalized = "normalized"
    """The frame of ``OUT/mesh.ply`` and ``OUT/sparse`` (median sparse-point depth 1)."""
    sfm = "sfm"
    """The original SfM (COLMAP mapper / user model) frame."""


@dataclass(kw_only=True)
class ExportConfig:
    formats: tuple[MeshFormat, ...] = setting(
        (MeshFormat.glb,), "Mesh formats written as OUT/export/mesh.<format>: any of ply, obj, glb, stl (mesh.glb is "
        "always written and published as OUT/mesh.glb).")
    decimate: int = setting(
        0, "Target triangle count for quadric decimation of the exported meshes (0: keep every triangle).",
        check=at_least(0))
    frame: ExportFrame = setting(
        ExportFrame.normalized, "Frame of the exported meshes and cameras: normalized (that of OUT/mesh.ply and "
        "OUT/sparse) or sfm (the original SfM frame).")

"""export stage: meshes for downstream tools through trimesh (PLY, OBJ, GLB, STL)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StageNotImplemented
from pipeline.settings import setting
from pipeline.stage import StageContext


@dataclass(kw_only=True)
class ExportConfig:
    formats: tuple[str, ...] = setting(("glb",), "Extra mesh formats written next to OUT/mesh.ply: any of ply, obj, glb, stl.")


def run(ctx: StageContext) -> None:
    raise StageNotImplemented("the export stage is not implemented yet")

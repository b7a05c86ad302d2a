"""Settings of the export stage (formats, decimation, texture, frame); light to import, checked at config load."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.core.settings import Check, at_least, between, or_automatic, setting


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


class DecimationMethod(str, enum.Enum):
    fast = "fast"
    """fast-simplification (quadric edge collapse, borders kept, no flipped faces): about 1 s per million faces."""
    open3d = "open3d"
    """Open3D's quadric decimation (Garland-Heckbert) with a high boundary weight: tens of seconds."""


class ChartMethod(str, enum.Enum):
    views = "views"
    """Charts are the patches of faces textured from one photo, at the photo's resolution; xatlas packs them."""
    xatlas = "xatlas"
    """xatlas cuts and parameterizes the mesh itself (slow: about 86 s for 200 k faces on 2 cores)."""


class TextureFormat(str, enum.Enum):
    png = "png"
    jpeg = "jpeg"


def _atlas_side() -> Check:
    return Check("a multiple of 64 between 256 and 16384", lambda v: 256 <= v <= 16384 and v % 64 == 0)


@dataclass(kw_only=True)
class ExportConfig:
    formats: tuple[MeshFormat, ...] = setting(
        (MeshFormat.glb,), "Mesh formats written as OUT/export/mesh.<format>: any of ply, obj, glb, stl (mesh.glb is "
        "always written and published as OUT/mesh.glb).")
    target_faces: int | None = setting(
        200_000, "Triangle count the exported meshes are decimated to (null: keep every triangle of OUT/mesh.ply).",
        check=or_automatic(at_least(1)))
    target_ratio: float | None = setting(
        None, "Fraction of OUT/mesh.ply's triangles the exported meshes keep, e.g. 0.1 (null: no relative target; "
        "with target_faces the smaller count wins).", check=or_automatic(between(0.0, 1.0, open_low=True)))
    decimation: DecimationMethod = setting(
        DecimationMethod.fast, "Decimation library: fast (fast-simplification) or open3d.")
    textured: bool = setting(
        True, "Bake a texture from the photos into the GLB and OBJ exports (false: per-vertex colours).")
    texture_size: int | None = setting(
        None, "Texture atlas side in texels (null: from the photos' resolution, up to texture_max_size).",
        check=or_automatic(_atlas_side()))
    texture_max_size: int = setting(
        8192, "Largest automatic texture atlas side in texels.", check=_atlas_side())
    texels_per_pixel: float = setting(
        1.5, "Texel density of the automatic texture size, in texels per photo pixel (linear).",
        check=between(0.25, 4.0))
    texture_smoothness: float = setting(
        1.0, "Cost of a neighbouring face textured from another photo, relative to the view-quality cost in [0, 1] "
        "(higher: fewer, larger charts).", check=at_least(0.0))
    texture_charts: ChartMethod = setting(
        ChartMethod.views, "UV charts: views (photo patches packed by xatlas) or xatlas (xatlas charts, slow).")
    texture_format: TextureFormat = setting(
        TextureFormat.png, "Texture image format: png (lossless) or jpeg (smaller files).")
    level_exposure: bool = setting(
        True, "Level exposure differences between photos with per-photo colour gains before baking.")
    frame: ExportFrame = setting(
        ExportFrame.normalized, "Frame of the exported meshes and cameras: normalized (that of OUT/mesh.ply and "
        "OUT/sparse) or sfm (the original SfM frame).")

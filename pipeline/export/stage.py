"""export stage: meshes for downstream tools (PLY, OBJ, GLB, STL), decimated and textured, with the cameras.

Reads the fused mesh (``OUT/fuse/mesh.ply``, normalized frame, every triangle,
per-vertex colour) and the undistorted photos, and writes into ``OUT/export/``:

* ``mesh.glb`` always (published as ``OUT/mesh.glb``), plus ``mesh.<format>``
  for every format in ``formats``; the meshes are decimated to
  ``target_faces`` / ``target_ratio`` (:mod:`pipeline.export.decimate`) and, with
  ``textured``, GLB and OBJ carry a texture baked from the photos
  (:mod:`pipeline.export.texture`; OBJ with ``mesh.mtl`` and ``mesh_texture.png``);
  PLY and STL stay vertex-coloured / geometry only (:mod:`pipeline.export.mesh_files`);
* ``sparse/``: the cameras as a COLMAP binary model in the frame of the meshes;
* ``transform.json``: which frame the files are in, the similarity
  ``sfm_from_normalized`` (the inverse of ``normalized_from_sfm``) that takes
  the normalized frame back to the original SfM frame, and what was done
  (decimation, texture size).

``recon export OUT [--format ...] [--target-faces N] [--textured/--no-textured] [--frame normalized|sfm]``
calls :func:`export_outputs`; it writes into ``OUT/exports/`` (not a stage
folder, so the cached stages stay valid).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.cache import atomic_dir, write_json_atomic
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.io import View, load_sfm_scene
from pipeline.core.workspace import Workspace
from pipeline.export.config import (
    ChartMethod,
    DecimationMethod,
    ExportConfig,
    ExportFrame,
    MeshFormat,
    TextureFormat,
)
from pipeline.export.decimate import decimate_arrays, target_face_count, transfer_vertex_colors
from pipeline.export.mesh_files import write_colored_mesh, write_textured_mesh
from pipeline.export.texture import Progress, TextureSettings, texture_mesh

TEXTURED_FORMATS = (MeshFormat.glb, MeshFormat.obj)
"""Formats that carry a texture; PLY and STL stay vertex-coloured / geometry only."""

logger = logging.getLogger(__name__)


STAGE_FILE_STEM = "mesh"
"""Exported meshes are ``<folder>/mesh.<format>``."""


def export_mesh_path(folder: Path, fmt: MeshFormat | str) -> Path:
    """``folder/mesh.<format>``."""
    return Path(folder) / f"{STAGE_FILE_STEM}.{MeshFormat(fmt).value}"


def export_sparse_dir(folder: Path) -> Path:
    """``folder/sparse``: the cameras in the frame of the exported meshes."""
    return Path(folder) / "sparse"


def export_transform_path(folder: Path) -> Path:
    return Path(folder) / "transform.json"


def cli_exports_dir(ws: Workspace) -> Path:
    """Where ``recon export`` writes by default: ``OUT/exports`` (outside every stage folder)."""
    return ws.out_dir / "exports"


# ---- transforms ---------------------------------------------------------------------------


def invert_similarity(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 similarity ``x -> s R x + t``: ``x -> (1/s) R^T (x - t)``."""
    T = np.asarray(T, dtype=np.float64)
    sR = T[:3, :3]
    s = float(np.cbrt(np.linalg.det(sR)))
    if not s > 0:
        raise ReconError("the normalization transform is not a similarity (non-positive scale); re-run sfm")
    out = np.eye(4)
    out[:3, :3] = sR.T / s**2
    out[:3, 3] = -out[:3, :3] @ T[:3, 3]
    return out


def read_normalized_from_sfm(path: Path) -> np.ndarray:
    """The 4x4 ``normalized_from_sfm`` of ``OUT/sfm/normalization.json``."""
    if not Path(path).is_file():
        raise ReconError(f"{path}: no normalization transform; re-run `recon stage sfm` (needed for --frame sfm)")
    try:
        T = np.asarray(json.loads(Path(path).read_text())["normalized_from_sfm"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReconError(f"{path}: unreadable normalization transform ({exc}); re-run `recon stage sfm`") from exc
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise ReconError(f"{path}: normalized_from_sfm must be a finite 4x4 matrix; re-run `recon stage sfm`")
    return T


# ---- meshes -------------------------------------------------------------------------------


def load_trimesh(path: Path):
    """A coloured PLY (or any trimesh-readable mesh) as ``trimesh.Trimesh``, vertices kept as stored."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise ReconError(f"{path}: mesh not found; run `recon stage fuse` first")
    mesh = _read_ply_open3d(path) if path.suffix.lower() == ".ply" else None
    if mesh is not None:
        return mesh
    try:
        mesh = trimesh.load(str(path), process=False, force="mesh")
    except Exception as exc:  # noqa: BLE001 - trimesh raises many types for bad files
        raise ReconError(f"{path}: cannot read the mesh ({exc}); re-run `recon stage fuse`") from exc
    if len(mesh.faces) == 0:
        raise ReconError(f"{path}: the mesh has no triangles; re-run `recon stage fuse`")
    return mesh


def _read_ply_open3d(path: Path):
    """A triangle PLY (the fuse stage's) read by Open3D's C++ reader as ``trimesh.Trimesh``: the same vertices, faces,
    8-bit colours and normals as ``trimesh.load``, several times faster (0.15 s against 0.8 s for 1 M triangles).

    None unless Open3D read every vertex and triangle the header announces (a point cloud, polygons, a truncated
    or broken file): the caller falls back to trimesh, whose error names the problem.
    """
    import open3d as o3d
    import trimesh

    from pipeline.core.native_output import quiet_native

    try:
        with open(path, "rb") as file:
            header = file.read(4096).split(b"end_header", 1)[0]
    except OSError:
        return None
    counts = dict(re.findall(rb"^element (vertex|face) (\d+)", header, flags=re.M))
    if not header.startswith(b"ply") or len(counts) != 2:
        return None
    with quiet_native():  # RPly prints its complaints; trimesh's error says what is wrong
        read = o3d.io.read_triangle_mesh(str(path))
    if len(read.vertices) != int(counts[b"vertex"]) or len(read.triangles) != int(counts[b"face"]) or not len(
            read.triangles):
        return None
    colors = np.round(np.asarray(read.vertex_colors) * 255.0).astype(np.uint8) if read.has_vertex_colors() else None
    return trimesh.Trimesh(np.asarray(read.vertices), np.asarray(read.triangles, dtype=np.int64),
                           vertex_colors=colors, process=False)  # normals: from the faces, as trimesh.load gives them


def vertex_colors_rgb(mesh) -> np.ndarray | None:
    """(V, 3) uint8 per-vertex colours of a trimesh mesh, or None."""
    if getattr(mesh.visual, "kind", None) != "vertex":
        return None
    return np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.uint8)


def decimated(mesh, target: int | None, method: DecimationMethod | str):
    """``mesh`` (trimesh) decimated to ``target`` faces (None: unchanged), vertex colours from the nearest vertex."""
    import trimesh

    if target is None or target >= len(mesh.faces):
        return mesh
    vertices, faces = decimate_arrays(mesh.vertices, mesh.faces, target, method)
    if len(faces) == 0:
        raise ReconError(f"decimating {len(mesh.faces)} triangles to {target} left none; ask for more "
                         "(export.target_faces / --target-faces, export.target_ratio / --target-ratio)")
    colors = vertex_colors_rgb(mesh)
    new_colors = transfer_vertex_colors(mesh.vertices, colors, vertices) if colors is not None else None
    return trimesh.Trimesh(vertices, faces, vertex_colors=new_colors, process=False)


def transformed(mesh, T: np.ndarray):
    """A copy of ``mesh`` with vertices mapped by the 4x4 similarity ``T`` (colours kept)."""
    out = mesh.copy()
    out.apply_transform(np.asarray(T, dtype=np.float64))
    return out


def write_cameras(model_dir: Path, dest: Path, sfm_from_normalized: np.ndarray | None) -> bool:
    """Copy the COLMAP model at ``model_dir`` to ``dest`` (atomically), mapped to the SfM frame when a transform is
    given.

    Returns False (and writes nothing) when there is no model.
    """
    import pycolmap

    if not (Path(model_dir) / "cameras.bin").exists() and not (Path(model_dir) / "cameras.txt").exists():
        return False
    rec = pycolmap.Reconstruction(str(model_dir))
    if sfm_from_normalized is not None:
        rec.transform(pycolmap.Sim3d(np.asarray(sfm_from_normalized, dtype=np.float64)[:3, :4]))
    with atomic_dir(Path(dest)) as tmp:
        rec.write_binary(str(tmp))
    return True


@dataclass
class ExportResult:
    files: dict[str, Path]
    """format → written mesh file."""
    extra_files: list[Path]
    """Files that go with them (the OBJ's MTL and texture image)."""
    cameras: Path | None
    vertices: int
    faces: int
    textured: bool = False
    texture_size: tuple[int, int] | None = None
    texture_stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export (the export settings, or ``recon export``'s options)."""

    formats: tuple[MeshFormat, ...] = (MeshFormat.glb,)
    target_faces: int | None = None
    target_ratio: float | None = None
    decimation: DecimationMethod = DecimationMethod.fast
    texture: TextureSettings | None = None
    """None: vertex colours only."""
    texture_format: TextureFormat = TextureFormat.png
    frame: ExportFrame = ExportFrame.normalized

    @classmethod
    def from_config(cls, cfg: ExportConfig, *, formats: Iterable[MeshFormat | str] | None = None) -> "ExportOptions":
        texture = None
        if cfg.textured:
            texture = TextureSettings(size=cfg.texture_size, max_size=cfg.texture_max_size,
                                      texels_per_pixel=cfg.texels_per_pixel, smoothness=cfg.texture_smoothness,
                                      charts=ChartMethod(cfg.texture_charts).value, level_exposure=cfg.level_exposure)
        return cls(formats=parse_formats(cfg.formats if formats is None else formats), target_faces=cfg.target_faces,
                   target_ratio=cfg.target_ratio, decimation=DecimationMethod(cfg.decimation), texture=texture,
                   texture_format=TextureFormat(cfg.texture_format), frame=ExportFrame(cfg.frame))


def parse_formats(formats: Iterable[MeshFormat | str]) -> tuple[MeshFormat, ...]:
    """Formats, deduplicated in order. Raises ReconError for an unknown one."""
    try:
        return tuple(dict.fromkeys(MeshFormat(f) for f in formats))
    except ValueError as exc:
        raise ReconError(f"unknown mesh format ({exc}); formats: {', '.join(m.value for m in MeshFormat)}") from None


def export_mesh_files(
    mesh_path: Path,
    dest_dir: Path,
    options: ExportOptions,
    *,
    views: Sequence[View] = (),
    normalized_from_sfm: np.ndarray | None = None,
    model_dir: Path | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Read ``mesh_path`` (normalized frame), decimate, texture, map to the export frame, write every format.

    Args:
        options: formats, decimation target, texture settings (None: vertex colours), frame
            (``sfm`` needs ``normalized_from_sfm``).
        views: the registered views (cameras and undistorted photos, normalized frame) to texture from.
        model_dir: COLMAP model of the cameras (normalized frame), written to ``dest_dir/sparse`` in the frame.
        progress: wraps the texturing loops in progress bars.
    Raises:
        ReconError: unreadable mesh, ``sfm`` frame without a transform, no photo to texture from.
    """
    frame = ExportFrame(options.frame)
    mesh = load_trimesh(mesh_path)
    sfm_from_normalized = None
    if frame is ExportFrame.sfm:
        if normalized_from_sfm is None:
            raise ReconError("--frame sfm needs the normalization transform (OUT/sfm/normalization.json); "
                             "re-run `recon stage sfm`")
        sfm_from_normalized = invert_similarity(normalized_from_sfm)
    before = len(mesh.faces)
    mesh = decimated(mesh, target_face_count(before, options.target_faces, options.target_ratio), options.decimation)
    if len(mesh.faces) != before:
        logger.info("decimated %d → %d triangles (%s)", before, len(mesh.faces),
                    DecimationMethod(options.decimation).value)
    textured = None
    if options.texture is not None and any(f in TEXTURED_FORMATS for f in options.formats):
        textured = texture_mesh(mesh.vertices, mesh.faces, views, options.texture,
                                vertex_colors=vertex_colors_rgb(mesh), progress=progress)
        logger.info("texture %dx%d from %d photos (%d of %d faces seen by none)", *textured.stats["texture_size"],
                    textured.stats["views_used"], textured.stats["faces_unseen"], textured.stats["faces"])
    if sfm_from_normalized is not None:
        mesh = transformed(mesh, sfm_from_normalized)
    files = {}
    extra: list[Path] = []
    for fmt in options.formats:
        path = export_mesh_path(dest_dir, fmt)
        if textured is not None and fmt in TEXTURED_FORMATS:
            vertices = textured.vertices
            if sfm_from_normalized is not None:
                vertices = vertices @ sfm_from_normalized[:3, :3].T + sfm_from_normalized[:3, 3]
            written = write_textured_mesh(vertices, textured.faces, textured.uv, textured.texture, path, fmt,
                                          options.texture_format)
            extra.extend(p for p in written if p != path)
        else:
            write_colored_mesh(mesh, path, fmt)
        files[fmt.value] = path
    cameras = None
    if model_dir is not None and write_cameras(model_dir, export_sparse_dir(dest_dir), sfm_from_normalized):
        cameras = export_sparse_dir(dest_dir)
    transform: dict[str, Any] = {
        "frame": frame.value, "files": sorted(p.name for p in [*files.values(), *extra]),
        "faces": int(len(mesh.faces)), "faces_before": int(before),
        "textured": sorted(f.value for f in options.formats if textured is not None and f in TEXTURED_FORMATS),
        "texture": textured.stats if textured is not None else None,
        "cameras": "sparse" if cameras is not None else None,
    }
    if normalized_from_sfm is not None:
        transform["normalized_from_sfm"] = np.asarray(normalized_from_sfm).tolist()
        transform["sfm_from_normalized"] = invert_similarity(normalized_from_sfm).tolist()
    write_json_atomic(export_transform_path(dest_dir), transform)
    return ExportResult(files=files, extra_files=extra, cameras=cameras, vertices=len(mesh.vertices),
                        faces=len(mesh.faces),
                        textured=textured is not None,
                        texture_size=tuple(textured.stats["texture_size"]) if textured is not None else None,
                        texture_stats=textured.stats if textured is not None else {})


# ---- the stage and the command ------------------------------------------------------------------


def _views_for_texture(ws: Workspace, options: ExportOptions) -> list[View]:
    """The registered views of the sfm cache, when the export is textured (else none)."""
    if options.texture is None or not any(f in TEXTURED_FORMATS for f in options.formats):
        return []
    if not (ws.sfm_model_dir / "cameras.bin").exists():
        raise ReconError(f"{ws.sfm_model_dir}: no SfM cache (cameras and undistorted photos) to bake a texture from; "
                         "export with --no-textured (export.textured=false), or re-run the sfm stage")
    return load_sfm_scene(ws).views


def run(ctx: StageContext) -> None:
    """Write ``OUT/export/mesh.glb`` (+ the configured formats), the cameras and the transform."""
    cfg: ExportConfig = ctx.settings
    ws = ctx.ws
    options = ExportOptions.from_config(cfg, formats=[MeshFormat.glb, *cfg.formats])
    norm = read_normalized_from_sfm(ws.sfm_normalization) if (
        options.frame is ExportFrame.sfm or ws.sfm_normalization.exists()) else None
    result = export_mesh_files(
        ws.fuse_mesh, ctx.stage_dir, options, views=_views_for_texture(ws, options), normalized_from_sfm=norm,
        model_dir=ws.sfm_model_dir, progress=lambda it, desc, total: ctx.progress(it, desc=desc, total=total,
                                                                                  unit="view"),
    )
    ctx.summary.update(formats=",".join(sorted(result.files)), frame=options.frame.value, vertices=result.vertices,
                       faces=result.faces, textured=result.textured)
    if result.texture_size is not None:
        ctx.summary["texture"] = "x".join(str(n) for n in result.texture_size)
    ctx.logger.info("exported %s (%d vertices, %d faces, %s, %s frame)",
                    ", ".join(p.name for p in result.files.values()), result.vertices, result.faces,
                    f"texture {ctx.summary['texture']}" if result.textured else "vertex colours", options.frame.value)


def export_outputs(out_dir: Path, options: ExportOptions, *, dest: Path | None = None,
                   progress: Progress | None = None) -> ExportResult:
    """``recon export OUT``: export ``OUT/mesh.ply`` (and the cameras of ``OUT/sparse``) to ``dest``.

    Args:
        out_dir: a finished recon output folder (its ``sfm/`` cache holds the photos a texture is baked from).
        options: formats, decimation, texture, frame.
        dest: output folder (default ``OUT/exports``).
    Raises:
        ReconError: no mesh in ``out_dir``, missing transform for ``sfm``, no photos for a texture.
    """
    ws = Workspace(scene_dir=Path(out_dir), out_dir=Path(out_dir).expanduser().resolve())
    if not ws.mesh_path.is_file():
        raise ReconError(f"{ws.out_dir}: no mesh.ply; run `recon run SCENE --out {ws.out_dir}` first")
    norm = read_normalized_from_sfm(ws.sfm_normalization) if (
        options.frame is ExportFrame.sfm or ws.sfm_normalization.exists()) else None
    return export_mesh_files(
        ws.mesh_path, Path(dest) if dest is not None else cli_exports_dir(ws), options,
        views=_views_for_texture(ws, options), normalized_from_sfm=norm, model_dir=ws.sparse_dir, progress=progress,
    )

"""export stage: meshes for downstream tools through trimesh (PLY, OBJ, GLB, STL).

Reads the fused mesh (``OUT/fuse/mesh.ply``, normalized frame) and writes into
``OUT/export/``:

* ``mesh.glb`` always (published as ``OUT/mesh.glb``), plus ``mesh.<format>``
  for every format in ``formats``;
* ``sparse/``: the cameras as a COLMAP binary model in the frame of the meshes;
* ``transform.json``: which frame the files are in and the similarity
  ``sfm_from_normalized`` (the inverse of ``normalized_from_sfm``) that takes
  the normalized frame back to the original SfM frame.

Formats: PLY (binary, per-vertex RGB), GLB (glTF 2.0 binary, ``COLOR_0`` per
vertex), OBJ (per-vertex colour as the ``v x y z r g b`` extension, read by
trimesh, Open3D, MeshLab and Blender), STL (geometry only: the format has no
colours, and it stores each triangle's corners separately, so readers see the
vertices merged or split depending on the reader). Decimation (``decimate`` =
target triangle count) uses Open3D's quadric error decimation, which keeps
vertex colours.

``recon export OUT [--format ...] [--decimate N] [--frame normalized|sfm]``
calls :func:`export_outputs`; it writes into ``OUT/exports/`` (not a stage
folder, so the cached stages stay valid).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.cache import atomic_dir, atomic_path, write_json_atomic
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.workspace import Workspace
from pipeline.export.config import ExportConfig, ExportFrame, MeshFormat  # noqa: F401 - re-exported

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
    try:
        mesh = trimesh.load(str(path), process=False, force="mesh")
    except Exception as exc:  # noqa: BLE001 - trimesh raises many types for bad files
        raise ReconError(f"{path}: cannot read the mesh ({exc}); re-run `recon stage fuse`") from exc
    if len(mesh.faces) == 0:
        raise ReconError(f"{path}: the mesh has no triangles; re-run `recon stage fuse`")
    return mesh


def vertex_colors_rgb(mesh) -> np.ndarray | None:
    """(V, 3) uint8 per-vertex colours of a trimesh mesh, or None."""
    if getattr(mesh.visual, "kind", None) != "vertex":
        return None
    return np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.uint8)


def decimate(mesh, target_faces: int):
    """Quadric-error decimation (Open3D) to about ``target_faces`` triangles; vertex colours kept.

    A mesh already at or below the target is returned unchanged.
    """
    import open3d as o3d
    import trimesh

    if target_faces <= 0 or len(mesh.faces) <= target_faces:
        return mesh
    o3 = o3d.geometry.TriangleMesh()
    o3.vertices = o3d.utility.Vector3dVector(np.asarray(mesh.vertices, dtype=np.float64))
    o3.triangles = o3d.utility.Vector3iVector(np.asarray(mesh.faces, dtype=np.int32))
    colors = vertex_colors_rgb(mesh)
    if colors is not None:
        o3.vertex_colors = o3d.utility.Vector3dVector(colors / 255.0)
    out = o3.simplify_quadric_decimation(int(target_faces))
    out.remove_unreferenced_vertices()
    new_colors = None
    if out.has_vertex_colors():
        new_colors = np.clip(np.round(np.asarray(out.vertex_colors) * 255.0), 0, 255).astype(np.uint8)
    return trimesh.Trimesh(np.asarray(out.vertices), np.asarray(out.triangles), vertex_colors=new_colors, process=False)


def transformed(mesh, T: np.ndarray):
    """A copy of ``mesh`` with vertices mapped by the 4x4 similarity ``T`` (colours kept)."""
    out = mesh.copy()
    out.apply_transform(np.asarray(T, dtype=np.float64))
    return out


def write_mesh(mesh, path: Path, fmt: MeshFormat | str) -> None:
    """Write ``mesh`` (trimesh) as ``fmt`` to ``path`` atomically."""
    fmt = MeshFormat(fmt)
    with atomic_path(Path(path), suffix=f".{fmt.value}") as tmp:
        if fmt is MeshFormat.obj:
            data = mesh.export(file_type="obj", include_color=True, include_texture=False)
        else:
            data = mesh.export(file_type=fmt.value)
        Path(tmp).write_bytes(data if isinstance(data, bytes) else data.encode())


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
    cameras: Path | None
    vertices: int
    faces: int


def export_mesh_files(
    mesh_path: Path,
    dest_dir: Path,
    *,
    formats: Iterable[MeshFormat | str],
    target_faces: int = 0,
    frame: ExportFrame | str = ExportFrame.normalized,
    normalized_from_sfm: np.ndarray | None = None,
    model_dir: Path | None = None,
) -> ExportResult:
    """Read ``mesh_path`` (normalized frame), optionally decimate and map to the SfM frame, write every format.

    Args:
        formats: mesh formats to write as ``dest_dir/mesh.<format>``.
        target_faces: decimation target (0: none).
        frame: ``normalized`` or ``sfm`` (then ``normalized_from_sfm`` is required).
        model_dir: COLMAP model of the cameras (normalized frame), written to ``dest_dir/sparse`` in ``frame``.
    Raises:
        ReconError: unreadable mesh, unknown format, ``sfm`` frame without a transform.
    """
    frame = ExportFrame(frame)
    try:
        fmts = list(dict.fromkeys(MeshFormat(f) for f in formats))
    except ValueError as exc:
        raise ReconError(f"unknown mesh format ({exc}); formats: {', '.join(m.value for m in MeshFormat)}") from None
    mesh = load_trimesh(mesh_path)
    if target_faces > 0:
        before = len(mesh.faces)
        mesh = decimate(mesh, target_faces)
        logger.info("decimated %d → %d triangles", before, len(mesh.faces))
    sfm_from_normalized = None
    if frame is ExportFrame.sfm:
        if normalized_from_sfm is None:
            raise ReconError("--frame sfm needs the normalization transform (OUT/sfm/normalization.json); "
                             "re-run `recon stage sfm`")
        sfm_from_normalized = invert_similarity(normalized_from_sfm)
        mesh = transformed(mesh, sfm_from_normalized)
    files = {}
    for fmt in fmts:
        path = export_mesh_path(dest_dir, fmt)
        write_mesh(mesh, path, fmt)
        files[fmt.value] = path
    cameras = None
    if model_dir is not None and write_cameras(model_dir, export_sparse_dir(dest_dir), sfm_from_normalized):
        cameras = export_sparse_dir(dest_dir)
    transform: dict[str, Any] = {"frame": frame.value, "files": sorted(p.name for p in files.values()),
                                 "decimate": int(target_faces), "cameras": "sparse" if cameras is not None else None}
    if normalized_from_sfm is not None:
        transform["normalized_from_sfm"] = np.asarray(normalized_from_sfm).tolist()
        transform["sfm_from_normalized"] = invert_similarity(normalized_from_sfm).tolist()
    write_json_atomic(export_transform_path(dest_dir), transform)
    return ExportResult(files=files, cameras=cameras, vertices=len(mesh.vertices), faces=len(mesh.faces))


# ---- the stage and the command ------------------------------------------------------------------


def run(ctx: StageContext) -> None:
    """Write ``OUT/export/mesh.glb`` (+ the configured formats), the cameras and the transform."""
    cfg: ExportConfig = ctx.settings
    ws = ctx.ws
    norm = (read_normalized_from_sfm(ws.sfm_normalization)
            if (ExportFrame(cfg.frame) is ExportFrame.sfm or ws.sfm_normalization.exists()) else None)
    result = export_mesh_files(
        ws.fuse_mesh, ctx.stage_dir, formats=[MeshFormat.glb, *cfg.formats], target_faces=cfg.decimate,
        frame=cfg.frame, normalized_from_sfm=norm, model_dir=ws.sfm_model_dir,
    )
    ctx.summary.update(formats=",".join(sorted(result.files)), frame=ExportFrame(cfg.frame).value,
                       vertices=result.vertices, faces=result.faces)
    ctx.logger.info("exported %s (%d vertices, %d faces, %s frame)", ", ".join(p.name for p in result.files.values()),
                    result.vertices, result.faces, ExportFrame(cfg.frame).value)


def export_outputs(
    out_dir: Path,
    formats: Iterable[str] = ("glb",),
    *,
    decimate_faces: int = 0,
    frame: str = "normalized",
    dest: Path | None = None,
) -> ExportResult:
    """``recon export OUT``: export ``OUT/mesh.ply`` (and the cameras of ``OUT/sparse``) to ``dest``.

    Args:
        out_dir: a finished recon output folder.
        formats: any of ply, obj, glb, stl.
        decimate_faces: target triangle count (0: none).
        frame: ``normalized`` (that of OUT/mesh.ply) or ``sfm`` (the original SfM frame).
        dest: output folder (default ``OUT/exports``).
    Raises:
        ReconError: no mesh in ``out_dir``, bad options, missing transform for ``sfm``.
    """
    ws = Workspace(scene_dir=Path(out_dir), out_dir=Path(out_dir).expanduser().resolve())
    if not ws.mesh_path.is_file():
        raise ReconError(f"{ws.out_dir}: no mesh.ply; run `recon run SCENE --out {ws.out_dir}` first")
    if decimate_faces < 0:
        raise ReconError(f"--decimate {decimate_faces}: expected a target triangle count >= 0")
    try:
        frame_ = ExportFrame(frame)
    except ValueError:
        raise ReconError(f"--frame {frame!r}: expected one of {', '.join(f.value for f in ExportFrame)}") from None
    norm = (read_normalized_from_sfm(ws.sfm_normalization)
            if (frame_ is ExportFrame.sfm or ws.sfm_normalization.exists()) else None)
    return export_mesh_files(
        ws.mesh_path, Path(dest) if dest is not None else cli_exports_dir(ws), formats=formats,
        target_faces=decimate_faces, frame=frame_, normalized_from_sfm=norm, model_dir=ws.sparse_dir,
    )

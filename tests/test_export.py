"""export stage: PLY / OBJ / GLB / STL through trimesh (vertex colours), decimation, the SfM frame.

The textured exports are tested in tests/test_texture.py.

What is compared on the way back: PLY, OBJ and GLB keep the vertex list as
written (same count, order, positions and colours) in both trimesh and
Open3D. STL stores every triangle's three corners separately and has no
colours: its vertices are compared after merging coincident ones, and only
the geometry is compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import trimesh
from scipy.spatial import cKDTree

from pipeline.config import ReconConfig, load_config
from pipeline.core.cache import write_json_atomic
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.poses import similarity_matrix
from pipeline.core.workspace import Workspace
from pipeline.export import stage as export
from pipeline.export.stage import (
    ExportFrame,
    ExportOptions,
    MeshFormat,
    export_mesh_files,
    export_outputs,
    invert_similarity,
    parse_formats,
)


def rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.fixture()
def colored_mesh_path(tmp_path) -> Path:
    """A coloured sphere (random per-vertex colours) written as a fuse-stage PLY (Open3D)."""
    mesh = o3d.geometry.TriangleMesh.create_sphere(0.5, 24)
    mesh.compute_vertex_normals()
    rng = np.random.default_rng(0)
    mesh.vertex_colors = o3d.utility.Vector3dVector(rng.integers(0, 256, (len(mesh.vertices), 3)) / 255.0)
    path = tmp_path / "in" / "mesh.ply"
    path.parent.mkdir()
    o3d.io.write_triangle_mesh(str(path), mesh)
    return path


def reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mesh = o3d.io.read_triangle_mesh(str(path))
    colors = np.round(np.asarray(mesh.vertex_colors) * 255).astype(np.uint8)
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles), colors


def read_back(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """{reader: (vertices, triangles, uint8 colours or None)} from trimesh and Open3D."""
    tm = trimesh.load(str(path), process=False, force="mesh")
    tm_colors = np.asarray(tm.visual.vertex_colors)[:, :3] if tm.visual.kind == "vertex" else None
    om = o3d.io.read_triangle_mesh(str(path))
    om_colors = np.round(np.asarray(om.vertex_colors) * 255).astype(np.uint8) if om.has_vertex_colors() else None
    return {"trimesh": (np.asarray(tm.vertices), np.asarray(tm.faces), tm_colors),
            "open3d": (np.asarray(om.vertices), np.asarray(om.triangles), om_colors)}


def match_vertices(read: np.ndarray, written: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """For each read vertex the index of the written vertex at the same position; asserts a one-to-one match.

    Readers may reorder vertices (Open3D's OBJ and GLB readers order them by first use in a face).
    """
    dist, index = cKDTree(written).query(read)
    assert dist.max() <= tol, dist.max()
    assert len(np.unique(index)) == len(written) == len(read)
    return index


@pytest.mark.parametrize("fmt", ["ply", "obj", "glb"])
def test_colored_formats_round_trip(colored_mesh_path, tmp_path, fmt):
    vertices, triangles, colors = reference(colored_mesh_path)
    result = export_mesh_files(colored_mesh_path, tmp_path / "out", ExportOptions(formats=(MeshFormat(fmt),)))
    path = result.files[fmt]
    assert path == tmp_path / "out" / f"mesh.{fmt}" and path.is_file()
    written_faces = {tuple(sorted(t)) for t in triangles.tolist()}
    for reader, (v, faces, c) in read_back(path).items():
        assert len(v) == len(vertices) and len(faces) == len(triangles), reader
        index = match_vertices(v, vertices)  # float32 positions in GLB: within 1e-6 here
        assert {tuple(sorted(t)) for t in index[faces].tolist()} == written_faces, reader
        assert c is not None, f"{reader} lost the colours"
        assert np.abs(c.astype(int) - colors[index].astype(int)).max() <= 1, reader
    back = read_back(path)
    np.testing.assert_allclose(back["trimesh"][0], vertices, atol=1e-6)  # trimesh keeps the vertex order
    if fmt == "ply":  # Open3D too for PLY (its OBJ and GLB readers reorder)
        np.testing.assert_allclose(back["open3d"][0], vertices, atol=1e-6)


def test_stl_round_trip_keeps_the_geometry(colored_mesh_path, tmp_path):
    vertices, triangles, _ = reference(colored_mesh_path)
    path = export_mesh_files(colored_mesh_path, tmp_path / "out", ExportOptions(formats=(MeshFormat.stl,))).files["stl"]
    merged = trimesh.load(str(path), force="mesh")  # process=True merges the per-triangle corners
    assert len(merged.vertices) == len(vertices) and len(merged.faces) == len(triangles)
    om = o3d.io.read_triangle_mesh(str(path)).remove_duplicated_vertices()
    assert len(om.vertices) == len(vertices) and len(om.triangles) == len(triangles)
    np.testing.assert_allclose(np.sort(np.asarray(om.vertices), axis=0), np.sort(vertices, axis=0), atol=1e-6)


def test_sfm_frame_applies_the_inverse_normalization(colored_mesh_path, tmp_path):
    vertices, _, colors = reference(colored_mesh_path)
    normalized_from_sfm = similarity_matrix(0.25, rotation(1), np.array([0.3, -1.0, 2.0]))
    options = ExportOptions(formats=(MeshFormat.ply,), frame=ExportFrame.sfm)
    result = export_mesh_files(colored_mesh_path, tmp_path / "out", options, normalized_from_sfm=normalized_from_sfm)
    out = trimesh.load(str(result.files["ply"]), process=False)
    sfm = np.asarray(out.vertices)
    back = sfm @ normalized_from_sfm[:3, :3].T + normalized_from_sfm[:3, 3]
    np.testing.assert_allclose(back, vertices, atol=1e-6)  # trimesh writes float32 PLY positions
    assert np.ptp(sfm, axis=0).max() == pytest.approx(4.0 * np.ptp(vertices, axis=0).max(), rel=0.2)
    np.testing.assert_array_equal(np.asarray(out.visual.vertex_colors)[:, :3], colors)
    info = json.loads((tmp_path / "out" / "transform.json").read_text())
    assert info["frame"] == "sfm"
    np.testing.assert_allclose(np.asarray(info["sfm_from_normalized"]) @ normalized_from_sfm, np.eye(4), atol=1e-12)
    with pytest.raises(ReconError, match="normalization"):
        export_mesh_files(colored_mesh_path, tmp_path / "out2", options)


def test_load_trimesh_reads_a_fuse_ply_as_trimesh_does(colored_mesh_path, tmp_path):
    """The fast (Open3D) PLY read gives trimesh's mesh: vertices, faces, colours, normals; other files go to trimesh."""
    fast = export.load_trimesh(colored_mesh_path)
    slow = trimesh.load(str(colored_mesh_path), process=False, force="mesh")
    assert np.array_equal(fast.vertices, slow.vertices)
    assert np.array_equal(fast.faces, slow.faces)
    assert np.array_equal(export.vertex_colors_rgb(fast), export.vertex_colors_rgb(slow))
    assert np.allclose(fast.vertex_normals, slow.vertex_normals)
    points = tmp_path / "points.ply"  # a point cloud: no triangles for Open3D, trimesh's error
    o3d.io.write_point_cloud(str(points), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.eye(3))))
    with pytest.raises(ReconError, match="points.ply"):
        export.load_trimesh(points)
    truncated = tmp_path / "truncated.ply"  # the faces cut short: Open3D keeps what it read, trimesh refuses
    data = colored_mesh_path.read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ReconError, match="truncated.ply"):
        export.load_trimesh(truncated)
    broken = tmp_path / "broken.ply"
    broken.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n")
    with pytest.raises(ReconError, match="broken.ply"):
        export.load_trimesh(broken)


def test_invert_similarity():
    T = similarity_matrix(3.0, rotation(2), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(invert_similarity(T) @ T, np.eye(4), atol=1e-12)


def test_decimation_reaches_the_target_and_keeps_colours(colored_mesh_path, tmp_path):
    _, triangles, _ = reference(colored_mesh_path)
    result = export_mesh_files(colored_mesh_path, tmp_path / "out", ExportOptions(target_faces=300))
    assert 250 <= result.faces <= 300 < len(triangles)
    assert not result.textured
    back = read_back(result.files["glb"])
    for reader, (v, faces, c) in back.items():
        assert len(faces) == result.faces and len(v) == result.vertices and c is not None, reader
        assert c.std() > 10, reader  # still the random colours, not a constant


def write_colmap_model(folder: Path, poses: list[np.ndarray]) -> None:
    import pycolmap

    rec = pycolmap.Reconstruction()
    for i, T in enumerate(poses, start=1):
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=64, height=48, params=[50, 50, 32, 24],
                                                        camera_id=i))
        image = pycolmap.Image(name=f"view_{i:03d}.png", camera_id=i, image_id=i)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(T[:3, :3]), T[:3, 3]))
    folder.mkdir(parents=True, exist_ok=True)
    rec.write(str(folder))


def camera_centers(model_dir: Path) -> dict[str, np.ndarray]:
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    return {im.name: im.projection_center() for im in rec.images.values()}


@pytest.fixture()
def finished_out(colored_mesh_path, tmp_path) -> tuple[Workspace, np.ndarray]:
    """An output folder after fuse: OUT/fuse/mesh.ply, OUT/mesh.ply, OUT/sfm/model (+ OUT/sparse),
    normalization.json."""
    ws = Workspace.create(tmp_path / "scene", tmp_path / "scene" / "recon")
    ws.scene_dir.mkdir(parents=True, exist_ok=True)
    ws.fuse_mesh.parent.mkdir(parents=True)
    ws.fuse_mesh.write_bytes(colored_mesh_path.read_bytes())
    ws.mesh_path.write_bytes(colored_mesh_path.read_bytes())
    poses = []
    for k in range(3):
        T = np.eye(4)
        T[:3, :3] = rotation(10 + k)
        T[:3, 3] = [0.1 * k, 0.0, 2.0]
        poses.append(T)
    write_colmap_model(ws.sfm_model_dir, poses)
    write_colmap_model(ws.sparse_dir, poses)
    normalized_from_sfm = similarity_matrix(0.5, rotation(3), np.array([1.0, 0.0, -2.0]))
    write_json_atomic(ws.sfm_normalization, {"normalized_from_sfm": normalized_from_sfm})
    return ws, normalized_from_sfm


def test_stage_writes_glb_and_configured_formats(finished_out):
    ws, _ = finished_out
    cfg = load_config(overrides=["export.formats=ply,stl", "export.textured=false"])
    ctx = StageContext(ws=ws, config=cfg, name="export", fingerprint="test", show_progress=False)
    export.run(ctx)
    names = sorted(p.name for p in ws.export_dir.iterdir())
    assert names == ["mesh.glb", "mesh.ply", "mesh.stl", "sparse", "transform.json"]
    assert ctx.summary["formats"] == "glb,ply,stl" and ctx.summary["frame"] == "normalized"
    glb = read_back(ws.export_dir / "mesh.glb")["trimesh"]
    assert len(glb[0]) == ctx.summary["vertices"] and len(glb[1]) == ctx.summary["faces"]
    # normalized frame: cameras as in the sfm model
    for name, c in camera_centers(ws.export_dir / "sparse").items():
        np.testing.assert_allclose(c, camera_centers(ws.sfm_model_dir)[name], atol=1e-9)


def test_stage_in_the_sfm_frame_moves_mesh_and_cameras_together(finished_out):
    ws, normalized_from_sfm = finished_out
    cfg = ReconConfig()
    cfg.export.textured = False
    cfg.export.frame = ExportFrame.sfm
    cfg.export.formats = (MeshFormat.ply,)
    export.run(StageContext(ws=ws, config=cfg, name="export", fingerprint="test", show_progress=False))
    sfm_from_normalized = invert_similarity(normalized_from_sfm)
    mesh_sfm = np.asarray(trimesh.load(str(ws.export_dir / "mesh.ply"), process=False).vertices)
    mesh_norm = np.asarray(trimesh.load(str(ws.fuse_mesh), process=False).vertices)
    np.testing.assert_allclose(mesh_sfm, mesh_norm @ sfm_from_normalized[:3, :3].T + sfm_from_normalized[:3, 3],
                               atol=1e-6)
    normalized = camera_centers(ws.sfm_model_dir)
    for name, c in camera_centers(ws.export_dir / "sparse").items():
        np.testing.assert_allclose(c, sfm_from_normalized[:3, :3] @ normalized[name] + sfm_from_normalized[:3, 3],
                                   atol=1e-9)


def test_export_command(finished_out, tmp_path):
    ws, _ = finished_out
    options = ExportOptions(formats=(MeshFormat.obj, MeshFormat.stl), target_faces=200, frame=ExportFrame.sfm)
    result = export_outputs(ws.out_dir, options)
    assert sorted(result.files) == ["obj", "stl"]
    assert all(p.parent == ws.out_dir / "exports" and p.is_file() for p in result.files.values())
    assert result.faces <= 200 and (ws.out_dir / "exports" / "sparse" / "images.bin").is_file()
    assert not (ws.export_dir).exists()  # the export stage's folder is left alone
    with pytest.raises(ReconError, match="format"):
        parse_formats(["obj", "fbx"])
    with pytest.raises(ReconError, match="no mesh.ply"):
        export_outputs(tmp_path / "empty", ExportOptions())

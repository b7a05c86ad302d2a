"""Synthetic scene renderer: layout, determinism, geometric consistency of the ground truth, texture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
from PIL import Image

from pipeline.synthetic.render import (
    GroundTruth,
    intrinsics,
    load_ground_truth,
    look_at,
    render_scene,
    subpixel_grid,
)
from pipeline.synthetic.shapes import SHAPES

W, H, N_VIEWS = 160, 120, 6


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_scene(tmp_path_factory.mktemp("synth") / "blob", shape="blob", n_views=N_VIEWS, width=W, height=H)


@pytest.fixture(scope="module")
def gt(scene: Path) -> GroundTruth:
    return load_ground_truth(scene / "gt")


def backproject(depth: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """World points (N, 3) of integer pixels ``uv`` (N, 2) (col, row) with z-depth, COLMAP pixel centres."""
    z = depth[uv[:, 1], uv[:, 0]]
    x_cam = np.linalg.inv(K) @ np.vstack([uv[:, 0] + 0.5, uv[:, 1] + 0.5, np.ones(len(uv))]) * z
    rot, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    return (rot.T @ (x_cam - t[:, None])).T


def project(K: np.ndarray, cam_from_world: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image coordinates (N, 2), z-depth (N,)) of world points (N, 3)."""
    x_cam = cam_from_world[:3, :3] @ points.T + cam_from_world[:3, 3:]
    uvw = K @ x_cam
    return (uvw[:2] / uvw[2]).T, x_cam[2]


def distance_to_mesh(mesh_path: Path, points: np.ndarray) -> np.ndarray:
    mesh = o3d.t.geometry.TriangleMesh.from_legacy(o3d.io.read_triangle_mesh(str(mesh_path)))
    raycaster = o3d.t.geometry.RaycastingScene()
    raycaster.add_triangles(mesh)
    return raycaster.compute_distance(o3d.core.Tensor(points.astype(np.float32))).numpy()


def random_pixels(rng: np.random.Generator, n: int, width: int = W, height: int = H) -> np.ndarray:
    return np.stack([rng.integers(0, width, n), rng.integers(0, height, n)], -1)


def test_layout_and_sizes(scene: Path) -> None:
    names = [f"view_{i:03d}" for i in range(N_VIEWS)]
    for name in names:
        image = np.asarray(Image.open(scene / "images" / f"{name}.png"))
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        depth = np.load(scene / "gt" / "depth" / f"{name}.npy")
        assert depth.shape == (H, W) and depth.dtype == np.float32
        assert (depth > 0).all(), "every pixel must hit geometry"
    for mesh in ("mesh.ply", "object.ply"):
        assert len(o3d.io.read_triangle_mesh(str(scene / "gt" / mesh)).triangles) > 100
    cameras = json.loads((scene / "gt" / "cameras.json").read_text())
    assert (cameras["width"], cameras["height"]) == (W, H)
    assert [im["name"] for im in cameras["images"]] == [f"{n}.png" for n in names]
    K = np.asarray(cameras["images"][0]["K"])
    assert K[0, 2] == W / 2 and K[1, 2] == H / 2 and K[0, 0] == K[1, 1]
    info = json.loads((scene / "gt" / "scene.json").read_text())
    assert info["shape"] == "blob" and info["seed"] == 0 and info["scale"] == 1.0
    assert info["object_diagonal"] == pytest.approx(1.0)
    assert np.asarray(info["object_bbox_min"])[2] == pytest.approx(0.0, abs=1e-9)


def test_load_ground_truth(scene: Path, gt: GroundTruth) -> None:
    assert gt.names == [f"view_{i:03d}.png" for i in range(N_VIEWS)]
    assert (gt.width, gt.height) == (W, H)
    K, cam_from_world = gt.cameras["view_000.png"]
    assert K.shape == (3, 3) and cam_from_world.shape == (4, 4)
    rot = cam_from_world[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    assert gt.depth("view_001.png").shape == (H, W)
    assert gt.mesh_path().exists() and gt.object_mesh_path().exists()
    assert gt.object_diagonal == pytest.approx(1.0)
    assert load_ground_truth(scene).root == gt.root  # the scene folder works too


def test_deterministic(tmp_path: Path) -> None:
    def render(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, list]:
        out = render_scene(tmp_path / name, shape="knot", n_views=2, width=64, height=48, seed=seed)
        cameras = json.loads((out / "gt" / "cameras.json").read_text())
        return (np.asarray(Image.open(out / "images" / "view_001.png")), np.load(out / "gt" / "depth" / "view_001.npy"),
                cameras["images"])

    first, again, other = render("a", 0), render("b", 0), render("c", 1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]
    assert not np.array_equal(first[0], other[0])
    assert first[2] != other[2]


def test_depth_lies_on_mesh(gt: GroundTruth) -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([backproject(gt.depth(name), *gt.cameras[name], random_pixels(rng, 200))
                             for name in gt.names])
    assert distance_to_mesh(gt.mesh_path(), points).max() < 1e-4


def sample_inverse_depth(depth: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of 1 / depth at image coordinates ``uv`` (N, 2) (exact on planes)."""
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # pixel centres at integer positions
    x0 = np.clip(np.floor(x).astype(int), 0, depth.shape[1] - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, depth.shape[0] - 2)
    fx, fy = x - x0, y - y0
    inv = 1.0 / depth.astype(np.float64)
    top = inv[y0, x0] * (1 - fx) + inv[y0, x0 + 1] * fx
    bottom = inv[y0 + 1, x0] * (1 - fx) + inv[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def test_depth_consistent_between_views(gt: GroundTruth) -> None:
    rng = np.random.default_rng(1)
    src, dst = gt.names[0], gt.names[N_VIEWS // 2]  # neighbours: first view of each ring
    points = backproject(gt.depth(src), *gt.cameras[src], random_pixels(rng, 3000))
    uv, z = project(*gt.cameras[dst], points)
    inside = (uv[:, 0] >= 1) & (uv[:, 0] < W - 1) & (uv[:, 1] >= 1) & (uv[:, 1] < H - 1)
    assert inside.mean() > 0.3
    rel = z[inside] * sample_inverse_depth(gt.depth(dst), uv[inside]) - 1.0
    assert np.median(np.abs(rel)) < 1e-4  # most points are visible in dst and agree
    assert np.mean(np.abs(rel) < 1e-3) > 0.6
    # away from depth edges, no point lies in front of the surface that dst sees (occluded ones lie behind)
    x0, y0 = np.floor(uv[inside] - 0.5).astype(int).T
    depth = gt.depth(dst)
    around = np.stack([depth[y0, x0], depth[y0, x0 + 1], depth[y0 + 1, x0], depth[y0 + 1, x0 + 1]])
    smooth = around.max(0) / around.min(0) < 1.02
    assert smooth.mean() > 0.8
    assert np.mean(rel[smooth] < -5e-3) < 0.005  # (small errors at creases seen obliquely)


def test_cameras_look_at_object(gt: GroundTruth) -> None:
    center = 0.5 * (gt.object_bbox_min + gt.object_bbox_max)
    fractions = []
    for name in gt.names:
        K, cam_from_world = gt.cameras[name]
        uv, z = project(K, cam_from_world, center[None])
        assert z[0] > 0
        assert abs(uv[0, 0] - W / 2) < 0.1 * W and abs(uv[0, 1] - H / 2) < 0.1 * H
        ys, xs = np.mgrid[0:H, 0:W]
        points = backproject(gt.depth(name), K, cam_from_world, np.stack([xs.ravel(), ys.ravel()], -1))
        on_object = np.all((points > gt.object_bbox_min - 1e-3) & (points < gt.object_bbox_max + 1e-3), axis=1)
        fractions.append(on_object.mean())
    assert 0.05 < min(fractions) and max(fractions) < 0.7


def test_scale_scales_geometry_not_images(scene: Path, gt: GroundTruth, tmp_path: Path) -> None:
    big = load_ground_truth(render_scene(tmp_path / "big", shape="blob", n_views=N_VIEWS, width=W, height=H,
                                         scale=10.0))
    for name in ("view_000.png", "view_003.png"):
        (K1, pose1), (K10, pose10) = gt.cameras[name], big.cameras[name]
        np.testing.assert_array_equal(K1, K10)
        np.testing.assert_allclose(pose10[:3, :3], pose1[:3, :3])
        np.testing.assert_allclose(pose10[:3, 3], 10.0 * pose1[:3, 3], rtol=1e-12)
        np.testing.assert_allclose(big.depth(name), 10.0 * gt.depth(name), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(Image.open(big.root.parent / "images" / name)),
                                      np.asarray(Image.open(scene / "images" / name)))
    np.testing.assert_allclose(big.object_bbox_max, 10.0 * gt.object_bbox_max)
    assert big.object_diagonal == pytest.approx(10.0)
    rng = np.random.default_rng(2)
    points = backproject(big.depth("view_001.png"), *big.cameras["view_001.png"], random_pixels(rng, 300))
    assert distance_to_mesh(big.mesh_path(), points).max() < 1e-4 * 10.0


def test_images_textured_everywhere(scene: Path) -> None:
    block = 8
    for path in sorted((scene / "images").glob("*.png")):
        gray = np.asarray(Image.open(path)).astype(np.float64).mean(-1)
        blocks = gray.reshape(H // block, block, W // block, block).std(axis=(1, 3))
        assert blocks.min() > 5.0, f"{path.name}: flat {block}x{block} block (std {blocks.min():.1f})"
        assert np.median(blocks) > 15.0


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders(shape: str, tmp_path: Path) -> None:
    out = render_scene(tmp_path / shape, shape=shape, n_views=2, width=64, height=48, seed=3)
    gt = load_ground_truth(out)
    assert gt.object_diagonal == pytest.approx(1.0)
    assert abs(gt.object_bbox_min[2]) < 1e-9  # stands on the floor
    assert all((gt.depth(n) > 0).all() for n in gt.names)


def test_object_mesh_is_normalised(tmp_path: Path) -> None:
    path = tmp_path / "column.obj"
    column = o3d.geometry.TriangleMesh.create_cylinder(radius=1.0, height=3.0)  # long axis +z
    column.rotate(o3d.geometry.get_rotation_matrix_from_xyz((-np.pi / 2, 0.0, 0.0)), center=(0, 0, 0))  # now +y
    o3d.io.write_triangle_mesh(str(path), column)
    gt = load_ground_truth(render_scene(tmp_path / "mesh", object_mesh=path, n_views=2, width=64, height=48,
                                        scale=2.0))
    assert gt.object_diagonal == pytest.approx(2.0)
    extent = gt.object_bbox_max - gt.object_bbox_min
    assert extent[2] == pytest.approx(extent.max())  # OBJ +y up becomes world +z up: the column stands
    assert abs(gt.object_bbox_min[2]) < 1e-9
    assert json.loads((gt.root / "scene.json").read_text())["shape"] == "mesh"


def test_unknown_shape_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        render_scene(tmp_path / "x", shape="teapot", n_views=1, width=16, height=16)


def test_look_at_and_subpixel_grid() -> None:
    center, target = np.array([2.0, 1.0, 1.5]), np.array([0.0, 0.0, 0.3])
    pose = look_at(center, target)
    K = intrinsics(W, H)
    uv, z = project(K, pose, target[None])
    np.testing.assert_allclose(uv[0], [W / 2, H / 2], atol=1e-9)
    assert z[0] > 0
    uv_up, _ = project(K, pose, (target + [0.0, 0.0, 0.1])[None])
    assert uv_up[0, 1] < H / 2  # world up is image up (y down)
    np.testing.assert_allclose(-pose[:3, :3].T @ pose[:3, 3], center)
    grid = subpixel_grid(3, 2)
    np.testing.assert_allclose(grid[0, 0], [0.5, 0.5])
    np.testing.assert_allclose(grid[1, 2], [2.5, 1.5])
    np.testing.assert_allclose(subpixel_grid(3, 2, 2)[0, :2], [[0.25, 0.25], [0.75, 0.25]])


@pytest.mark.slow
def test_blob_scene_registers_in_colmap(tmp_path: Path) -> None:
    pycolmap = pytest.importorskip("pycolmap")
    scene = render_scene(tmp_path / "scene", shape="blob", n_views=12, width=320, height=240)
    database = tmp_path / "database.db"
    pycolmap.extract_features(database, scene / "images")
    pycolmap.match_exhaustive(database)
    models = pycolmap.incremental_mapping(database, scene / "images", tmp_path / "sparse")
    assert max(m.num_reg_images() for m in models.values()) == 12

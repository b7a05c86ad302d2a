"""fuse stage: TSDF fusion of depth maps (Open3D VoxelBlockGrid).

The reference is the ground truth of a rendered scene: fusing its GT depth
must reproduce the GT object (scored with :mod:`pipeline.analysis.evaluate`, the
protocol of ``recon eval``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
from PIL import Image

from pipeline.analysis.evaluate import evaluate_meshes
from pipeline.analysis.metrics import GtViews, Mesh
from pipeline.config import ReconConfig
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.io import DepthMap, save_depth_map
from pipeline.core.workspace import Workspace
from pipeline.fuse import stage as fuse
from pipeline.fuse import tsdf
from pipeline.fuse.clean import clean_mesh, remove_vertices, visibility_outliers, visibility_votes
from pipeline.fuse.config import FuseConfig
from pipeline.fuse.stage import check_poses, resolve_params
from pipeline.fuse.tsdf import FusionParams, fuse_depth_maps, fusion_depth, resize_rgb
from pipeline.synthetic.fusion import fuse_ground_truth, ground_truth_frames
from pipeline.synthetic.groundtruth import gt_depth_path, scene_from_ground_truth

EVAL_POINTS = 100_000


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A blob on a floor in a room: 10 views 256x192."""
    from pipeline.synthetic.render import render_scene

    return render_scene(tmp_path_factory.mktemp("fuse") / "blob", shape="blob", n_views=10, width=256, height=192,
                        seed=0)


@pytest.fixture(scope="module")
def gt_scene(rendered):
    return scene_from_ground_truth(rendered)


@pytest.fixture(scope="module")
def gt_fused(rendered):
    return fuse_ground_truth(rendered, FuseConfig(), "auto")


def scene_info(scene_dir: Path) -> dict:
    return json.loads((scene_dir / "gt" / "scene.json").read_text())


def score(mesh_normalized, scene_dir: Path, normalized_from_sfm: np.ndarray, gt_mesh: str = "mesh.ply") -> dict:
    """Official metrics of a normalized-frame mesh against the scene's GT (object box + 5 %, visible GT)."""
    info = scene_info(scene_dir)
    est = Mesh(np.asarray(mesh_normalized.vertices), np.asarray(mesh_normalized.triangles))
    return evaluate_meshes(
        est, scene_dir / "gt" / gt_mesh, gt_from_est=np.linalg.inv(normalized_from_sfm),
        crop_box=(np.asarray(info["object_bbox_min"]), np.asarray(info["object_bbox_max"])),
        diagonal=float(info["object_diagonal"]), gt_views=GtViews.load(scene_dir / "gt"), max_points=EVAL_POINTS,
    )


def write_gt_depth_views(scene_dir: Path, scene, path_of) -> None:
    """Write the GT depth (normalized frame) as the per-view depth caches ``path_of(name)``."""
    for frame in ground_truth_frames(scene_dir, scene):
        save_depth_map(path_of(frame.depth_map.name), frame.depth_map)


def stage_context(ws: Workspace, cfg: ReconConfig | None = None, skipped: frozenset[str] = frozenset()) -> StageContext:
    return StageContext(ws=ws, config=cfg or ReconConfig(), name="fuse", fingerprint="test", skipped=skipped,
                        show_progress=False)


def load_ply(path: Path):
    mesh = o3d.io.read_triangle_mesh(str(path))
    assert len(mesh.triangles) > 0
    return mesh


# ---- accuracy of the fusion --------------------------------------------------------------------


def test_ground_truth_depth_reproduces_the_object(rendered, gt_fused):
    result, scene, params = gt_fused
    metrics = score(result.mesh, rendered, scene.normalized_from_sfm)
    f1 = metrics["thresholds"]["1%"]["fscore"]
    f05 = metrics["thresholds"]["0.5%"]["fscore"]
    assert f1 >= 0.95, metrics["thresholds"]
    assert f05 >= 0.90, metrics["thresholds"]
    # Voxels are about one depth pixel at the median depth: well below the 0.5 % threshold here.
    assert params.voxel_size / (scene_info(rendered)["object_diagonal"] * scene.normalized_from_sfm[0, 0]) < 0.0075
    colors = np.asarray(result.mesh.vertex_colors)
    assert colors.shape == (len(result.mesh.vertices), 3) and colors.std() > 0.02  # textured, not a constant colour
    assert result.stats["attempts"] == 1 and result.stats["blocks"] == result.stats["blocks_counted"]


def test_open3d_reads_depth_with_the_colmap_pixel_convention():
    """A slanted plane fuses without bias when K is passed unchanged (a half-pixel shift would bias it)."""
    w, h, f = 64, 48, 50.0
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    u = np.arange(w) + 0.5  # COLMAP pixel centres
    xn = np.broadcast_to((u - K[0, 2]) / f, (h, w))
    depth = (1.0 / (1.0 - 0.5 * xn)).astype(np.float32)  # the plane z = 1 + 0.5 x
    dm = DepthMap(name="plane", depth=depth, confidence=np.ones_like(depth), valid=np.ones((h, w), bool), K=K,
                  cam_from_world=np.eye(4))
    params = FusionParams(voxel_size=0.005, sdf_trunc=0.02, depth_max=5.0)
    mesh = fuse_depth_maps([(dm, np.full((h, w, 3), 128, np.uint8))], params, "cpu").mesh
    v = np.asarray(mesh.vertices)
    inner = (np.abs(v[:, 0]) < 0.3) & (np.abs(v[:, 1]) < 0.2)
    bias = float(np.mean(v[inner, 2] - (1.0 + 0.5 * v[inner, 0])))
    half_pixel_bias = 0.5 * (1.0 / f) * 0.5  # half a pixel along x at z = 1, times the slope
    assert abs(bias) < 0.2 * half_pixel_bias


# ---- automatic sizes ------------------------------------------------------------------------------


def test_auto_sizes_do_not_depend_on_the_scene_scale(tmp_path):
    from pipeline.synthetic.render import render_scene

    sizes = []
    meshes = []
    for scale in (1.0, 10.0):
        scene_dir = render_scene(tmp_path / f"s{scale:g}", shape="blob", n_views=6, width=128, height=96, seed=3,
                                 scale=scale)
        result, scene, params = fuse_ground_truth(scene_dir, FuseConfig(), "auto")
        sizes.append(params)
        meshes.append(result.mesh)
    a, b = sizes
    for name in ("voxel_size", "sdf_trunc", "depth_max"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5), name
    np.testing.assert_allclose(a.roi_min, b.roi_min, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.roi_max, b.roi_max, rtol=1e-5, atol=1e-6)
    # The same surface in the normalized frame.
    assert len(meshes[1].triangles) == pytest.approx(len(meshes[0].triangles), rel=0.01)


def test_absolute_settings_override_the_auto_values(gt_scene):
    auto = resolve_params(FuseConfig(), gt_scene)
    fixed = resolve_params(FuseConfig(voxel_size=0.02, sdf_trunc=0.05, depth_max=2.5, crop=False), gt_scene)
    assert (fixed.voxel_size, fixed.sdf_trunc, fixed.depth_max, fixed.roi) == (0.02, 0.05, 2.5, None)
    assert auto.sdf_trunc == pytest.approx(FuseConfig().trunc_voxels * auto.voxel_size)
    # Half-resolution depth maps: twice the pixel footprint.
    assert resolve_params(FuseConfig(), gt_scene, focal_scale=0.5).voxel_size == pytest.approx(2 * auto.voxel_size)


def test_region_of_interest_holds_the_object(rendered, gt_scene):
    params = resolve_params(FuseConfig(), gt_scene)
    info = scene_info(rendered)
    T = gt_scene.normalized_from_sfm
    lo = np.asarray(info["object_bbox_min"]) @ T[:3, :3].T + T[:3, 3]
    hi = np.asarray(info["object_bbox_max"]) @ T[:3, :3].T + T[:3, 3]
    roi_lo, roi_hi = params.roi
    assert np.all(roi_lo <= lo) and np.all(roi_hi >= hi)
    # ... but not the whole room: the walls are more than 2 object diagonals away.
    diag = info["object_diagonal"] * T[0, 0]
    assert np.all(roi_hi - roi_lo < 2.5 * diag)


def test_negative_visibility_settings_fail_clearly(gt_scene):
    with pytest.raises(ReconError, match="visibility_margin"):
        resolve_params(FuseConfig(visibility_margin=-0.1), gt_scene)
    with pytest.raises(ReconError, match="visibility_agree"):
        resolve_params(FuseConfig(visibility_agree=0.0), gt_scene)


def test_inverted_poses_fail_clearly(gt_scene):
    z = np.concatenate([(gt_scene.points[v.point_ids] @ v.cam_from_world[2, :3] + v.cam_from_world[2, 3])
                        for v in gt_scene.views])
    check_poses(z)
    with pytest.raises(ReconError, match="world→camera"):
        check_poses(-z)


# ---- what is fused ---------------------------------------------------------------------------------


def test_fusion_depth_drops_invalid_low_confidence_masked_and_far_pixels():
    depth = np.array([[1.0, 2.0, 3.0, np.nan], [1.0, 1.0, 1.0, 1.0]], np.float32)
    conf = np.array([[1.0, 1.0, 1.0, 1.0], [0.05, 0.5, 1.0, 1.0]], np.float32)
    valid = np.array([[True, True, True, True], [True, True, False, True]])
    mask = np.array([[True, True, True, True], [True, True, True, False]])
    dm = DepthMap(name="a", depth=depth, confidence=conf, valid=valid, K=np.eye(3), cam_from_world=np.eye(4))
    out = fusion_depth(dm, min_confidence=0.1, depth_max=2.5, mask=mask)
    assert out.tolist() == [[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_resize_rgb_to_the_depth_resolution():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = 255
    out = resize_rgb(rgb, (2, 3))
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    assert out[:, 0].min() == 1.0 and out[:, 2].max() == 0.0 and 0.4 < out[0, 1, 0] < 0.6  # box filter


def test_clean_mesh_crops_and_removes_small_components():
    big = o3d.geometry.TriangleMesh.create_sphere(1.0, 40)
    small = o3d.geometry.TriangleMesh.create_sphere(0.1, 5).translate((3.0, 0.0, 0.0))
    far = o3d.geometry.TriangleMesh.create_sphere(0.5, 20).translate((10.0, 0.0, 0.0))
    merged = big + small + far
    merged.vertex_colors = o3d.utility.Vector3dVector(np.full((len(merged.vertices), 3), 0.5))
    n_big, n_small = len(big.triangles), len(small.triangles)
    assert n_small < 0.05 * n_big
    kept = clean_mesh(merged, (np.full(3, -5.0), np.full(3, 5.0)), 0.05)
    assert len(kept.triangles) == n_big
    assert np.asarray(kept.vertices).max() <= 1.0 + 1e-9 and kept.has_vertex_colors()
    assert len(clean_mesh(merged, None, 0.0).triangles) == len(merged.triangles)


def test_visibility_votes_see_through_agree_and_abstain():
    K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])
    depth = np.full((80, 100), 2.0, dtype=np.float32)
    depth[:, 90:] = 0.0  # no depth in the right-hand columns
    vertices = np.array([
        [0.0, 0.0, 1.0],    # in front of the map's surface: seen through
        [0.0, 0.0, 2.01],   # on it (0.5 %): agrees
        [0.0, 0.0, 2.2],    # 9 % behind it: hidden, no vote
        [0.0, 0.0, 1.9],    # 5 % in front: within the margin, no vote
        [0.9, 0.0, 2.0],    # projects to u = 95, a pixel without depth
        [5.0, 0.0, 1.0],    # outside the image
        [0.0, 0.0, -1.0],   # behind the camera
    ])
    through, agree = visibility_votes(vertices, depth, K, np.eye(4), margin=0.12, agree=0.01)
    assert through.tolist() == [True, False, False, False, False, False, False]
    assert agree.tolist() == [False, True, False, False, False, False, False]
    # the same vertices seen from a camera shifted by +1 along x: the pose is applied
    cam_from_world = np.eye(4)
    cam_from_world[0, 3] = -1.0
    through2, _ = visibility_votes(vertices + [1.0, 0.0, 0.0], depth, K, cam_from_world, margin=0.12, agree=0.01)
    assert through2.tolist() == through.tolist()


def test_visibility_outliers_need_more_maps_seeing_through_than_agreeing():
    through = np.array([0, 1, 1, 2, 3])
    agree = np.array([0, 0, 1, 1, 5])
    assert visibility_outliers(through, agree).tolist() == [False, True, False, True, False]


def test_remove_vertices_drops_their_triangles_and_keeps_colours():
    mesh = o3d.geometry.TriangleMesh.create_box()
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.random.default_rng(0).random((len(mesh.vertices), 3)))
    drop = np.zeros(len(mesh.vertices), bool)
    drop[0] = True
    kept = remove_vertices(mesh, drop)
    uses_0 = (np.asarray(mesh.triangles) == 0).any(1).sum()
    assert len(kept.triangles) == len(mesh.triangles) - uses_0
    assert len(kept.vertices) == len(mesh.vertices) - 1
    assert not np.any(np.all(np.isclose(np.asarray(kept.vertices), np.asarray(mesh.vertices)[0]), axis=1))
    original = {tuple(v): tuple(c) for v, c in zip(np.asarray(mesh.vertices), np.asarray(mesh.vertex_colors))}
    assert all(original[tuple(v)] == tuple(c)
               for v, c in zip(np.asarray(kept.vertices), np.asarray(kept.vertex_colors)))


def test_visibility_cleaning_removes_a_floater_and_keeps_the_surface(gt_scene, small_frames):
    """A view whose depth has a patch at half the true depth fuses a floater; the other views see through it."""
    params = replace(resolve_params(FuseConfig(), gt_scene), visibility_margin=0.0)
    reference = fuse_depth_maps(small_frames, params, "auto").mesh
    first = small_frames[0]
    dm = first.depth_map
    h, w = dm.shape
    depth = dm.depth.copy()
    patch = np.zeros((h, w), bool)
    patch[h // 3: h // 2, w // 3: w // 2] = True
    depth[patch & dm.valid] *= 0.5
    corrupted = replace(first, depth_map=replace(dm, depth=depth))
    frames = [*small_frames, corrupted]

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(reference))

    def off_surface(mesh) -> int:
        d = scene.compute_distance(o3d.core.Tensor(np.asarray(mesh.vertices, dtype=np.float32))).numpy()
        return int((d > 3 * params.voxel_size).sum())

    plain = fuse_depth_maps(frames, params, "auto")
    cleaned = fuse_depth_maps(frames, replace(params, visibility_margin=0.12), "auto")
    assert off_surface(plain.mesh) > 200, "the corrupted view should fuse a floater"
    assert off_surface(cleaned.mesh) < 0.1 * off_surface(plain.mesh)
    assert cleaned.stats["visibility_removed_vertices"] > 0
    assert len(cleaned.mesh.vertices) > 0.9 * len(reference.vertices)


# ---- the hash map ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_frames(rendered, gt_scene):
    return list(ground_truth_frames(rendered, gt_scene))[:4]


def test_tiny_block_count_grows_to_the_same_mesh(gt_scene, small_frames):
    params = resolve_params(FuseConfig(), gt_scene)
    counted = fuse_depth_maps(small_frames, params, "auto")
    tiny = fuse_depth_maps(small_frames, FusionParams(**{**vars(params), "block_count": 1}), "auto")
    assert tiny.stats["capacity"] >= tiny.stats["blocks"] == counted.stats["blocks"]
    assert len(tiny.mesh.triangles) == len(counted.mesh.triangles)
    np.testing.assert_allclose(np.asarray(tiny.mesh.vertices).mean(0), np.asarray(counted.mesh.vertices).mean(0),
                               atol=1e-9)


def test_dropped_blocks_are_detected_and_retried(gt_scene, small_frames, monkeypatch):
    params = resolve_params(FuseConfig(), gt_scene)
    reference = fuse_depth_maps(small_frames, params, "auto")
    integrate = tsdf._Integrator.integrate
    calls = {"n": 0}

    def drop_once(self, grid, frame, prepared):
        calls["n"] += 1
        if calls["n"] == 2:  # the second view of the first attempt "overflows"
            raise tsdf._BlocksDropped("simulated")
        return integrate(self, grid, frame, prepared)

    monkeypatch.setattr(tsdf._Integrator, "integrate", drop_once)
    retried = fuse_depth_maps(small_frames, params, "auto")
    assert retried.stats["attempts"] == 2
    assert retried.stats["capacity"] >= 2 * (reference.stats["blocks_counted"])
    assert len(retried.mesh.triangles) == len(reference.mesh.triangles)

    def always_drop(self, grid, frame, prepared):
        raise tsdf._BlocksDropped("simulated")

    monkeypatch.setattr(tsdf._Integrator, "integrate", always_drop)
    with pytest.raises(ReconError, match="dropping blocks|max_memory_gb"):
        fuse_depth_maps(small_frames, params, "auto")


def test_grid_beyond_the_memory_limit_fails_clearly(gt_scene, small_frames):
    params = FusionParams(**{**vars(resolve_params(FuseConfig(), gt_scene)), "max_memory_gb": 1e-4})
    with pytest.raises(ReconError, match="max_memory_gb"):
        fuse_depth_maps(small_frames, params, "auto")


def test_cuda_request_without_cuda_fails_clearly():
    if o3d.core.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ReconError, match="CUDA"):
        tsdf.open3d_device("cuda")


# ---- the stage ---------------------------------------------------------------------------------------


def object_pixels(scene_dir: Path, name: str, K: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose GT surface point lies in the object's box (grown by 2 % of its diagonal, above the
    floor)."""
    info = scene_info(scene_dir)
    depth = np.load(gt_depth_path(scene_dir / "gt", name))
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w] + 0.5
    cam = np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], -1)
    world = (cam - cam_from_world[:3, 3]) @ cam_from_world[:3, :3]
    grow = 0.02 * info["object_diagonal"]
    lo, hi = np.asarray(info["object_bbox_min"]) - grow, np.asarray(info["object_bbox_max"]) + grow
    lo[2] = info["object_bbox_min"][2] + 1e-3 * info["object_diagonal"]  # leave the floor in
    return (depth > 0) & np.all((world >= lo) & (world <= hi), axis=-1)


@pytest.mark.slow
def test_stage_fuses_refined_depth_and_masks_remove_the_object(rendered, gt_scene, tmp_path, monkeypatch):
    monkeypatch.setattr(fuse, "load_sfm_scene", lambda ws: gt_scene)
    ws = Workspace.create(rendered, tmp_path / "out")
    write_gt_depth_views(rendered, gt_scene, ws.refine_view)

    ctx = stage_context(ws)
    fuse.run(ctx)
    mesh = load_ply(ws.fuse_mesh)
    assert ctx.summary["vertices"] == len(mesh.vertices) and ctx.summary["faces"] == len(mesh.triangles)
    assert ctx.summary["source"] == "refine" and ctx.summary["voxel_size"] > 0 and ctx.summary["seconds"] > 0
    assert mesh.has_vertex_colors()
    unmasked = score(mesh, rendered, gt_scene.normalized_from_sfm, "object.ply")["thresholds"]["1%"]["recall"]
    assert unmasked >= 0.95

    # Mask the object out of every view: its surface must disappear from the mesh (the floor stays).
    masks = ws.masks_dir
    masks.mkdir(parents=True, exist_ok=True)
    for view in gt_scene.views:
        keep = ~object_pixels(rendered, view.name, view.K, load_gt_pose(rendered, view.name))  # GT frame, GT depth
        Image.fromarray((keep * 255).astype(np.uint8)).save(masks / Path(view.name).with_suffix(".png").name)
    try:
        ctx = stage_context(ws)
        fuse.run(ctx)
        masked_mesh = load_ply(ws.fuse_mesh)
        masked = score(masked_mesh, rendered, gt_scene.normalized_from_sfm, "object.ply")["thresholds"]["1%"]["recall"]
    finally:
        for p in masks.iterdir():
            p.unlink()
        masks.rmdir()
    assert masked < 0.1, masked
    assert len(masked_mesh.triangles) > 0.2 * len(mesh.triangles)  # the floor around it is still there


def load_gt_pose(scene_dir: Path, name: str) -> np.ndarray:
    from pipeline.synthetic.groundtruth import load_gt_cameras

    cams, _, _ = load_gt_cameras(scene_dir / "gt")
    return cams[name][1]


def test_stage_reads_the_initial_depth_when_refine_is_skipped(rendered, gt_scene, tmp_path, monkeypatch):
    monkeypatch.setattr(fuse, "load_sfm_scene", lambda ws: gt_scene)
    ws = Workspace.create(rendered, tmp_path / "out")
    cfg = ReconConfig()
    with pytest.raises(ReconError, match="no depth maps"):
        fuse.run(stage_context(ws, cfg, frozenset({"refine"})))
    write_gt_depth_views(rendered, gt_scene, ws.depth_view)
    cfg.fuse.voxel_size = 0.02  # coarse: only the plumbing is checked here
    ctx = stage_context(ws, cfg, frozenset({"refine"}))
    fuse.run(ctx)
    assert ctx.summary["source"] == "depth" and ctx.summary["voxel_size"] == 0.02
    assert len(load_ply(ws.fuse_mesh).triangles) == ctx.summary["faces"] > 0
    assert not any(p.name.startswith(".") for p in ws.fuse_mesh.parent.iterdir())  # no temp files left


def _speck(frame: tsdf.FusionFrame) -> tsdf.FusionFrame:
    """The frame with a 2x2 patch of its depth left (what a mask keeping a speck leaves), off the every-4th-pixel
    grid on which Open3D looks for touched blocks."""
    dm = frame.depth_map
    keep = np.zeros_like(dm.valid)
    v, u = np.argwhere(dm.valid)[len(np.argwhere(dm.valid)) // 2] // 4 * 4 + 1
    keep[v : v + 2, u : u + 2] = True
    return replace(frame,
                   depth_map=replace(dm, depth=np.where(keep, dm.depth, 0).astype(np.float32), valid=keep & dm.valid))


def test_a_nearly_empty_view_is_left_out_not_a_crash(gt_scene, small_frames):
    # Open3D raises "No block is touched" for a depth image whose few pixels its subsampled touch misses.
    params = resolve_params(FuseConfig(), gt_scene)
    reference = fuse_depth_maps(small_frames[:3], params, "auto")
    with_speck = fuse_depth_maps([*small_frames[:3], _speck(small_frames[3])], params, "auto")
    assert with_speck.stats["views_fused"] == 3
    assert len(with_speck.mesh.triangles) == len(reference.mesh.triangles)

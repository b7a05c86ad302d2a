"""Depth stage: plane-sweep maths, mvs on a rendered scene, scale anchoring, priors, TorchScript, caching."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import ReconError
from pipeline.core.geometry import pixel_grid
from pipeline.core.io import load_depth_map
from pipeline.core.workers import available_cpus
from pipeline.core.workspace import Workspace, view_stem
from pipeline.depth import anchoring, coarse_to_fine, consistency
from pipeline.depth import plane_sweep as mvs
from pipeline.depth.estimators import sweep_settings
from pipeline.depth.stage import (
    DepthConfig,
    DepthEstimator,
    MvsConfig,
    PriorKind,
    compute_depth_maps,
    raw_depth_path,
)
from pipeline.depth.views import (
    AUTO_MAX_SIDE_CPU,
    AUTO_MAX_SIDE_CUDA,
    depth_range,
    fit_scene_planes,
    plane_in_camera,
    refit_plane,
    resolution_scale,
    resolve_max_image_side,
    stereo_neighbors,
    working_size,
)
from pipeline.synthetic.groundtruth import gt_depth_path, scene_from_ground_truth

# ---- plane-sweep maths ---------------------------------------------------------------------------


def _stereo_pair(device, f=100.0, baseline=0.2, width=64, height=48):
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], device=device)
    src_from_ref = torch.eye(4, device=device)
    src_from_ref[0, 3] = -baseline  # source camera centre at x = +baseline
    return K, src_from_ref


def test_plane_homography_fronto_parallel_x_translation(device):
    """Plane z = d, source camera moved by B along x: a pure shift by the disparity f·B/d."""
    K, T = _stereo_pair(device)
    d = torch.tensor([4.0, 2.0], device=device)  # disparities 5 px and 10 px
    H = mvs.plane_homographies(K, K, T, d)
    for i, disparity in enumerate((5.0, 10.0)):
        expected = torch.tensor([[1.0, 0.0, -disparity], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=device)
        torch.testing.assert_close(H[i] / H[i, 2, 2], expected, atol=1e-5, rtol=0)


def test_warps_shift_the_source_by_the_disparity(device):
    K, T = _stereo_pair(device)
    g = torch.Generator().manual_seed(0)
    src = torch.rand(1, 1, 48, 64, generator=g).to(device)
    depth = 4.0  # disparity 5 px: ref pixel u reads src at u - 5
    H = mvs.plane_homographies(K, K, T, torch.tensor([depth], device=device))
    w_h, in_h = mvs.warp_by_homography(src, H, 48, 64)
    torch.testing.assert_close(w_h[0, 0, :, 5:], src[0, 0, :, :-5], atol=1e-5, rtol=0)
    assert not in_h[0, 0, :, :4].any() and in_h[0, 0, :, 6:].all()
    A, b = mvs.ray_field(K, K, T, 48, 64)
    w_d, in_d = mvs.warp_by_depth(src, A, b, torch.full((1, 48, 64), depth, device=device))
    w_s, in_s = mvs.warp_source(mvs.make_source(src, K, K, T, 48, 64), torch.full((1, 48, 64), depth, device=device))
    for w, ins in ((w_d, in_d), (w_s, in_s)):
        torch.testing.assert_close(w, w_h, atol=1e-5, rtol=0)
        assert torch.equal(ins, in_h)


def test_splat_depth_moves_a_plane_and_keeps_the_nearest_surface(device):
    """A source map of the plane z = 4 with a near patch (z = 2) seen from the reference camera."""
    K, src_from_ref = _stereo_pair(device)
    depth_src = torch.full((48, 64), 4.0, device=device)
    depth_src[20:28, 30:38] = 2.0
    depth_src[0:4, 0:4] = 0.0  # invalid source pixels propose nothing
    inv = consistency.splat_depth(depth_src, K, K, torch.linalg.inv(src_from_ref), 48, 64)
    # ref pixel u sees the plane where the source sees it at u - 5 (z = 4) and the patch at u - 10 (z = 2)
    torch.testing.assert_close(inv[10, 20:50], torch.full((30,), 0.25, device=device))
    torch.testing.assert_close(inv[22:26, 42:46], torch.full((4, 4), 0.5, device=device))  # the nearer patch wins
    assert (inv[:, :4] == 0).all()  # left of the source's field of view: no proposal


def test_adopt_candidates_takes_the_surface_that_matches(device):
    """Reference = source shifted by the disparity of z = 4; a wrong own depth on the left is replaced by the
    candidate."""
    K, src_from_ref = _stereo_pair(device)
    g = torch.Generator().manual_seed(1)
    src = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 52, 68, generator=g), 3, 1)[..., :48, :64].to(device)
    H = mvs.plane_homographies(K, K, src_from_ref, torch.tensor([4.0], device=device))
    ref, _ = mvs.warp_by_homography(src, H, 48, 64)
    own = torch.full((48, 64), 4.0, device=device)
    own[:, :32] = 2.5  # the wrong basin
    candidate = torch.full((48, 64), 0.25, device=device)  # inverse depth of the right surface
    candidate[:, 32:] = 1.0  # a worse proposal where the own depth is right
    cfg = coarse_to_fine.SweepSettings(window=5, min_ncc=0.3)
    depth, ncc, adopted = consistency.adopt_candidates(ref, K, [src], [K], [src_from_ref], own, [candidate], cfg)
    inner = (slice(4, 44), slice(10, 28))
    torch.testing.assert_close(depth[inner], torch.full((40, 18), 4.0, device=device))
    assert adopted[inner].all() and ncc[inner].min() > 0.9
    assert not adopted[:, 36:60].any() and (depth[4:44, 36:60] == 4.0).all()  # the right surface is kept


def _slanted_floor(device):
    """The plane y = 1 (a floor seen at a grazing angle by a camera tilted 10° down), in the camera frame."""
    a = np.radians(10.0)
    R = torch.tensor([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]], dtype=torch.float32,
                     device=device)
    n = R @ torch.tensor([0.0, 1.0, 0.0], device=device)  # floor normal in the tilted camera frame
    return torch.cat([n, torch.tensor([-1.0], device=device)])


def test_plane_inverse_depth_puts_every_pixel_on_the_plane(device):
    K, _ = _stereo_pair(device)
    plane = _slanted_floor(device)
    inv = coarse_to_fine.plane_inverse_depth(K, plane, 48, 64)
    seen = inv > 0
    assert seen.float().mean() > 0.3 and not seen[0].any()  # the top rows look above the horizon
    p = pixel_grid(48, 64, device=device)[seen]
    X = torch.cat([p, torch.ones_like(p[:, :1])], 1) @ torch.linalg.inv(K).T / inv[seen][:, None]
    torch.testing.assert_close(X @ plane[:3] + plane[3], torch.zeros(len(X), device=device), atol=1e-4, rtol=0)


def test_plane_in_camera_matches_transformed_points():
    rng = np.random.default_rng(0)
    n = rng.normal(size=3)
    n /= np.linalg.norm(n)
    plane_world = np.concatenate([n, [0.3]])
    X = rng.normal(size=(20, 3))
    X -= (X @ n + 0.3)[:, None] * n  # points on the plane
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    cam_from_world = np.eye(4)
    cam_from_world[:3, :3], cam_from_world[:3, 3] = q * np.sign(np.linalg.det(q)), rng.normal(size=3)
    X_cam = X @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    plane_cam = plane_in_camera(plane_world, cam_from_world)
    np.testing.assert_allclose(X_cam @ plane_cam[:3] + plane_cam[3], 0.0, atol=1e-9)


def test_fit_scene_planes_finds_the_floor_and_nothing_else():
    rng = np.random.default_rng(0)
    floor = np.c_[rng.uniform(-1, 1, (700, 2)), rng.normal(0, 1e-3, 700)]  # z = 0
    blob = rng.normal(0, 0.2, (300, 3)) + [0, 0, 0.5]
    planes = fit_scene_planes(np.vstack([floor, blob]), max_planes=3, distance_fraction=0.005, min_inlier_fraction=0.1)
    assert len(planes) == 1  # the blob holds no plane with 10 % of the points
    n, d = planes[0][:3] * np.sign(planes[0][2]), planes[0][3] * np.sign(planes[0][2])
    assert np.degrees(np.arccos(min(1.0, n[2]))) < 1.0 and abs(d) < 0.005
    assert fit_scene_planes(np.vstack([floor, blob]), 0, 0.005, 0.1) == []


def test_refit_plane_settles_on_the_same_plane_from_different_starts():
    """RANSAC's pick depends on the thread count; the least-squares refit must not (deterministic depth maps)."""
    rng = np.random.default_rng(1)
    floor = np.c_[rng.uniform(-1, 1, (500, 2)), rng.normal(0, 2e-3, 500)]
    points = np.vstack([floor, rng.normal(0, 0.3, (200, 3)) + [0, 0, 0.6]])
    starts = [np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.01, -0.01, 1.0, 0.002]), np.array([-0.01, 0.0, -1.0, 0.001])]
    fits = [refit_plane(points, start, 0.01) for start in starts]
    for plane, inliers in fits[1:]:
        np.testing.assert_array_equal(plane, fits[0][0])
        np.testing.assert_array_equal(inliers, fits[0][1])
    plane, inliers = fits[0]
    assert inliers[:500].mean() > 0.99 and abs(plane[2]) > 0.9999 and abs(plane[3]) < 1e-3


def test_plane_candidates_recover_a_slanted_floor(device):
    """A textured floor at a grazing angle: with the plane as a candidate the sweep lands on it exactly."""
    K, src_from_ref = _stereo_pair(device, width=96, height=72)
    K[1, 2] = 12.0  # principal point high up: most rows see the floor
    plane = _slanted_floor(device)
    g = torch.Generator().manual_seed(2)
    src = torch.nn.functional.interpolate(torch.rand(1, 1, 36, 48, generator=g), size=(72, 96),
                                          mode="bilinear").to(device)
    inv_true = coarse_to_fine.plane_inverse_depth(K, plane, 72, 96)
    A, b = mvs.ray_field(K, K, src_from_ref, 72, 96)
    ref, inside = mvs.warp_by_depth(src, A, b, (1.0 / inv_true.clamp(min=1e-3))[None])
    ref = ref[0:1]
    cfg = coarse_to_fine.SweepSettings(num_hypotheses=48, levels=2, window=5, min_ncc=0.3)
    scored = (inv_true > 0.1) & inside[0, 0]
    scored[:, :16] = False  # left border: the source does not see it at every hypothesis

    def good_fraction(planes, max_gap=1.0):
        settings = dataclasses.replace(cfg, plane_max_gap=max_gap)
        res = coarse_to_fine.estimate_depth(ref, K, [src], [K], [src_from_ref], 1.0, 10.0, settings, planes)
        rel = (res.depth * inv_true - 1.0).abs()
        return float(((rel < 0.005) & res.valid)[scored].float().mean())

    without, with_plane = good_fraction([]), good_fraction([plane])
    # measured (CPU): 0.75 of the floor within 0.5 % without the plane, 1.00 with it
    assert with_plane > 0.95 and with_plane > without + 0.05
    # a plane too far from every estimate is never tried
    assert good_fraction([plane], max_gap=0.0) == pytest.approx(without, abs=0.01)


def test_ncc_cost_is_invariant_to_gain_and_offset(device):
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 1, 40, 50, generator=g).to(device)
    stats = mvs.reference_stats(ref, 5)
    inside = torch.ones(2, 1, 40, 50, dtype=torch.bool, device=device)
    other = torch.rand(1, 1, 40, 50, generator=g).to(device)
    cost = mvs.ncc_cost(stats, torch.cat([0.5 * ref + 0.2, other]), inside)
    interior = (slice(2, -2), slice(2, -2))  # zero padding is not gain/offset-invariant at the border
    assert cost[0][interior].max() < 1e-3
    assert 0.6 < cost[1][interior].mean() < 1.4  # unrelated texture: NCC ≈ 0
    inside[1, 0, :, :10] = False
    assert (mvs.ncc_cost(stats, torch.cat([ref, other]), inside)[1, :, :10] == mvs.OUTSIDE_COST).all()


@pytest.mark.parametrize("copies", [4, 5, 6])  # 12, 15 and 18 channels: depthwise convolution
def test_box_filter_paths_agree(copies):
    g = torch.Generator().manual_seed(2)
    few = torch.rand(1, 3, 30, 40, generator=g)  # 3 channels: shifted sums
    many = few.repeat(1, copies, 1, 1)
    torch.testing.assert_close(mvs.box_filter(few, 5), mvs.box_filter(many, 5)[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(mvs.box_filter(few, 5)[0, 0, 10, 10], few[0, 0, 8:13, 8:13].mean(), atol=1e-6, rtol=0)


def test_best_k_matches_sorting(device):
    g = torch.Generator().manual_seed(3)
    costs = torch.rand(5, 4, 6, 7, generator=g).to(device)
    for k in (1, 2, 3, 5):
        expected = costs.sort(dim=0).values[:k].mean(0)
        torch.testing.assert_close(mvs.aggregate_best_k(costs, k), expected)


def test_winner_take_all_parabola_is_exact_on_a_parabola(device):
    d = torch.arange(8, dtype=torch.float32, device=device)[:, None, None].expand(8, 2, 3)
    cost = 0.1 + (d - 3.3) ** 2
    index, best = mvs.winner_take_all(cost)
    torch.testing.assert_close(index, torch.full((2, 3), 3.3, device=device), atol=1e-4, rtol=0)
    torch.testing.assert_close(best, torch.full((2, 3), 0.1, device=device), atol=1e-4, rtol=0)
    edge = 0.1 + (d - 0.0) ** 2  # minimum at the first hypothesis: no extrapolation
    assert torch.equal(mvs.winner_take_all(edge)[0], torch.zeros(2, 3, device=device))


def test_bad_mvs_settings_are_reported(scene, tmp_path):
    ws = Workspace(scene_dir=tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(ReconError, match=r"mvs.ncc_window must be odd.*mvs.best_k must be >= 1"):
        compute_depth_maps(scene, ws, DepthConfig(), MvsConfig(ncc_window=4, best_k=0))


def test_working_size():
    assert working_size(480, 360, 640) == (480, 360)
    assert working_size(4000, 3000, 640) == (640, 480)
    assert working_size(3000, 4000, 640) == (480, 640)
    assert working_size(4000, 3000, 0) == (4000, 3000)  # 0: full resolution


def test_the_sweep_settings_in_pixels_follow_the_working_resolution():
    cfg = MvsConfig()  # 5x5 windows, shifts (3, 8), median radius 2, 2 levels (scales below: map side / reference)
    assert resolution_scale((480, 360), 640) == resolution_scale((640, 480), 640) == 1.0  # never scaled down
    assert resolution_scale((1024, 768), 640) == pytest.approx(1.6)
    assert resolution_scale((4000, 3000), 0) == 1.0  # 0: never scaled
    base = sweep_settings(cfg)
    assert sweep_settings(cfg, 1.0) == base
    assert (base.window, base.propagation_shifts, base.smooth_radius, base.levels) == (5, (3, 8), 2, 2)
    at_1024 = sweep_settings(cfg, 1.6)
    assert (at_1024.window, at_1024.propagation_shifts, at_1024.smooth_radius, at_1024.levels) == (9, (5, 13), 3, 3)
    at_1600 = sweep_settings(cfg, 2.5)
    assert (at_1600.window, at_1600.propagation_shifts, at_1600.smooth_radius, at_1600.levels) == (13, (8, 20), 5, 3)
    assert sweep_settings(cfg, 1.05).window == 5  # a few pixels more keep the window
    at_2560 = sweep_settings(cfg, 4.0)
    assert at_2560.window % 2 == 1 and at_2560.levels == 4
    # what does not depend on pixels is left alone
    assert (at_1600.num_hypotheses, at_1600.edge_radius, at_1600.min_ncc) == (base.num_hypotheses, base.edge_radius,
                                                                                base.min_ncc)


def test_automatic_working_side_follows_the_photos_and_the_device():
    assert resolve_max_image_side(None, "cpu") == AUTO_MAX_SIDE_CPU
    assert resolve_max_image_side(None, "cuda") == resolve_max_image_side(None, "cuda:1") == AUTO_MAX_SIDE_CUDA
    assert resolve_max_image_side(800, "cuda") == 800 and resolve_max_image_side(0, "cpu") == 0  # a set value wins
    # photos smaller than the automatic side keep their size; larger ones come down to it
    assert working_size(480, 360, resolve_max_image_side(None, "cpu")) == (480, 360)
    side = AUTO_MAX_SIDE_CUDA
    assert working_size(3072, 2048, resolve_max_image_side(None, "cuda")) == (side, round(2048 * side / 3072))


def test_automatic_side_shares_caches_with_the_side_it_resolves_to():
    """The depth fingerprint holds the side used here: automatic and the same value set by hand share caches."""
    from pipeline.config import load_config
    from pipeline.core.geometry import default_device
    from pipeline.graph import stage_fingerprint

    here = resolve_max_image_side(None, str(default_device("auto")))
    auto, by_hand, other = (load_config(overrides=o) for o in ([], [f"depth.max_image_side={here}"],
                                                                ["depth.max_image_side=320"]))
    assert stage_fingerprint("depth", auto, {}) == stage_fingerprint("depth", by_hand, {})
    assert stage_fingerprint("depth", auto, {}) != stage_fingerprint("depth", other, {})


# ---- anchoring ------------------------------------------------------------------------------------


def test_fit_scale_is_robust_to_outliers():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 3.0, 500)
    z = 2.5 * x * (1 + 0.01 * rng.standard_normal(500))
    z[:100] *= rng.uniform(0.2, 5.0, 100)  # 20 % gross outliers
    assert anchoring.fit_scale(x, z) == pytest.approx(2.5, rel=5e-3)


def test_fit_scale_shift_in_inverse_depth():
    rng = np.random.default_rng(1)
    inv = rng.uniform(0.3, 2.0, 400)  # true inverse depth
    disparity = (inv - 0.15) / 0.6  # an affine-invariant prior: inv = 0.6 * disparity + 0.15
    disparity += 0.002 * rng.standard_normal(400)
    disparity[:60] = rng.uniform(0, 3, 60)  # 15 % outliers
    a, b = anchoring.fit_scale_shift(disparity, inv)
    assert a == pytest.approx(0.6, rel=0.02) and b == pytest.approx(0.15, abs=0.01)


def _synthetic_view(h=60, w=80, n=200, seed=0):
    """A tilted-plane depth map, sparse points on it (pixel coordinates + depths)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    depth = (1.0 + 0.01 * u + 0.005 * v).astype(np.float64)
    uv = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
    z = depth[np.floor(uv[:, 1]).astype(int), np.floor(uv[:, 0]).astype(int)]
    return depth, uv, z


def test_anchor_recovers_scale_and_reports_residuals():
    depth, uv, z = _synthetic_view()
    res = anchoring.anchor(depth / 3.7, np.ones_like(depth, bool), uv, z, domain=anchoring.DEPTH, affine=False,
                           min_points=20)
    assert res.scale == pytest.approx(3.7, rel=1e-6) and res.shift == 0.0
    assert res.residual_before > 0.7 and res.residual_after < 1e-6
    aligned, valid = anchoring.apply_anchor(depth / 3.7, np.ones_like(depth, bool), res)
    np.testing.assert_allclose(aligned, depth, rtol=1e-5)


def test_anchor_affine_inverse_depth_prior():
    depth, uv, z = _synthetic_view()
    disparity = 2.0 / depth + 0.3
    res = anchoring.anchor(disparity, np.ones_like(depth, bool), uv, z, domain=anchoring.INVERSE_DEPTH, affine=True,
                           min_points=20)
    assert res.scale == pytest.approx(0.5, rel=1e-3) and res.shift == pytest.approx(-0.15, abs=1e-3)
    aligned, _ = anchoring.apply_anchor(disparity, np.ones_like(depth, bool), res)
    np.testing.assert_allclose(aligned, depth, rtol=1e-3)
    assert res.residual_after < 1e-3


def test_anchor_failures():
    depth, uv, z = _synthetic_view()
    ok = np.ones_like(depth, bool)
    with pytest.raises(anchoring.AnchorError, match="only 5 sparse point"):
        anchoring.anchor(depth, ok, uv[:5], z[:5], domain=anchoring.DEPTH, affine=False, min_points=20)
    with pytest.raises(anchoring.AnchorError, match="wrong sign"):
        anchoring.anchor(1.0 / depth, ok, uv, z, domain=anchoring.DEPTH, affine=False, min_points=20)


# ---- a rendered scene -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    """10 views, 320x240, two rings of cameras around the blob object (rendered once)."""
    from pipeline.synthetic.render import render_scene

    return render_scene(tmp_path_factory.mktemp("depth") / "blob", shape="blob", n_views=10, width=320, height=240,
                        seed=0)


@pytest.fixture(scope="module")
def scene(scene_dir):
    return scene_from_ground_truth(scene_dir)


@pytest.fixture(scope="module")
def mvs_run(scene_dir, scene, tmp_path_factory):
    """The default mvs estimator over the whole scene (cached maps in a workspace)."""
    ws = Workspace.create(scene_dir, tmp_path_factory.mktemp("mvs_out"))
    result = compute_depth_maps(scene, ws, DepthConfig(device="cpu"), MvsConfig())
    return ws, result


def _gt_depth(scene_dir, scene, view, shape):
    """GT z-depth of a view in the normalized frame, resampled (nearest) to ``shape``."""
    gt = np.load(gt_depth_path(scene_dir / "gt", view.name)) * scene.normalized_from_sfm[0, 0]
    if gt.shape != shape:
        gt = torch.nn.functional.interpolate(torch.from_numpy(gt)[None, None], size=shape, mode="nearest")[0, 0].numpy()
    return gt


def _depth_errors(scene_dir, scene, path_of):
    rows = []
    for v in scene.views:
        dm = load_depth_map(path_of(v.name))
        gt = _gt_depth(scene_dir, scene, v, dm.shape)
        m = dm.valid & (gt > 0)
        rel = np.abs(dm.depth[m] - gt[m]) / gt[m]
        rows.append((np.median(rel), np.mean(rel < 0.01), np.mean(rel < 0.05), m.mean()))
    return np.array(rows)


def test_neighbors_and_depth_range(scene_dir, scene):
    nbrs = stereo_neighbors(scene, 4, 10.0, 60.0)
    centers = np.stack([v.center for v in scene.views])
    for i, nb in enumerate(nbrs):
        assert 1 <= len(nb) <= 4 and i not in nb
        for j in nb:  # within the angle limit of the object seen from both cameras
            a, b = -centers[i], -centers[j]
            assert np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))) < 75
    near, far = depth_range(scene, scene.views[0], 2.0, 0.25)
    z = _gt_depth(scene_dir, scene, scene.views[0], (240, 320))
    assert near < np.percentile(z[z > 0], 5) and far > np.percentile(z[z > 0], 95)


def test_mvs_depth_matches_ground_truth(scene_dir, scene, mvs_run):
    ws, result = mvs_run
    assert sorted(result.written) == sorted(v.name for v in scene.views) and not result.failed
    final = _depth_errors(scene_dir, scene, ws.depth_view)
    raw = _depth_errors(scene_dir, scene, lambda n: raw_depth_path(ws, n))
    # Measured on this scene (defaults, CPU): final maps median AbsRel 0.0012, δ<1 % 0.95 (worst view 0.91),
    # δ<5 % 0.99, valid 0.55; raw maps AbsRel 0.004, valid 0.92. Asserted with margin.
    assert np.median(final[:, 0]) < 0.003
    assert final[:, 1].mean() > 0.85 and final[:, 1].min() > 0.75 and final[:, 2].mean() > 0.95
    assert final[:, 3].mean() > 0.4
    assert np.median(raw[:, 0]) < 0.01 and raw[:, 3].mean() > 0.8
    # the filter trades coverage for accuracy
    assert raw[:, 3].mean() > final[:, 3].mean() and final[:, 1].mean() > raw[:, 1].mean()


def test_mvs_cache_contents(scene, mvs_run):
    ws, _ = mvs_run
    v = scene.views[0]
    dm = load_depth_map(ws.depth_view(v.name))
    assert dm.depth.dtype == np.float32 and dm.shape == (240, 320)
    assert np.all(dm.depth[~dm.valid] == 0) and np.all(dm.depth[dm.valid] > 0)
    assert np.all((dm.confidence >= 0) & (dm.confidence <= 1)) and np.all(dm.confidence[~dm.valid] == 0)
    np.testing.assert_allclose(dm.K, v.K)  # 320x240 is below max_image_side: full resolution
    np.testing.assert_allclose(dm.cam_from_world, v.cam_from_world)
    a = dm.stats["anchoring"]
    assert a["scale"] == pytest.approx(1.0, abs=0.05) and a["applied"] is False  # metric already
    assert dm.stats["near"] < dm.stats["far"] and dm.stats["seconds"] > 0 and len(dm.stats["neighbors"]) >= 1
    assert "geometric_filter" in dm.stats and dm.stats["raw_valid_fraction"] >= dm.stats["valid_fraction"]


def test_mvs_resumes_per_view_and_per_pass(scene, mvs_run):
    ws, _ = mvs_run
    a, b = scene.views[1].name, scene.views[2].name
    before = load_depth_map(ws.depth_view(a))
    ws.depth_view(a).unlink()  # an interrupted filter pass: one filtered map missing
    raw_depth_path(ws, b).unlink()  # an interrupted first pass: one raw map missing (and its filtered map)
    ws.depth_view(b).unlink()
    res = compute_depth_maps(scene, ws, DepthConfig(device="cpu"), MvsConfig())
    assert len(res.seconds) == 1  # only view b was estimated again
    after = load_depth_map(ws.depth_view(a))
    np.testing.assert_array_equal(after.valid, before.valid)
    np.testing.assert_allclose(after.depth, before.depth, rtol=1e-6)
    assert ws.depth_view(b).exists() and raw_depth_path(ws, b).exists()


def test_mvs_maps_are_the_same_for_any_number_of_cpu_workers(scene, mvs_run, tmp_path):
    """Views in parallel threads (the default on a CPU: one per core) give the maps one thread gives."""
    ws, _ = mvs_run
    ws_one = Workspace.create(ws.scene_dir, tmp_path / "one")
    res = compute_depth_maps(scene, ws_one, DepthConfig(device="cpu", cpu_workers=1), MvsConfig())
    assert sorted(res.written) == sorted(v.name for v in scene.views)
    assert load_depth_map(ws.depth_view(scene.views[0].name)).stats["workers"] == available_cpus()
    for v in scene.views:
        for path in (raw_depth_path, lambda w, n: w.depth_view(n)):
            a, b = load_depth_map(path(ws, v.name)), load_depth_map(path(ws_one, v.name))
            np.testing.assert_array_equal(a.depth, b.depth)
            np.testing.assert_array_equal(a.confidence, b.confidence)
            np.testing.assert_array_equal(a.valid, b.valid)


def test_geometric_consistency_on_ground_truth(scene_dir, scene, device):
    v0, v1 = scene.views[0], scene.views[1]
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    d0 = t(_gt_depth(scene_dir, scene, v0, (240, 320)))
    d1 = t(_gt_depth(scene_dir, scene, v1, (240, 320)))
    rel = t(v1.cam_from_world @ np.linalg.inv(v0.cam_from_world))
    cons = consistency.geometric_consistency(d0, t(v0.K), [(d1, t(v1.K), rel)], 1.0, 0.01)
    assert cons.count.float().mean() > 0.3  # the overlap of two true maps agrees
    assert cons.violations.float().mean() < 0.03  # only at depth edges (bilinear reads mix both sides)
    agree = cons.count > 0
    torch.testing.assert_close(cons.mean_depth[agree], d0[agree], rtol=2e-3, atol=0)
    cons = consistency.geometric_consistency(d0, t(v0.K), [(d1 * 1.05, t(v1.K), rel)], 1.0, 0.01)
    assert cons.count.float().mean() < 0.01  # 5 % off: nothing agrees
    cons = consistency.geometric_consistency(d0 * 0.9, t(v0.K), [(d1, t(v1.K), rel)], 1.0, 0.01)
    # 10 % too near: in v1's free space
    assert cons.count.float().mean() < 0.01 and cons.violations.float().mean() > 0.3


# ---- priors and TorchScript ---------------------------------------------------------------------------


def _write_priors(scene_dir, scene, prior_dir, transform, rng):
    prior_dir.mkdir(parents=True, exist_ok=True)
    for v in scene.views:
        gt = np.load(gt_depth_path(scene_dir / "gt", v.name)).astype(np.float64)
        np.save(prior_dir / f"{view_stem(v.name)}.npy", transform(gt, rng).astype(np.float32))


def _prior_ws(scene_dir, tmp_path):
    """A workspace whose scene folder holds only depth_prior/ (the views read the rendered images)."""
    ws = Workspace(scene_dir=tmp_path / "scene", out_dir=tmp_path / "out")
    ws.scene_dir.mkdir(parents=True, exist_ok=True)
    return ws


def _rel_errors(scene_dir, scene, ws):
    rows = []
    for v in scene.views:
        if not ws.depth_view(v.name).exists():
            continue
        dm = load_depth_map(ws.depth_view(v.name))
        gt = _gt_depth(scene_dir, scene, v, dm.shape)
        m = dm.valid & (gt > 0)
        rows.append(np.median(np.abs(dm.depth[m] - gt[m]) / gt[m]))
    return np.array(rows)


def test_depth_prior_scale_only(scene_dir, scene, tmp_path):
    ws = _prior_ws(scene_dir, tmp_path)
    rng = np.random.default_rng(0)
    _write_priors(scene_dir, scene, ws.depth_prior_dir,
                  lambda gt, r: gt * 3.7 * (1 + 0.003 * r.standard_normal(gt.shape)), rng)
    res = compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.prior, device="cpu"), MvsConfig())
    assert len(res.written) == len(scene.views)
    assert np.max(_rel_errors(scene_dir, scene, ws)) < 0.005
    dm = load_depth_map(ws.depth_view(scene.views[0].name))
    expected = scene.normalized_from_sfm[0, 0] / 3.7
    assert dm.stats["anchoring"]["scale"] == pytest.approx(expected, rel=0.005)
    assert dm.stats["anchoring"]["residual_before"] > 0.5 and dm.stats["anchoring"]["residual_after"] < 0.005
    assert not raw_depth_path(ws, scene.views[0].name).exists()  # no filter pass for priors


def test_depth_prior_affine_inverse_depth_png(scene_dir, scene, tmp_path):
    ws = _prior_ws(scene_dir, tmp_path)
    ws.depth_prior_dir.mkdir(parents=True)
    for v in scene.views:
        gt = np.load(gt_depth_path(scene_dir / "gt", v.name)).astype(np.float64)
        disparity = np.where(gt > 0, 2.0 / np.maximum(gt, 1e-6) + 0.5, 0.0)  # affine in inverse depth
        Image.fromarray((disparity * 10000).astype(np.uint16)).save(ws.depth_prior_dir / f"{view_stem(v.name)}.png")
    cfg = DepthConfig(estimator=DepthEstimator.prior, prior_kind=PriorKind.inverse_depth, prior_affine=True,
                      device="cpu")
    res = compute_depth_maps(scene, ws, cfg, MvsConfig())
    assert len(res.written) == len(scene.views)
    assert np.max(_rel_errors(scene_dir, scene, ws)) < 0.005


def test_bad_priors_are_left_out_with_warnings(scene_dir, scene, tmp_path, caplog):
    ws = _prior_ws(scene_dir, tmp_path)
    _write_priors(scene_dir, scene, ws.depth_prior_dir, lambda gt, r: gt * 2.0, np.random.default_rng(0))
    names = [view_stem(v.name) for v in scene.views]
    nan_prior = np.load(ws.depth_prior_dir / f"{names[0]}.npy")
    nan_prior[10:20, 10:20] = np.nan
    np.save(ws.depth_prior_dir / f"{names[0]}.npy", nan_prior)
    np.save(ws.depth_prior_dir / f"{names[1]}.npy", np.ones((50, 50), np.float32))  # wrong shape (aspect)
    np.save(ws.depth_prior_dir / f"{names[2]}.npy", np.ones((2, 240, 320), np.float32))  # not a single map
    few = np.zeros((240, 320), np.float32)
    few[:3, :3] = 1.0  # almost no valid pixel: too few sparse points land on it
    np.save(ws.depth_prior_dir / f"{names[3]}.npy", few)
    (ws.depth_prior_dir / f"{names[4]}.npy").unlink()  # missing
    with caplog.at_level(logging.WARNING, logger="pipeline.depth.stage"):
        res = compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.prior, device="cpu"), MvsConfig())
    assert sorted(res.failed) == sorted(v.name for v in scene.views[:5])
    assert len(res.written) == len(scene.views) - 5
    text = caplog.text
    assert f"{names[0]}.npy: the prior holds 100 NaN/inf" in text
    assert f"{names[1]}.npy: shape 50x50" in text and "does not match the image" in text
    assert f"{names[2]}.npy: the prior has shape (2, 240, 320)" in text
    assert f"{names[3]}.npy: cannot anchor" in text and "sparse point" in text
    assert f"{names[4]}.npy: no prior for image" in text
    assert text.count("view left out") == 5


def test_all_priors_bad_is_an_error(scene_dir, scene, tmp_path):
    ws = _prior_ws(scene_dir, tmp_path)
    _write_priors(scene_dir, scene, ws.depth_prior_dir, lambda gt, r: np.full_like(gt, np.inf),
                  np.random.default_rng(0))
    with pytest.raises(ReconError, match="no view got a depth map"):
        compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.prior, device="cpu"), MvsConfig())


def test_missing_prior_folder_is_an_error(scene_dir, scene, tmp_path):
    ws = _prior_ws(scene_dir, tmp_path)
    with pytest.raises(ReconError, match="depth_prior: folder of depth priors not found"):
        compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.prior, device="cpu"), MvsConfig())


class _ToyDisparity(torch.nn.Module):
    """A 'network' predicting a ground plane: disparity grows towards the bottom rows, (1, 1, H, W)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = image.shape[-2]
        rows = torch.linspace(0.0, 1.0, h, device=image.device)[:, None]
        return (0.2 + rows + 0.0 * image[:, :1])


class _WrongShape(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :2]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_estimator(scene_dir, scene, tmp_path):
    ws = _prior_ws(scene_dir, tmp_path)
    model = tmp_path / "toy.pt"
    torch.jit.script(_ToyDisparity()).save(str(model))
    cfg = DepthConfig(estimator=DepthEstimator.torchscript, torchscript_path=str(model),
                      prior_kind=PriorKind.inverse_depth, prior_affine=True, max_image_side=160, device="cpu")
    res = compute_depth_maps(scene, ws, cfg, MvsConfig())
    assert len(res.written) == len(scene.views)
    dm = load_depth_map(ws.depth_view(scene.views[0].name))
    assert dm.shape == (120, 160)
    np.testing.assert_allclose(dm.K, scene.views[0].K * np.array([[0.5], [0.5], [1.0]]))
    assert dm.valid.any() and np.all(np.isfinite(dm.depth)) and np.all(dm.depth[dm.valid] > 0)
    assert dm.stats["anchoring"]["applied"] and dm.stats["source"] == str(model)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_errors(scene_dir, scene, tmp_path, caplog):
    ws = _prior_ws(scene_dir, tmp_path)
    with pytest.raises(ReconError, match="TorchScript model not found"):
        compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.torchscript,
                                                  torchscript_path=str(tmp_path / "nope.pt")), MvsConfig())
    bad = tmp_path / "bad.pt"
    torch.jit.script(_WrongShape()).save(str(bad))
    with (caplog.at_level(logging.WARNING, logger="pipeline.depth.stage"),
          pytest.raises(ReconError, match="no view got a depth map")):
        compute_depth_maps(scene, ws, DepthConfig(estimator=DepthEstimator.torchscript, torchscript_path=str(bad),
                                                  max_image_side=80), MvsConfig())
    assert "output of shape (1, 2, 60, 80)" in caplog.text


# ---- the stage ---------------------------------------------------------------------------------------


def test_stage_run_writes_summary(scene_dir, scene, tmp_path, monkeypatch):
    from pipeline.config import ReconConfig
    from pipeline.core.context import StageContext
    from pipeline.depth import stage as depth

    ws = Workspace(scene_dir=scene_dir, out_dir=tmp_path / "out")
    cfg = ReconConfig()
    cfg.depth.max_image_side = 160  # a quick run
    monkeypatch.setattr(depth, "load_sfm_scene", lambda _ws: scene)
    ctx = StageContext(ws=ws, config=cfg, name="depth", fingerprint="test", show_progress=False)
    depth.run(ctx)
    assert ctx.summary["views"] == len(scene.views) and ctx.summary["failed"] == 0
    assert 0 < ctx.summary["mean_valid_fraction"] <= 1 and ctx.summary["seconds_per_view"] > 0
    assert all(ws.depth_view(v.name).exists() for v in scene.views)
    assert not any(p.name.startswith(".") for p in (ws.stage_dir("depth") / "views").iterdir())


def test_out_of_memory_retries_with_smaller_chunks(scene, tmp_path, monkeypatch, caplog):
    """A CUDA out-of-memory error in the sweep is retried with half the chunk (same result), with a warning."""
    from pipeline.depth.estimators import MvsEstimator

    real = coarse_to_fine.estimate_depth
    chunks = []

    def flaky(*args, **kwargs):
        chunks.append(args[-1].chunk_pixels)
        if len(chunks) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    cfg, mvs_cfg = DepthConfig(device="cpu"), MvsConfig(pyramid_levels=2, num_hypotheses=32)
    expected = MvsEstimator(scene, cfg, mvs_cfg, torch.device("cpu")).estimate(0)
    monkeypatch.setattr(coarse_to_fine, "estimate_depth", flaky)
    with caplog.at_level(logging.WARNING):
        got = MvsEstimator(scene, cfg, mvs_cfg, torch.device("cpu")).estimate(0)
    assert chunks == [mvs_cfg.chunk_pixels, mvs_cfg.chunk_pixels // 2]
    assert "out of memory" in caplog.text.lower() and "depth of" in caplog.text
    np.testing.assert_array_equal(got.valid, expected.valid)
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5)


# ---- the median filter's selection network -----------------------------------------------------

@pytest.mark.parametrize("n", [9, 25, 49])
def test_median_network_selects_the_middle_value_of_every_zero_one_input(n):
    # 0-1 principle: a comparator network that selects the median of every 0/1 input selects it for every input.
    rng = np.random.default_rng(n)
    if n == 9:
        inputs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).T.astype(np.uint8)
    else:
        inputs = (rng.random((n, 200_000)) < rng.random((1, 200_000))).astype(np.uint8)
    values = list(inputs)
    for i, j, keep_low, keep_high in coarse_to_fine.median_network(n):
        a, b = values[i], values[j]
        if keep_low:
            values[i] = np.minimum(a, b)
        if keep_high:
            values[j] = np.maximum(a, b)
    np.testing.assert_array_equal(values[n // 2], np.sort(inputs, axis=0)[n // 2])
    assert len(coarse_to_fine.median_network(n)) < len(coarse_to_fine.merge_exchange_pairs(n))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_median_filter_equals_torch_median_over_each_window(radius):
    gen = torch.Generator().manual_seed(radius)
    x = torch.rand(37, 53, generator=gen)
    x[::5, ::3] = 0.5  # ties
    x[10:20, 5:30] = 0.25
    k = 2 * radius + 1
    padded = torch.nn.functional.pad(x[None, None], (radius,) * 4, mode="replicate")[0, 0]
    expected = padded.unfold(0, k, 1).unfold(1, k, 1).reshape(*x.shape, k * k).median(-1).values
    assert torch.equal(coarse_to_fine.median_filter(x, radius), expected)
    assert coarse_to_fine.median_filter(x, 0) is x

"""Geometry evaluation: surface metrics with hand-derived answers, robust camera alignment, depth metrics, bad
inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest

from pipeline.analysis.alignment import align_from_cameras
from pipeline.analysis.evaluate import (
    depth_error_image,
    depth_metrics,
    depth_pairs,
    evaluate_meshes,
    evaluate_reconstruction,
    format_summary,
)
from pipeline.analysis.metrics import Mesh, sample_depth
from pipeline.core.errors import ReconError
from pipeline.core.poses import scale_intrinsics, transform_pose_by_similarity, umeyama

FAST = dict(max_points=60_000)


def unit_box() -> Mesh:
    box = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0)
    return Mesh(np.asarray(box.vertices, np.float64), np.asarray(box.triangles, np.int64))


def square() -> Mesh:
    """Unit square in the plane z = 0 (two triangles)."""
    v = np.array([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    return Mesh(v, np.array([[0, 1, 2], [0, 2, 3]]))


def translated(mesh: Mesh, offset) -> Mesh:
    return Mesh(mesh.vertices + np.asarray(offset, np.float64), mesh.triangles)


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


# ---- surface metrics -----------------------------------------------------------------------

def test_mesh_against_itself_is_perfect():
    r = evaluate_meshes(unit_box(), unit_box(), **FAST)
    assert r["accuracy"]["mean"] < 1e-6 and r["completeness"]["mean"] < 1e-6 and r["chamfer"] < 1e-6
    for t in r["thresholds"].values():
        assert t["precision"] == 1.0 and t["recall"] == 1.0 and t["fscore"] == 1.0
    assert math.isclose(r["diagonal"], math.sqrt(3.0))
    assert r["samples"]["est"] > 50_000 and not r["samples"]["visibility_filter"]


def test_plane_offset_along_normal_gives_offset_as_accuracy():
    """Every point of a square lifted by δ is exactly δ from the original: P = R = 0 below δ, 1 above."""
    diag = math.sqrt(2.0)
    delta = 0.007 * diag
    r = evaluate_meshes(translated(square(), [0, 0, delta]), square(), **FAST)
    for key in ("accuracy", "completeness"):
        assert r[key]["mean"] == pytest.approx(delta, rel=1e-4)
        assert r[key]["median"] == pytest.approx(delta, rel=1e-4)
    assert r["chamfer_rel"] == pytest.approx(0.007, rel=1e-3)
    assert r["thresholds"]["0.5%"]["fscore"] == 0.0
    assert r["thresholds"]["1%"]["fscore"] == 1.0


def test_box_shifted_along_x_matches_hand_derived_scores():
    """Unit cube shifted by δ along x, threshold τ < δ (side a = 1).

    Shifted cube → original: the four faces parallel to x lie on the original
    faces except a strip of width δ beyond x = 1 (distance x − 1); the +x face
    is δ away; the −x face (now inside the cube) is min(δ, distance to its
    border) away. So P(τ) = [4 (1 − δ + τ) + 1 − (1 − 2τ)²] / 6, and by
    symmetry R(τ) = P(τ); every distance is ≤ δ, so P = R = 1 for τ > δ.
    Mean distance = [2δ² + δ + 4(δ²/2 − 2δ³/3) + δ(1 − 2δ)²] / 6.
    """
    diag = math.sqrt(3.0)
    d, tau = 0.007 * diag, 0.005 * diag
    r = evaluate_meshes(translated(unit_box(), [d, 0, 0]), unit_box(), **FAST)
    expected_p = (4 * (1 - d + tau) + 1 - (1 - 2 * tau) ** 2) / 6
    t = r["thresholds"]["0.5%"]
    assert t["precision"] == pytest.approx(expected_p, abs=0.01)
    assert t["recall"] == pytest.approx(expected_p, abs=0.01)
    assert t["fscore"] == pytest.approx(expected_p, abs=0.01)
    assert 0.6 < t["fscore"] < 0.75
    assert r["thresholds"]["1%"]["fscore"] == 1.0
    expected_mean = (2 * d**2 + d + 4 * (d**2 / 2 - 2 * d**3 / 3) + d * (1 - 2 * d) ** 2) / 6
    assert r["accuracy"]["mean"] == pytest.approx(expected_mean, rel=0.03)
    assert r["completeness"]["mean"] == pytest.approx(expected_mean, rel=0.03)


def test_absolute_threshold_and_crop_box():
    """An absolute threshold is used as given; a floater outside the crop box is ignored, inside it lowers precision."""
    far = translated(unit_box(), [5.0, 0, 0])
    est = Mesh(np.concatenate([square().vertices, far.vertices]),
               np.concatenate([square().triangles, far.triangles + 4]))
    r = evaluate_meshes(est, square(), threshold_abs=0.001, thresholds_rel=(), **FAST)
    assert list(r["thresholds"]) == ["abs:0.001"] and r["thresholds"]["abs:0.001"]["fscore"] == 1.0
    # 5 cm above, inside the box
    near = translated(Mesh(square().vertices * 0.1, square().triangles), [0.45, 0.45, 0.05])
    est = Mesh(np.concatenate([square().vertices, near.vertices]),
               np.concatenate([square().triangles, near.triangles + 4]))
    r = evaluate_meshes(est, square(), **FAST)
    # the floater has 1 % of the square's area and is 0.05 away from it
    assert r["thresholds"]["1%"]["precision"] == pytest.approx(1 / 1.01, abs=0.003)
    assert r["thresholds"]["1%"]["recall"] == 1.0


def test_icp_removes_a_small_rigid_offset():
    gt = unit_box()
    offset = np.array([0.011, -0.01, 0.01])  # each face moves by more than τ(0.5 %) = 0.0087 along its normal
    est = translated(gt, offset)
    plain = evaluate_meshes(est, gt, **FAST)
    fixed = evaluate_meshes(est, gt, icp=True, **FAST)
    assert plain["thresholds"]["0.5%"]["fscore"] < 0.9
    assert fixed["accuracy"]["mean"] < 1e-4 and fixed["thresholds"]["0.5%"]["fscore"] > 0.999
    assert np.allclose(np.asarray(fixed["gt_from_est"])[:3, 3], -offset, atol=1e-5)


# ---- camera alignment ----------------------------------------------------------------------

def ring_centres(n: int, rng) -> np.ndarray:
    az = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([3 * np.cos(az), 3 * np.sin(az), 1.0 + rng.uniform(-0.5, 0.5, n)], axis=1)


def test_alignment_recovers_similarity_despite_two_bad_cameras():
    rng = np.random.default_rng(3)
    gt = ring_centres(12, rng)
    s, R, t = 0.37, random_rotation(rng), np.array([2.0, -1.0, 0.5])
    est = (gt - t) @ R / s  # gt = s R est + t
    est[[2, 7]] += np.array([[0.8, -0.5, 0.3], [-0.4, 0.9, 0.6]]) * 5  # two cameras registered badly
    sim = align_from_cameras(est, gt)
    assert sim.scale == pytest.approx(s, rel=1e-9)
    assert np.allclose(sim.rotation, R, atol=1e-9) and np.allclose(sim.translation, t, atol=1e-9)
    assert sim.inliers.tolist() == [i not in (2, 7) for i in range(12)]
    assert sim.rms < 1e-9
    # the plain least-squares fit is pulled away by the two bad cameras
    s_ls, _, _ = umeyama(est, gt)
    assert abs(s_ls - s) > 0.01


def test_alignment_needs_three_non_collinear_cameras():
    with pytest.raises(ReconError, match="3 or more"):
        align_from_cameras(np.zeros((2, 3)), np.ones((2, 3)))
    line = np.stack([np.linspace(0, 1, 5), np.zeros(5), np.zeros(5)], 1)
    with pytest.raises(ReconError):
        align_from_cameras(line * 2, line)


# ---- depth metrics -------------------------------------------------------------------------

def plane_depth(K: np.ndarray, cam_from_world: np.ndarray, normal: np.ndarray, offset: float, width: int,
                height: int) -> np.ndarray:
    """z-depth at pixel centres of the plane {x : normal·x = offset} (world frame)."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)  # z = 1
    R, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    centre = -R.T @ t
    rays_world = rays_cam @ R  # R^T d
    n_world = normal / np.linalg.norm(normal)
    return (offset - n_world @ centre) / (rays_world @ n_world)  # ray parameter = z-depth


def test_depth_metrics_on_scaled_depth_in_another_frame_and_resolution():
    rng = np.random.default_rng(0)
    W, H = 64, 48
    K_gt = np.array([[58.0, 0, 32], [0, 58.0, 24], [0, 0, 1]])
    T_gt = np.eye(4)
    T_gt[:3, 3] = [0.1, -0.2, 0.3]
    normal, offset = np.array([0.2, -0.3, -1.0]), -3.0  # a tilted plane in front of the camera
    depth_gt = plane_depth(K_gt, T_gt, normal, offset, W, H)
    assert depth_gt.min() > 1.0
    # estimated frame: x_est = s_n R_n x_gt + t_n, at half resolution (another pixel grid)
    s_n, R_n, t_n = 0.25, random_rotation(rng), np.array([1.0, 2.0, -0.5])
    T_est = transform_pose_by_similarity(T_gt, s_n, R_n, t_n)
    K_est = scale_intrinsics(K_gt, 0.5)
    depth_est = plane_depth(K_est, T_gt, normal, offset, W // 2, H // 2) * s_n  # same plane, est units
    gt_from_est = np.eye(4)
    gt_from_est[:3, :3] = R_n.T / s_n
    gt_from_est[:3, 3] = -R_n.T @ t_n / s_n
    valid = np.ones_like(depth_est, bool)
    pred, gt = depth_pairs(depth_est, valid, K_est, T_est, gt_from_est, depth_gt, K_gt, T_gt)
    assert len(gt) > 0.8 * valid.size
    m = depth_metrics(pred, gt)
    assert m["abs_rel"] < 1e-4 and m["rmse"] < 1e-3 and m["delta_1.01"] == 1.0
    # 3 % too far: AbsRel 0.03, RMSE 3 % of the GT depth in GT units
    pred, gt = depth_pairs(depth_est * 1.03, valid, K_est, T_est, gt_from_est, depth_gt, K_gt, T_gt)
    m = depth_metrics(pred, gt)
    assert m["abs_rel"] == pytest.approx(0.03, rel=0.01)
    assert m["rmse"] == pytest.approx(0.03 * np.sqrt(np.mean(gt**2)), rel=0.01)
    assert m["delta_1.01"] == 0.0 and m["delta_1.05"] == 1.0


def test_depth_error_image_is_the_signed_relative_error_per_pixel():
    """Same plane and frames as above: a block 3 % too far, a block 2 % too near, invalid pixels and GT background are
    NaN."""
    rng = np.random.default_rng(1)
    W, H = 64, 48
    K_gt = np.array([[58.0, 0, 32], [0, 58.0, 24], [0, 0, 1]])
    T_gt = np.eye(4)
    normal, offset = np.array([0.2, -0.3, -1.0]), -3.0
    depth_gt = plane_depth(K_gt, T_gt, normal, offset, W, H)
    depth_gt[:, 56:] = 0.0  # GT background (no surface) on the right
    s_n, R_n, t_n = 0.5, random_rotation(rng), np.array([0.3, -1.0, 2.0])
    T_est = transform_pose_by_similarity(T_gt, s_n, R_n, t_n)
    gt_from_est = np.eye(4)
    gt_from_est[:3, :3] = R_n.T / s_n
    gt_from_est[:3, 3] = -R_n.T @ t_n / s_n
    depth_est = plane_depth(K_gt, T_gt, normal, offset, W, H) * s_n
    depth_est[5:15, 5:20] *= 1.03
    depth_est[30:40, 10:30] *= 0.98
    valid = np.ones((H, W), bool)
    valid[20:25, 40:45] = False
    err = depth_error_image(depth_est, valid, K_gt, T_est, gt_from_est, depth_gt, K_gt, T_gt)
    assert err.shape == (H, W)
    assert np.allclose(err[6:14, 6:19], 0.03, atol=1e-6) and np.allclose(err[31:39, 11:29], -0.02, atol=1e-6)
    assert np.abs(err[45:, :50]).max() < 1e-6
    assert np.isnan(err[20:25, 40:45]).all() and np.isnan(err[:, 57:]).all()
    # the valid, paired pixels are exactly depth_pairs'
    pred, gt = depth_pairs(depth_est, valid, K_gt, T_est, gt_from_est, depth_gt, K_gt, T_gt)
    assert np.isfinite(err).sum() == len(gt)
    assert np.allclose(np.sort(err[np.isfinite(err)]), np.sort((pred - gt) / gt))


def test_sample_depth_bilinear_inside_nearest_across_edges():
    depth = np.array([[1.0, 1.01], [1.0, 1.01]])
    assert sample_depth(depth, np.array([[1.0, 1.0]]))[0] == pytest.approx(1.005)  # between 4 close pixels
    edge = np.array([[1.0, 2.0], [1.0, 2.0]])
    assert sample_depth(edge, np.array([[0.9, 1.0], [1.1, 1.0]])).tolist() == [1.0, 2.0]
    assert sample_depth(edge, np.array([[-0.1, 1.0], [2.0, 1.0]])).tolist() == [0.0, 0.0]


# ---- the entry point on a rendered scene -------------------------------------------------

def write_colmap_model(folder: Path, cams: list[tuple[str, np.ndarray, np.ndarray, int, int]]) -> None:
    """A COLMAP binary model with one PINHOLE camera per image: (name, K, cam_from_world, width, height)."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    for i, (name, K, T, w, h) in enumerate(cams, start=1):
        cam = pycolmap.Camera(model="PINHOLE", width=w, height=h, params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
                              camera_id=i)
        rec.add_camera_with_trivial_rig(cam)
        image = pycolmap.Image(name=name, camera_id=i, image_id=i)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(T[:3, :3]), T[:3, 3]))
    folder.mkdir(parents=True, exist_ok=True)
    rec.write(str(folder))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    from pipeline.synthetic.render import render_scene

    return render_scene(tmp_path_factory.mktemp("scene") / "blob", shape="blob", n_views=8, width=160, height=120,
                        seed=1, scale=2.0)


@pytest.fixture(scope="module")
def perfect_out(rendered, tmp_path_factory) -> Path:
    """A recon output in the normalized frame whose mesh, cameras and depth maps are the ground truth,
    except: 2 of the 8 cameras moved far away, and the refined maps 2 % too deep."""
    from pipeline.core.io import DepthMap, save_depth_map
    from pipeline.core.workspace import Workspace
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    scene = scene_from_ground_truth(rendered, n_points=500)
    s_n = scene.normalized_from_sfm[0, 0]
    out = tmp_path_factory.mktemp("out")
    ws = Workspace(scene_dir=rendered, out_dir=out)
    gt_mesh = o3d.io.read_triangle_mesh(str(rendered / "gt" / "mesh.ply"))
    gt_mesh.transform(scene.normalized_from_sfm)
    o3d.io.write_triangle_mesh(str(ws.mesh_path), gt_mesh)
    cams = []
    for i, v in enumerate(scene.views):
        T = v.cam_from_world.copy()
        if i in (1, 5):
            T[:3, 3] += [3.0, -2.0, 1.0]
        cams.append((v.name, v.K, T, v.width, v.height))
        depth = np.load(rendered / "gt" / "depth" / f"{Path(v.name).stem}.npy") * s_n
        dm = DepthMap(name=v.name, depth=depth.astype(np.float32), confidence=np.ones_like(depth, np.float32),
                      valid=depth > 0, K=v.K, cam_from_world=v.cam_from_world)
        save_depth_map(ws.depth_view(v.name), dm)
        save_depth_map(ws.refine_view(v.name), DepthMap(**{**dm.__dict__, "depth": (depth * 1.02).astype(np.float32)}))
    write_colmap_model(ws.sparse_dir, cams)
    return out


def test_evaluate_reconstruction_of_ground_truth(rendered, perfect_out):
    r = evaluate_reconstruction(perfect_out, rendered, **FAST)
    al = r["alignment"]
    info = json.loads((rendered / "gt" / "scene.json").read_text())
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    s_n = scene_from_ground_truth(rendered, n_points=500).normalized_from_sfm[0, 0]
    assert al["scale"] == pytest.approx(1.0 / s_n, rel=1e-6)
    assert sorted(al["outlier_cameras"]) == ["view_001.png", "view_005.png"] and al["cameras_inliers"] == 6
    assert r["diagonal"] == pytest.approx(info["object_diagonal"])
    assert r["accuracy"]["mean"] < 1e-5 * r["diagonal"] and r["completeness"]["mean"] < 1e-5 * r["diagonal"]
    assert all(t["fscore"] == 1.0 for t in r["thresholds"].values())
    assert r["samples"]["visibility_filter"] and 0.3 < r["samples"]["gt_visible_fraction"] < 1.0
    depth, refine = r["depth"]["depth"], r["depth"]["refine"]
    assert depth["views"] == 8 and depth["abs_rel"] < 1e-5 and depth["delta_1.01"] == 1.0
    assert (refine["abs_rel"] == pytest.approx(0.02, rel=1e-3) and refine["delta_1.01"] == 0.0
            and refine["delta_1.05"] == 1.0)
    saved = json.loads((perfect_out / "eval.json").read_text())
    assert saved["thresholds"] == r["thresholds"]
    assert "F@0.5%" in format_summary(r)


def test_gt_argument_forms_and_mesh_file_without_alignment(rendered, tmp_path):
    """GT as the gt/ folder; OUT as a mesh already in the GT frame (--no-align), scored against a bare GT mesh."""
    r = evaluate_reconstruction(rendered / "gt" / "object.ply", rendered / "gt" / "object.ply", align=False,
                                json_path=tmp_path / "e.json", **FAST)
    assert r["thresholds"]["1%"]["fscore"] == 1.0 and r["alignment"]["method"] == "none"
    assert (tmp_path / "e.json").is_file()


def test_bad_inputs_raise_one_line_errors(rendered, perfect_out, tmp_path):
    empty = tmp_path / "empty_out"
    empty.mkdir()
    with pytest.raises(ReconError, match="no mesh.ply"):
        evaluate_reconstruction(empty, rendered)
    with pytest.raises(ReconError, match="not found"):
        evaluate_reconstruction(tmp_path / "nope", rendered)
    with pytest.raises(ReconError, match="ground truth not found"):
        evaluate_reconstruction(perfect_out, tmp_path / "nope")
    with pytest.raises(ReconError, match="no GT cameras"):
        evaluate_reconstruction(perfect_out, rendered / "gt" / "mesh.ply", json_path=tmp_path / "x.json")
    lone_mesh = tmp_path / "lone" / "mesh.ply"
    lone_mesh.parent.mkdir()
    lone_mesh.write_bytes((perfect_out / "mesh.ply").read_bytes())
    with pytest.raises(ReconError, match="no cameras"):
        evaluate_reconstruction(lone_mesh, rendered)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "mesh.ply").write_bytes((perfect_out / "mesh.ply").read_bytes())
    write_colmap_model(renamed / "sparse", [(f"other_{i}.jpg", np.eye(3), np.eye(4), 10, 10) for i in range(4)])
    with pytest.raises(ReconError, match="only 0 image name"):
        evaluate_reconstruction(renamed, rendered)
    bad_mesh = tmp_path / "bad.ply"
    bad_mesh.write_text("not a mesh")
    with pytest.raises(ReconError):
        evaluate_reconstruction(bad_mesh, rendered / "gt" / "mesh.ply", align=False, json_path=tmp_path / "y.json")
    with pytest.raises(ReconError) as info:
        evaluate_reconstruction(empty, rendered)
    assert "\n" not in str(info.value)


# ---- agreement with an independent implementation of the protocol ----------------------------

def overlapping(mesh: o3d.geometry.TriangleMesh, lo: np.ndarray, hi: np.ndarray) -> o3d.geometry.TriangleMesh:
    """The triangles of ``mesh`` whose bounding box overlaps the box [lo, hi] (Open3D's crop keeps only those fully
    inside)."""
    tri = np.asarray(mesh.vertices)[np.asarray(mesh.triangles)]
    keep = np.all(tri.max(1) >= lo, axis=1) & np.all(tri.min(1) <= hi, axis=1)
    out = o3d.geometry.TriangleMesh(mesh)
    out.remove_triangles_by_mask(~keep)
    out.remove_unreferenced_vertices()
    return out


def perturbed_reconstruction(gt_mesh: o3d.geometry.TriangleMesh, lo: np.ndarray, hi: np.ndarray, diagonal: float,
                             seed: int) -> o3d.geometry.TriangleMesh:
    """A reconstruction-like mesh: the GT near the box, subdivided once, displaced along its normals by a smooth
    field (±0.8 % of the diagonal) plus noise (σ = 0.3 %), with a hole punched in the object's top and a floater."""
    rng = np.random.default_rng(seed)
    mesh = overlapping(gt_mesh, lo - 0.15 * diagonal, hi + 0.15 * diagonal).subdivide_midpoint(1)
    mesh.compute_vertex_normals()
    v, n = np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals)
    k = rng.normal(size=(3, 3)) * 6.0 / diagonal
    top = v[np.argmax(v[:, 2])].copy()
    smooth = 0.008 * diagonal * np.sin(v @ k[0] + 1.0) * np.cos(v @ k[1])
    v = v + n * (smooth + rng.normal(scale=0.003 * diagonal, size=len(v)))[:, None]
    mesh.vertices = o3d.utility.Vector3dVector(v)
    tri_centres = v[np.asarray(mesh.triangles)].mean(1)
    mesh.remove_triangles_by_mask(np.linalg.norm(tri_centres - top, axis=1) < 0.1 * diagonal)
    floater = o3d.geometry.TriangleMesh.create_sphere(0.03 * diagonal).translate(
        hi + np.array([0.0, 0.0, -0.05]) * diagonal)
    return mesh + floater


def independent_fscore(est: o3d.geometry.TriangleMesh, gt: o3d.geometry.TriangleMesh, gt_dir: Path, lo: np.ndarray,
                       hi: np.ndarray, diagonal: float, taus_rel=(0.005, 0.01),
                       margin: float = 0.05) -> dict[float, tuple[float, float, float]]:
    """A minimal Tanks-and-Temples-style score written from the protocol text alone, sharing no code with
    pipeline.analysis (evaluate, metrics, alignment): Open3D uniform sampling, nearest-pixel GT visibility,
    scipy k-d tree point-to-point distances to a 2x denser sampling."""
    from scipy.spatial import cKDTree

    taus = [t * diagonal for t in taus_rel]
    box_lo, box_hi = lo - margin * diagonal, hi + margin * diagonal

    def samples(mesh, spacing, grow, seed):
        part = overlapping(mesh, box_lo - grow, box_hi + grow)
        n = int(part.get_surface_area() / spacing**2)
        o3d.utility.random.seed(seed)
        return np.asarray(part.sample_points_uniformly(number_of_points=n).points)

    def inside(p):
        return np.all((p >= box_lo) & (p <= box_hi), axis=1)

    src_spacing, dst_spacing = 0.5 * min(taus), 0.25 * min(taus)
    est_src = samples(est, src_spacing, 0.0, 1)
    est_src = est_src[inside(est_src)]
    gt_src = samples(gt, src_spacing, 0.0, 2)
    gt_src = gt_src[inside(gt_src)]
    cams = json.loads((gt_dir / "cameras.json").read_text())
    seen = np.zeros(len(gt_src), bool)
    for cam in cams["images"]:
        K, T = np.asarray(cam["K"]), np.asarray(cam["cam_from_world"])
        depth = np.load(gt_dir / "depth" / f"{Path(cam['name']).stem}.npy")
        pc = gt_src @ T[:3, :3].T + T[:3, 3]
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            col = np.floor(K[0, 0] * pc[:, 0] / z + K[0, 2])
            row = np.floor(K[1, 1] * pc[:, 1] / z + K[1, 2])
        ok = (z > 0) & (col >= 0) & (col < depth.shape[1]) & (row >= 0) & (row < depth.shape[0])
        d = np.zeros(len(z))
        d[ok] = depth[row[ok].astype(int), col[ok].astype(int)]
        seen |= ok & (d > 0) & (np.abs(d - z) <= 0.01 * z)
    gt_src = gt_src[seen]
    d_acc, _ = cKDTree(samples(gt, dst_spacing, max(taus), 3)).query(est_src)
    d_comp, _ = cKDTree(samples(est, dst_spacing, max(taus), 4)).query(gt_src)
    out = {}
    for rel, tau in zip(taus_rel, taus):
        p, r = float(np.mean(d_acc < tau)), float(np.mean(d_comp < tau))
        out[rel] = (p, r, 2 * p * r / (p + r))
    return out


@pytest.fixture(scope="module")
def rendered_fine(tmp_path_factory) -> Path:
    from pipeline.synthetic.render import render_scene

    return render_scene(tmp_path_factory.mktemp("scene_fine") / "thin", shape="thin", n_views=10, width=320, height=240,
                        seed=2)


def test_scores_agree_with_an_independent_implementation(rendered_fine, tmp_path):
    gt_dir = rendered_fine / "gt"
    info = json.loads((gt_dir / "scene.json").read_text())
    lo, hi, diagonal = (np.asarray(info["object_bbox_min"]), np.asarray(info["object_bbox_max"]),
                        float(info["object_diagonal"]))
    gt_mesh = o3d.io.read_triangle_mesh(str(gt_dir / "mesh.ply"))
    est = perturbed_reconstruction(gt_mesh, lo, hi, diagonal, seed=0)
    est_path = tmp_path / "recon_like.ply"
    o3d.io.write_triangle_mesh(str(est_path), est)

    ours = evaluate_reconstruction(est_path, rendered_fine, align=False, json_path=tmp_path / "eval.json")
    theirs = independent_fscore(est, gt_mesh, gt_dir, lo, hi, diagonal)
    assert ours["samples"]["visibility_filter"]
    for rel, (p, r, f) in theirs.items():
        t = ours["thresholds"][f"{100 * rel:g}%"]
        assert abs(t["fscore"] - f) < 0.02, (rel, t, (p, r, f))
        assert abs(t["precision"] - p) < 0.02 and abs(t["recall"] - r) < 0.02, (rel, t, (p, r, f))
    # the perturbation is large enough that the comparison means something
    assert (0.3 < ours["thresholds"]["0.5%"]["fscore"] < 0.9
            and ours["thresholds"]["1%"]["fscore"] > ours["thresholds"]["0.5%"]["fscore"])

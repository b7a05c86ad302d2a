"""What the depth stage needs to know about each view: working size and intrinsics, stereo neighbours, depth range,
scene planes.

Used by the estimators (:mod:`pipeline.depth.estimators`) and the stage's passes (:mod:`pipeline.depth.stage`).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.core.io import SfmScene, View
from pipeline.core.poses import scale_intrinsics
from pipeline.depth import anchoring


class ViewFailure(Exception):
    """One view cannot get a depth map; the message names the file or reason. The view is left out."""


# ---- sizes ----------------------------------------------------------------------------------------

AUTO_MAX_SIDE_CPU = 640
"""Automatic ``depth.max_image_side`` on a CPU (pixels). On 1600x1200 renders of spot and bob, 1024 px maps took about
3 times as long as 640 px ones and gave F@0.25 % +0.004 (spot) and +0.000 (bob), F@0.5 % +0.002 and -0.003
(docs/results.md, issue 21): not worth the time on a CPU."""
AUTO_MAX_SIDE_CUDA = 1024
"""Automatic ``depth.max_image_side`` on a CUDA device (pixels): where time is cheap, the side that scored best at
F@0.25 % on 1600x1200 renders; 1600 px maps were no better there (docs/results.md, issue 21)."""


def resolve_max_image_side(setting: int | None, device: str) -> int:
    """``depth.max_image_side`` in pixels (0 = full resolution): the setting, or when None (automatic) the
    photos' own size up to :data:`AUTO_MAX_SIDE_CUDA` on a CUDA device, :data:`AUTO_MAX_SIDE_CPU` on a CPU."""
    if setting is not None:
        return setting
    return AUTO_MAX_SIDE_CUDA if str(device).startswith("cuda") else AUTO_MAX_SIDE_CPU


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after downscaling so the longer side is at most ``max_side`` (never upscaled)."""
    s = min(1.0, max_side / max(width, height)) if max_side > 0 else 1.0
    return max(1, round(width * s)), max(1, round(height * s))


def resolution_scale(size: tuple[int, int], reference_side: int) -> float:
    """How many times the longer side of a working ``size`` (width, height) exceeds ``reference_side`` (pixels), at
    least 1 (and 1 when ``reference_side`` is 0): the factor the sweep's pixel-sized settings grow by."""
    if reference_side <= 0:
        return 1.0
    return max(1.0, max(size) / reference_side)


def scaled_window(window: int, scale: float) -> int:
    """A window side in pixels for maps ``scale`` times larger: the odd side at least ``window · scale`` within half a
    pixel (so a window stays the same part of the scene; a narrower one lost precision at 1024 px)."""
    side = math.ceil(window * scale - 0.5)
    return side + 1 - side % 2


def scaled_pixels(pixels: float, scale: float) -> int:
    """A distance of ``pixels`` for maps ``scale`` times larger, rounded half up."""
    return int(math.floor(pixels * scale + 0.5))


def working_intrinsics(view: View, size: tuple[int, int]) -> np.ndarray:
    """``K`` of ``view`` at working size (width, height) (COLMAP convention: exact)."""
    return scale_intrinsics(view.K, size[0] / view.width, size[1] / view.height)


# ---- neighbours and depth range -------------------------------------------------------------------

def stereo_neighbors(scene: SfmScene, k: int, good_angle_deg: float, max_angle_deg: float) -> list[list[int]]:
    """Per view, up to ``k`` neighbour indices, best first.

    Score of ``j`` for reference ``i``: shared sparse points × min(1, θ / good_angle)
    where θ is the median triangulation angle of those points seen from the two
    camera centres; views sharing no point, or with θ > ``max_angle_deg``, are out.
    Only the ``4k`` most co-visible views are scored (the angle weight is ≤ 1).
    """
    covis = scene.covisibility()
    centers = np.stack([v.center for v in scene.views]) if scene.views else np.zeros((0, 3))
    out = []
    for i, vi in enumerate(scene.views):
        scores = []
        # Angles only for the most co-visible candidates (the angle weight is at most 1).
        order = [j for j in np.argsort(-covis[i], kind="stable") if j != i and covis[i, j] > 0][: 4 * k]
        for j in order:
            shared = np.intersect1d(vi.point_ids, scene.views[j].point_ids, assume_unique=True)
            X = scene.points[shared]
            a = X - centers[i]
            b = X - centers[j]
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            theta = float(np.degrees(np.median(np.arccos(np.clip(cos, -1.0, 1.0)))))
            if theta > max_angle_deg or theta <= 0:
                continue
            scores.append((len(shared) * min(1.0, theta / max(good_angle_deg, 1e-9)), int(j)))
        scores.sort(key=lambda s: (-s[0], s[1]))
        out.append([j for _, j in scores[:k]])
    return out


def depth_range(scene: SfmScene, view: View, percentile: float, margin: float) -> tuple[float, float]:
    """(near, far) of the sweep from the depths of the sparse points ``view`` sees.

    Raises:
        ViewFailure: the view sees no sparse point in front of it.
    """
    ids = view.point_ids
    X = scene.points[ids] if len(ids) else np.zeros((0, 3))
    z = X @ view.cam_from_world[2, :3] + view.cam_from_world[2, 3]
    z = z[np.isfinite(z) & (z > 0)]
    if len(z) < 2:
        raise ViewFailure(f"{view.name}: sees {len(z)} sparse point(s) in front of the camera; "
                          "cannot set a depth range")
    near, far = np.percentile(z, [percentile, 100.0 - percentile])
    return float(near / (1.0 + margin)), float(max(far, near * 1.01) * (1.0 + margin))


def fit_scene_planes(points: np.ndarray, max_planes: int, distance_fraction: float, min_inlier_fraction: float,
                     seed: int = 0) -> list[np.ndarray]:
    """Dominant planes of the sparse points: up to ``max_planes`` ``(n, d)`` (4,) with ``n·X + d = 0``, ``|n| = 1``.

    Sequential RANSAC (Open3D ``segment_plane``): fit, remove the inliers,
    repeat. The inlier distance is ``distance_fraction`` × the diagonal of the
    points' 2-98 percentile box; a plane is kept only when at least
    ``min_inlier_fraction`` of all the points lie on it. Each RANSAC plane is
    then refitted by least squares to its inliers until they stop changing:
    RANSAC's multithreaded sampling differs with the thread count, the
    refitted plane does not (the depth maps must not depend on how many
    threads a worker has).
    """
    if max_planes <= 0 or len(points) < 50:
        return []
    points = np.asarray(points, dtype=np.float64)
    lo, hi = np.percentile(points, [2, 98], axis=0)
    distance = distance_fraction * float(np.linalg.norm(hi - lo))
    if distance <= 0:
        return []
    # here, not at import: the stage's other passes (and a GPU machine without Open3D) do not need it
    import open3d as o3d

    o3d.utility.random.seed(seed)
    remaining = points
    planes = []
    for _ in range(max_planes):
        if len(remaining) < max(3, min_inlier_fraction * len(points)):
            break
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(remaining))
        model, _ = cloud.segment_plane(distance_threshold=distance, ransac_n=3, num_iterations=1000)
        plane, inliers = refit_plane(remaining, np.asarray(model, dtype=np.float64), distance)
        if inliers.sum() < min_inlier_fraction * len(points):
            break
        planes.append(plane)
        remaining = remaining[~inliers]
    return planes


def refit_plane(points: np.ndarray, plane: np.ndarray, distance: float,
                max_iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane (4,) through the points within ``distance`` of ``plane``, repeated until the inliers settle.

    Returns the plane (unit normal, sign fixed so that its largest component is positive) and the inlier mask (N,).
    """
    plane = plane / np.linalg.norm(plane[:3])
    inliers = np.abs(points @ plane[:3] + plane[3]) < distance
    for _ in range(max_iterations):
        if inliers.sum() < 3:
            break
        centroid = points[inliers].mean(axis=0)
        normal = np.linalg.svd(points[inliers] - centroid, full_matrices=False)[2][2]
        normal = normal * np.sign(normal[np.argmax(np.abs(normal))])
        plane = np.concatenate([normal, [-normal @ centroid]])
        updated = np.abs(points @ plane[:3] + plane[3]) < distance
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    return plane, inliers


def plane_in_camera(plane_world: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    """The plane ``(n, d)`` (``n·X + d = 0``, world frame) in the frame of the camera ``cam_from_world`` (4x4)."""
    R, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    n_cam = R @ plane_world[:3]
    return np.concatenate([n_cam, [plane_world[3] - n_cam @ t]])


def sparse_in_view(scene: SfmScene, view: View, K: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) at working size and depths (N,) of the sparse points ``view`` observes."""
    X = scene.points[view.point_ids] if len(view.point_ids) else np.zeros((0, 3))
    uv, z, ok = anchoring.project_points(X, K, view.cam_from_world, size[1], size[0])
    return uv[ok], z[ok]

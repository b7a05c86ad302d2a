"""Alignment of a reconstruction to the ground truth (step 1 of the protocol in :mod:`pipeline.analysis.evaluate`).

A similarity ``x_gt = s R x_est + t`` from the camera centres (RANSAC over camera triples, Umeyama refit on the
inliers), the COLMAP poses it is computed from, and the optional point-to-plane ICP refinement (rigid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis.metrics import GtViews
from pipeline.core.errors import ReconError
from pipeline.core.poses import camera_center, umeyama

DEFAULT_INLIER_TOL_REL = 0.05
"""Camera-alignment inlier tolerance, as a fraction of the GT cameras' RMS spread."""


# ---- alignment ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Similarity:
    """``x_gt = scale * rotation @ x_est + translation`` and how well it fits the cameras."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray
    inliers: np.ndarray
    """(N,) bool: cameras within the inlier tolerance."""
    rms: float
    """RMS camera-centre residual over the inliers (GT units)."""

    def matrix(self) -> np.ndarray:
        """4x4 ``gt_from_est``."""
        out = np.eye(4)
        out[:3, :3] = self.scale * self.rotation
        out[:3, 3] = self.translation
        return out

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(points) @ self.rotation.T + self.translation


def align_from_cameras(est_centers: np.ndarray, gt_centers: np.ndarray, *,
                       inlier_tol_rel: float = DEFAULT_INLIER_TOL_REL, max_trials: int = 2000,
                       seed: int = 0) -> Similarity:
    """Robust similarity taking estimated camera centres onto GT ones.

    RANSAC over camera triples (all of them when there are at most
    ``max_trials``, else ``max_trials`` random ones): each triple's Umeyama
    fit scores the cameras within ``inlier_tol_rel`` × the RMS spread of the
    GT centres; the best (most inliers, then smallest residual) is refit by
    least squares on its inliers until the inlier set is stable.

    Args:
        est_centers, gt_centers: (N, 3) corresponding centres, N >= 3.
    Raises:
        ReconError: fewer than 3 cameras, or the inliers are (nearly) collinear.
    """
    est = np.asarray(est_centers, dtype=np.float64).reshape(-1, 3)
    gt = np.asarray(gt_centers, dtype=np.float64).reshape(-1, 3)
    if len(est) != len(gt):
        raise ValueError(f"need corresponding centres, got {len(est)} and {len(gt)}")
    n = len(gt)
    if n < 3:
        raise ReconError(f"only {n} camera(s) shared by the reconstruction and the ground truth; "
                         "alignment needs 3 or more")
    spread = float(np.sqrt(((gt - gt.mean(0)) ** 2).sum(1).mean()))
    if spread <= 0:
        raise ReconError("the ground-truth cameras all sit at one point; cannot align")
    tol = inlier_tol_rel * spread
    rng = np.random.default_rng(seed)
    if math.comb(n, 3) <= max_trials:
        triples = np.array(list(_combinations3(n)), dtype=np.int64)
    else:
        triples = np.stack([rng.choice(n, 3, replace=False) for _ in range(max_trials)])

    best: tuple[int, float, np.ndarray] | None = None
    for tri in triples:
        if not _well_spread(gt[tri]) or not _well_spread(est[tri]):
            continue
        s, R, t = umeyama(est[tri], gt[tri])
        res = np.linalg.norm(s * est @ R.T + t - gt, axis=1)
        inl = res < tol
        key = (int(inl.sum()), -float(np.minimum(res, tol).sum()))
        if best is None or key > (best[0], best[1]):
            best = (key[0], key[1], inl)
    if best is None or best[0] < 3:
        raise ReconError("cameras could not be aligned to the ground truth (no 3 consistent, non-collinear cameras); "
                         "check that OUT and GT are the same scene")
    inl = best[2]
    for _ in range(10):
        if not _well_spread(gt[inl]):
            raise ReconError("the inlier cameras are collinear; the alignment to the ground truth is ambiguous")
        s, R, t = umeyama(est[inl], gt[inl])
        res = np.linalg.norm(s * est @ R.T + t - gt, axis=1)
        new = res < tol
        if new.sum() < 3 or np.array_equal(new, inl):
            break
        inl = new
    rms = float(np.sqrt(np.mean(res[inl] ** 2)))
    return Similarity(scale=float(s), rotation=R, translation=t, inliers=inl, rms=rms)


def _combinations3(n: int):
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                yield (i, j, k)


def _well_spread(points: np.ndarray, rel: float = 1e-3) -> bool:
    """True when the points span at least a plane (second singular value not negligible)."""
    if len(points) < 3:
        return False
    sv = np.linalg.svd(points - points.mean(0), compute_uv=False)
    return bool(sv[0] > 0 and sv[1] > rel * sv[0])


def read_colmap_poses(sparse_dir: Path) -> dict[str, np.ndarray]:
    """``{image name: cam_from_world (4, 4)}`` of the registered images of a COLMAP model."""
    import pycolmap

    sparse_dir = Path(sparse_dir)
    if not any((sparse_dir / f"images{ext}").exists() for ext in (".bin", ".txt")):
        raise ReconError(f"{sparse_dir}: no COLMAP model (images.bin) to read the cameras from; "
                         "pass the recon output folder or --no-align")
    try:
        rec = pycolmap.Reconstruction(str(sparse_dir))
    except Exception as exc:  # noqa: BLE001 - pycolmap raises plain RuntimeErrors
        raise ReconError(f"{sparse_dir}: unreadable COLMAP model ({exc}); re-run the sfm stage") from exc
    out = {}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        T = np.eye(4)
        T[:3, :4] = image.cam_from_world().matrix()
        out[image.name] = T
    return out


def match_cameras(est: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(est name, gt name) pairs matched by image name, or by file stem when names differ in folder/extension."""
    pairs = [(n, n) for n in sorted(est) if n in gt]
    if len(pairs) >= 3:
        return pairs
    by_stem = {Path(n).stem: n for n in gt}
    return [(n, by_stem[Path(n).stem]) for n in sorted(est) if Path(n).stem in by_stem]


def refine_icp(est_points: np.ndarray, gt_points: np.ndarray, gt_normals: np.ndarray, max_dist: float, *,
               iterations: int = 50) -> np.ndarray:
    """Rigid 4x4 (point-to-plane ICP, Open3D) moving ``est_points`` onto the GT samples."""
    import open3d as o3d

    reg = o3d.pipelines.registration
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(est_points))
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(gt_points))
    tgt.normals = o3d.utility.Vector3dVector(gt_normals)
    result = reg.registration_icp(src, tgt, max_dist, np.eye(4), reg.TransformationEstimationPointToPlane(),
                                  reg.ICPConvergenceCriteria(max_iteration=iterations))
    return np.asarray(result.transformation, dtype=np.float64)


def align_to_gt_cameras(est_poses: dict[str, np.ndarray], gt_views: GtViews, *, source: Path | str, seed: int = 0
                        ) -> tuple[Similarity, list[tuple[str, str]]]:
    """Similarity est → GT frame from the camera centres of the images both share (:func:`align_from_cameras`).

    Args:
        est_poses: image name → cam_from_world (est frame), e.g. from :func:`read_colmap_poses`.
        source: where ``est_poses`` came from (named in the error).
    Returns:
        (the similarity, the (est name, GT name) pairs it used).
    Raises:
        ReconError: fewer than 3 shared images.
    """
    gt_poses = {n: T for n, (_, T) in gt_views.cameras.items()}
    pairs = match_cameras(est_poses, gt_poses)
    if len(pairs) < 3:
        raise ReconError(f"{source}: only {len(pairs)} image name(s) shared with {gt_views.gt_dir / 'cameras.json'}; "
                         "alignment needs 3 or more")
    est_c = np.stack([camera_center(est_poses[a]) for a, _ in pairs])
    gt_c = np.stack([camera_center(gt_poses[b]) for _, b in pairs])
    return align_from_cameras(est_c, gt_c, seed=seed), pairs

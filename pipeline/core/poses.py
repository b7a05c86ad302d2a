"""Camera poses, intrinsics and similarity transforms in numpy (no torch: the sfm stage runs without it).

Conventions: :mod:`pipeline.core.geometry` (``cam_from_world`` 4x4, COLMAP
pixel convention, depth = camera-frame z).
"""

from __future__ import annotations

import numpy as np


def camera_center(cam_from_world: np.ndarray) -> np.ndarray:
    """Camera centre in world coordinates, ``C = -R^T t`` (3,)."""
    R, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    return -R.T @ t


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4, dtype=T.dtype)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def scale_intrinsics(K: np.ndarray, sx: float, sy: float | None = None) -> np.ndarray:
    """Intrinsics of the image resized by ``(sx, sy)`` (COLMAP pixel convention: exact)."""
    sy = sx if sy is None else sy
    out = np.array(K, dtype=np.float64, copy=True)
    out[0, :] *= sx
    out[1, :] *= sy
    return out


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity with ``dst ≈ s * R @ src + t`` (Umeyama 1991).

    Args:
        src, dst: (N, 3) corresponding points, N >= 3 and not collinear.
    Returns:
        (s, R (3,3), t (3,)).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"umeyama needs two (N>=3, 3) arrays, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    var_s = (xs**2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var_s) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def similarity_matrix(s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 matrix of ``x -> s R x + t``."""
    out = np.eye(4)
    out[:3, :3] = s * np.asarray(R)
    out[:3, 3] = t
    return out


def transform_pose_by_similarity(cam_from_world: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Pose in the new world frame ``x' = s R x + t`` (camera keeps its metric scale ×s).

    The new pose maps ``x'`` to ``s * X_cam``: ``R_c' = R_c R^T``, ``t_c' = s t_c - R_c' t``.
    """
    Rc, tc = cam_from_world[:3, :3], cam_from_world[:3, 3]
    out = np.eye(4)
    out[:3, :3] = Rc @ R.T
    out[:3, 3] = s * tc - out[:3, :3] @ t
    return out


def normalizing_similarity(points: np.ndarray, depths: np.ndarray) -> tuple[float, np.ndarray]:
    """The normalized frame of docs/conventions.md: ``x_n = s * (x - c)``.

    ``c`` is the per-axis median of the sparse points and ``s`` makes the
    median depth of the sparse points over all their observations equal 1.

    Args:
        points: (M, 3) sparse points (SfM frame).
        depths: (K,) camera-frame depth of every observation of those points.
    Returns:
        (s, c): scale and centre.
    """
    depths = np.asarray(depths, dtype=np.float64)
    depths = depths[np.isfinite(depths) & (depths > 0)]
    if len(depths) == 0 or len(points) == 0:
        raise ValueError("cannot normalize a scene without sparse points in front of the cameras")
    s = 1.0 / float(np.median(depths))
    c = np.median(np.asarray(points, dtype=np.float64), axis=0)
    return s, c

"""Camera geometry shared by every stage.

Conventions (the same everywhere in recon):

* Poses are ``cam_from_world`` 4x4 matrices (world → camera, COLMAP/OpenCV:
  x right, y down, z forward): ``X_cam = R @ X_world + t``. The camera centre
  is ``C = -R.T @ t``.
* ``K`` is the 3x3 pinhole matrix in pixels with COLMAP's pixel convention:
  pixel (column u, row v) covers ``[u, u+1) x [v, v+1)``, so its centre is at
  image coordinates ``(u + 0.5, v + 0.5)``. Resizing an image by ``s`` scales
  ``fx, fy, cx, cy`` by ``s`` exactly. For ``torch.nn.functional.grid_sample``
  use ``align_corners=False`` with :func:`to_grid_coords`.
* Depth is camera-frame ``z`` (not ray length), in scene units.

Tensor suffixes give shapes: ``depth_b1hw``, ``K_b33``, ``points_bn3``.
"""

from __future__ import annotations

import numpy as np
import torch

# ---- numpy helpers -----------------------------------------------------------------------

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


# ---- torch helpers ---------------------------------------------------------------------

def pixel_grid(height: int, width: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates ``(u + 0.5, v + 0.5)`` as a (H, W, 2) tensor (x, y)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([u + 0.5, v + 0.5], dim=-1)


def backproject(uv_bn2: torch.Tensor, depth_bn: torch.Tensor, K_b33: torch.Tensor) -> torch.Tensor:
    """Camera-frame 3D points of pixels ``uv`` at z-depth ``depth``: (B, N, 3)."""
    fx, fy = K_b33[:, 0, 0, None], K_b33[:, 1, 1, None]
    cx, cy = K_b33[:, 0, 2, None], K_b33[:, 1, 2, None]
    x = (uv_bn2[..., 0] - cx) / fx * depth_bn
    y = (uv_bn2[..., 1] - cy) / fy * depth_bn
    return torch.stack([x, y, depth_bn], dim=-1)


def transform_points(T_b44: torch.Tensor, points_bn3: torch.Tensor) -> torch.Tensor:
    """Apply 4x4 transforms to (B, N, 3) points (``T`` (B, 4, 4), or (1, 4, 4) for every batch)."""
    R_t, t = T_b44[:, :3, :3].transpose(1, 2), T_b44[:, None, :3, 3]
    if T_b44.shape[0] == points_bn3.shape[0]:  # one GEMM that adds t: about half the time of matmul, then add, on CPU
        return torch.baddbmm(t.expand(*points_bn3.shape[:2], 3), points_bn3, R_t)
    return points_bn3 @ R_t + t


def project(points_bn3: torch.Tensor, K_b33: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Project camera-frame points: returns (uv (B, N, 2) in pixels, z (B, N)).

    Points with ``z <= eps`` get uv computed with ``z`` clamped to ``eps``;
    callers must mask them with ``z > eps``.
    """
    z = points_bn3[..., 2]
    zc = z.clamp(min=eps)
    u = K_b33[:, 0, 0, None] * points_bn3[..., 0] / zc + K_b33[:, 0, 2, None]
    v = K_b33[:, 1, 1, None] * points_bn3[..., 1] / zc + K_b33[:, 1, 2, None]
    return torch.stack([u, v], dim=-1), z


def to_grid_coords(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates → ``grid_sample`` coordinates in [-1, 1] (``align_corners=False``)."""
    scale = torch.tensor([2.0 / width, 2.0 / height], device=uv.device, dtype=uv.dtype)
    return uv * scale - 1.0


def inside_image(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean mask of pixel coordinates that fall inside the image."""
    return (uv[..., 0] >= 0) & (uv[..., 0] <= width) & (uv[..., 1] >= 0) & (uv[..., 1] <= height)


def sample_image(image_bchw: torch.Tensor, uv_bn2: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Read an image at pixel coordinates: returns (B, C, N). Outside reads the border value (mask with
    :func:`inside_image`)."""
    h, w = image_bchw.shape[-2:]
    grid = to_grid_coords(uv_bn2, h, w)[:, None]  # B,1,N,2
    out = torch.nn.functional.grid_sample(image_bchw, grid, mode=mode, padding_mode="border", align_corners=False)
    return out[:, :, 0]


def default_device(preference: str = "auto") -> torch.device:
    """``cuda`` when present (or asked for), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


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

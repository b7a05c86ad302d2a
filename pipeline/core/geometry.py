"""Camera geometry shared by every stage, in torch (the numpy pose maths: :mod:`pipeline.core.poses`).

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

import torch

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

"""How much a coloured or textured mesh looks like the photos: render from a camera, PSNR and SSIM.

:func:`render_mesh_colors` ray-casts a mesh from a pinhole camera (one ray per
pixel centre, no lighting: the colour stored on the mesh, as a viewer shows it
unlit) with vertex colours or a texture. :func:`photometric_scores` compares a
render with the photo on a mask (e.g. where the object is): PSNR in dB and the
mean SSIM (kornia, 11-pixel Gaussian window) over the mask.

Texture convention: :mod:`pipeline.core.sampling` (UV v up).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.raycast import MeshRaycaster
from pipeline.core.sampling import sample_texture

SSIM_WINDOW = 11


def render_mesh_colors(raycaster: MeshRaycaster, faces: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray,
                       width: int, height: int, *, vertex_colors: np.ndarray | None = None,
                       uv: np.ndarray | None = None, texture: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Unlit render of the mesh in ``raycaster`` (faces ``faces``) from a ``width`` x ``height`` camera.

    Args:
        vertex_colors: (V, 3) uint8 or float in [0, 1], interpolated over faces; or
        uv, texture: (V, 2) UVs and an (H, W, 3) uint8 texture, bilinear.
    Returns:
        (RGB (H, W, 3) float32 in [0, 1], black where nothing is hit; (H, W) bool hit mask).
    """
    hits = raycaster.cast_view(K, cam_from_world, width, height)
    image = np.zeros((height, width, 3), np.float32)
    hit = hits.hit
    face = hits.face_id[hit]
    bary = hits.barycentric[hit]
    corners = np.asarray(faces)[face]
    if texture is not None and uv is not None:
        point_uv = (np.asarray(uv, dtype=np.float64)[corners] * bary[..., None]).sum(1)
        image[hit] = sample_texture(np.asarray(texture, dtype=np.float32) / 255.0, point_uv)
    elif vertex_colors is not None:
        colors = np.asarray(vertex_colors)
        colors = colors.astype(np.float32) / 255.0 if colors.dtype == np.uint8 else colors.astype(np.float32)
        image[hit] = (colors[corners][..., :3] * bary[..., None]).sum(1)
    else:
        raise ValueError("render_mesh_colors needs vertex_colors, or uv and texture")
    return image, hit


def psnr(render: np.ndarray, photo: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 1) of ``render`` vs ``photo`` (H, W, 3) in [0, 1] over ``mask`` (H, W)."""
    diff = (render[mask] - photo[mask]).astype(np.float64)
    mse = float((diff**2).mean()) if diff.size else float("nan")
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def ssim(render: np.ndarray, photo: np.ndarray, mask: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM (kornia, Gaussian ``window``) of ``render`` vs ``photo`` over ``mask``."""
    import kornia
    import torch

    def to_tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]

    ssim_map = kornia.metrics.ssim(to_tensor(render), to_tensor(photo), window)[0].mean(0).numpy()
    return float(ssim_map[mask].mean()) if mask.any() else float("nan")


def photometric_scores(render: np.ndarray, photo: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``{"psnr": dB, "ssim": mean SSIM, "pixels": count}`` of a render vs the photo (float [0, 1]) on ``mask``."""
    return {"psnr": psnr(render, photo, mask), "ssim": ssim(render, photo, mask), "pixels": int(mask.sum())}

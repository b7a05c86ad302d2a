"""Reading images and textures at subpixel positions.

Pixel convention (:mod:`pipeline.core.geometry`): pixel ``(column u, row v)``
covers ``[u, u+1) x [v, v+1)``, its centre is at ``(u + 0.5, v + 0.5)``.

Texture convention (that of trimesh and OpenGL, which trimesh turns into glTF's
when it writes a GLB): UV ``(0, 0)`` is the bottom-left corner of the texture
image and ``v`` points up, so texel row ``r`` of an ``H``-row image has its
centre at ``v = 1 - (r + 0.5) / H`` and column ``c`` at ``u = (c + 0.5) / W``.
"""

from __future__ import annotations

import numpy as np


def uv_to_texel(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Continuous texel coordinates (x right, y down, texel centres at +0.5) of UVs (v up)."""
    return np.stack([uv[..., 0] * width, (1.0 - uv[..., 1]) * height], -1)


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(N, C) float32 colours of ``image`` (H, W, C) at pixel coordinates ``uv`` (N, 2), pixel centres at +0.5.

    Positions are clamped to the image (edge pixels repeat).
    """
    height, width = image.shape[:2]
    x = np.clip(uv[:, 0] - 0.5, 0.0, width - 1.0)
    y = np.clip(uv[:, 1] - 0.5, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros(len(x), np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros(len(y), np.int64)
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    fx = (x - x0)[:, None].astype(np.float32)
    fy = (y - y0)[:, None].astype(np.float32)
    img = image.astype(np.float32) if image.dtype != np.float32 else image
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(N, C) float32 bilinear colours of ``texture`` (H, W, C) at UVs (N, 2) (v up), edges repeated."""
    height, width = texture.shape[:2]
    return sample_bilinear(texture, uv_to_texel(uv, width, height))

"""Baking a texture atlas: rasterize the UV charts, sample the photos, fill the gutters.

Texture convention: :mod:`pipeline.core.sampling` (trimesh/OpenGL UVs, v up).

* :func:`rasterize_uv`: for every texel whose centre lies in a face's UV
  triangle, the face and the barycentric coordinates of the centre.
* :func:`fill_gutters`: every texel outside the charts (the gutters, and rim
  texels whose centre falls just outside a chart) takes the colour of the
  nearest texel inside one, so bilinear filtering and mipmaps never blend
  background into a chart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.sampling import uv_to_texel


@dataclass(frozen=True)
class TexelSamples:
    """The texels covered by faces: flat texel index, face, barycentric coordinates."""

    texel: np.ndarray
    """(T,) int64 flat index ``row * width + col``."""
    face: np.ndarray
    """(T,) int64 face index."""
    barycentric: np.ndarray
    """(T, 3) float32 weights of the face's corners (sum 1, each >= 0)."""


def rasterize_uv(face_uv: np.ndarray, width: int, height: int, priority: np.ndarray | None = None,
                 chunk_candidates: int = 4_000_000) -> TexelSamples:
    """The texels of a ``width`` x ``height`` atlas whose centres lie in each face's UV triangle.

    Args:
        face_uv: (F, 3, 2) UVs of the face corners (v up).
        priority: (F,) where two faces cover a texel, the one with the lower value keeps it (default: the
            lower index). Photo charts overlap where one surface hides another in the photo: the front one
            (lower depth) must keep its texels.
    Returns:
        :class:`TexelSamples`, each covered texel once (a texel on an edge shared by two faces goes to one of them).
        Degenerate (zero-area) UV triangles cover nothing.
    """
    corners = uv_to_texel(face_uv.astype(np.float64), width, height)  # (F, 3, 2)
    origin = corners[:, 0]
    e1 = corners[:, 1] - origin
    e2 = corners[:, 2] - origin
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    usable = np.abs(det) > 1e-12
    inv = np.zeros((len(corners), 2, 2))
    inv[usable, 0, 0] = e2[usable, 1] / det[usable]
    inv[usable, 0, 1] = -e2[usable, 0] / det[usable]
    inv[usable, 1, 0] = -e1[usable, 1] / det[usable]
    inv[usable, 1, 1] = e1[usable, 0] / det[usable]
    lo = np.clip(np.ceil(corners.min(1) - 0.5), 0, [width - 1, height - 1]).astype(np.int64)
    hi = np.clip(np.floor(corners.max(1) - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
    spans = np.where(usable[:, None], np.maximum(hi - lo + 1, 0), 0)  # (F, 2) columns, rows
    counts = spans[:, 0] * spans[:, 1]
    cum = np.cumsum(counts)
    total = int(cum[-1]) if len(cum) else 0
    cuts = np.searchsorted(cum, np.arange(chunk_candidates, total, chunk_candidates))
    bounds = np.unique(np.concatenate([[0], cuts, [len(corners)]]))
    texels, faces, barys = [], [], []
    tolerance = 1e-6
    for start, stop in zip(bounds[:-1], bounds[1:]):
        n = counts[start:stop]
        if n.sum() == 0:
            continue
        face = np.repeat(np.arange(start, stop), n)
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        cols = lo[face, 0] + local % spans[face, 0]
        rows = lo[face, 1] + local // spans[face, 0]
        dx = cols + 0.5 - origin[face, 0]
        dy = rows + 0.5 - origin[face, 1]
        m = inv[face]
        w1 = m[:, 0, 0] * dx + m[:, 0, 1] * dy
        w2 = m[:, 1, 0] * dx + m[:, 1, 1] * dy
        w0 = 1.0 - w1 - w2
        inside = (w0 >= -tolerance) & (w1 >= -tolerance) & (w2 >= -tolerance)
        texels.append(rows[inside] * width + cols[inside])
        faces.append(face[inside])
        barys.append(np.clip(np.stack([w0[inside], w1[inside], w2[inside]], 1), 0.0, 1.0).astype(np.float32))
    if not texels:
        return TexelSamples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    texel = np.concatenate(texels)
    face = np.concatenate(faces)
    bary = np.concatenate(barys)
    rank = face if priority is None else np.asarray(priority)[face]
    order = np.lexsort((face, rank, texel))
    texel, face, bary = texel[order], face[order], bary[order]
    first = np.ones(len(texel), dtype=bool)
    first[1:] = texel[1:] != texel[:-1]
    bary = bary[first]
    bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
    return TexelSamples(texel=texel[first], face=face[first], barycentric=bary)


def fill_gutters(texture: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """``texture`` (H, W, C) with every texel outside ``covered`` (H, W) set to its nearest covered texel."""
    from scipy import ndimage

    if covered.all() or not covered.any():
        return texture
    _, (rows, cols) = ndimage.distance_transform_edt(~covered, return_indices=True)
    return texture[rows, cols]

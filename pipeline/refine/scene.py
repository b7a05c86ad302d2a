"""The refine stage's inputs as the optimization reads them: scene-wide tables and per-group tensors.

:func:`_scene_tables` reads every initial map once for the small per-view
tables (intrinsics, neighbours :func:`covisible_neighbors`, relative poses,
sparse-point anchors, pyramid sizes) and the shared ``current`` maps
(V, H, W, 2: depth and L_mv weight, −1 where invalid; read through
:func:`_decode_current`); :func:`photo_inputs` makes the grey images and window
taps L_photo reads; :func:`_build_group` makes one group's device tensors (a
:class:`pipeline.refine.pyramid._Group`, δz = 0). Views of different sizes
are padded to the largest with invalid pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ReconError
from pipeline.core.geometry import sample_image
from pipeline.core.io import DepthMap, View
from pipeline.refine import losses
from pipeline.refine.config import RefineConfig
from pipeline.refine.pyramid import _Group

# ---- neighbours, images --------------------------------------------------------------------

def covisible_neighbors(views: Sequence[View], k: int) -> np.ndarray:
    """(V, k') indices of each view's neighbours, k' = min(k, V − 1).

    Ranked by the number of shared sparse points (co-visibility), ties (e.g.
    no shared points) broken by camera-centre distance.
    """
    n = len(views)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    sets = [set(np.asarray(v.point_ids).tolist()) for v in views]
    centers = np.stack([v.center for v in views])
    out = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        covis = np.array([len(sets[i] & sets[j]) if j != i else -1 for j in range(n)], dtype=np.float64)
        dist = np.linalg.norm(centers - centers[i], axis=1)
        order = np.lexsort((dist, -covis))  # most shared points first, then nearest
        out[i] = [j for j in order if j != i][:k]
    return out


def _gray(image: np.ndarray | None, height: int, width: int) -> np.ndarray | None:
    """Grayscale float32 (H, W) in [0, 1] at the depth map's resolution."""
    if image is None:
        return None
    raw = np.asarray(image)
    img = raw[..., :3].astype(np.float32).mean(-1) if raw.ndim == 3 else raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.integer):
        img = img / float(np.iinfo(raw.dtype).max)
    if img.shape != (height, width):
        t = torch.from_numpy(img)[None, None]
        img = F.interpolate(t, size=(height, width), mode="area" if img.shape[0] > height else "bilinear").numpy()[0, 0]
    return img


def gaussian_blur(x_bchw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (border replicated); ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x_bchw
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x_bchw.dtype, device=x_bchw.device)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x_bchw.shape[1]
    x = F.conv2d(F.pad(x_bchw, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ---- scene-wide tables, one group's tensors ----------------------------------------------

def _check_map(view: View, dm: DepthMap) -> None:
    h, w = dm.depth.shape
    if (dm.valid.shape != (h, w) or dm.confidence.shape != (h, w) or np.shape(dm.K) != (3, 3)
            or np.shape(dm.cam_from_world) != (4, 4)):
        raise ReconError(f"depth map of {view.name}: inconsistent shapes (depth {dm.depth.shape}, "
                         f"valid {dm.valid.shape}, confidence {dm.confidence.shape}); "
                         "delete it and re-run the depth stage")


@dataclass(frozen=True)
class _ViewCamera:
    """What the scene-wide tables need of one initial map (kept for every view: small)."""

    shape: tuple[int, int]
    K: np.ndarray  # (3, 3) float64
    cam_from_world: np.ndarray  # (4, 4) float64


def _anchor_projections(views: Sequence[View], cameras: Sequence[_ViewCamera], points: np.ndarray, max_points: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each view's sparse points projected with its depth map's K and pose, padded: (uv (V,P,2), z (V,P), in-image mask
    (V,P))."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for v, cam in zip(views, cameras):
        ids = np.asarray(v.point_ids, np.int64)
        if len(ids) > max_points:
            ids = np.sort(rng.choice(ids, max_points, replace=False))
        T, K = cam.cam_from_world, cam.K
        Xc = points[ids] @ T[:3, :3].T + T[:3, 3] if len(ids) else np.zeros((0, 3))
        z = Xc[:, 2]
        zc = np.maximum(z, 1e-8)
        uv = np.stack([K[0, 0] * Xc[:, 0] / zc + K[0, 2], K[1, 1] * Xc[:, 1] / zc + K[1, 2]], -1).reshape(-1, 2)
        h, w = cam.shape
        ok = (z > losses.MIN_DEPTH) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        rows.append((uv, z, ok))
    P = max(1, max(len(z) for _, z, _ in rows))
    a_uv = np.zeros((len(rows), P, 2), np.float32)
    a_z = np.ones((len(rows), P), np.float32)
    a_ok = np.zeros((len(rows), P), bool)
    for i, (uv, z, ok) in enumerate(rows):
        a_uv[i, : len(z)], a_z[i, : len(z)], a_ok[i, : len(z)] = uv, np.where(ok, z, 1.0), ok
    return a_uv, a_z, a_ok


def _pyramid_shapes(height: int, width: int, strides: Sequence[int]) -> list[tuple[int, int]]:
    """Grid sizes, fine to coarse, of the pyramid levels (``ceil(size / stride)``)."""
    if not strides or any(int(s) < 1 for s in strides) or list(strides) != sorted(set(strides)):
        raise ReconError("refine.pyramid_strides must be increasing positive integers, e.g. 1,2,4,8; "
                         f"got {tuple(strides)}")
    return [(max(1, math.ceil(height / s)), max(1, math.ceil(width / s))) for s in strides]


def _input_arrays(dm: DepthMap, cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An initial map as optimized: (depth float32, 0 where invalid; valid; L_mv weight float32, 0 where invalid),
    (h, w) each."""
    d = np.asarray(dm.depth, np.float32)
    ok = np.asarray(dm.valid, bool) & np.isfinite(d) & (d > losses.MIN_DEPTH)
    c = np.nan_to_num(np.asarray(dm.confidence, np.float32), nan=0.0)
    conf = np.where(ok, np.clip(c, 0.0, 1.0) if cfg.use_confidence else 1.0, 0.0).astype(np.float32)
    return np.where(ok, d, 0.0).astype(np.float32), ok, conf


def _decode_current(taps: torch.Tensor) -> torch.Tensor:
    """``current`` stores (depth, weight) with weight −1 at invalid pixels; read as (depth, valid 0/1, weight ≥ 0)."""
    c = taps[..., 1]
    return torch.stack([taps[..., 0], (c >= 0).to(taps.dtype), c.clamp(min=0.0)], -1)


@dataclass
class _SceneTables:
    """Per-view data small enough to keep for every view (storage order), and the common padded size."""

    height: int
    width: int
    Ks: np.ndarray  # (V, 3, 3)
    nbr: np.ndarray  # (V, k) neighbour storage indices
    dst_from_src: np.ndarray  # (V, k, 4, 4)
    anchor_uv: np.ndarray  # (V, P, 2)
    anchor_z: np.ndarray  # (V, P)
    anchor_ok: np.ndarray  # (V, P)
    pyramid: list[tuple[int, int]]
    shapes: list[tuple[int, int]]  # each view's map size (h, w)
    pixel_scale: float = 1.0
    """Largest factor by which the depth stage scaled its pixel-sized settings for a map (``depth.reference_side``)."""


def _scene_tables(views: Sequence[View], init: Sequence[DepthMap], points: np.ndarray, cfg: RefineConfig,
                  device: torch.device) -> tuple[_SceneTables, torch.Tensor]:
    """The scene-wide tables and the shared ``current`` maps (V, H, W, 2): depth and L_mv weight (−1 where invalid).

    Reads each initial map twice, one at a time (sizes and cameras first, then
    the common padded size is known); views are padded to (H, W) with invalid pixels.
    """
    n = len(views)
    cameras = []
    pixel_scale = 1.0
    for v, dm in zip(views, init):
        _check_map(v, dm)
        pixel_scale = max(pixel_scale, float(dm.stats.get("pixel_scale", 1.0)))
        cameras.append(_ViewCamera(dm.depth.shape, np.asarray(dm.K, np.float64),
                                   np.asarray(dm.cam_from_world, np.float64)))
    H = max(c.shape[0] for c in cameras)
    W = max(c.shape[1] for c in cameras)
    pyramid = _pyramid_shapes(H, W, cfg.pyramid_strides)
    poses = np.stack([c.cam_from_world for c in cameras])
    nbr = covisible_neighbors(views, cfg.num_neighbors)
    k = nbr.shape[1]
    dst_from_src = np.array([[poses[j] @ np.linalg.inv(poses[i]) for j in nbr[i]]
                             for i in range(n)]).reshape(n, k, 4, 4)
    a_uv, a_z, a_ok = _anchor_projections(views, cameras, points, cfg.max_anchor_points, cfg.seed)
    current = torch.empty((n, H, W, 2), dtype=torch.float32, device=device)
    for i, dm in enumerate(init):
        h, w = dm.depth.shape
        d, ok, conf = _input_arrays(dm, cfg)
        block = np.zeros((H, W, 2), np.float32)
        block[..., 1] = -1.0
        block[:h, :w, 0] = d
        block[:h, :w, 1] = np.where(ok, conf, -1.0)
        current[i] = torch.from_numpy(block)
    tables = _SceneTables(height=H, width=W, Ks=np.stack([c.K for c in cameras]), nbr=nbr, dst_from_src=dst_from_src,
                          anchor_uv=a_uv, anchor_z=a_z, anchor_ok=a_ok, pyramid=pyramid,
                          shapes=[c.shape for c in cameras], pixel_scale=pixel_scale)
    return tables, current


@dataclass(frozen=True)
class PhotoInputs:
    """What L_photo reads: every view's grey images and its window's taps."""

    images: torch.Tensor
    """(2, V, H, W) float16 grey levels in [0, 1]: the sharp plane, then the blurred one (:func:`_scene_images`)."""
    offsets: torch.Tensor
    """(T, 2) the window taps' pixel offsets (:func:`pipeline.refine.losses.window_offsets`)."""


def photo_inputs(images: Sequence[np.ndarray | None], tables: _SceneTables, cfg: RefineConfig,
                 device: torch.device) -> PhotoInputs | None:
    """L_photo's inputs; maps larger than ``depth.reference_side`` get a proportionally wider blur and window (the
    same number of taps, spread out), as the depth stage's windows are. None if a view has no image."""
    scale = tables.pixel_scale
    gray = _scene_images(images, tables.shapes, tables.height, tables.width, cfg.photo_blur * scale, device)
    if gray is None:
        return None
    offsets = losses.window_offsets(cfg.photo_radius, scale, cfg.photo_checkerboard)
    return PhotoInputs(images=gray, offsets=offsets.to(device))


def _scene_images(images: Sequence[np.ndarray | None], shapes: Sequence[tuple[int, int]], height: int, width: int,
                  blur: float, device: torch.device) -> torch.Tensor | None:
    """Every view's grey image at its map's resolution, padded to (height, width): (2, V, H, W) float16, the sharp
    plane and the plane Gaussian-blurred by ``blur`` pixels (L_photo reads the neighbours'; 1.4 MiB per view at 480x360;
    each plane contiguous, so a read gathers single values). None if a view has no image."""
    out = torch.zeros((2, len(shapes), height, width), dtype=torch.float16, device=device)
    for i, (h, w) in enumerate(shapes):
        g = _gray(images[i], h, w)
        if g is None:
            return None
        t = torch.as_tensor(g, dtype=torch.float32, device=device)[None, None]
        out[0, i, :h, :w] = t[0, 0].to(torch.float16)
        out[1, i, :h, :w] = gaussian_blur(t, blur)[0, 0].to(torch.float16)
    return out


def _build_group(start: int, stop: int, init: Sequence[DepthMap], images: Sequence[np.ndarray | None] | None,
                 tables: _SceneTables, cfg: RefineConfig, device: torch.device) -> _Group:
    """The device tensors of the views ``start:stop`` (storage order), read from their initial maps and images;
    δz = 0."""
    B, H, W = stop - start, tables.height, tables.width
    depth = np.zeros((B, 1, H, W), np.float32)
    valid = np.zeros((B, 1, H, W), bool)
    conf = np.zeros((B, 1, H, W), np.float32)
    gray = np.zeros((B, 1, H, W), np.float32)
    for j, i in enumerate(range(start, stop)):
        dm = init[i]
        h, w = dm.depth.shape
        depth[j, 0, :h, :w], valid[j, 0, :h, :w], conf[j, 0, :h, :w] = _input_arrays(dm, cfg)
        g = _gray(images[i] if images is not None else None, h, w)
        if g is not None:
            gray[j, 0, :h, :w] = g
    sl = slice(start, stop)
    nbr = tables.nbr
    k = nbr.shape[1]

    def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    d0, ok, cf = t(depth), t(valid, torch.bool), t(conf)
    w_x, w_y = losses.image_edge_weights(t(gray), cfg.edge_alpha)
    if cfg.smooth_depth_edge > 0:
        w_x, w_y = losses.depth_edge_weights(d0, w_x, w_y, cfg.smooth_depth_edge)
    flat_valid = valid.reshape(B, -1)
    counts = flat_valid.sum(1)
    pix_index = np.zeros((B, max(1, int(counts.max()))), np.int32)  # int32 halves the largest fixed tensor (H·W < 2³¹)
    for j in range(B):
        idx = np.flatnonzero(flat_valid[j])
        pix_index[j, : len(idx)] = idx
    anchor_uv = t(tables.anchor_uv[sl])
    # Anchors must land on valid depth (all four bilinear taps valid).
    anchor_ok = t(tables.anchor_ok[sl], torch.bool) & (sample_image(ok.float(), anchor_uv)[:, 0] > 0.999)
    grids = [torch.zeros(B, 1, h, w, device=device) for h, w in tables.pyramid]
    return _Group(
        start=start, stop=stop, depth_init=d0, valid=ok, valid_count=ok.sum().float(), confidence=cf,
        pix_index=t(pix_index, torch.int32), pix_count=t(counts[:, None]),
        K_src=t(tables.Ks[sl]).repeat_interleave(k, 0), K_dst=t(tables.Ks[nbr[sl].reshape(-1)]),
        nbr=t(nbr[sl].reshape(-1), torch.long), dst_from_src=t(tables.dst_from_src[sl].reshape(-1, 4, 4)),
        edge_w=losses.edge_smoothness_weights(ok, d0, w_x, w_y),
        surf_w=losses.surface_smoothness_weights(ok, d0, w_x, w_y), anchor_uv=anchor_uv,
        anchor_z=t(tables.anchor_z[sl]), anchor_mask=anchor_ok, mag_w=losses.magnitude_weights(d0, ok), grids=grids,
        exp_avg=[torch.zeros_like(g) for g in grids], exp_avg_sq=[torch.zeros_like(g) for g in grids],
        adam_steps=torch.zeros((), device=device),
    )

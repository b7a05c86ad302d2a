"""refine stage: multi-view refinement of the depth maps (``depth_pred = depth_init + δz``).

Model
-----
Each view's correction is a *multi-resolution pyramid* of log-depth grids
``r_l`` (strides :attr:`RefineConfig.pyramid_strides`: 1, 2, 4 ... 32 pixels),
upsampled coarse-to-fine (bilinear) and summed::

    r(p)          = Σ_l upsample(r_l)(p)
    depth_pred(p) = depth_init(p) · exp(r(p)),    δz = depth_pred − depth_init

All grids start at 0, so δz = 0 at step 0. Coarse grids make smooth,
low-frequency corrections (a per-view warp or scale drift) with a handful of
parameters, the stride-1 grid fixes single pixels (noise, outliers); ``exp``
keeps the depth positive and makes one Adam step of size ``lr`` a *relative*
depth change of about ``lr``, the same on every scene. The loss is

    weight_mv·L_mv + weight_anchor·L_anchor + weight_edge·L_edge + weight_surf·L_surf + weight_mag·L_mag

(:mod:`pipeline.refine.losses`). The views are split into groups of at most
``views_per_batch`` (interleaved, so neighbouring cameras fall in different
groups); each step refines one group in turn: every view samples
``samples_per_view`` valid pixels, projects them into its ``num_neighbors``
most co-visible views and compares with the neighbours' *current* predicted
depth, read bilinearly as this step's fixed target (every view is a source
in turn, so the consistency is symmetric over a round).

Everything lives on the torch device (CUDA when present, else CPU; the same
code). The inner loop neither copies between host and device nor
synchronises: per-step diagnostics go into a device tensor read every
``log_every`` steps, and a step whose loss or gradient is not finite is
skipped *on the device* (Adam's update is multiplied by a 0/1 flag) and
halves the learning rate; it is warned about at the next log.

I/O
---
:func:`run` reads ``OUT/depth/views/<stem>.npz`` and the sfm cache, calls
:func:`refine_depth_maps` and writes ``OUT/refine/views/<stem>.npz`` (with
``depth_init`` and INIT/PRED/DELTA statistics) and ``OUT/refine/log.json``
(settings, per-step losses and Δz statistics, per-view statistics).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.refine import losses
from pipeline.core.errors import ReconError
from pipeline.core.geometry import default_device, inside_image, sample_image
from pipeline.core.io import (
    DepthMap,
    LazySequence,
    View,
    load_depth_map,
    save_scratch_depth_map,
)
from pipeline.core.oom import call_with_oom_fallback
from pipeline.refine.config import RefineConfig  # noqa: F401 - re-exported
from pipeline.core.settings import check_section, fingerprint_fields
from pipeline.core.context import StageContext

logger = logging.getLogger(__name__)

LOG_COLUMNS: tuple[str, ...] = ("loss", "L_mv", "L_anchor", "L_edge", "L_surf", "L_mag", "L_photo", "dz_mean", "dz_std", "mv_kept",
                                 "photo_kept", "lr", "finite")
"""Per-step values in ``log.json`` (``dz_*`` in normalized-frame depth units, ``mv_kept`` / ``photo_kept`` = share of the
L_mv / L_photo samples used)."""


# ---- small pure helpers ------------------------------------------------------------------

def select_neighbors(views: Sequence[View], k: int) -> np.ndarray:
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


def value_stats(values: np.ndarray) -> dict[str, float]:
    """mean/std/min/max of an array (zeros when empty)."""
    if values.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    v = values.astype(np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def sample_views(maps_vhwc: torch.Tensor, view_bn: torch.Tensor, uv_bn2: torch.Tensor,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Bilinear read of per-view maps at pixel coordinates, each sample from its own view.

    The same values as :func:`pipeline.core.geometry.sample_image` of map
    ``view_bn[b, n]`` at ``uv_bn2[b, n]`` (``align_corners=False``, border
    padding: pixel centres at +0.5, coordinates clamped to the border), done
    with four row gathers from the channels-last maps of all views instead of
    one ``grid_sample`` per view. Differentiable with respect to ``uv`` (the
    maps are read as constants); the cost does not depend on the number of views.

    Args:
        maps_vhwc: (V, H, W, C) maps of all views, channels last.
        view_bn: (B, N) long view indices.
        uv_bn2: (B, N, 2) pixel coordinates in those views.
        decode: optional map of each tap's values (B, N, C) → (B, N, C'), applied
            before the interpolation (a compact storage read as more channels).
    Returns:
        (B, C, N), or (B, C', N) with ``decode``.
    """
    v, h, w, c = maps_vhwc.shape
    x = (uv_bn2[..., 0] - 0.5).clamp(0, w - 1)
    y = (uv_bn2[..., 1] - 0.5).clamp(0, h - 1)
    x0f, y0f = x.detach().floor(), y.detach().floor()
    ax, ay = (x - x0f)[..., None], (y - y0f)[..., None]  # (B, N, 1)
    x0, y0 = x0f.long(), y0f.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    rows = maps_vhwc.detach().reshape(v * h * w, c)
    base = view_bn * (h * w)

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        values = rows.index_select(0, (base + yy * w + xx).reshape(-1)).reshape(*view_bn.shape, c)
        return values if decode is None else decode(values)

    top = tap(y0, x0) * (1 - ax) + tap(y0, x1) * ax
    bottom = tap(y1, x0) * (1 - ax) + tap(y1, x1) * ax
    return (top * (1 - ay) + bottom * ay).permute(0, 2, 1)


def upsample2x(x_b1hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear ×2 upsampling (``align_corners=False``, border replicated), cropped to (height, width).

    Equal to ``F.interpolate(x, scale_factor=2, mode="bilinear")`` for even
    sizes; a coarse cell ``j`` covers fine pixels ``2j, 2j+1``. Written as
    shifted weighted sums, whose backward pass is several times cheaper on
    CPU than ``upsample_bilinear2d``'s.
    """
    xp = F.pad(x_b1hw, (1, 1, 0, 0), mode="replicate")
    x = torch.stack([0.25 * xp[..., :-2] + 0.75 * x_b1hw, 0.75 * x_b1hw + 0.25 * xp[..., 2:]], -1).flatten(-2)
    xp = F.pad(x, (0, 0, 1, 1), mode="replicate")
    x = torch.stack([0.25 * xp[..., :-2, :] + 0.75 * x, 0.75 * x + 0.25 * xp[..., 2:, :]], -2).flatten(-3, -2)
    return x[..., :height, :width]


def _upsample(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if 0 <= 2 * h - height <= 1 and 0 <= 2 * w - width <= 1:
        return upsample2x(x, height, width)
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def upsample_sum(grids: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Coarse-to-fine sum of a pyramid: ``up(... up(up(g_n) + g_{n-1}) ...) + g_0`` at (height, width).

    ``grids`` are (B, 1, h_l, w_l) from fine to coarse; each partial sum is
    bilinearly upsampled to the next finer grid's size (×2 steps use
    :func:`upsample2x`, other ratios ``F.interpolate``), the finest to
    (height, width). Cascading costs about 1.3 full-resolution upsamplings
    whatever the number of levels.
    """
    total = grids[-1]
    for g in reversed(grids[:-1]):
        total = _upsample(total, *g.shape[-2:]) + g
    return _upsample(total, height, width)


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


# ---- the optimization --------------------------------------------------------------------

def view_groups(num_views: int, views_per_batch: int) -> list[np.ndarray]:
    """Views refined together, one group per step in turn: interleaved (``i % G``), so a view's
    neighbours (usually the cameras next to it) are mostly refined in other steps and read fresh."""
    groups = max(1, math.ceil(num_views / max(1, views_per_batch)))
    return [np.arange(g, num_views, groups) for g in range(groups)]


@dataclass
class _Group:
    """The device tensors of one group of views (views stored contiguously, ``start:stop`` of the scene)."""

    start: int
    stop: int
    depth_init: torch.Tensor  # (B, 1, H, W), 0 where invalid
    valid: torch.Tensor  # (B, 1, H, W) bool
    valid_count: torch.Tensor  # () number of valid pixels
    confidence: torch.Tensor  # (B, 1, H, W)
    pix_index: torch.Tensor  # (B, Nmax) int32 flat indices of valid pixels
    pix_count: torch.Tensor  # (B, 1)
    K_src: torch.Tensor  # (B*k, 3, 3)
    K_dst: torch.Tensor  # (B*k, 3, 3)
    nbr: torch.Tensor  # (B*k,) storage indices of the neighbours
    dst_from_src: torch.Tensor  # (B*k, 4, 4)
    edge_w: tuple[torch.Tensor, torch.Tensor]
    surf_w: tuple[torch.Tensor, torch.Tensor]
    anchor_uv: torch.Tensor  # (B, P, 2)
    anchor_z: torch.Tensor  # (B, P)
    anchor_mask: torch.Tensor  # (B, P) bool
    grids: list[torch.Tensor]  # per level (B, 1, h_l, w_l), the parameters
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    adam_steps: torch.Tensor  # () device step count (skipped steps do not count)

    _FIXED = ("depth_init", "valid", "valid_count", "confidence", "pix_index", "pix_count", "K_src", "K_dst", "nbr", "dst_from_src",
              "anchor_uv", "anchor_z", "anchor_mask")

    def fixed_tensors(self) -> list[torch.Tensor]:
        """The tensors that do not change while optimizing, in a fixed order (see :meth:`from_tensors`)."""
        return [getattr(self, k) for k in self._FIXED] + [*self.edge_w, *self.surf_w]

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimizer state: grids, Adam moments, step count."""
        return [*self.grids, *self.exp_avg, *self.exp_avg_sq, self.adam_steps]

    @classmethod
    def from_tensors(cls, start: int, stop: int, fixed: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> "_Group":
        n = len(cls._FIXED)
        levels = (len(state) - 1) // 3
        return cls(start=start, stop=stop, **dict(zip(cls._FIXED, fixed[:n])), edge_w=(fixed[n], fixed[n + 1]), surf_w=(fixed[n + 2], fixed[n + 3]),
                   grids=list(state[:levels]), exp_avg=list(state[levels:2 * levels]), exp_avg_sq=list(state[2 * levels:3 * levels]),
                   adam_steps=state[-1])


def _check_map(view: View, dm: DepthMap) -> None:
    h, w = dm.depth.shape
    if dm.valid.shape != (h, w) or dm.confidence.shape != (h, w) or np.shape(dm.K) != (3, 3) or np.shape(dm.cam_from_world) != (4, 4):
        raise ReconError(f"depth map of {view.name}: inconsistent shapes (depth {dm.depth.shape}, valid {dm.valid.shape}, "
                         f"confidence {dm.confidence.shape}); delete it and re-run the depth stage")


@dataclass(frozen=True)
class _ViewCamera:
    """What the scene-wide tables need of one initial map (kept for every view: small)."""

    shape: tuple[int, int]
    K: np.ndarray  # (3, 3) float64
    cam_from_world: np.ndarray  # (4, 4) float64


def _anchor_projections(views: Sequence[View], cameras: Sequence[_ViewCamera], points: np.ndarray, max_points: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each view's sparse points projected with its depth map's K and pose, padded: (uv (V,P,2), z (V,P), in-image mask (V,P))."""
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
        raise ReconError(f"refine.pyramid_strides must be increasing positive integers, e.g. 1,2,4,8; got {tuple(strides)}")
    return [(max(1, math.ceil(height / s)), max(1, math.ceil(width / s))) for s in strides]


def _input_arrays(dm: DepthMap, cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An initial map as optimized: (depth float32, 0 where invalid; valid; L_mv weight float32, 0 where invalid), (h, w) each."""
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


def _scene_tables(views: Sequence[View], init: Sequence[DepthMap], points: np.ndarray, cfg: RefineConfig,
                  device: torch.device) -> tuple[_SceneTables, torch.Tensor]:
    """The scene-wide tables and the shared ``current`` maps (V, H, W, 2): depth and L_mv weight (−1 where invalid).

    Reads each initial map twice, one at a time (sizes and cameras first, then
    the common padded size is known); views are padded to (H, W) with invalid pixels.
    """
    n = len(views)
    cameras = []
    for v, dm in zip(views, init):
        _check_map(v, dm)
        cameras.append(_ViewCamera(dm.depth.shape, np.asarray(dm.K, np.float64), np.asarray(dm.cam_from_world, np.float64)))
    H = max(c.shape[0] for c in cameras)
    W = max(c.shape[1] for c in cameras)
    pyramid = _pyramid_shapes(H, W, cfg.pyramid_strides)
    poses = np.stack([c.cam_from_world for c in cameras])
    nbr = select_neighbors(views, cfg.num_neighbors)
    k = nbr.shape[1]
    dst_from_src = np.array([[poses[j] @ np.linalg.inv(poses[i]) for j in nbr[i]] for i in range(n)]).reshape(n, k, 4, 4)
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
                          anchor_uv=a_uv, anchor_z=a_z, anchor_ok=a_ok, pyramid=pyramid, shapes=[c.shape for c in cameras])
    return tables, current


def _scene_images(images: Sequence[np.ndarray | None], shapes: Sequence[tuple[int, int]], height: int, width: int, blur: float,
                  device: torch.device) -> torch.Tensor | None:
    """Every view's grey image at its map's resolution, padded to (height, width): (V, H, W, 2) float16, sharp and
    Gaussian-blurred by ``blur`` pixels (L_photo reads the neighbours'; 1.4 MiB per view at 480x360). None if a view has no image."""
    out = torch.zeros((len(shapes), height, width, 2), dtype=torch.float16, device=device)
    for i, (h, w) in enumerate(shapes):
        g = _gray(images[i], h, w)
        if g is None:
            return None
        t = torch.as_tensor(g, dtype=torch.float32, device=device)[None, None]
        out[i, :h, :w, 0] = t[0, 0].to(torch.float16)
        out[i, :h, :w, 1] = gaussian_blur(t, blur)[0, 0].to(torch.float16)
    return out


def _build_group(start: int, stop: int, init: Sequence[DepthMap], images: Sequence[np.ndarray | None] | None, tables: _SceneTables,
                 cfg: RefineConfig, device: torch.device) -> _Group:
    """The device tensors of the views ``start:stop`` (storage order), read from their initial maps and images; δz = 0."""
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
        K_src=t(tables.Ks[sl]).repeat_interleave(k, 0), K_dst=t(tables.Ks[nbr[sl].reshape(-1)]), nbr=t(nbr[sl].reshape(-1), torch.long),
        dst_from_src=t(tables.dst_from_src[sl].reshape(-1, 4, 4)),
        edge_w=losses.edge_smoothness_weights(ok, d0, w_x, w_y), surf_w=losses.surface_smoothness_weights(ok, d0, w_x, w_y),
        anchor_uv=anchor_uv, anchor_z=t(tables.anchor_z[sl]), anchor_mask=anchor_ok,
        grids=grids, exp_avg=[torch.zeros_like(g) for g in grids], exp_avg_sq=[torch.zeros_like(g) for g in grids],
        adam_steps=torch.zeros((), device=device),
    )


# ---- scratch files: offloaded groups, maps awaiting the consistency gate ------------------

_ALIGN = 64


def _save_tensors(path: Path, tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Write the tensors' raw bytes one after another (each padded to 64 bytes); returns their (shape, dtype) for :func:`_load_tensors`."""
    layout = []
    with open(path, "wb") as fh:
        for x in tensors:
            a = x.detach().contiguous().cpu().numpy()
            fh.write(a.reshape(-1).view(np.uint8).data)
            fh.write(b"\0" * (-a.nbytes % _ALIGN))
            layout.append((tuple(x.shape), x.dtype))
    return layout


def _load_tensors(path: Path, layout: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """Read back what :func:`_save_tensors` wrote: the same values, bit for bit (one read; on the CPU the tensors share its buffer)."""
    buf = np.fromfile(path, dtype=np.uint8)
    out, offset = [], 0
    for shape, dtype in layout:
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        nbytes = math.prod(shape) * np_dtype.itemsize
        out.append(torch.from_numpy(buf[offset: offset + nbytes].view(np_dtype).reshape(shape)).to(device))
        offset += nbytes + (-nbytes % _ALIGN)
    return out


@contextlib.contextmanager
def _scratch_folder(parent: Path | None) -> Iterator[Callable[[], Path]]:
    """Yield a function giving this call's own scratch folder (made on first use in ``parent``, or the
    system's temporary folder); the folder is removed on exit, also after an error."""
    made: list[Path] = []

    def folder() -> Path:
        if not made:
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            made.append(Path(tempfile.mkdtemp(prefix=".refine.", dir=parent)))
        return made[0]

    try:
        yield folder
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


class _GroupStore:
    """Every group's tensors, made on first use and kept — or, when the groups exceed ``max_views``, the
    first groups kept and the others taking turns in one slot, their tensors in scratch files between
    turns (raw bytes: a group comes back bit-identical, so the result does not depend on ``max_views``)."""

    def __init__(self, spans: Sequence[tuple[int, int]], build: Callable[[int, int], _Group], max_views: int,
                 scratch: Callable[[], Path], device: torch.device):
        self.spans = list(spans)
        self._build, self._scratch, self._device = build, scratch, device
        sizes = [b - a for a, b in self.spans]
        kept = 0  # groups always resident; the remaining ones share one slot
        while kept < len(sizes) - 1 and sum(sizes[: kept + 1]) + max(sizes[kept + 1:]) <= max_views:
            kept += 1
        self.kept = kept
        self.offloading = kept < len(sizes) - 1
        self._resident: dict[int, _Group] = {}
        self._slot: tuple[int, _Group] | None = None
        self._layouts: dict[int, tuple[list, list]] = {}
        self.swaps = 0

    def get(self, g: int) -> _Group:
        if not self.offloading or g < self.kept:
            if g not in self._resident:
                self._resident[g] = self._build(*self.spans[g])
            return self._resident[g]
        if self._slot is not None and self._slot[0] == g:
            return self._slot[1]
        if self._slot is not None:
            self._save(*self._slot)
            self._slot = None
        self._slot = (g, self._load(g))
        return self._slot[1]

    def _paths(self, g: int) -> tuple[Path, Path]:
        folder = self._scratch()
        return folder / f"group{g:04d}.fixed", folder / f"group{g:04d}.state"

    def _save(self, g: int, gr: _Group) -> None:
        fixed, state = self._paths(g)
        if g not in self._layouts:  # the fixed tensors once, the state at every turn
            self._layouts[g] = (_save_tensors(fixed, gr.fixed_tensors()), [])
        self._layouts[g] = (self._layouts[g][0], _save_tensors(state, gr.state_tensors()))

    def _load(self, g: int) -> _Group:
        self.swaps += 1
        if g not in self._layouts:
            return self._build(*self.spans[g])
        fixed, state = self._paths(g)
        layout_fixed, layout_state = self._layouts[g]
        return _Group.from_tensors(*self.spans[g], _load_tensors(fixed, layout_fixed, self._device), _load_tensors(state, layout_state, self._device))

    def release(self) -> None:
        """Drop every group's tensors (the scratch files stay until the scratch folder goes)."""
        self._resident.clear()
        self._slot = None


LOSS_TERMS: tuple[str, ...] = ("L_mv", "L_anchor", "L_edge", "L_surf", "L_mag", "L_photo")


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


def _photo_term(gr: _Group, pred: torch.Tensor, current: torch.Tensor, images: torch.Tensor, channel: int, cfg: RefineConfig,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """L_photo of one group (:func:`pipeline.refine.losses.photometric_loss`): (loss, share of the sampled windows it used).

    ``photo_samples_per_view`` windows per view are centred on random valid
    pixels; their taps read the predicted depth, the view's own grey image
    (``channel`` 0: sharp, 1: blurred) and, through the neighbours, theirs.
    """
    B, _, H, W = pred.shape
    S = cfg.photo_samples_per_view
    offsets = losses.window_offsets(cfg.photo_radius).to(pred.device)
    T = offsets.shape[0]
    pick = torch.minimum((torch.rand(B, S, generator=gen, device=pred.device) * gr.pix_count).long(), (gr.pix_count - 1).clamp(min=0).long())
    flat = torch.gather(gr.pix_index, 1, pick).long()  # (B, S)
    tx = (flat % W)[..., None] + offsets[:, 0].long()
    ty = torch.div(flat, W, rounding_mode="floor")[..., None] + offsets[:, 1].long()  # (B, S, T)
    in_image = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
    tap = (ty.clamp(0, H - 1) * W + tx.clamp(0, W - 1)).reshape(B, S * T)
    d_taps = torch.gather(pred.reshape(B, -1), 1, tap).reshape(B, S, T)
    tap_ok = torch.gather(gr.valid.reshape(B, -1), 1, tap).reshape(B, S, T) & in_image
    ref_taps = images[gr.start:gr.stop, ..., channel].reshape(B, -1).gather(1, tap).reshape(B, S, T).to(pred.dtype)
    uv = torch.stack([tx.to(pred.dtype) + 0.5, ty.to(pred.dtype) + 0.5], -1)
    gray = images[..., channel:channel + 1]

    def read_image(uv_dst: torch.Tensor) -> torch.Tensor:
        return sample_views(gray, gr.nbr[:, None].expand(*uv_dst.shape[:2]), uv_dst)[:, 0].to(pred.dtype)

    def read_depth(uv_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        read = sample_views(current, gr.nbr[:, None].expand(*uv_c.shape[:2]), uv_c, _decode_current)
        return read[:, 0], read[:, 1] > 0.999

    return losses.photometric_loss(ref_taps, d_taps, uv, tap_ok, gr.K_src, gr.K_dst, gr.dst_from_src, read_image, read_depth, offsets,
                                   height=H, width=W, sigma_color=cfg.photo_sigma_color, best_k=cfg.photo_best_k,
                                   behind_tol=cfg.photo_occlusion_tol, min_texture=cfg.photo_min_texture)


def _group_losses(gr: _Group, current: torch.Tensor, cfg: RefineConfig, gen: torch.Generator, images: torch.Tensor | None = None,
                  image_channel: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss terms of one group at its current grids; returns (terms, depth_pred (B,1,H,W), share of L_mv samples kept,
    share of L_photo samples used). ``images``: every view's grey images (V, H, W, 2: sharp, blurred) for L_photo."""
    B, _, H, W = gr.depth_init.shape
    d0 = gr.depth_init
    pred = d0 * torch.exp(upsample_sum(gr.grids, H, W))  # 0 where invalid (d0 = 0 there)
    zero = pred.sum() * 0.0
    terms = dict.fromkeys(LOSS_TERMS, zero)
    kept = zero
    k = gr.nbr.shape[0] // B
    if k > 0 and cfg.weight_mv > 0:
        # L_mv: valid pixels → back-project at depth_pred → neighbours → their current depth there.
        S = cfg.samples_per_view
        # (a view without valid pixels samples pixel 0: invalid, so its confidence weight is 0)
        pick = torch.minimum((torch.rand(B, S, generator=gen, device=pred.device) * gr.pix_count).long(), (gr.pix_count - 1).clamp(min=0).long())
        flat = torch.gather(gr.pix_index, 1, pick).long()  # (B, S)
        uv_src = torch.stack([(flat % W).to(pred.dtype) + 0.5, torch.div(flat, W, rounding_mode="floor").to(pred.dtype) + 0.5], -1)
        d_src = torch.gather(pred.reshape(B, -1), 1, flat)
        c_src = torch.gather(gr.confidence.reshape(B, -1), 1, flat)
        uv_dst, z_sel = losses.reproject(uv_src.repeat_interleave(k, 0), d_src.repeat_interleave(k, 0), gr.K_src, gr.K_dst, gr.dst_from_src)
        # The neighbour's current depth is this step's target: read as a constant, at a constant location.
        read = sample_views(current, gr.nbr[:, None].expand(B * k, S), uv_dst.detach(), _decode_current)  # (B*k, 3, S): depth, valid, weight
        inside = inside_image(uv_dst, H, W) & (read[:, 1] > 0.999)
        weight = c_src.repeat_interleave(k, 0) * read[:, 2]
        terms["L_mv"], keep = losses.multiview_loss(z_sel, read[:, 0], inside, delta=cfg.huber_delta, tol=cfg.occlusion_tol,
                                                    behind_tol=cfg.occlusion_tol_behind, weight=weight)
        kept = keep.to(pred.dtype).mean()
    if cfg.weight_anchor > 0:
        terms["L_anchor"] = losses.anchor_loss(sample_image(pred, gr.anchor_uv)[:, 0], gr.anchor_z, gr.anchor_mask, delta=cfg.huber_delta)
    if cfg.weight_edge > 0:
        terms["L_edge"] = losses.edge_aware_smoothness(pred, *gr.edge_w)
    if cfg.weight_surf > 0:
        terms["L_surf"] = losses.surface_smoothness(pred, *gr.surf_w)
    if cfg.weight_mag > 0:
        terms["L_mag"] = losses.magnitude_loss(pred - d0, d0, gr.valid)
    photo_kept = zero
    if cfg.weight_photo > 0 and images is not None and k > 0:
        # L_photo's gradients are sparse (a few windows per view per step); Adam turns rare per-pixel gradients into
        # full-size steps, so they reach only the levels of stride >= photo_min_stride (the same depth, other paths).
        coarse = [g if s >= cfg.photo_min_stride else g.detach() for g, s in zip(gr.grids, cfg.pyramid_strides)]
        pred_photo = pred if coarse[0] is gr.grids[0] else d0 * torch.exp(upsample_sum(coarse, H, W))
        terms["L_photo"], photo_kept = _photo_term(gr, pred_photo, current, images, image_channel, cfg, gen)
    return terms, pred, kept, photo_kept


@torch.no_grad()
def _adam_step(gr: _Group, grads: Sequence[torch.Tensor], finite: torch.Tensor, lr: torch.Tensor,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """In-place Adam on a group's grids; with ``finite`` False (a device flag, no sync) nothing changes."""
    b1, b2 = betas
    f = finite.to(gr.adam_steps.dtype)
    gr.adam_steps += f
    t = gr.adam_steps.clamp(min=1.0)
    step_size = lr * f / (1.0 - b1**t)
    bc2_sqrt = (1.0 - b2**t).sqrt()
    for p, m, v, g in zip(gr.grids, gr.exp_avg, gr.exp_avg_sq, grads):
        g = torch.where(finite, g, torch.zeros((), device=g.device))
        m.lerp_(g, (1.0 - b1) * f)
        v.lerp_(g * g, (1.0 - b2) * f)
        p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads (``n <= 0``: leave torch's setting), then restore it."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(old)


def _lr_at(cfg: RefineConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr · lr_final_ratio`` over the run."""
    progress = step / max(cfg.steps - 1, 1)
    return cfg.lr * (cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def refine_depth_maps(
    views: Sequence[View],
    init: Sequence[DepthMap],
    points: np.ndarray,
    cfg: RefineConfig,
    device: torch.device | str = "cpu",
    *,
    images: Sequence[np.ndarray | None] | None = None,
    bar: Any = None,
    sink: Callable[[int, DepthMap], None] | None = None,
    scratch_dir: Path | None = None,
    candidates: Sequence[DepthMap | None] | None = None,
) -> tuple[list[DepthMap], dict[str, Any]]:
    """Refine the depth maps of a scene jointly (the core of the stage; no file I/O but its own scratch files).

    Memory: besides every view's current depth (the multiview targets) and small
    per-view tables, only the groups of views that ``cfg.max_resident_views``
    allows are in memory; ``init`` and ``images`` are read one view at a time
    (and more than once), so they may be :class:`pipeline.core.io.LazySequence`\\ s that
    load each item from its file, and with ``sink`` the refined maps are handed
    over one by one instead of being collected.

    Args:
        views: the scene's views (``point_ids`` for anchoring, co-visibility for neighbours).
        init: one initial :class:`DepthMap` per view (same order), normalized frame; its
            ``K`` and ``cam_from_world`` are used (the depth map's own resolution).
        points: (M, 3) sparse points (normalized frame), indexed by ``View.point_ids``.
        cfg: settings.
        device: torch device.
        images: optional per-view RGB/gray images (any resolution; resized to the
            depth maps) for the edge-aware weights; None = uniform weights.
        bar: optional tqdm-like bar (``update``, ``set_postfix``).
        sink: optional ``sink(index in views, refined map)``, called once per view
            after the optimization; the returned list is then empty.
        scratch_dir: folder in which this call makes its own scratch folder (offloaded
            groups, maps awaiting the consistency gate), removed before it returns, also
            after an error; None: the system's temporary folder.
        candidates: optional per-view maps of the depth stage before its consistency filter:
            their pixels that ``init`` lacks are refined too and kept where the evidence
            supports them (:func:`with_candidates`, the gate).
    Returns:
        (refined maps in the order of ``views`` — ``depth = depth_init + δz``, 0 where
        invalid, ``depth_init`` set, ``stats`` with INIT/PRED/DELTA mean/std/min/max —
        or ``[]`` with ``sink``; and the log dict).
    """
    if candidates is not None and cfg.restore_dropped:
        merged = LazySequence(len(init), lambda i: with_candidates(init[i], candidates[i]))
    else:
        merged = LazySequence(len(init), lambda i: with_candidates(init[i], None))
    with torch_threads(cfg.cpu_threads if torch.device(device).type == "cpu" else 0):
        return _refine(views, merged, points, cfg, device, images=images, bar=bar, sink=sink, scratch_dir=scratch_dir)


def with_candidates(dm: DepthMap, candidate: DepthMap | None) -> DepthMap:
    """``dm`` plus the pixels of ``candidate`` (the same view before the depth stage's filter) that ``dm`` lacks.

    Those pixels get confidence 0 (L_mv neither pulls them nor lets them pull
    a neighbour; L_photo, the anchors and the smoothness terms refine them) and
    are marked in ``restored``; the gate keeps them only where the evidence
    supports them.
    """
    none = np.zeros(dm.depth.shape, bool)
    if candidate is None or candidate.depth.shape != dm.depth.shape:
        return replace(dm, restored=none)
    c = np.asarray(candidate.depth, np.float32)
    extra = np.asarray(candidate.valid, bool) & ~np.asarray(dm.valid, bool) & np.isfinite(c) & (c > losses.MIN_DEPTH)
    return replace(dm, depth=np.where(extra, c, dm.depth).astype(np.float32), valid=dm.valid | extra,
                   confidence=np.where(extra, 0.0, dm.confidence).astype(np.float32), restored=extra)


def _refine(
    views: Sequence[View],
    init: Sequence[DepthMap],
    points: np.ndarray,
    cfg: RefineConfig,
    device: torch.device | str = "cpu",
    *,
    images: Sequence[np.ndarray | None] | None = None,
    bar: Any = None,
    sink: Callable[[int, DepthMap], None] | None = None,
    scratch_dir: Path | None = None,
) -> tuple[list[DepthMap], dict[str, Any]]:
    check_section(cfg, "refine")
    if len(views) != len(init) or not views:
        raise ValueError(f"need one depth map per view, got {len(views)} views and {len(init)} maps")
    device = torch.device(device)
    started = time.perf_counter()
    # Storage order: the members of each group side by side.
    groups_idx = view_groups(len(views), cfg.views_per_batch)
    order = np.concatenate(groups_idx)
    spans = np.cumsum([0] + [len(g) for g in groups_idx])
    spans = [(int(a), int(b)) for a, b in zip(spans[:-1], spans[1:])]
    views_s = [views[i] for i in order]
    init_s = LazySequence(len(views), lambda pos: init[order[pos]])
    images_s = LazySequence(len(views), lambda pos: images[order[pos]]) if images is not None else None
    out: list[DepthMap | None] = [None] * len(views) if sink is None else []

    def emit(pos: int, dm: DepthMap) -> None:
        if sink is None:
            out[order[pos]] = dm
        else:
            sink(int(order[pos]), dm)

    with _scratch_folder(scratch_dir) as scratch:
        tables, current = _scene_tables(views_s, init_s, np.asarray(points, np.float64).reshape(-1, 3), cfg, device)
        store = _GroupStore(spans, lambda a, b: _build_group(a, b, init_s, images_s, tables, cfg, device), cfg.max_resident_views, scratch, device)
        if store.offloading:
            logger.info("refine: %d views, %d in memory at once (refine.max_resident_views=%d): %d of %d groups wait in scratch files between turns",
                        len(views), sum(b - a for a, b in spans[: store.kept]) + max(b - a for a, b in spans[store.kept:]),
                        cfg.max_resident_views, len(spans) - store.kept, len(spans))
        photo_images = None
        if cfg.weight_photo > 0 and images_s is not None:
            photo_images = _scene_images(images_s, tables.shapes, tables.height, tables.width, cfg.photo_blur, device)
            if photo_images is None:
                logger.warning("refine: a view has no image; L_photo is off")
        hist = _optimize(store, current, cfg, device, bar, photo_images)
        del current, photo_images
        if store.offloading:
            logger.info("refine: %d group turns read from scratch files", store.swaps)
        if cfg.keep_if_more_consistent:
            ungated = lambda pos: scratch() / f"ungated{pos:05d}.npz"  # noqa: E731
            _finalize(store, views_s, init_s, lambda pos, dm: save_scratch_depth_map(ungated(pos), dm))
            stats = _gate(views_s, lambda pos: load_depth_map(ungated(pos)), cfg, device, emit, images_s)
        else:
            stats = _finalize(store, views_s, init_s, emit, keep_restored=False)
    log = {
        "settings": fingerprint_fields(cfg),
        "device": str(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "num_views": len(views),
        "resolution": [tables.width, tables.height],
        "neighbors": {views_s[i].name: [views_s[j].name for j in row] for i, row in enumerate(tables.nbr.tolist())},
        "skipped_steps": int((hist[:, -1] == 0).sum()),
        "seconds": round(time.perf_counter() - started, 3),
        "steps": [{"step": i, **{k: float(hist[i, j]) for j, k in enumerate(LOG_COLUMNS)}} for i in range(cfg.steps)],
        "views": {v.name: stats[v.name] for v in views},
    }
    return out, log  # type: ignore[return-value]


def _optimize(store: _GroupStore, current: torch.Tensor, cfg: RefineConfig, device: torch.device, bar: Any,
              images: torch.Tensor | None = None) -> np.ndarray:
    """The optimization loop (updates the groups' grids and ``current`` in place); returns the per-step log (steps, LOG_COLUMNS)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    history = torch.zeros(max(cfg.steps, 1), len(LOG_COLUMNS), device=device)
    weights = {"L_mv": cfg.weight_mv, "L_anchor": cfg.weight_anchor, "L_edge": cfg.weight_edge, "L_surf": cfg.weight_surf, "L_mag": cfg.weight_mag,
               "L_photo": cfg.weight_photo}
    lr_scale = torch.ones((), device=device)
    skipped_seen = 0

    for step in range(cfg.steps):
        gr = store.get((step // cfg.steps_per_visit) % len(store.spans))
        for g in gr.grids:
            g.requires_grad_(True)
        blurred = cfg.photo_blur > 0 and step < cfg.steps // 2
        terms, pred, kept, photo_kept = _group_losses(gr, current, cfg, gen, images, 1 if blurred else 0)
        loss = sum(weights[k] * terms[k] for k in LOSS_TERMS)
        grads = torch.autograd.grad(loss, gr.grids, allow_unused=True)
        with torch.no_grad():
            for g in gr.grids:
                g.requires_grad_(False)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, gr.grids)]
            finite = torch.isfinite(loss)
            for g in grads:
                finite = finite & torch.isfinite(g).all()
            lr = _lr_at(cfg, step) * lr_scale
            _adam_step(gr, grads, finite, lr)
            lr_scale = torch.where(finite, lr_scale, lr_scale * 0.5)
            # Neighbours read this group's depth as of this step (the prediction before the update).
            cur = current[gr.start:gr.stop, ..., 0]
            cur.copy_(torch.where(finite, pred[:, 0], cur))
            m = gr.valid.to(pred.dtype)
            dz = (pred - gr.depth_init) * m
            n = gr.valid_count.clamp(min=1.0)
            dz_mean = dz.sum() / n
            dz_std = ((dz * dz).sum() / n - dz_mean * dz_mean).clamp(min=0.0).sqrt()
            history[step] = torch.stack([loss, *(terms[k] for k in LOSS_TERMS), dz_mean, dz_std, kept, photo_kept, lr, finite.to(pred.dtype)])
        del gr, g, terms, pred, kept, photo_kept, loss, grads, cur, m, dz  # this step's tensors go before the next group's arrive
        if bar is not None:
            bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            values = dict(zip(LOG_COLUMNS, history[step].tolist()))
            skipped_now = int((history[: step + 1, -1] == 0).sum().item())
            if skipped_now > skipped_seen:
                logger.warning("refine: %d step(s) with a non-finite loss or gradient skipped so far; learning rate halved each time (now %.2e)",
                               skipped_now, values["lr"])
                skipped_seen = skipped_now
            if bar is not None:
                shown = [k for k in LOSS_TERMS if weights[k] > 0]
                bar.set_postfix({k: f"{values[k]:.2e}" for k in shown} | {"Δz_mean": f"{values['dz_mean']:.2e}", "Δz_std": f"{values['dz_std']:.2e}"},
                                refresh=False)
    return history[: cfg.steps].cpu().numpy()


def _finalize(store: _GroupStore, views: Sequence[View], init: Sequence[DepthMap], emit: Callable[[int, DepthMap], None],
              keep_restored: bool = True) -> dict[str, dict[str, Any]]:
    """Full-resolution refined maps, one group at a time, handed to ``emit(storage index, map)``; never NaN.

    Without ``keep_restored`` (no gate to check them) the restored candidates are left out.

    Returns each view's statistics; the groups' tensors are released.
    """
    stats: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for g in range(len(store.spans)):
            gr = store.get(g)
            H, W = gr.depth_init.shape[-2:]
            pred = (gr.depth_init * torch.exp(upsample_sum(gr.grids, H, W))).cpu().numpy()
            d0 = gr.depth_init.cpu().numpy()
            valid_all = gr.valid.cpu().numpy()
            for j, i in enumerate(range(gr.start, gr.stop)):
                dm = init[i]
                h, w = dm.depth.shape
                valid = valid_all[j, 0, :h, :w]
                d_init = d0[j, 0, :h, :w]
                d_pred = pred[j, 0, :h, :w]
                bad = valid & ~(np.isfinite(d_pred) & (d_pred > 0))
                if bad.any():
                    logger.warning("refine: %s: %d non-finite refined depths replaced by the initial depth", views[i].name, int(bad.sum()))
                    d_pred = np.where(bad, d_init, d_pred)
                d_pred = np.where(valid, d_pred, 0.0).astype(np.float32)
                s = change_stats(d_init, d_pred, valid)
                stats[views[i].name] = s
                restored = dm.restored if dm.restored is not None else np.zeros_like(valid)
                if not keep_restored:
                    valid = valid & ~restored
                    d_pred = np.where(valid, d_pred, 0.0).astype(np.float32)
                emit(i, replace(dm, depth=d_pred, valid=valid.copy(), confidence=np.where(valid, dm.confidence, 0.0).astype(np.float32),
                                depth_init=np.where(valid, d_init, 0.0).astype(np.float32), restored=restored & valid, stats={**dm.stats, **s}))
            del gr, pred, d0, valid_all
    store.release()
    return stats


def agreement_counts(depths: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], Ks: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                     cam_from_world: Mapping[int, np.ndarray] | Sequence[np.ndarray], index: int,
                     neighbors: Sequence[int], *, reproj_px: float, rel_depth: float) -> np.ndarray:
    """Per pixel of view ``index``: how many ``neighbors`` agree with its depth (int (H, W)).

    ``depths`` are (H, W) maps (0 where invalid), ``Ks`` their intrinsics, each
    indexed by view (every view, or a mapping holding at least ``index`` and
    ``neighbors``); agreement is :func:`pipeline.depth.consistency.geometric_consistency`
    (forward-backward reprojection within ``reproj_px`` pixels and ``rel_depth``
    relative depth).
    """
    from pipeline.depth.consistency import geometric_consistency
    from pipeline.core.geometry import invert_pose

    world_from_ref = invert_pose(cam_from_world[index])
    others = [(depths[j], Ks[j], torch.as_tensor(cam_from_world[j] @ world_from_ref, dtype=torch.float32, device=depths[j].device))
              for j in neighbors]
    with torch.no_grad():
        cons = geometric_consistency(depths[index], Ks[index], others, reproj_px, rel_depth)
    return cons.count.cpu().numpy()


def photometric_costs(ref_gray_11hw: torch.Tensor, K_ref_33: torch.Tensor, cam_from_world_ref: np.ndarray,
                      sources: Sequence[tuple[torch.Tensor, torch.Tensor, np.ndarray]], depths_dhw: torch.Tensor,
                      window: int = 5) -> torch.Tensor:
    """Matching cost ``1 - NCC`` (D, H, W) of each candidate depth map against the best neighbour image.

    The depth stage's cost (:func:`pipeline.depth.plane_sweep.sweep_cost`, ``best_k = 1``):
    grayscale windows of ``window`` pixels, a pixel's window warped through
    its own candidate depth. ``sources`` are (grayscale (1, 1, h, w), K (3, 3),
    cam_from_world (4, 4)) of the neighbours; depths are camera z (0 = none:
    cost of a far-away point, irrelevant where the caller masks invalid pixels).
    """
    from pipeline.depth import plane_sweep as mvs
    from pipeline.core.geometry import invert_pose

    H, W = depths_dhw.shape[-2:]
    ref = mvs.reference_stats(ref_gray_11hw, window)
    world_from_ref = invert_pose(cam_from_world_ref)
    prepared = [mvs.make_source(g, K_ref_33, K_j, torch.as_tensor(pose_j @ world_from_ref, dtype=torch.float32, device=g.device), H, W)
                for g, K_j, pose_j in sources]
    inv = torch.where(depths_dhw > 0, depths_dhw.clamp(min=1e-6).reciprocal(), torch.full_like(depths_dhw, 1e-6))
    with torch.no_grad():
        return mvs.sweep_cost(ref, prepared, inv, 1, 1 << 20)


def change_stats(depth_init: np.ndarray, depth: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """INIT / PRED / DELTA statistics (mean, std, min, max) over the valid pixels, and the valid fraction."""
    return {"INIT": value_stats(depth_init[valid]), "PRED": value_stats(depth[valid]), "DELTA": value_stats((depth - depth_init)[valid]),
            "valid_fraction": float(valid.mean())}


def keep_more_consistent(views: Sequence[View], maps: Sequence[DepthMap], cfg: RefineConfig, device: torch.device,
                         images: Sequence[np.ndarray | None] | None = None) -> tuple[list[DepthMap], dict[str, dict[str, Any]]]:
    """Refined depth where more neighbours agree with it than with the initial depth, initial depth elsewhere.

    With ``images`` (one per view) and ``cfg.keep_if_photo_consistent``, the
    refined depth must also match the neighbour images at least as well as the
    initial depth (:func:`photometric_costs`).

    Returns the maps (same order) and their statistics (:func:`change_stats` plus
    ``refined_fraction``: share of valid pixels that kept the refined depth).
    """
    out: list[DepthMap | None] = [None] * len(maps)
    stats = _gate(views, maps.__getitem__, cfg, device, out.__setitem__, images)
    return out, stats  # type: ignore[return-value]


def supported(count: np.ndarray, violations: np.ndarray, photo_cost: np.ndarray | None, max_photo_cost: float) -> np.ndarray:
    """Pixels whose depth the evidence supports: a neighbour map agrees, or the photos match (``photo_cost``
    at most ``max_photo_cost``; None: no photos) and no neighbour sees through the point ("keep unless contradicted")."""
    photo_ok = np.zeros_like(count, dtype=bool) if photo_cost is None else photo_cost <= max_photo_cost
    return (count >= 1) | ((violations == 0) & photo_ok)


def gate_choice(trusted: np.ndarray, restored: np.ndarray, count_ref: np.ndarray, count_init: np.ndarray, supported_ref: np.ndarray,
                photo_ref: np.ndarray | None, photo_init: np.ndarray | None, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, which depth the gate keeps: (take the refined depth, keep the pixel at all), both bool (H, W).

    * A pixel of a *trusted* initial map (the depth stage checked it against its
      neighbours): the refined depth where more neighbour maps agree with it than
      with the initial one and its photos match no worse, or where as many agree
      and its photos match better by more than ``margin``; the initial depth
      elsewhere. The pixel is always kept.
    * A pixel the depth stage dropped (``restored``), or one of an untrusted
      initial map (a prior nothing checked): the refined depth, kept only where
      ``supported_ref`` (:func:`supported`).
    """
    if photo_ref is None or photo_init is None:
        better = count_ref > count_init
    else:
        better = ((count_ref > count_init) & (photo_ref <= photo_init)) | ((count_ref >= count_init) & (photo_ref < photo_init - margin))
    checked = trusted & ~restored
    take = np.where(checked, better, supported_ref)
    keep = checked | supported_ref
    return take & keep, keep


def evidence_stats(init_valid: np.ndarray, keep: np.ndarray, take: np.ndarray, count_init: np.ndarray, count_ref: np.ndarray,
                   photo_init: np.ndarray | None, photo_ref: np.ndarray | None) -> dict[str, float]:
    """Before/after evidence of one view for the report and ``recon diagnose``.

    ``consistent_init`` / ``consistent_refined``: share of the initial valid
    pixels / of the kept pixels that at least one neighbour map agrees with;
    ``photo_cost_init`` / ``photo_cost_refined``: their mean matching cost
    1 − NCC (5x5, best neighbour; NaN without photos). The kept depth is the
    refined one where ``take``, the initial one elsewhere.
    """
    count_out = np.where(take, count_ref, count_init)
    out = {"consistent_init": float((count_init[init_valid] >= 1).mean()) if init_valid.any() else float("nan"),
           "consistent_refined": float((count_out[keep] >= 1).mean()) if keep.any() else float("nan"),
           "photo_cost_init": float("nan"), "photo_cost_refined": float("nan")}
    if photo_init is not None and photo_ref is not None:
        cost_out = np.where(take, photo_ref, photo_init)
        a, b = photo_init[init_valid], cost_out[keep]
        out["photo_cost_init"] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        out["photo_cost_refined"] = float(np.nanmean(b)) if np.isfinite(b).any() else float("nan")
    return out


def _gate(views: Sequence[View], load: Callable[[int], DepthMap], cfg: RefineConfig, device: torch.device,
          emit: Callable[[int, DepthMap], None], images: Sequence[np.ndarray | None] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`keep_more_consistent` one view at a time: ``load(i)`` gives view i's refined map (with
    ``depth_init`` and ``restored``), ``emit(i, map)`` takes the gated one; only a few views' maps are held at once.

    Neighbour evidence is each view's refined (and initial) depth at the pixels
    the depth stage checked, or at every pixel of a map it did not check
    (a prior); restored candidates of other views are never evidence.
    """
    from pipeline.depth.consistency import geometric_consistency
    from pipeline.core.geometry import invert_pose

    neighbors = select_neighbors(views, cfg.accept_neighbors)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]] = OrderedDict()
    capacity = 2 * (neighbors.shape[1] + 1)

    def evidence(dm: DepthMap) -> np.ndarray:
        restored = dm.restored if dm.restored is not None else np.zeros_like(dm.valid)
        return dm.valid & ~restored

    def tensors(j: int, dm: DepthMap | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """View j's evidence (initial, refined, K, pose), each map converted once while it stays in the small cache."""
        if j in cache:
            cache.move_to_end(j)
            return cache[j]
        dm = load(j) if dm is None else dm
        ev = evidence(dm)
        cache[j] = (t(np.where(ev, dm.depth_init, 0.0)), t(np.where(ev, dm.depth, 0.0)), t(dm.K), np.asarray(dm.cam_from_world, np.float64))
        while len(cache) > capacity:
            cache.popitem(last=False)
        return cache[j]

    photo = cfg.keep_if_photo_consistent and images is not None
    grays: OrderedDict[int, torch.Tensor | None] = OrderedDict()

    def gray(j: int, shape: tuple[int, int]) -> torch.Tensor | None:
        """View j's grayscale image (1, 1, H, W) at its map's resolution (small cache), None without an image."""
        if j not in grays:
            g = _gray(images[j], *shape)  # type: ignore[index]
            grays[j] = None if g is None else t(g)[None, None]
            while len(grays) > capacity:
                grays.popitem(last=False)
        grays.move_to_end(j)
        return grays[j]

    def consistency(i: int, depth: np.ndarray, which: int, nb: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(agreeing neighbours, neighbours that see through) of ``depth`` in view i against the neighbours' initial (0) or refined (1) evidence."""
        pose_i = entries[i][3]
        others = [(entries[j][which], entries[j][2], t(entries[j][3] @ invert_pose(pose_i))) for j in nb]
        with torch.no_grad():
            c = geometric_consistency(t(depth), entries[i][2], others, cfg.accept_reproj_px, cfg.accept_rel_depth, cfg.accept_free_space_margin)
        return c.count.cpu().numpy(), c.violations.cpu().numpy()

    stats: dict[str, dict[str, Any]] = {}
    for i in range(len(views)):
        dm = load(i)
        nb = neighbors[i].tolist()
        entries = {j: tensors(j, dm if j == i else None) for j in [i, *nb]}
        restored = dm.restored if dm.restored is not None else np.zeros_like(dm.valid)
        trusted = "geometric_filter" in dm.stats  # the depth stage checked these maps against their neighbours
        init_depth = np.where(dm.valid & ~restored, dm.depth_init, 0.0)
        ref_depth = np.where(dm.valid, dm.depth, 0.0)
        count_init, _ = consistency(i, init_depth, 0, nb)
        count_ref, violations_ref = consistency(i, ref_depth, 1, nb)
        photo_ref = photo_init = None
        if photo:
            ref_gray = gray(i, dm.depth.shape)
            src = [(gray(j, tuple(entries[j][0].shape)), entries[j][2], entries[j][3]) for j in nb]
            src = [s_ for s_ in src if s_[0] is not None]
            if ref_gray is not None and src:
                costs = photometric_costs(ref_gray, entries[i][2], entries[i][3], src, torch.stack([t(init_depth), t(ref_depth)])).cpu().numpy()
                photo_init, photo_ref = costs[0], costs[1]
        # An unchecked prior's pixel needs a neighbour map that agrees; photos alone only restore pixels the depth stage dropped.
        sup = (supported(count_ref, violations_ref, photo_ref, cfg.restore_max_photo_cost) if trusted else count_ref >= 1) & dm.valid
        take, keep = gate_choice(np.full(dm.valid.shape, trusted), restored, count_ref, count_init, sup, photo_ref, photo_init,
                                 cfg.accept_photo_margin)
        keep &= dm.valid
        if cfg.max_correction > 0:
            take &= np.abs(dm.depth - dm.depth_init) <= cfg.max_correction * dm.depth_init
            keep &= take | (trusted & ~restored)
        depth = np.where(keep, np.where(take, dm.depth, dm.depth_init), 0.0).astype(np.float32)
        kept_restored = keep & restored
        s = {**change_stats(dm.depth_init, depth, keep), "refined_fraction": float((take & keep & ~restored).sum() / max(1, (dm.valid & ~restored).sum())),
             "restored_fraction": float(kept_restored.sum() / max(1, keep.sum())), "dropped_fraction": float((dm.valid & ~keep).sum() / max(1, dm.valid.sum())),
             **evidence_stats(dm.valid & ~restored, keep, take, count_init, count_ref, photo_init, photo_ref)}
        stats[views[i].name] = s
        emit(i, replace(dm, depth=depth, valid=keep, confidence=np.where(keep, dm.confidence, 0.0).astype(np.float32),
                        depth_init=np.where(keep, dm.depth_init, 0.0).astype(np.float32), restored=kept_restored, stats={**dm.stats, **s}))
    return stats


# ---- the stage ---------------------------------------------------------------------------

def run(ctx: StageContext) -> None:
    """Refine every view's depth map; writes ``refine/views/<stem>.npz`` and ``refine/log.json``.

    Inputs are read lazily (one view's depth map and image at a time) and each
    refined map is written as soon as it is final, to the stage's scratch folder;
    the maps are moved into ``refine/views/`` only once the whole refinement has
    succeeded (a GPU out-of-memory retry on the CPU never mixes in maps of the
    failed attempt). The scratch folder is removed when the stage ends.
    """
    from pipeline.core.cache import write_json_atomic
    from pipeline.core.io import load_rgb, load_sfm_scene, save_depth_map

    ws, cfg = ctx.ws, ctx.settings
    scene = load_sfm_scene(ws)
    views = [v for v in scene.views if ws.depth_view(v.name).exists()]
    missing = len(scene.views) - len(views)
    if missing:
        ctx.logger.warning("refine: %d view(s) have no initial depth map and are left out", missing)
    if not views:
        raise ReconError(f"{ws.stage_dir('depth')}: no depth maps to refine; run `recon stage depth {ws.scene_dir}` first")
    if all(ws.refine_view(v.name).exists() for v in views) and ws.refine_log.exists():
        ctx.logger.info("refine: all %d views already refined", len(views))
        return
    for v in views:
        if not v.image_path.exists():
            raise ReconError(f"{v.image_path}: undistorted image missing from the sfm cache; re-run `recon run {ws.scene_dir} --force sfm`")
    shapes: dict[int, tuple[int, int]] = {}

    def load_init(i: int) -> DepthMap:
        dm = load_depth_map(ws.depth_view(views[i].name))
        shapes[i] = dm.depth.shape
        return dm

    def load_image(i: int) -> np.ndarray:  # only for edge weights at the depth resolution
        shape = shapes[i] if i in shapes else load_init(i).depth.shape
        return load_rgb(views[i].image_path, max_size=max(shape))

    def load_candidate(i: int) -> DepthMap | None:  # the depth stage's map before its consistency filter (mvs only)
        from pipeline.depth.stage import filter_input_path

        path = filter_input_path(ws, ctx.config.mvs, views[i].name)
        return load_depth_map(path) if path.exists() and path != ws.depth_view(views[i].name) else None

    init, images = LazySequence(len(views), load_init), LazySequence(len(views), load_image)
    candidates = LazySequence(len(views), load_candidate)
    device = default_device(cfg.device)
    h, w = init[0].depth.shape
    ctx.logger.info("refine: %d views at %dx%d on %s, %d steps", len(views), w, h, device, cfg.steps)
    scratch = ws.refine_scratch
    shutil.rmtree(scratch, ignore_errors=True)
    finished = scratch / "views"

    def write(i: int, dm: DepthMap) -> None:
        path = ws.refine_view(views[i].name)
        if not path.exists():
            save_depth_map(finished / path.name, dm)

    bar = ctx.bar(desc="refine depth", total=cfg.steps, unit="step")
    try:
        # views_per_batch changes the result, so an out-of-memory GPU goes straight to the CPU (same settings).
        _, log = call_with_oom_fallback(
            lambda _batch, dev: refine_depth_maps(views, init, scene.points, cfg, dev, images=images, bar=bar, sink=write, scratch_dir=scratch,
                                                  candidates=candidates),
            batch=cfg.views_per_batch, min_batch=cfg.views_per_batch, device=device, what="refinement",
            setting="refine.views_per_batch", log=ctx.logger).value
        ws.refine_view(views[0].name).parent.mkdir(parents=True, exist_ok=True)
        for v in views:
            path = ws.refine_view(v.name)
            if (finished / path.name).exists():
                os.replace(finished / path.name, path)
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    write_json_atomic(ws.refine_log, log)
    last = log["steps"][-1] if log["steps"] else {}
    deltas = [s["DELTA"] for s in log["views"].values()]
    ctx.summary.update({
        "views": len(views),
        "steps": cfg.steps,
        "device": str(device),
        "dz_mean": round(float(np.mean([d["mean"] for d in deltas])), 6),
        "dz_std": round(float(np.mean([d["std"] for d in deltas])), 6),
        "mv_kept": round(float(last.get("mv_kept", 0.0)), 3),
        "skipped_steps": log["skipped_steps"],
        "refined_fraction": round(float(np.mean([s.get("refined_fraction", 1.0) for s in log["views"].values()])), 4),
        "restored_fraction": round(float(np.mean([s.get("restored_fraction", 0.0) for s in log["views"].values()])), 4),
        "dropped_fraction": round(float(np.mean([s.get("dropped_fraction", 0.0) for s in log["views"].values()])), 4),
    })


# ---- synthetic evaluation (tests, benchmarks) --------------------------------------------

def ground_truth_depths(scene_dir, views: Sequence[View], normalized_from_sfm: np.ndarray) -> list[np.ndarray]:
    """GT z-depth (H, W) float32 of each view of a rendered scene, in the scene's normalized frame (0 = no hit)."""
    from pipeline.synthetic.groundtruth import load_gt_depth

    scale = float(np.cbrt(np.linalg.det(np.asarray(normalized_from_sfm)[:3, :3])))
    return [(load_gt_depth(Path(scene_dir) / "gt", v.name) * scale).astype(np.float32) for v in views]


def corrupt_depth(depth_gt: np.ndarray, kind: str, rng: np.random.Generator, *, warp: float = 0.02, noise: float = 0.005,
                  outliers: float = 0.03, holes: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic initial depth map from GT: (depth, valid, confidence).

    ``kind``:
      * ``warp`` — smooth per-view multiplicative warp ``1 + warp · sin(...)``
        (random low-frequency direction and phase, ~1 period across the image)
        times per-pixel Gaussian noise of relative σ = ``noise``;
      * ``mvs`` — what plane-sweep stereo gives: per-pixel relative noise σ = ``noise``,
        a share ``outliers`` of pixels off by ±5-30 %, and holes (random discs
        covering about ``holes`` of the image) marked invalid; confidence is
        lower (0.3) on half of the outliers and 1 elsewhere.
    """
    h, w = depth_gt.shape
    valid = depth_gt > 0
    d = depth_gt.astype(np.float64)
    if kind == "warp":
        v, u = np.mgrid[0:h, 0:w] / max(h, w)
        theta = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.7, 1.3)
        field = 1.0 + warp * np.sin(2 * np.pi * freq * (np.cos(theta) * u + np.sin(theta) * v) + rng.uniform(0, 2 * np.pi))
        d = d * field * (1.0 + noise * rng.standard_normal((h, w)))
        conf = np.ones((h, w))
    elif kind == "mvs":
        d = d * (1.0 + noise * rng.standard_normal((h, w)))
        out = rng.random((h, w)) < outliers
        d = np.where(out, d * (1.0 + rng.choice([-1.0, 1.0], (h, w)) * rng.uniform(0.05, 0.3, (h, w))), d)
        conf = np.where(out & (rng.random((h, w)) < 0.5), 0.3, 1.0)
        hole = np.zeros((h, w), bool)
        yy, xx = np.mgrid[0:h, 0:w]
        while hole.mean() < holes:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.01, 0.04) * max(h, w)
            hole |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        valid &= ~hole
    else:
        raise ValueError(f"unknown corruption {kind!r}; expected warp or mvs")
    valid &= d > 0
    return np.where(valid, d, 0.0).astype(np.float32), valid, np.where(valid, conf, 0.0).astype(np.float32)


def depth_error(depth: np.ndarray, depth_gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Relative depth error ``|d − gt| / gt`` over pixels valid in both: mean, median, and share within 1 %."""
    m = valid & (depth_gt > 0) & (depth > 0)
    if not m.any():
        return {"mean": float("nan"), "median": float("nan"), "within_1pct": float("nan"), "pixels": 0}
    e = np.abs(depth[m].astype(np.float64) - depth_gt[m]) / depth_gt[m]
    return {"mean": float(e.mean()), "median": float(np.median(e)), "within_1pct": float((e < 0.01).mean()), "pixels": int(m.sum())}

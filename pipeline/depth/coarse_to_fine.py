"""Coarse-to-fine plane-sweep depth of one reference view: :func:`estimate_depth`, its settings and its result.

The search drives the warp and cost primitives of :mod:`pipeline.depth.plane_sweep`:

1. **Coarse to fine.** A full sweep, uniform in inverse depth, on the coarsest
   pyramid level; each finer level sweeps a few offsets of the (median-
   filtered, upsampled) estimate plus its local min and max, then spatial
   propagation and polish sweeps at full resolution, then scene-plane
   candidates. Winner-take-all plus a parabola fit on the cost curve gives
   sub-hypothesis inverse depth.
2. **Confidence** = clamp(NCC, 0, 1) x uniqueness, where uniqueness
   ``1 - c_best / c_second`` compares the coarse sweep's best cost with the
   best cost away from it (a peak-ratio measure).

Conventions are those of :mod:`pipeline.depth.plane_sweep`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.geometry import backproject, pixel_grid
from pipeline.depth.plane_sweep import (
    _EPS,
    OUTSIDE_COST,
    RefStats,
    Source,
    level_shape,
    make_source,
    reference_stats,
    resize_image,
    scale_K,
    second_best_cost,
    sweep_cost,
    winner_take_all,
)

# ---- coarse to fine ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """How one reference view is swept (the mvs settings of :class:`pipeline.depth.stage.DepthConfig`)."""

    num_hypotheses: int = 128
    """Full sweep on the coarsest level (uniform in inverse depth)."""
    levels: int = 3
    refine_hypotheses: int = 8
    """Per finer level: offsets of the upsampled estimate spanning ± ``refine_radius`` coarser steps."""
    refine_radius: float = 2.0
    edge_radius: int = 1
    """Finer levels also try the coarser estimate's local min and max (window 2r+1, coarser pixels): edges can move."""
    propagation_shifts: tuple[int, ...] = (3, 8)
    """Full resolution: try the (smoothed) estimate shifted by each of these pixel distances in 4 directions."""
    polish_hypotheses: int = 5
    """Final sweep at full resolution around the (smoothed) result with half the last step (0 = none)."""
    polish_iterations: int = 1
    """Polish sweeps (each halves the step again)."""
    smooth_radius: int = 2
    """Centre surfaces of the finer sweeps are the previous estimate median-filtered over (2r+1)² pixels."""
    offset_penalty: float = 0.05
    """Cost added at the ends of a finer sweep (quadratic in the offset): keeps weak texture near the centre."""
    plane_max_gap: float = 0.25
    """A scene-plane candidate is tried only where it is within this relative inverse-depth distance of the estimate."""
    window: int = 5
    best_k: int = 1
    truncation: float = OUTSIDE_COST
    """Per-neighbour costs are clamped here before aggregation (OUTSIDE_COST = no clamping)."""
    min_ncc: float = 0.3
    chunk_pixels: int = 1 << 20


@dataclass(frozen=True)
class SweepResult:
    """Depth of one reference view at full (working) resolution."""

    depth: torch.Tensor  # (H, W), 0 where invalid
    confidence: torch.Tensor  # (H, W) in [0, 1]
    valid: torch.Tensor  # (H, W) bool
    ncc: torch.Tensor  # (H, W) aggregated NCC of the winner


def _level_inputs(ref_11hw: torch.Tensor, K_ref_33: torch.Tensor, src_images: Sequence[torch.Tensor],
                  K_srcs: Sequence[torch.Tensor], src_from_ref: Sequence[torch.Tensor], level: int,
                  window: int) -> tuple[RefStats, list[Source]]:
    """Reference statistics and prepared sources at pyramid level ``level``."""
    H, W = ref_11hw.shape[-2:]
    h, w = level_shape(H, W, level)
    ref = reference_stats(resize_image(ref_11hw, h, w), window)
    K_l = scale_K(K_ref_33, w / W, h / H)
    sources = []
    for img, K_s, T in zip(src_images, K_srcs, src_from_ref):
        hs, ws = level_shape(img.shape[-2], img.shape[-1], level)
        K_sl = scale_K(K_s, ws / img.shape[-1], hs / img.shape[-2])
        sources.append(make_source(resize_image(img, hs, ws), K_l, K_sl, T, h, w))
    return ref, sources


def _offset_sweep(ref: RefStats, sources: Sequence[Source], centre_hw: torch.Tensor, step: float, n: int,
                  cfg: "SweepSettings", penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sweep ``n`` copies of the surface ``centre`` offset by multiples of ``step`` (inverse depth), centred.

    Every hypothesis is a coherent surface (the centre surface shifted), so
    NCC windows follow slanted and curved surfaces — provided ``centre`` is
    smooth (a per-pixel noisy centre makes every window a jagged surface).
    ``penalty`` · (offset / max offset)² is added to the cost: in weak texture
    the estimate stays near the centre. Returns (inverse depth (H, W) with
    parabola refinement, best cost (H, W) without the penalty, the cost volume (n, H, W)).
    """
    k = torch.arange(n, device=centre_hw.device, dtype=centre_hw.dtype)[:, None, None] - 0.5 * (n - 1)
    cost = sweep_cost(ref, sources, centre_hw[None] + k * step, cfg.best_k, cfg.chunk_pixels, cfg.truncation)
    if penalty > 0:
        cost = cost + penalty * (k / (0.5 * (n - 1))) ** 2
    index, best = winner_take_all(cost)
    if penalty > 0:
        best = best - penalty * ((index - 0.5 * (n - 1)) / (0.5 * (n - 1))) ** 2
    return centre_hw + (index - 0.5 * (n - 1)) * step, best, cost


def median_filter(x_hw: torch.Tensor, radius: int) -> torch.Tensor:
    """Median over a (2r+1)² window (replicated borders): an edge-preserving smoother of depth maps.

    On a CPU through a selection network of elementwise min / max over the
    window's shifted copies (:func:`median_network`; 3-4 times faster than a
    sort per pixel), which gives the values of ``torch.median`` for NaN-free
    input; elsewhere ``torch.median`` itself (one kernel instead of hundreds).
    """
    if radius <= 0:
        return x_hw
    k = 2 * radius + 1
    h, w = x_hw.shape
    p = F.pad(x_hw[None, None], (radius, radius, radius, radius), mode="replicate")[0, 0]
    if x_hw.device.type != "cpu":
        return p.unfold(0, k, 1).unfold(1, k, 1).reshape(h, w, k * k).median(-1).values
    values = [p[i : i + h, j : j + w] for i in range(k) for j in range(k)]
    n = len(values)
    for i, j, keep_low, keep_high in median_network(n):
        a, b = values[i], values[j]
        if keep_low:
            values[i] = torch.minimum(a, b)
        if keep_high:
            values[j] = torch.maximum(a, b)
    return values[n // 2]


def merge_exchange_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's merge-exchange sort of ``n`` values (Knuth, TAOCP 5.2.2,
    Algorithm M), in order: after each puts the smaller value at ``i``, position ``m`` holds the m-th smallest."""
    if n < 2:
        return []
    t = math.ceil(math.log2(n))
    p = 1 << (t - 1)
    pairs: list[tuple[int, int]] = []
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            pairs += [(i, i + d) for i in range(n - d) if i & p == r]
            if q == p:
                break
            d, q, r = q - p, q // 2, p
        p //= 2
    return pairs


@functools.lru_cache(maxsize=8)
def median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`merge_exchange_pairs` that the middle output (``n // 2``, odd ``n``) depends on:
    ``(i, j, keep_low, keep_high)``, where ``keep_low`` / ``keep_high`` say whether its min / max is used later."""
    needed = {n // 2}
    kept = []
    for i, j in reversed(merge_exchange_pairs(n)):
        keep_low, keep_high = i in needed, j in needed
        if keep_low or keep_high:
            kept.append((i, j, keep_low, keep_high))
            needed |= {i, j}
    return tuple(reversed(kept))


def _shifted(x_hw: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """``x`` translated by ``shift`` pixels left, right, up and down (replicated borders)."""
    p = F.pad(x_hw[None, None], (shift, shift, shift, shift), mode="replicate")[0, 0]
    h, w = x_hw.shape
    s2 = 2 * shift
    return [p[shift : shift + h, s2 : s2 + w], p[shift : shift + h, 0:w],
            p[s2 : s2 + h, shift : shift + w], p[0:h, shift : shift + w]]


def _try_candidates(ref: RefStats, sources: Sequence[Source], inv_hw: torch.Tensor, best_hw: torch.Tensor,
                    candidates: Sequence[torch.Tensor], cfg: "SweepSettings") -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, replace the estimate by a candidate surface (H, W) that matches better."""
    cand = torch.stack(list(candidates))
    cost = sweep_cost(ref, sources, cand, cfg.best_k, cfg.chunk_pixels, cfg.truncation)
    c_best, c_idx = cost.min(0)
    switch = c_best < best_hw
    return torch.where(switch, cand.gather(0, c_idx[None])[0], inv_hw), torch.where(switch, c_best, best_hw)


def plane_inverse_depth(K_33: torch.Tensor, plane_cam_4: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse depth (H, W) at which each pixel's ray meets the plane ``n·X + d = 0`` (camera frame).

    ``plane_cam_4 = (n_x, n_y, n_z, d)``. With the ray ``X = z K^-1 p~`` (pixel
    centres), ``1 / z = -(n · K^-1 p~) / d``. Pixels whose ray meets the plane
    behind the camera (or never) get 0.
    """
    uv = pixel_grid(height, width, device=K_33.device, dtype=K_33.dtype).reshape(1, -1, 2)
    rays = backproject(uv, torch.ones_like(uv[..., 0]), K_33[None])[0]  # (H·W, 3) at unit depth
    n, d = plane_cam_4[:3], plane_cam_4[3]
    # d = 0: the plane passes through the camera centre (seen edge-on) and is never tried.
    edge_on = d.abs() <= _EPS
    inv = torch.where(edge_on, torch.zeros_like(rays[:, 0]), -(rays @ n) / torch.where(edge_on, torch.ones_like(d), d))
    return inv.clamp(min=0.0).reshape(height, width)


def _min_max_pool(x_hw: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x_hw[None, None]
    size = 2 * radius + 1
    hi = F.max_pool2d(x, size, stride=1, padding=radius)[0, 0]
    lo = -F.max_pool2d(-x, size, stride=1, padding=radius)[0, 0]
    return lo, hi


def estimate_depth(
    ref_11hw: torch.Tensor,
    K_ref_33: torch.Tensor,
    src_images: Sequence[torch.Tensor],
    K_srcs: Sequence[torch.Tensor],
    src_from_ref: Sequence[torch.Tensor],
    near: float,
    far: float,
    cfg: SweepSettings,
    planes_cam: Sequence[torch.Tensor] = (),
) -> SweepResult:
    """Coarse-to-fine plane-sweep depth of one reference view.

    1. Coarsest level: ``num_hypotheses`` fronto-parallel planes uniform in
       inverse depth over [near, far]; winner-take-all + parabola.
    2. Each finer level: the upsampled estimate shifted by
       ``refine_hypotheses`` offsets spanning ± ``refine_radius`` coarser steps,
       plus two edge candidates (the coarser estimate's local min and max),
       so a pixel on the wrong side of a depth edge can switch surfaces. The
       sweeps are centred on the median-filtered estimate (coherent surfaces
       for the NCC windows), with a small penalty on large offsets.
    3. Spatial propagation at full resolution: the smoothed estimate shifted
       by ``propagation_shifts`` pixels in four directions, kept per pixel where
       it matches better (moves depth edges, fills weakly textured pixels).
    4. Polish sweeps at full resolution, each with half the previous step.
    5. Scene planes (``planes_cam``, e.g. the floor fitted to the sparse
       points): each pixel also tries the depth where its ray meets each plane
       and keeps it where it matches better. This recovers slivers of a
       slanted plane between occluders, which the fronto-parallel sweeps and
       the propagation miss. The plane is tried only where it lies within
       ``plane_max_gap`` (relative inverse depth) of the estimate: an object
       pixel that took the floor behind it by a chance match would be depth
       that is too far, which carves the true surface out of a TSDF.

    Args:
        ref_11hw: (1, 1, H, W) grayscale reference image in [0, 1] (working resolution).
        K_ref_33: intrinsics of ``ref`` at (H, W).
        src_images: (1, 1, h_i, w_i) grayscale neighbour images.
        K_srcs: their intrinsics at (h_i, w_i).
        src_from_ref: (4, 4) poses of each neighbour camera relative to the reference camera.
        near, far: depth range of the sweep (reference camera z, > 0).
        planes_cam: (4,) planes ``(n, d)`` with ``n·X + d = 0`` in the reference camera frame.
    """
    H, W = ref_11hw.shape[-2:]
    dev, dt = ref_11hw.device, ref_11hw.dtype
    levels = max(1, cfg.levels)
    inv_near, inv_far = 1.0 / near, 1.0 / far

    # 1. full sweep on the coarsest level
    ref, sources = _level_inputs(ref_11hw, K_ref_33, src_images, K_srcs, src_from_ref, levels - 1, cfg.window)
    h, w = ref.image.shape[-2:]
    n = max(3, cfg.num_hypotheses)
    step = (inv_near - inv_far) / (n - 1)
    centre = torch.full((h, w), 0.5 * (inv_near + inv_far), device=dev, dtype=dt)
    inv, best, cost = _offset_sweep(ref, sources, centre, step, n, cfg)
    index = (inv - inv_far) / step
    second = second_best_cost(cost, index, exclude=2)
    uniqueness = (1.0 - best.clamp(min=0) / second.clamp(min=_EPS)).clamp(0.0, 1.0)
    del cost

    # 2. finer levels
    for level in reversed(range(levels - 1)):
        ref, sources = _level_inputs(ref_11hw, K_ref_33, src_images, K_srcs, src_from_ref, level, cfg.window)
        h, w = ref.image.shape[-2:]
        n = max(2, cfg.refine_hypotheses)
        new_step = 2.0 * cfg.refine_radius * step / (n - 1)
        candidates = _min_max_pool(inv, cfg.edge_radius) if cfg.edge_radius > 0 else ()
        centre = _upsample(median_filter(inv, cfg.smooth_radius), h, w, "bilinear")
        inv, best, _ = _offset_sweep(ref, sources, centre, new_step, n, cfg, cfg.offset_penalty)
        if candidates:
            upsampled = [_upsample(c, h, w, "bilinear") for c in candidates]
            inv, best = _try_candidates(ref, sources, inv, best, upsampled, cfg)
        uniqueness = _upsample(uniqueness, h, w, "bilinear")
        step = new_step

    # 2b. spatial propagation at full resolution: the estimate shifted by a few pixels
    for shift in cfg.propagation_shifts:
        smooth = median_filter(inv, cfg.smooth_radius)
        inv, best = _try_candidates(ref, sources, inv, best, _shifted(smooth, shift), cfg)

    # 4. polish at full resolution
    for _ in range(cfg.polish_iterations if cfg.polish_hypotheses >= 3 else 0):
        step = step / 2.0
        centre = median_filter(inv, cfg.smooth_radius)
        inv, best, _ = _offset_sweep(ref, sources, centre, step, cfg.polish_hypotheses, cfg, cfg.offset_penalty)

    # 5. scene planes
    if planes_cam:
        cands = []
        for plane in planes_cam:
            plane_inv = plane_inverse_depth(K_ref_33, plane.to(dev, dt), H, W)
            usable = ((plane_inv >= inv_far) & (plane_inv <= inv_near)
                      & ((plane_inv - inv).abs() <= cfg.plane_max_gap * inv))
            cands.append(torch.where(usable, plane_inv, inv))
        inv, best = _try_candidates(ref, sources, inv, best, cands, cfg)

    ncc = 1.0 - best
    valid = (ncc >= cfg.min_ncc) & (inv >= inv_far * (1 - 1e-4)) & (inv <= inv_near * (1 + 1e-4)) & (inv > 0)
    depth = torch.where(valid, 1.0 / inv.clamp(min=_EPS), torch.zeros_like(inv))
    confidence = torch.where(valid, ncc.clamp(0.0, 1.0) * uniqueness, torch.zeros_like(inv))
    return SweepResult(depth=depth, confidence=confidence, valid=valid, ncc=ncc)


def _upsample(x_hw: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    if x_hw.shape == (h, w):
        return x_hw
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x_hw[None, None], size=(h, w), mode=mode, **kwargs)[0, 0]

"""Cross-view work on finished depth maps: a view tries the surfaces its neighbours found, and a pixel is checked
against them.

* :func:`splat_depth` renders a neighbour's map into the reference camera (z-buffer);
  :func:`adopt_candidates` lets each pixel take such a surface where it matches better
  (the plane-sweep cost of :mod:`pipeline.depth.plane_sweep`).
* :func:`geometric_consistency` checks finished depth maps against their
  neighbours by forward-backward reprojection.

Conventions are those of :mod:`pipeline.core.geometry` (see :mod:`pipeline.depth.plane_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.geometry import backproject, inside_image, pixel_grid, project, sample_image, transform_points
from pipeline.depth.coarse_to_fine import SweepSettings, _level_inputs, _try_candidates
from pipeline.depth.plane_sweep import _EPS, OUTSIDE_COST, sweep_cost

# ---- cross-view candidates ---------------------------------------------------------------------

def splat_depth(depth_src_hw: torch.Tensor, K_src_33: torch.Tensor, K_ref_33: torch.Tensor,
                ref_from_src_44: torch.Tensor, height: int, width: int, fill_radius: int = 1) -> torch.Tensor:
    """A neighbour's depth map seen from the reference camera: inverse depth (H, W), 0 where none.

    Every valid source pixel is back-projected, moved into the reference
    camera and written to the pixel it lands in; where several land in one
    pixel the nearest wins (z-buffer: largest inverse depth). Holes left by
    the forward mapping are filled with the nearest surface of the
    surrounding (2r+1)² pixels (a max-filter on inverse depth, holes only).
    """
    hs, ws = depth_src_hw.shape
    uv = pixel_grid(hs, ws, device=depth_src_hw.device, dtype=depth_src_hw.dtype).reshape(1, -1, 2)
    d = depth_src_hw.reshape(1, -1)
    keep = d[0] > 0
    X = transform_points(ref_from_src_44[None], backproject(uv[:, keep], d[:, keep], K_src_33[None]))
    uv_ref, z = project(X, K_ref_33[None])
    u, v = uv_ref[0, :, 0].floor().long(), uv_ref[0, :, 1].floor().long()
    ok = (z[0] > _EPS) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    inv = torch.zeros(height * width, device=depth_src_hw.device, dtype=depth_src_hw.dtype)
    inv.scatter_reduce_(0, (v[ok] * width + u[ok]), z[0, ok].reciprocal(), reduce="amax", include_self=True)
    inv = inv.view(height, width)
    if fill_radius > 0:
        filled = F.max_pool2d(inv[None, None], 2 * fill_radius + 1, stride=1, padding=fill_radius)[0, 0]
        inv = torch.where(inv > 0, inv, filled)
    return inv


def adopt_candidates(
    ref_11hw: torch.Tensor,
    K_ref_33: torch.Tensor,
    src_images: Sequence[torch.Tensor],
    K_srcs: Sequence[torch.Tensor],
    src_from_ref: Sequence[torch.Tensor],
    depth_hw: torch.Tensor,
    candidates_inv: Sequence[torch.Tensor],
    cfg: SweepSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second look at a finished depth map with the surfaces other views found.

    Per pixel, the current depth competes with each candidate inverse-depth
    map (the neighbours' maps :func:`splat_depth`-ed into this view; 0 = no
    proposal) on the same full-resolution matching cost, and the lowest cost
    wins. A view whose coarse sweep fell into the wrong cost basin (a thin or
    briefly seen surface) takes the surface a neighbour found when it matches
    better. No propagation or polishing follows: spreading adopted surfaces
    to pixels no view proposed them for costs precision (measured).

    Returns (depth (H, W), 0 where invalid; NCC of the kept depth (H, W);
    adopted (H, W) bool: the depth came from a candidate).
    """
    ref, sources = _level_inputs(ref_11hw, K_ref_33, src_images, K_srcs, src_from_ref, 0, cfg.window)
    own = depth_hw > 0
    inv = torch.where(own, depth_hw.clamp(min=_EPS).reciprocal(), torch.zeros_like(depth_hw))
    best = sweep_cost(ref, sources, inv.clamp(min=_EPS)[None], cfg.best_k, cfg.chunk_pixels, cfg.truncation)[0]
    best = torch.where(own, best, torch.full_like(best, OUTSIDE_COST))
    origin = inv
    cands = [torch.where(c > 0, c, inv) for c in candidates_inv]
    if cands:
        inv, best = _try_candidates(ref, sources, inv, best, cands, cfg)
    ncc = 1.0 - best
    valid = (inv > 0) & (ncc >= cfg.min_ncc)
    adopted = valid & (inv != origin)
    depth = torch.where(valid, 1.0 / inv.clamp(min=_EPS), torch.zeros_like(inv))
    return depth, ncc, adopted


# ---- geometric consistency ---------------------------------------------------------------------

@dataclass(frozen=True)
class Consistency:
    """Per-pixel outcome of :func:`geometric_consistency` (all (H, W))."""

    count: torch.Tensor
    """int32: neighbour maps that agree with the pixel."""
    violations: torch.Tensor
    """int32: neighbour maps that see a surface clearly *behind* the pixel's point (it would float in their free
    space)."""
    mean_depth: torch.Tensor
    """Mean of the pixel's depth and the agreeing round-trip depths (0 where invalid)."""


def geometric_consistency(
    depth_hw: torch.Tensor,
    K_33: torch.Tensor,
    neighbours: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    max_reproj_px: float,
    max_rel_depth: float,
    free_space_margin: float = 0.05,
) -> Consistency:
    """Forward-backward reprojection check of a depth map against its neighbours' maps.

    A pixel ``p`` with depth ``d`` is back-projected, projected into neighbour
    ``j`` (depth ``z_j`` there), the neighbour's depth ``d_j`` is read there
    (bilinear, all four taps valid) and that point is projected back into the
    reference view: ``p`` *agrees* with ``j`` when the round trip lands within
    ``max_reproj_px`` of ``p`` and its depth is within ``max_rel_depth``
    (relative) of ``d``. It *violates* ``j``'s free space when
    ``z_j < (1 - free_space_margin) · d_j``: ``j`` sees through the point to a
    surface behind it. (A neighbour seeing something in front is an occlusion,
    not evidence against the point.)

    Args:
        depth_hw: (H, W) reference depth, 0 where invalid.
        neighbours: (depth_j (h, w), K_j (3, 3), j_from_ref (4, 4)) per neighbour.
    """
    H, W = depth_hw.shape
    uv = pixel_grid(H, W, device=depth_hw.device, dtype=depth_hw.dtype).reshape(1, -1, 2)
    d = depth_hw.reshape(1, -1)
    valid = d > 0
    X_ref = backproject(uv, d, K_33[None])
    count = torch.zeros_like(d, dtype=torch.int32)
    violations = torch.zeros_like(d, dtype=torch.int32)
    depth_sum = d.clone()
    for depth_j, K_j, j_from_ref in neighbours:
        hj, wj = depth_j.shape
        X_j = transform_points(j_from_ref[None], X_ref)
        uv_j, z_j = project(X_j, K_j[None])
        ok = valid & (z_j > _EPS) & inside_image(uv_j, hj, wj)
        # Bilinear read; a read touching an invalid (0) neighbour pixel is rejected.
        taps = sample_image(torch.stack([depth_j, (depth_j > 0).to(depth_j.dtype)])[None], uv_j)  # (1, 2, N)
        d_j = torch.where(taps[:, 1] > 0.999, taps[:, 0], torch.zeros_like(taps[:, 0]))
        ok &= d_j > 0
        violations += (ok & (z_j < (1.0 - free_space_margin) * d_j)).to(torch.int32)
        X_back = transform_points(torch.linalg.inv(j_from_ref)[None], backproject(uv_j, d_j, K_j[None]))
        uv_back, z_back = project(X_back, K_33[None])
        ok &= (uv_back - uv).norm(dim=-1) <= max_reproj_px
        ok &= (z_back - d).abs() <= max_rel_depth * d
        count += ok.to(torch.int32)
        depth_sum += torch.where(ok, z_back, torch.zeros_like(z_back))
    mean_depth = torch.where(valid, depth_sum / (1 + count).to(d.dtype), torch.zeros_like(d))
    return Consistency(count.reshape(H, W), violations.reshape(H, W), mean_depth.reshape(H, W))

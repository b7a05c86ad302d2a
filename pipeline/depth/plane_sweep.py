"""Plane-sweep multi-view stereo in torch: the warp, cost and winner-take-all primitives of the ``mvs`` estimator.

One reference view against a few source (neighbour) views:

1. **Warp.** A source image is read at the pixels where the reference pixels
   land for a depth hypothesis. For a constant depth ``d`` (a fronto-parallel
   plane in the reference camera) this is the plane-induced homography
   ``H = K_src (R + t n^T / d) K_ref^-1`` with ``n = (0, 0, 1)``
   (:func:`plane_homographies`); for per-pixel hypotheses it is the same map
   written as ``x_src ~ d * A(p) + b`` with ``A(p) = K_src R K_ref^-1 p~`` and
   ``b = K_src t`` (:func:`ray_field`, :func:`warp_by_depth`), so one code path
   serves both.
2. **Cost.** Windowed normalized cross-correlation on grayscale (box filters,
   robust to gain and offset changes between views), cost ``1 - NCC`` in
   [0, 2]; a hypothesis that lands outside a source image costs
   :data:`OUTSIDE_COST`. Costs of the ``best_k`` best neighbours per pixel
   and hypothesis are averaged (occlusion-robust aggregation; ``best_k = 1``
   keeps surfaces that only one neighbour sees, the geometric filter then
   removes the chance matches).
3. **Winner-take-all.** The lowest cost plus a parabola fit on the cost
   curve gives sub-hypothesis inverse depth (:func:`winner_take_all`);
   :func:`second_best_cost` is the denominator of the peak-ratio uniqueness.

The coarse-to-fine search of one view that drives these is :func:`pipeline.depth.coarse_to_fine.estimate_depth`;
cross-view candidates and the geometric-consistency check of finished maps are in
:mod:`pipeline.depth.consistency`.

Conventions are those of :mod:`pipeline.core.geometry`: ``cam_from_world`` poses,
COLMAP pixel centres (+0.5), ``grid_sample(align_corners=False)``, depth =
camera z. Everything is float32 torch on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.geometry import inside_image, pixel_grid, to_grid_coords

OUTSIDE_COST = 2.0
"""Cost of a hypothesis that projects outside a source image (the worst NCC cost)."""

_EPS = 1e-6


# ---- images --------------------------------------------------------------------------------

def rgb_to_gray(image_b3hw: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB images in [0, 1]: (B, 3, H, W) → (B, 1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image_b3hw.dtype, device=image_b3hw.device)
    return (image_b3hw * w[None, :, None, None]).sum(1, keepdim=True)


def resize_image(image_bchw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize (``align_corners=False``, so K scales exactly)."""
    if image_bchw.shape[-2:] == (height, width):
        return image_bchw
    return F.interpolate(image_bchw, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def level_shape(height: int, width: int, level: int) -> tuple[int, int]:
    """Image size at pyramid level ``level`` (0 = full, each level halves)."""
    f = 2**level
    return max(1, round(height / f)), max(1, round(width / f))


def scale_K(K_33: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics of an image resized by (sx, sy) (COLMAP convention: exact)."""
    out = K_33.clone()
    out[0] = out[0] * sx
    out[1] = out[1] * sy
    return out


# ---- warping ---------------------------------------------------------------------------------

def plane_homographies(K_ref_33: torch.Tensor, K_src_33: torch.Tensor, src_from_ref_44: torch.Tensor,
                       depth_d: torch.Tensor) -> torch.Tensor:
    """Homographies of fronto-parallel planes ``z_ref = d``: reference pixel → source pixel.

    ``H_d = K_src (R + t n^T / d) K_ref^-1`` with ``n = (0, 0, 1)``, where
    ``(R, t)`` is ``src_from_ref``; applies to homogeneous pixel coordinates
    (COLMAP convention, pixel centres at +0.5).

    Args:
        depth_d: (D,) plane depths in the reference camera (> 0).
    Returns:
        (D, 3, 3).
    """
    R, t = src_from_ref_44[:3, :3], src_from_ref_44[:3, 3]
    n = torch.tensor([0.0, 0.0, 1.0], dtype=R.dtype, device=R.device)
    M = R[None] + (t[:, None] * n[None, :])[None] / depth_d[:, None, None]
    return K_src_33[None] @ M @ torch.linalg.inv(K_ref_33)[None]


def warp_by_homography(src_11hw: torch.Tensor, H_d33: torch.Tensor, height: int,
                       width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``src`` through each homography at every pixel of a (height, width) reference image.

    Returns:
        warped (D, 1, height, width) bilinear samples (0 outside), inside (D, 1, height, width) bool.
    """
    p = pixel_grid(height, width, device=src_11hw.device, dtype=src_11hw.dtype).reshape(-1, 2)
    ph = torch.cat([p, torch.ones_like(p[:, :1])], 1)  # (N, 3)
    q = ph @ H_d33.transpose(1, 2)  # (D, N, 3)
    z = q[..., 2]
    uv = q[..., :2] / z.clamp(min=_EPS)[..., None]
    return _sample_warped(src_11hw, uv.reshape(-1, height, width, 2), z.reshape(-1, height, width) > _EPS)


def ray_field(K_ref_33: torch.Tensor, K_src_33: torch.Tensor, src_from_ref_44: torch.Tensor, height: int,
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (3, H, W)`` and ``b (3,)`` such that a reference pixel at depth ``d`` lands at ``x_src ~ d * A + b``.

    ``A(p) = K_src R K_ref^-1 p~`` (pixel centres), ``b = K_src t``.
    """
    p = pixel_grid(height, width, device=K_ref_33.device, dtype=K_ref_33.dtype)
    ph = torch.cat([p, torch.ones_like(p[..., :1])], -1)  # (H, W, 3)
    M = K_src_33 @ src_from_ref_44[:3, :3] @ torch.linalg.inv(K_ref_33)
    A = torch.einsum("ij,hwj->ihw", M, ph)
    b = K_src_33 @ src_from_ref_44[:3, 3]
    return A, b


def warp_by_depth(src_11hw: torch.Tensor, A_3hw: torch.Tensor, b_3: torch.Tensor,
                  depth_dhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``src`` where each reference pixel lands at per-pixel depth hypotheses.

    Args:
        src_11hw: (1, 1, h_src, w_src) source image.
        A_3hw, b_3: from :func:`ray_field` (reference size H, W).
        depth_dhw: (D, H, W) depth hypotheses (> 0).
    Returns:
        warped (D, 1, H, W) (0 outside), inside (D, 1, H, W) bool.
    """
    x = depth_dhw * A_3hw[0] + b_3[0]
    y = depth_dhw * A_3hw[1] + b_3[1]
    z = depth_dhw * A_3hw[2] + b_3[2]
    zc = z.clamp(min=_EPS)
    uv = torch.stack([x / zc, y / zc], dim=-1)
    return _sample_warped(src_11hw, uv, z > _EPS)


def _sample_warped(src_11hw: torch.Tensor, uv_dhw2: torch.Tensor,
                   front_dhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, h, w, _ = uv_dhw2.shape
    hs, ws = src_11hw.shape[-2:]
    grid = to_grid_coords(uv_dhw2, hs, ws).reshape(1, d * h, w, 2)
    warped = F.grid_sample(src_11hw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = inside_image(uv_dhw2, hs, ws) & front_dhw
    return warped.reshape(d, 1, h, w), inside[:, None]


# ---- matching cost ---------------------------------------------------------------------------------

def box_filter(x_bchw: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window`` x ``window`` box of every channel (odd window, zero padding).

    Many channels: a depthwise convolution; few channels: separable shifted
    sums (on CPU a depthwise convolution of 2-6 channels is several times
    slower than either; of 15, the three statistics of 5 neighbours at one
    hypothesis, 3-4 times faster than the sums at 480x360). Both give the
    same values up to rounding.
    """
    c, h, w = x_bchw.shape[1:]
    r = window // 2
    if c >= 12 or x_bchw.device.type != "cpu":
        kernel = torch.full((c, 1, window, window), 1.0 / (window * window), dtype=x_bchw.dtype, device=x_bchw.device)
        return F.conv2d(x_bchw, kernel, padding=r, groups=c)
    p = F.pad(x_bchw, (r, r))
    rows = p[..., 0:w].clone()
    for i in range(1, window):
        rows += p[..., i : i + w]
    p = F.pad(rows, (0, 0, r, r))
    out = p[..., 0:h, :].clone()
    for i in range(1, window):
        out += p[..., i : i + h, :]
    return out.mul_(1.0 / (window * window))


@dataclass(frozen=True)
class RefStats:
    """Box-filter statistics of the reference image, shared by every hypothesis."""

    image: torch.Tensor  # (1, 1, H, W)
    mean: torch.Tensor  # (1, 1, H, W)
    var: torch.Tensor  # (1, 1, H, W)
    window: int


def reference_stats(ref_11hw: torch.Tensor, window: int) -> RefStats:
    stats = box_filter(torch.cat([ref_11hw, ref_11hw * ref_11hw], 1), window)
    mean = stats[:, :1]
    var = (stats[:, 1:] - mean * mean).clamp(min=0.0)
    return RefStats(ref_11hw, mean, var, window)


def ncc_cost(ref: RefStats, warped_d1hw: torch.Tensor, inside_d1hw: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """``1 - NCC`` of reference and warped windows (D, H, W), in [0, 2]; outside → :data:`OUTSIDE_COST`.

    ``eps`` (an intensity standard deviation, images in [0, 1]) keeps
    textureless windows from producing arbitrary correlations: they score
    near 0 NCC (cost ≈ 1).
    """
    d = warped_d1hw.shape[0]
    w = warped_d1hw[:, 0]
    stats = box_filter(torch.cat([w, w * w, w * ref.image[0, 0]], 0)[None], ref.window)[0]
    mw, mww, mrw = stats[:d], stats[d : 2 * d], stats[2 * d :]
    var_w = mww.sub_(mw * mw).clamp_(min=0.0)
    cov = mrw.sub_(mw.mul_(ref.mean[0]))
    cost = cov.mul_(var_w.mul_(ref.var[0]).add_(eps**4).rsqrt_())  # NCC
    cost = cost.neg_().add_(1.0).clamp_(0.0, 2.0)
    return cost.masked_fill_(~inside_d1hw[:, 0], OUTSIDE_COST)


class BestK:
    """Running mean of the ``k`` lowest of several cost volumes (occlusion-robust aggregation).

    An insertion network of elementwise min/max (much faster than ``topk``
    over a small axis on CPU); memory holds ``k`` volumes, not one per neighbour.
    """

    def __init__(self, k: int):
        self.k = max(1, k)
        self.slots: list[torch.Tensor] = []

    def add(self, cost: torch.Tensor) -> None:
        carry = cost
        for i, slot in enumerate(self.slots):
            lo = torch.minimum(slot, carry)
            carry = torch.maximum(slot, carry)
            self.slots[i] = lo
        if len(self.slots) < self.k:
            self.slots.append(carry)

    def mean(self) -> torch.Tensor:
        total = self.slots[0].clone()
        for slot in self.slots[1:]:
            total += slot
        return total / len(self.slots)


def aggregate_best_k(cost_ndhw: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` lowest costs over the neighbour axis: (N, D, H, W) → (D, H, W)."""
    agg = BestK(min(k, cost_ndhw.shape[0]))
    for c in cost_ndhw:
        agg.add(c)
    return agg.mean()


@dataclass(frozen=True)
class Source:
    """One neighbour view at one pyramid level, ready for :func:`warp_source`.

    ``gx = (d · Ax + bx) / (d · Az + bz)`` (and ``gy``) are the ``grid_sample``
    coordinates of a reference pixel at depth ``d``: the ray field of
    :func:`ray_field` with the pixel → [-1, 1] mapping folded in.
    """

    image: torch.Tensor  # (1, 1, h, w) grayscale in [0, 1]
    Ax: torch.Tensor  # (H_ref, W_ref)
    Ay: torch.Tensor
    Az: torch.Tensor
    bx: float
    by: float
    bz: float


def make_source(image_11hw: torch.Tensor, K_ref_33: torch.Tensor, K_src_33: torch.Tensor, src_from_ref_44: torch.Tensor,
                height: int, width: int) -> Source:
    A, b = ray_field(K_ref_33, K_src_33, src_from_ref_44, height, width)
    hs, ws = image_11hw.shape[-2:]
    # grid = 2 * uv / size - 1  →  numerator (2/size · x - z).
    Ax, Ay = A[0] * (2.0 / ws) - A[2], A[1] * (2.0 / hs) - A[2]
    bx, by = b[0] * (2.0 / ws) - b[2], b[1] * (2.0 / hs) - b[2]
    return Source(image_11hw, Ax.contiguous(), Ay.contiguous(), A[2].contiguous(), float(bx), float(by), float(b[2]))


def warp_source(src: Source, depth_dhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast :func:`warp_by_depth` for a prepared :class:`Source`: (warped (D, 1, H, W), inside (D, 1, H, W))."""
    d, h, w = depth_dhw.shape
    z = depth_dhw * src.Az + src.bz
    inv_z = z.clamp(min=_EPS).reciprocal_()
    grid = torch.empty((d, h, w, 2), dtype=depth_dhw.dtype, device=depth_dhw.device)
    gx, gy = grid[..., 0], grid[..., 1]  # written in place: no stacked copy
    torch.mul(depth_dhw, src.Ax, out=gx).add_(src.bx).mul_(inv_z)
    torch.mul(depth_dhw, src.Ay, out=gy).add_(src.by).mul_(inv_z)
    warped = F.grid_sample(src.image, grid.view(1, d * h, w, 2), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    inside = (gx.abs() <= 1.0).logical_and_(gy.abs() <= 1.0).logical_and_(z > _EPS)
    return warped.view(d, 1, h, w), inside[:, None]


def sweep_cost(ref: RefStats, sources: Sequence[Source], inv_depth_dhw: torch.Tensor, best_k: int, chunk_pixels: int,
               truncation: float = OUTSIDE_COST) -> torch.Tensor:
    """Aggregated matching cost (D, H, W) of per-pixel inverse-depth hypotheses.

    All sources of a chunk of hypotheses are scored together (one box filter
    over neighbours x hypotheses); chunks hold about ``chunk_pixels`` pixels x
    hypotheses x neighbours, which bounds memory (and on CPU keeps the working
    set small). Per-neighbour costs are clamped at ``truncation``: a neighbour
    that is occluded or outside costs about the same for every hypothesis,
    so it shifts the curve instead of bending it.
    """
    n = len(sources)
    D, H, W = inv_depth_dhw.shape
    chunk = max(1, chunk_pixels // (H * W * n))
    out = []
    for s in range(0, D, chunk):
        depth = inv_depth_dhw[s : s + chunk].clamp(min=_EPS).reciprocal()
        d = depth.shape[0]
        warped, inside = zip(*(warp_source(src, depth) for src in sources))
        cost = ncc_cost(ref, torch.cat(warped, 0), torch.cat(inside, 0)).view(n, d, H, W)
        if truncation < OUTSIDE_COST:
            cost = cost.clamp_(max=truncation)
        out.append(aggregate_best_k(cost, best_k))
    return torch.cat(out, 0)


# ---- winner-take-all --------------------------------------------------------------------------

def winner_take_all(cost_dhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best hypothesis with a parabola fit: (fractional index (H, W), interpolated best cost (H, W)).

    The offset ``(c₋ - c₊) / (2 (c₋ - 2c₀ + c₊))`` is clamped to ±0.5 and is 0
    at either end of the curve or where it is not convex.
    """
    D = cost_dhw.shape[0]
    idx = cost_dhw.argmin(0, keepdim=True)
    c0 = cost_dhw.gather(0, idx)[0]
    if D < 3:
        return idx[0].to(cost_dhw.dtype), c0
    cm = cost_dhw.gather(0, (idx - 1).clamp(min=0))[0]
    cp = cost_dhw.gather(0, (idx + 1).clamp(max=D - 1))[0]
    denom = cm - 2.0 * c0 + cp
    interior = (idx[0] > 0) & (idx[0] < D - 1) & (denom > 1e-6)
    offset = torch.where(interior, 0.5 * (cm - cp) / denom.clamp(min=1e-6), torch.zeros_like(c0)).clamp(-0.5, 0.5)
    best = torch.where(interior, c0 - 0.25 * (cm - cp) * offset, c0)
    return idx[0].to(cost_dhw.dtype) + offset, best


def second_best_cost(cost_dhw: torch.Tensor, index_hw: torch.Tensor, exclude: int) -> torch.Tensor:
    """Lowest cost at least ``exclude + 1`` hypotheses away from ``index`` (H, W) (peak-ratio denominator)."""
    D = cost_dhw.shape[0]
    k = torch.arange(D, device=cost_dhw.device)[:, None, None]
    far = (k - index_hw.round()[None]).abs() > exclude
    return torch.where(far, cost_dhw, torch.full_like(cost_dhw, OUTSIDE_COST)).amin(0)

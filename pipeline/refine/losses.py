"""Loss functions of the refine stage: small, pure, differentiable torch functions.

Every loss works in the *normalized frame* (median sparse-point depth = 1,
see docs/conventions.md), and every depth residual is *relative* — divided by a depth —
so ``huber_delta = 1e-2`` means "1 % of the depth" on every scene and at
every distance.

Shapes follow the suffix convention of :mod:`pipeline.core.geometry`:
``depth_b1hw``, ``uv_bn2`` (pixel coordinates, COLMAP convention: pixel
centres at +0.5), ``K_b33``, ``dst_from_src_b44`` (4x4 rigid transform from
the source camera frame to the destination camera frame).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.core.geometry import inside_image

MIN_DEPTH = 1e-5
"""``sampled2`` below this is "no depth there" (an invalid pixel of the neighbour)."""
MAG_EPS = 1e-2
"""Denominator offset of :func:`magnitude_loss`: ``|δz| / (depth_init + 1e-2)`` (docs/conventions.md)."""


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Element-wise Huber penalty ``where(|x| < δ, 0.5 x², δ (|x| − 0.5 δ))``.

    Quadratic near 0, linear (slope δ) beyond ``delta``; continuous with a
    continuous first derivative at ``|x| = δ``. Same shape as ``x``.
    """
    if delta <= 0:
        raise ValueError(f"huber delta must be > 0, got {delta}")
    ax = x.abs()
    return torch.where(ax < delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w v) / sum(w)``, 0 (with a zero gradient) when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


# ---- multiview reprojection (L_mv) -------------------------------------------------------

def reproject(
    uv_src_bn2: torch.Tensor,
    depth_src_bn: torch.Tensor,
    K_src_b33: torch.Tensor,
    K_dst_b33: torch.Tensor,
    dst_from_src_b44: torch.Tensor,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-project source pixels at their depth and project them into the destination camera.

    Computed as ``p = d · H [u, v, 1] + K_dst t`` with the ray homography
    ``H = K_dst R K_src⁻¹`` (``R, t`` of ``dst_from_src``): ``p = K_dst X_dst``,
    so ``uv_dst = p_xy / p_z`` and ``z_sel = p_z``: the points of
    back-projecting, transforming and projecting (:func:`pipeline.core.geometry.project`)
    wherever ``z_sel > eps`` (callers mask the others), with a few ops instead
    of three passes over the points, since the refine losses differentiate it
    at every step.

    Args:
        uv_src_bn2: (B, N, 2) source pixel coordinates.
        depth_src_bn: (B, N) source camera-frame z.
        K_src_b33, K_dst_b33: intrinsics at the resolution of the two depth maps.
        dst_from_src_b44: ``cam_from_world_dst @ inv(cam_from_world_src)``.
    Returns:
        (uv_dst (B, N, 2) pixels in the destination image, z_sel (B, N): the
        points' z in the destination camera; ``z_sel <= 0`` is behind it).
    """
    H = K_dst_b33 @ dst_from_src_b44[:, :3, :3] @ torch.linalg.inv(K_src_b33)  # (B, 3, 3)
    b = (K_dst_b33 @ dst_from_src_b44[:, :3, 3:])[:, None, :, 0]  # (B, 1, 3)
    ray = uv_src_bn2 @ H[:, :, :2].transpose(1, 2) + H[:, None, :, 2]  # H [u, v, 1]: (B, N, 3)
    p = depth_src_bn[..., None] * ray + b
    z = p[..., 2]
    return p[..., :2] / z.clamp(min=eps)[..., None], z


def occlusion_mask(z_sel: torch.Tensor, sampled2: torch.Tensor, tol: float,
                   behind_tol: float | None = None) -> torch.Tensor:
    """Z-buffer test of docs/conventions.md: which reprojected samples see the same surface in the neighbour.

    A sample counts only if ``sampled2 > 1e-5`` (the neighbour has a depth
    there) and ``|z_sel − sampled2| / (z_sel + 1e-6) < tol``. With
    ``behind_tol`` the test is also one-sided, as a z-buffer is: a sample
    *behind* the neighbour's surface by more than ``behind_tol``
    (``(z_sel − sampled2) / (z_sel + 1e-6) >= behind_tol``) is hidden by a
    nearer surface there and is dropped, while a sample *in front* of it (a
    real conflict: the neighbour sees through it) counts up to ``tol``.
    Without it, points just behind an occluding edge (a floor next to the
    object standing on it, where the depth gap is below ``tol``) would be
    pulled onto the occluder.

    Args:
        z_sel: (...) depth of each sample in the neighbour's camera.
        sampled2: (...) the neighbour's depth map read at the projected pixel.
        tol: relative tolerance (``occlusion_tol``, e.g. 0.25).
        behind_tol: optional tighter relative tolerance on the occluded side.
    Returns:
        bool tensor, same shape.
    """
    rel = (z_sel - sampled2) / (z_sel + 1e-6)
    keep = (sampled2 > MIN_DEPTH) & (rel.abs() < tol)
    if behind_tol is not None:
        keep = keep & (rel < behind_tol)
    return keep


def multiview_loss(
    z_sel: torch.Tensor,
    sampled2: torch.Tensor,
    inside: torch.Tensor,
    *,
    delta: float,
    tol: float,
    behind_tol: float | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_mv: Huber of the *relative* reprojection residual over the kept samples.

    The residual is ``(z_sel − sampled2) / (z_sel + 1e-6)``: the disagreement
    between where a view puts a point and where the neighbour's depth map
    puts the surface along the same ray, as a fraction of the depth (so
    ``delta = 1e-2`` is 1 % of the depth). Samples are kept where ``inside``
    (they project into the neighbour image) and they lie in front of the
    neighbour (``z_sel > 1e-5``) and pass :func:`occlusion_mask`; the loss is
    the (weighted) mean of the Huber penalty over the kept samples, 0 if none
    is kept.

    Args:
        z_sel, sampled2, inside: (...) as produced by :func:`reproject` and a
            bilinear read of the neighbour's current predicted depth.
        delta: Huber threshold (relative depth).
        tol, behind_tol: occlusion tolerances (relative depth), see :func:`occlusion_mask`.
        weight: optional (...) non-negative per-sample weights (e.g. confidences).
    Returns:
        (scalar loss, bool mask of the kept samples).
    """
    keep = inside & (z_sel > MIN_DEPTH) & occlusion_mask(z_sel, sampled2, tol, behind_tol)
    # Safe denominator and zeroed dropped residuals: NaN/inf there cannot reach the gradient.
    residual = (z_sel - sampled2) / (z_sel.clamp(min=MIN_DEPTH) + 1e-6)
    residual = torch.where(keep, residual, torch.zeros_like(residual))
    w = keep.to(residual.dtype) if weight is None else weight * keep.to(residual.dtype)
    return weighted_mean(huber(residual, delta), w), keep


# ---- sparse-point anchoring (L_anchor) ---------------------------------------------------

def anchor_loss(depth_at_points: torch.Tensor, point_depth: torch.Tensor, mask: torch.Tensor, *,
                delta: float) -> torch.Tensor:
    """L_anchor: Huber of ``(depth_pred − z_point) / z_point`` at the sparse points a view sees.

    Args:
        depth_at_points: (...) refined depth read (bilinear) at each point's projection.
        point_depth: (...) the point's z in that camera (the SfM scale anchor).
        mask: (...) bool, points that project inside the image onto valid depth.
        delta: Huber threshold (relative depth).
    Returns:
        scalar: mean over the masked points (0 if none).
    """
    residual = (depth_at_points - point_depth) / point_depth.clamp(min=MIN_DEPTH)
    residual = torch.where(mask, residual, torch.zeros_like(residual))
    return weighted_mean(huber(residual, delta), mask.to(residual.dtype))


# ---- smoothness (L_edge, L_surf) ---------------------------------------------------------

def image_edge_weights(image_bchw: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-aware weights ``exp(−α |∇I|)`` between horizontal and vertical pixel pairs.

    Args:
        image_bchw: image with values in [0, 1] (the gradient is averaged over channels).
        alpha: edge sensitivity (``α = 0``: uniform weights).
    Returns:
        (w_x (B, 1, H, W−1), w_y (B, 1, H−1, W)).
    """
    gx = (image_bchw[..., :, 1:] - image_bchw[..., :, :-1]).abs().mean(1, keepdim=True)
    gy = (image_bchw[..., 1:, :] - image_bchw[..., :-1, :]).abs().mean(1, keepdim=True)
    return torch.exp(-alpha * gx), torch.exp(-alpha * gy)


def depth_edge_weights(depth_b1hw: torch.Tensor, w_x: torch.Tensor, w_y: torch.Tensor,
                       tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the pair weights across depth edges of ``depth`` (relative jump ``|Δd| / min(d) >= tol``).

    Returns:
        (w_x (B, 1, H, W−1), w_y (B, 1, H−1, W)) masked copies.
    """
    d = depth_b1hw
    jump_x = (d[..., :, 1:] - d[..., :, :-1]).abs() / torch.minimum(d[..., :, 1:], d[..., :, :-1]).clamp(min=MIN_DEPTH)
    jump_y = (d[..., 1:, :] - d[..., :-1, :]).abs() / torch.minimum(d[..., 1:, :], d[..., :-1, :]).clamp(min=MIN_DEPTH)
    return w_x * (jump_x < tol).to(w_x.dtype), w_y * (jump_y < tol).to(w_y.dtype)


def edge_smoothness_weights(
    valid_b1hw: torch.Tensor, scale_b1hw: torch.Tensor, w_x: torch.Tensor, w_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair weights of :func:`edge_aware_smoothness` (fixed during refinement, so computed once).

    ``W = w_edge · [both pixels valid] / (s(p) · N)`` with ``s`` the depth
    scale (the input depth: the penalty is relative) and ``N`` the number of
    valid pairs, so that the loss is a mean over valid pairs.

    Args:
        valid_b1hw: bool validity.
        scale_b1hw: positive depth normaliser (``depth_init``).
        w_x, w_y: image edge weights from :func:`image_edge_weights`.
    Returns:
        (W_x (B, 1, H, W−1), W_y (B, 1, H−1, W)).
    """
    m = valid_b1hw.to(w_x.dtype)
    inv_s = 1.0 / scale_b1hw.to(w_x.dtype).clamp(min=MIN_DEPTH)
    mx = m[..., :, 1:] * m[..., :, :-1]
    my = m[..., 1:, :] * m[..., :-1, :]
    n = (mx.sum() + my.sum()).clamp(min=1.0)
    return w_x * mx * inv_s[..., :, :-1] / n, w_y * my * inv_s[..., :-1, :] / n


def edge_aware_smoothness(depth_b1hw: torch.Tensor, W_x: torch.Tensor, W_y: torch.Tensor) -> torch.Tensor:
    """L_edge: first-order depth differences, L1, weighted per pair.

    ``Σ W_x |d(u+1, v) − d(u, v)| + Σ W_y |d(u, v+1) − d(u, v)|`` with the
    weights of :func:`edge_smoothness_weights`: the mean over valid pairs of
    the *relative* depth gradient, down-weighted at image edges by
    ``exp(−α |∇I|)``. L1, so a real depth edge costs a bounded amount
    instead of being blurred.

    Args:
        depth_b1hw: predicted depth.
        W_x: (B, 1, H, W−1), W_y: (B, 1, H−1, W) pair weights.
    Returns:
        scalar.
    """
    dx = (depth_b1hw[..., :, 1:] - depth_b1hw[..., :, :-1]).abs()
    dy = (depth_b1hw[..., 1:, :] - depth_b1hw[..., :-1, :]).abs()
    return (dx * W_x).sum() + (dy * W_y).sum()


def surface_smoothness_weights(
    valid_b1hw: torch.Tensor, scale_b1hw: torch.Tensor, w_x: torch.Tensor | None = None, w_y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-triple weights of :func:`surface_smoothness` (computed once).

    ``W = [all three pixels valid] · min(edge weights of its two pairs) / (s(centre) · N)``
    with ``N`` the number of valid triples (the loss is a mean over them);
    without edge weights the triples are weighted uniformly.

    Returns:
        (W_x (B, 1, H, W−2), W_y (B, 1, H−2, W)).
    """
    m = valid_b1hw.to(scale_b1hw.dtype if scale_b1hw.is_floating_point() else torch.float32)
    inv_s = 1.0 / scale_b1hw.to(m.dtype).clamp(min=MIN_DEPTH)
    mx = m[..., :, 2:] * m[..., :, 1:-1] * m[..., :, :-2]
    my = m[..., 2:, :] * m[..., 1:-1, :] * m[..., :-2, :]
    n = (mx.sum() + my.sum()).clamp(min=1.0)
    wx, wy = mx * inv_s[..., :, 1:-1] / n, my * inv_s[..., 1:-1, :] / n
    if w_x is not None and w_y is not None:
        wx = wx * torch.minimum(w_x[..., :, 1:], w_x[..., :, :-1])
        wy = wy * torch.minimum(w_y[..., 1:, :], w_y[..., :-1, :])
    return wx, wy


def surface_smoothness(depth_b1hw: torch.Tensor, W_x: torch.Tensor, W_y: torch.Tensor) -> torch.Tensor:
    """L_surf: second-order depth differences (discrete Laplacian along x and y), L1, weighted per triple.

    ``Σ W_x |d(u−1) − 2 d(u) + d(u+1)| + Σ W_y |…|`` with the weights of
    :func:`surface_smoothness_weights`: the mean relative curvature. Zero on
    any surface whose depth is linear in the pixel coordinates (and nearly so
    for slanted planes under perspective), so slanted surfaces are not
    flattened — unlike first-order smoothing — while per-pixel noise and
    isolated outliers are.

    Returns:
        scalar.
    """
    lx = (depth_b1hw[..., :, 2:] - 2 * depth_b1hw[..., :, 1:-1] + depth_b1hw[..., :, :-2]).abs()
    ly = (depth_b1hw[..., 2:, :] - 2 * depth_b1hw[..., 1:-1, :] + depth_b1hw[..., :-2, :]).abs()
    return (lx * W_x).sum() + (ly * W_y).sum()


# ---- magnitude (L_mag) -------------------------------------------------------------------

def magnitude_loss(delta_z_b1hw: torch.Tensor, depth_init_b1hw: torch.Tensor, valid_b1hw: torch.Tensor) -> torch.Tensor:
    """L_mag = ``mean(|δz| / (depth_init + 1e-2))`` over valid pixels.

    Divided by the *input* depth, never by the prediction: dividing by
    ``depth_init + δz`` would let the optimiser shrink the penalty by pushing
    depth outward (docs/conventions.md).
    """
    m = valid_b1hw.to(delta_z_b1hw.dtype)
    return (delta_z_b1hw.abs() / (depth_init_b1hw + MAG_EPS) * m).sum() / m.sum().clamp(min=1.0)


# ---- the dense terms together -------------------------------------------------------------

class _DenseTerms(torch.autograd.Function):
    """L_edge, L_surf and L_mag of one prediction with a hand-written backward pass.

    The same values as :func:`edge_aware_smoothness`, :func:`surface_smoothness`
    and :func:`magnitude_loss` up to the order of the sums; the gradient is
    their subgradient (sign(0) = 0, as autograd's), accumulated into one buffer
    with in-place slice updates. Autograd's backward of the slices allocates
    and zero-fills a full-size tensor per slice (10 per step here), which was a
    quarter of the backward pass on a CPU. Each term ``Σ w |r|`` is computed as
    ``(sign(r) · w) · r``, so the forward pass already holds the per-residual
    slopes ``sign(r) · w`` that the backward pass scales and scatters in place
    (it runs once per forward: no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, depth, W_x, W_y, S_x, S_y, depth_init, mag_w):  # type: ignore[override]
        dx = depth[..., :, 1:] - depth[..., :, :-1]
        dy = depth[..., 1:, :] - depth[..., :-1, :]
        # d(u+1) - 2 d(u) + d(u-1): 2 d(u) is exact, so sub with alpha=2 rounds like the two-step form
        lx = torch.sub(depth[..., :, 2:], depth[..., :, 1:-1], alpha=2).add_(depth[..., :, :-2])
        ly = torch.sub(depth[..., 2:, :], depth[..., 1:-1, :], alpha=2).add_(depth[..., :-2, :])
        dz = depth - depth_init
        slopes = [r.sign().mul_(w) for r, w in ((dx, W_x), (dy, W_y), (lx, S_x), (ly, S_y), (dz, mag_w))]
        terms = [torch.dot(g.reshape(-1), r.reshape(-1)) for g, r in zip(slopes, (dx, dy, lx, ly, dz))]
        ctx.save_for_backward(*slopes)
        return terms[0] + terms[1], terms[2] + terms[3], terms[4]

    @staticmethod
    def backward(ctx, g_edge, g_surf, g_mag):  # type: ignore[override]
        gx, gy, sx, sy, grad = ctx.saved_tensors
        grad = grad.mul_(g_mag)
        gx = gx.mul_(g_edge)
        grad[..., :, 1:] += gx
        grad[..., :, :-1] -= gx
        gy = gy.mul_(g_edge)
        grad[..., 1:, :] += gy
        grad[..., :-1, :] -= gy
        sx = sx.mul_(g_surf)
        grad[..., :, 2:] += sx
        grad[..., :, 1:-1].sub_(sx, alpha=2)  # 2 sx is exact: as -= 2 * sx, without a temporary
        grad[..., :, :-2] += sx
        sy = sy.mul_(g_surf)
        grad[..., 2:, :] += sy
        grad[..., 1:-1, :].sub_(sy, alpha=2)
        grad[..., :-2, :] += sy
        return grad, None, None, None, None, None, None


def magnitude_weights(depth_init_b1hw: torch.Tensor, valid_b1hw: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights of L_mag (computed once): ``valid / (depth_init + 1e-2) / N_valid``."""
    m = valid_b1hw.to(depth_init_b1hw.dtype)
    return m / (depth_init_b1hw + MAG_EPS) / m.sum().clamp(min=1.0)


def dense_terms(depth_b1hw: torch.Tensor, edge_w: tuple[torch.Tensor, torch.Tensor],
                surf_w: tuple[torch.Tensor, torch.Tensor], depth_init_b1hw: torch.Tensor,
                mag_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_edge, L_surf, L_mag) of ``depth`` (:class:`_DenseTerms`; ``mag_w`` from :func:`magnitude_weights`)."""
    return _DenseTerms.apply(depth_b1hw, *edge_w, *surf_w, depth_init_b1hw, mag_w)


# ---- photometric (L_photo) ---------------------------------------------------------------

def window_offsets(radius: int, spacing: float = 1.0, checkerboard: bool = False) -> torch.Tensor:
    """Integer pixel offsets ``(dx, dy)`` of a ``(2r+1)^2`` window, row by row: (T, 2) float32, the centre at index
    T // 2. With ``spacing`` > 1 the taps are about ``spacing`` pixels apart (distances rounded half up, so the window
    stays symmetric): the same number of taps over a wider window, for maps larger than the resolution the window was
    chosen at. With ``checkerboard`` only the taps whose row and column offsets (in taps) have an even sum: ``T =
    (2r+1)^2 // 2 + 1`` over the same extent, still symmetric about the centre."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    r = (r.sign() * torch.floor(r.abs() * max(spacing, 1.0) + 0.5)).to(torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    offsets = torch.stack([dx.reshape(-1), dy.reshape(-1)], -1)
    if checkerboard:
        i = torch.arange(-radius, radius + 1)
        offsets = offsets[((i[:, None] + i[None, :]) % 2 == 0).reshape(-1)]
    return offsets


def bilateral_weights(ref_taps_bnt: torch.Tensor, offsets_t2: torch.Tensor, *, sigma_color: float,
                      sigma_space: float) -> torch.Tensor:
    """Adaptive support weights of a window: ``exp(−|I(q) − I(p)| / σ_c) · exp(−|q − p|² / 2σ_s²)`` (B, N, T).

    ``p`` is the window's centre tap (index T // 2). Taps whose grey level
    differs from the centre's are probably another surface (across a depth
    edge) and count little, so a window at an object's silhouette matches the
    surface of its centre pixel, not the one behind.

    Args:
        ref_taps_bnt: reference grey levels in [0, 1] at the window taps.
        offsets_t2: the window's pixel offsets (:func:`window_offsets`).
    """
    centre = ref_taps_bnt[..., offsets_t2.shape[0] // 2 : offsets_t2.shape[0] // 2 + 1]
    space = torch.exp(-(offsets_t2 * offsets_t2).sum(-1) / (2.0 * sigma_space * sigma_space)).to(ref_taps_bnt)
    return torch.exp(-(ref_taps_bnt - centre).abs() / sigma_color) * space


def weighted_zncc(a_bnt: torch.Tensor, b_bnt: torch.Tensor, w_bnt: torch.Tensor,
                  eps: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted zero-mean normalized cross-correlation of windows ``a`` and ``b`` over their last axis.

    ``ZNCC = cov_w(a, b) / sqrt(var_w(a) var_w(b) + eps⁴)``: 1 for ``b = g a + o``
    with a gain ``g > 0`` (exposure changes between photos), −1 for ``g < 0``.
    ``eps`` (a grey-level standard deviation, images in [0, 1]) makes flat
    windows score about 0 instead of an arbitrary value.

    Returns:
        (ZNCC (B, N), the reference window's weighted standard deviation (B, N): its texture).
    """
    wsum = w_bnt.sum(-1).clamp(min=1e-12)
    mean_a = (w_bnt * a_bnt).sum(-1) / wsum
    mean_b = (w_bnt * b_bnt).sum(-1) / wsum
    da, db = a_bnt - mean_a[..., None], b_bnt - mean_b[..., None]
    var_a = (w_bnt * da * da).sum(-1) / wsum
    var_b = (w_bnt * db * db).sum(-1) / wsum
    cov = (w_bnt * da * db).sum(-1) / wsum
    return cov * torch.rsqrt(var_a * var_b + eps**4), var_a.clamp(min=0.0).sqrt()


def best_k_mean(cost_bkn: torch.Tensor, usable_bkn: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the mean of the ``k`` lowest costs over the neighbour axis (axis 1), among the usable ones.

    The best neighbours are those that see the sample's surface; the others
    are occluded there or see it badly, so this is the occlusion handling of
    the photometric term. A sample with fewer usable neighbours averages
    those it has.

    Returns:
        (cost (B, N), usable (B, N): at least one usable neighbour).
    """
    big = torch.full_like(cost_bkn, 1e4)
    c = torch.where(usable_bkn, cost_bkn, big)
    kk = min(k, c.shape[1])
    lowest = torch.topk(c, kk, dim=1, largest=False).values
    n = usable_bkn.sum(1).clamp(max=kk)
    take = torch.arange(kk, device=c.device)[None, :, None] < n[:, None, :]
    total = torch.where(take, lowest, torch.zeros_like(lowest)).sum(1)
    return total / n.clamp(min=1).to(total.dtype), n > 0


def photometric_loss(
    ref_taps_bst: torch.Tensor,
    depth_taps_bst: torch.Tensor,
    uv_taps_bst2: torch.Tensor,
    tap_ok_bst: torch.Tensor,
    K_src_b33: torch.Tensor,
    K_dst_b33: torch.Tensor,
    dst_from_src_b44: torch.Tensor,
    read_image: Callable[[torch.Tensor], torch.Tensor],
    read_depth: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    offsets_t2: torch.Tensor,
    *,
    height: int,
    width: int,
    sigma_color: float,
    best_k: int,
    behind_tol: float,
    min_texture: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_photo: ``1 − ZNCC`` of windows warped through their own depth into the neighbours, best-k mean.

    Each window tap of each sample is back-projected at its own depth (so a
    window follows the surface, slanted or curved), projected into each of the
    ``k`` neighbours and read there; the reference and warped windows are
    compared with :func:`weighted_zncc` under :func:`bilateral_weights`
    (a window at a depth edge matches its centre's surface). A neighbour is
    left out of a sample where the sample's centre lies behind that
    neighbour's own surface by more than ``behind_tol`` (occluded there), where
    less than half of the window's weight falls inside its image, or where the
    window is flat (reference standard deviation below ``min_texture``);
    the sample's cost is the mean over its ``best_k`` best remaining neighbours.

    Args:
        ref_taps_bst: (B, S, T) reference grey levels in [0, 1] at the taps of S sampled windows.
        depth_taps_bst: (B, S, T) predicted depth at the taps (differentiable).
        uv_taps_bst2: (B, S, T, 2) the taps' pixel coordinates (pixel centres at +0.5).
        tap_ok_bst: (B, S, T) bool, taps on valid depth inside the image.
        K_src_b33, K_dst_b33, dst_from_src_b44: (B*k, ...) per (view, neighbour) pair, views' pairs adjacent.
        read_image: ``uv (B*k, N, 2) → grey (B*k, N)`` of each pair's neighbour image (differentiable in ``uv``).
        read_depth: ``uv (B*k, S, 2) → (depth, valid) (B*k, S)`` of each pair's neighbour's current depth map.
        offsets_t2: the window's pixel offsets (:func:`window_offsets`).
    Returns:
        (scalar loss: mean cost over the samples with a usable neighbour, 0 if none; share of such samples).
    """
    B, S, T = ref_taps_bst.shape
    k = K_src_b33.shape[0] // B
    w = bilateral_weights(ref_taps_bst, offsets_t2, sigma_color=sigma_color,
                          sigma_space=float(offsets_t2.abs().max().clamp(min=1.0))) * tap_ok_bst
    uv_dst, z_sel = reproject(uv_taps_bst2.reshape(B, S * T, 2).repeat_interleave(k, 0),
                              depth_taps_bst.reshape(B, S * T).clamp(min=MIN_DEPTH).repeat_interleave(k, 0), K_src_b33,
                              K_dst_b33, dst_from_src_b44)
    src = read_image(uv_dst).reshape(B * k, S, T)
    seen = (inside_image(uv_dst, height, width) & (z_sel > MIN_DEPTH)).reshape(B * k, S, T)
    wk = w.repeat_interleave(k, 0) * seen
    zncc, texture = weighted_zncc(ref_taps_bst.repeat_interleave(k, 0), src, wk)
    centre = T // 2
    depth_there, valid_there = read_depth(uv_dst.reshape(B * k, S, T, 2)[:, :, centre].detach())
    z_centre = z_sel.reshape(B * k, S, T)[:, :, centre].detach()
    behind = valid_there & (z_centre > depth_there * (1.0 + behind_tol))
    usable = (wk.sum(-1) > 0.5 * w.sum(-1).repeat_interleave(k, 0)) & ~behind & (texture > min_texture)
    cost, ok = best_k_mean((1.0 - zncc).reshape(B, k, S), usable.reshape(B, k, S), best_k)
    return weighted_mean(cost, ok.to(cost.dtype)), ok.to(cost.dtype).mean()

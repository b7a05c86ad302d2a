"""Scale anchoring: align a per-view depth (or inverse-depth) map to the sparse SfM points it sees.

The sparse points are the metric anchors of the normalized frame (docs/conventions.md
§1-2). A map ``x`` is aligned to the depths ``z`` of the sparse points that
project into it:

* scale only (``z ≈ s · x`` for depth, ``1/z ≈ s · x`` for inverse depth):
  the median of ``log(target / x)``, refined by IRLS with Huber weights on
  the log residuals (a robust, multiplicative fit);
* scale and shift (affine-invariant maps, e.g. monocular disparity):
  ``target ≈ a · x + b`` in the map's own domain (inverse depth for
  disparity), by IRLS with Huber weights and a MAD noise scale, started
  from a least-squares fit on the central part of the data.

Residuals are reported as the median relative depth error
``|z_map − z| / z`` at the sparse points, before (the raw values read as
depth, or as inverse depth) and after alignment.

All functions are NumPy and pure; nothing here touches files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEPTH = "depth"
INVERSE_DEPTH = "inverse_depth"


class AnchorError(ValueError):
    """A map that cannot be aligned to the sparse points (the message says why)."""


@dataclass(frozen=True)
class AnchorResult:
    """How a map was aligned: ``aligned = scale · x + shift`` in ``domain``."""

    scale: float
    shift: float
    domain: str
    """``depth`` or ``inverse_depth``: the domain of the raw map and of the fit."""
    n_points: int
    """Sparse points used (inside the image, on a valid pixel)."""
    residual_before: float
    """Median relative depth error at the sparse points of the raw map (read as depth / inverse depth)."""
    residual_after: float
    """The same after alignment."""

    def as_dict(self) -> dict:
        return asdict(self)


def project_points(points_n3: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project world points into a view: (uv (N, 2) pixels, z (N,), ok (N,) in front and inside)."""
    Xc = np.asarray(points_n3, np.float64) @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    z = Xc[:, 2]
    zc = np.maximum(z, 1e-12)
    uv = np.stack([K[0, 0] * Xc[:, 0] / zc + K[0, 1] * Xc[:, 1] / zc + K[0, 2], K[1, 1] * Xc[:, 1] / zc + K[1, 2]],
                  axis=1)
    ok = (z > 1e-9) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    return uv, z, ok


def read_at(values_hw: np.ndarray, valid_hw: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-pixel read of a map at pixel coordinates (COLMAP convention): (values (N,), ok (N,))."""
    h, w = values_hw.shape
    col = np.clip(np.floor(uv[:, 0]).astype(np.int64), 0, w - 1)
    row = np.clip(np.floor(uv[:, 1]).astype(np.int64), 0, h - 1)
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    vals = values_hw[row, col]
    ok = inside & valid_hw[row, col] & np.isfinite(vals) & (vals > 0)
    return vals, ok


def _huber_weights(r: np.ndarray, c: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= c, 1.0, c / np.maximum(a, 1e-12))


def _mad(r: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def fit_scale(x: np.ndarray, target: np.ndarray, *, iters: int = 10, min_sigma: float = 1e-3) -> float:
    """Robust ``s`` with ``target ≈ s · x`` (both > 0): log-median, then Huber IRLS on log residuals."""
    x = np.asarray(x, np.float64)
    target = np.asarray(target, np.float64)
    r = np.log(target) - np.log(x)
    log_s = float(np.median(r))
    for _ in range(iters):
        res = r - log_s
        c = 1.345 * max(_mad(res), min_sigma)
        w = _huber_weights(res, c)
        log_s = float(np.sum(w * r) / np.sum(w))
    return float(np.exp(log_s))


def fit_scale_shift(x: np.ndarray, target: np.ndarray, *, iters: int = 20,
                    min_sigma: float = 1e-6) -> tuple[float, float]:
    """Robust ``(a, b)`` with ``target ≈ a · x + b``: start from robust spreads and medians, then Huber IRLS."""
    x = np.asarray(x, np.float64)
    target = np.asarray(target, np.float64)
    # Start from a fit that outliers in either variable cannot dominate:
    # a = ratio of robust spreads (sign from rank correlation), b from medians.
    sx, st = _mad(x), _mad(target)
    sign = 1.0 if _rank_correlation(x, target) >= 0 else -1.0
    a = sign * st / sx if sx > 0 else 0.0
    b = float(np.median(target - a * x))
    A = np.stack([x, np.ones_like(x)], 1)
    for _ in range(iters):
        res = target - (a * x + b)
        c = 1.345 * max(_mad(res), min_sigma * max(abs(float(np.median(target))), 1.0))
        w = _huber_weights(res, c)
        Aw = A * w[:, None]
        sol, *_ = np.linalg.lstsq(Aw.T @ A, Aw.T @ target, rcond=None)
        a, b = float(sol[0]), float(sol[1])
    return a, b


def _rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (0 when undefined)."""
    if len(x) < 3:
        return 0.0
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    rx -= rx.mean()
    ry -= ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else 0.0


def to_depth(values: np.ndarray, domain: str) -> np.ndarray:
    """Raw map values read as depth (inverse of inverse depth where > 0; 0 elsewhere)."""
    values = np.asarray(values, np.float64)
    if domain == DEPTH:
        return values
    out = np.zeros_like(values)
    np.divide(1.0, values, out=out, where=values > 0)
    return out


def _median_rel_error(depth: np.ndarray, z: np.ndarray) -> float:
    ok = depth > 0
    err = np.where(ok, np.abs(depth - z) / z, 1.0)  # a non-positive depth counts as a 100 % error
    return float(np.median(err)) if len(err) else float("nan")


def anchor(values_hw: np.ndarray, valid_hw: np.ndarray, uv: np.ndarray, z: np.ndarray, *, domain: str, affine: bool,
           min_points: int) -> AnchorResult:
    """Fit the alignment of a map to sparse points seen by its view.

    Args:
        values_hw: (H, W) raw map (depth or inverse depth, any positive units).
        valid_hw: (H, W) bool, pixels to use.
        uv: (N, 2) pixel coordinates of the sparse points in this map (COLMAP convention).
        z: (N,) their camera-frame depths (> 0, normalized frame).
        domain: ``depth`` or ``inverse_depth``.
        affine: also fit a shift (in ``domain``).
        min_points: fewer usable points than this → :class:`AnchorError`.
    Raises:
        AnchorError: too few points, a non-positive scale (the map anti-correlates
            with the sparse depths), or a non-finite fit.
    """
    if domain not in (DEPTH, INVERSE_DEPTH):
        raise ValueError(f"domain must be {DEPTH!r} or {INVERSE_DEPTH!r}, got {domain!r}")
    vals, ok = read_at(values_hw, valid_hw, uv)
    ok &= np.isfinite(z) & (z > 0)
    n = int(ok.sum())
    if n < max(min_points, 3 if affine else 1):
        raise AnchorError(f"only {n} sparse point(s) land on valid pixels (need {min_points})")
    x, zs = vals[ok].astype(np.float64), z[ok].astype(np.float64)
    target = zs if domain == DEPTH else 1.0 / zs
    before = _median_rel_error(to_depth(x, domain), zs)
    if _rank_correlation(x, target) < -0.2:
        other = INVERSE_DEPTH if domain == DEPTH else DEPTH
        raise AnchorError("the map decreases where the sparse depths increase (wrong sign: "
                          f"is it {other.replace('_', ' ')}?)")
    if affine:
        scale, shift = fit_scale_shift(x, target)
    else:
        scale, shift = fit_scale(x, target), 0.0
    if not (np.isfinite(scale) and np.isfinite(shift)):
        raise AnchorError("the fit is not finite")
    if scale <= 0:
        raise AnchorError(f"the fitted scale is {scale:.3g} (wrong sign)")
    after = _median_rel_error(to_depth(scale * x + shift, domain), zs)
    return AnchorResult(scale=float(scale), shift=float(shift), domain=domain, n_points=n,
                        residual_before=before, residual_after=after)


def apply_anchor(values_hw: np.ndarray, valid_hw: np.ndarray, result: AnchorResult) -> tuple[np.ndarray, np.ndarray]:
    """Aligned depth (H, W) float32 (0 where invalid) and the valid mask (pixels whose aligned depth is > 0)."""
    aligned = result.scale * np.asarray(values_hw, np.float64) + result.shift
    depth = to_depth(aligned, result.domain)
    valid = np.asarray(valid_hw, bool) & np.isfinite(depth) & (depth > 0)
    return np.where(valid, depth, 0.0).astype(np.float32), valid

"""Monocular-like depth priors made from ground-truth depth, for the tests and benchmarks of the refine stage.

A monocular network's output is what the research notes fought: *relative*
(inverse depth up to an unknown scale and shift per photo), *over-smoothed*
at depth edges, and *warped* by a low-frequency error that differs from
photo to photo. :func:`monocular_prior` makes such a map from a rendered
view's true depth, with strengths from :data:`STRENGTHS`; written as
``depth_prior/<image stem>.npy`` they are read by ``depth.estimator=prior``
with ``depth.prior_kind=inverse_depth`` and ``depth.prior_affine=true``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class PriorStrength:
    """How far a prior is from the truth."""

    blur: float
    """Gaussian blur of the inverse depth, as a fraction of the image's longer side (edges smoothed over that width)."""
    warp: float
    """Amplitude of the smooth multiplicative warp of the inverse depth (0.1 = ±10 %)."""
    gamma: float
    """The inverse depth is raised to a power drawn in [1 − gamma, 1 + gamma] per view (a compressed or stretched depth
    range)."""
    noise: float = 0.002
    """Relative per-pixel noise."""


STRENGTHS: dict[str, PriorStrength] = {
    "mild": PriorStrength(blur=0.004, warp=0.03, gamma=0.05),
    "medium": PriorStrength(blur=0.008, warp=0.08, gamma=0.1),
    "strong": PriorStrength(blur=0.015, warp=0.15, gamma=0.2),
}


def smooth_field(height: int, width: int, rng: np.random.Generator, waves: int = 3) -> np.ndarray:
    """A random low-frequency field in [-1, 1] (H, W): a sum of ``waves`` plane waves of about one period across the
    image."""
    v, u = np.mgrid[0:height, 0:width] / max(height, width)
    field = np.zeros((height, width))
    for _ in range(waves):
        theta, freq, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.2), rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * freq * (np.cos(theta) * u + np.sin(theta) * v) + phase)
    return field / max(1e-9, np.abs(field).max())


def monocular_prior(depth_gt: np.ndarray, rng: np.random.Generator, strength: PriorStrength) -> np.ndarray:
    """A relative inverse-depth map (H, W) float32 like a monocular network's; 0 where ``depth_gt`` is 0.

    Inverse depth, raised to a random power, times ``1 + warp · field`` (a
    smooth random field), blurred, plus noise, then an unknown scale in
    [0.2, 5] and a shift of up to half its mean.
    """
    valid = depth_gt > 0
    disp = np.where(valid, 1.0 / np.where(valid, depth_gt, 1.0), 0.0)
    mean = disp[valid].mean() if valid.any() else 1.0
    disp = np.where(valid, (disp / mean) ** (1.0 + strength.gamma * rng.uniform(-1, 1)), 0.0)
    disp = disp * (1.0 + strength.warp * smooth_field(*depth_gt.shape, rng))
    sigma = strength.blur * max(depth_gt.shape)
    if sigma > 0:
        weight = gaussian_filter(valid.astype(np.float64), sigma)
        disp = np.where(valid, gaussian_filter(disp, sigma) / np.maximum(weight, 1e-6), 0.0)
    disp = disp * (1.0 + strength.noise * rng.standard_normal(depth_gt.shape))
    scale = np.exp(rng.uniform(np.log(0.2), np.log(5.0)))
    shift = rng.uniform(0.0, 0.5) * scale * disp[valid].mean() if valid.any() else 0.0
    return np.where(valid, scale * disp + shift, 0.0).astype(np.float32)

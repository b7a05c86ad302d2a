"""Synthetic initial depth maps and their errors against ground truth, for the refine stage's tests and benchmarks.

:func:`ground_truth_depths` reads a rendered scene's true depth in the
normalized frame, :func:`corrupt_depth` makes an initial map from it (a
smooth warp, or plane-sweep-like noise, outliers and holes) and
:func:`depth_error` measures a map against it (relative error).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.io import View


def ground_truth_depths(scene_dir, views: Sequence[View], normalized_from_sfm: np.ndarray) -> list[np.ndarray]:
    """GT z-depth (H, W) float32 of each view of a rendered scene, in the scene's normalized frame (0 = no hit)."""
    from pipeline.synthetic.groundtruth import load_gt_depth

    scale = float(np.cbrt(np.linalg.det(np.asarray(normalized_from_sfm)[:3, :3])))
    return [(load_gt_depth(Path(scene_dir) / "gt", v.name) * scale).astype(np.float32) for v in views]


def corrupt_depth(depth_gt: np.ndarray, kind: str, rng: np.random.Generator, *, warp: float = 0.02,
                  noise: float = 0.005, outliers: float = 0.03,
                  holes: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        field = 1.0 + warp * np.sin(2 * np.pi * freq * (np.cos(theta) * u + np.sin(theta) * v)
                                    + rng.uniform(0, 2 * np.pi))
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
    return {"mean": float(e.mean()), "median": float(np.median(e)), "within_1pct": float((e < 0.01).mean()),
            "pixels": int(m.sum())}

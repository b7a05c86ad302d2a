"""Settings of the depth stage: ``DepthConfig`` (section ``depth``: estimator, priors, TorchScript) and ``MvsConfig``
(section ``mvs``: the plane sweep); light to import: checked when the config loads."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.settings import (
    Check,
    at_least,
    between,
    device_choice,
    each,
    greater_than,
    odd_at_least,
    or_automatic,
    setting,
)


class DepthEstimator(str, enum.Enum):
    mvs = "mvs"
    prior = "prior"
    torchscript = "torchscript"


class PriorKind(str, enum.Enum):
    depth = "depth"
    inverse_depth = "inverse_depth"


@dataclass(kw_only=True)
class DepthConfig:
    estimator: DepthEstimator = setting(
        DepthEstimator.mvs,
        "Initial depth estimator: mvs (plane-sweep stereo, no weights), prior (SCENE_DIR/depth_prior files) or "
        "torchscript (a model file).",
    )
    max_image_side: int | None = setting(
        None,
        "Longer side of the depth maps in pixels, photos are downscaled to it (null: automatic, the photos' size up "
        "to 640 on a CPU, 1024 on a CUDA device; 0: full resolution).",
        check=Check("0 (full resolution) or >= 16, or null for automatic", lambda v: v is None or v == 0 or v >= 16),
    )
    reference_side: int = setting(
        480,
        "Map side in pixels at which the pixel-sized settings hold (mvs: ncc_window, propagation_shifts, "
        "smooth_radius, geo_max_reproj_px, pyramid_levels; refine: photo_radius, photo_blur, accept_reproj_px); "
        "larger maps scale them by side / reference_side (0 = never).",
        check=Check("0 (never scale) or >= 16", lambda v: v == 0 or v >= 16),
    )
    # -- prior / torchscript
    prior_kind: PriorKind = setting(
        PriorKind.depth,
        "What prior and TorchScript maps hold: depth or inverse_depth (disparity).",
    )
    prior_affine: bool = setting(
        False,
        "Prior and TorchScript maps are affine-invariant (unknown scale and shift, fitted in their own domain) "
        "instead of scale-only.",
    )
    torchscript_path: str = setting("", "Path of the TorchScript model file (estimator torchscript).")
    min_anchor_points: int = setting(
        20,
        "Sparse points a view must see on valid pixels to be anchored; with fewer, the view is left out (prior, "
        "torchscript) or kept unscaled (mvs).",
        check=at_least(3),
    )
    # -- how it runs
    cache_images: int = setting(
        16,
        "Images and depth maps kept in memory at once (least recently used are dropped first).",
        affects_output=False, check=at_least(1),
    )
    device: str = setting(
        "auto",
        "Torch device: auto (cuda when present), cpu or cuda.",
        affects_output=False, check=device_choice("torch"),
    )
    cpu_workers: int | None = setting(
        None,
        "Views worked on at once in parallel threads on the CPU, each with single-threaded torch ops (null: one per "
        "CPU core; the maps are the same for any count).",
        affects_output=False, check=or_automatic(at_least(1)),
    )

    def resolved_for_fingerprint(self, fields: dict) -> dict:
        """``max_image_side`` as the depth stage resolves it here (an automatic side depends on the device)."""
        from pipeline.core.geometry import default_device
        from pipeline.depth.views import resolve_max_image_side

        side = resolve_max_image_side(self.max_image_side, str(default_device(self.device)))
        return {**fields, "max_image_side": side}

    def cross_problems(self) -> list[str]:
        """Rules between settings, checked when the config is loaded."""
        if self.estimator == DepthEstimator.torchscript and not Path(self.torchscript_path).expanduser().is_file():
            shown = self.torchscript_path or "(empty)"
            return ["depth.estimator=torchscript needs depth.torchscript_path set to a TorchScript model file (got "
                    f"{shown}, not a file)"]
        return []


@dataclass(kw_only=True)
class MvsConfig:
    """Settings of the plane-sweep estimator (``depth.estimator=mvs``): section ``mvs``, in the depth stage's
    fingerprint."""

    num_neighbors: int = setting(
        5,
        "Neighbour views each reference view is matched against, ranked by shared sparse points weighted by "
        "triangulation angle.",
        check=at_least(1),
    )
    neighbor_angle_deg: float = setting(
        10.0,
        "Median triangulation angle with the reference, in degrees, below which a neighbour's co-visibility score is "
        "scaled down proportionally.",
        check=between(0, 180, open_low=True),
    )
    max_neighbor_angle_deg: float = setting(
        60.0,
        "Median triangulation angle with the reference, in degrees, above which a neighbour is not used.",
        check=between(0, 180, open_low=True),
    )
    num_hypotheses: int = setting(
        96,
        "Depth hypotheses of the full sweep on the coarsest pyramid level, uniform in inverse depth.",
        check=at_least(3),
    )
    pyramid_levels: int = setting(
        2,
        "Coarse-to-fine levels, each halving the resolution (1 = a single full-resolution sweep).",
        check=at_least(1),
    )
    fine_hypotheses: int = setting(
        8,
        "Hypotheses per pixel on each finer level: the upsampled estimate shifted to span ± fine_radius coarser "
        "steps.",
        check=at_least(2),
    )
    fine_radius: float = setting(
        2.0,
        "Half-width of the finer levels' search interval, in hypothesis steps of the coarser level.",
        check=greater_than(0),
    )
    edge_radius: int = setting(
        1,
        "Radius r, in coarser pixels, of the (2r+1)^2 window whose min and max depth the finer levels also try, so "
        "depth edges can move (0 = off).",
        check=at_least(0),
    )
    propagation_shifts: tuple[int, ...] = setting(
        (3, 8),
        "Distances in pixels by which, at full resolution, each pixel also tries the smoothed estimate shifted left, "
        "right, up and down (moves depth edges, fills weak texture).",
        check=each(at_least(1)),
    )
    polish_hypotheses: int = setting(
        5,
        "Hypotheses of the final full-resolution sweeps, at half the last step, for sub-hypothesis "
        "accuracy (0 = off).",
        check=at_least(0),
    )
    polish_iterations: int = setting(
        1,
        "Polish sweeps, each re-centred on the smoothed estimate with the step halved again.",
        check=at_least(0),
    )
    smooth_radius: int = setting(
        2,
        "Radius r, in pixels, of the (2r+1)^2 median filter of the estimate the finer sweeps are centred on, which "
        "keeps the NCC windows on coherent surfaces (0 = unfiltered).",
        check=at_least(0),
    )
    offset_penalty: float = setting(
        0.05,
        "Matching cost added at the ends of a finer sweep (quadratic in the offset), keeping weakly textured pixels "
        "near the smoothed estimate.",
        check=at_least(0),
    )
    ncc_window: int = setting(5, "Side of the square NCC window in pixels (odd).", check=odd_at_least(3))
    best_k: int = setting(
        1,
        "Neighbours whose matching costs are averaged per pixel, the best ones (occlusion-robust).",
        check=at_least(1),
    )
    cost_truncation: float = setting(
        2.0,
        "Clamp on each neighbour's matching cost (1 - NCC, in [0, 2]) before the best_k mean, so occluded neighbours "
        "shift rather than bend the cost curve (2 = off).",
        check=greater_than(0),
    )
    min_ncc: float = setting(0.3, "Aggregated NCC (in [-1, 1]) below which a pixel is invalid.", check=between(-1, 1))
    range_percentile: float = setting(
        2.0,
        "Percentile p, in %, of the depths of a view's sparse points: its sweep spans their [p, 100-p] percentiles, "
        "widened by range_margin.",
        check=between(0, 50, open_high=True),
    )
    range_margin: float = setting(
        0.25,
        "Relative widening m of the depth range: near / (1 + m), far · (1 + m).",
        check=at_least(0),
    )
    plane_candidates: int = setting(
        1,
        "Dominant planes fitted to the sparse points (RANSAC: floors, table tops, walls) whose depth every pixel also "
        "tries, kept where it matches better (0 = off).",
        check=at_least(0),
    )
    plane_max_gap: float = setting(
        0.25,
        "Relative (inverse-depth) distance from a pixel's estimate within which a plane's depth is tried, so object "
        "pixels do not take the floor behind them.",
        check=greater_than(0),
    )
    plane_distance: float = setting(
        0.005,
        "RANSAC inlier distance of the plane fit, as a fraction of the diagonal of the sparse points' 2-98 percentile "
        "box.",
        check=greater_than(0),
    )
    plane_min_inliers: float = setting(
        0.1,
        "Fraction of the sparse points a fitted plane must hold to be used.",
        check=between(0, 1),
    )
    cross_view_candidates: bool = setting(
        True,
        "After the first pass, every pixel also tries the surfaces its geo_neighbors found (their maps reprojected "
        "into the view) and keeps whichever matches best, recovering thin and briefly seen surfaces.",
    )
    geometric_filter: bool = setting(
        True,
        "Second pass that keeps only pixels whose depth agrees with at least geo_min_consistent neighbour maps.",
    )
    geo_neighbors: int = setting(
        6,
        "Views checked by the geometric filter, most co-visible first, with the angle rules of the matching "
        "neighbours.",
        check=at_least(1),
    )
    geo_min_consistent: int = setting(
        1,
        "Neighbour maps that must agree with a pixel for the geometric filter to keep it.",
        check=at_least(0),
    )
    geo_max_reproj_px: float = setting(
        2.0,
        "Forward-backward reprojection error in pixels below which a neighbour agrees with a pixel.",
        check=greater_than(0),
    )
    geo_max_rel_depth: float = setting(
        0.02,
        "Relative depth difference below which a neighbour agrees with a pixel.",
        check=greater_than(0),
    )
    geo_free_space_margin: float = setting(
        0.05,
        "Relative distance behind a pixel's point beyond which a surface a neighbour sees contradicts the pixel.",
        check=at_least(0),
    )
    geo_unverified_min_confidence: float = setting(
        0.5,
        "Confidence (in [0, 1]) from which a pixel no neighbour agrees with is kept anyway when none contradicts it, "
        "for occluded regions (above 1 = never).",
        check=at_least(0),
    )
    geo_average: bool = setting(
        True,
        "Replace a kept pixel's depth by the mean of its own and the agreeing neighbours' depths.",
    )
    rescale_tolerance: float = setting(
        0.05,
        "Deviation from 1 of a map's sparse-point scale beyond which the scale is applied, with a warning.",
        check=at_least(0),
    )
    # -- how it runs
    chunk_pixels: int = setting(
        1 << 20,
        "Pixels x hypotheses x neighbours scored at once, about 60 bytes each (bounds memory, not the result).",
        affects_output=False, check=at_least(1),
    )

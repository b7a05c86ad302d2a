"""Settings of the depth stage: ``DepthConfig`` (section ``depth``: estimator, priors, TorchScript) and ``MvsConfig``
(section ``mvs``: the plane sweep); light to import: checked when the config loads."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.settings import at_least, between, device_choice, each, greater_than, odd_at_least, setting, zero_or_at_least


class DepthEstimator(str, enum.Enum):
    mvs = "mvs"
    prior = "prior"
    torchscript = "torchscript"


class PriorKind(str, enum.Enum):
    depth = "depth"
    inverse_depth = "inverse_depth"


@dataclass(kw_only=True)
class DepthConfig:
    estimator: DepthEstimator = setting(DepthEstimator.mvs, "Initial depth estimator: mvs (plane-sweep stereo, no weights), prior (SCENE_DIR/depth_prior files) or torchscript (a model file).")
    max_image_side: int = setting(640, "Working resolution: images are downscaled so that their longer side is at most this many pixels (depth maps have this size).", check=zero_or_at_least(16, "full resolution"))
    # -- prior / torchscript
    prior_kind: PriorKind = setting(PriorKind.depth, "prior / torchscript: the maps hold depth or inverse_depth (disparity).")
    prior_affine: bool = setting(False, "prior / torchscript: maps are affine-invariant (unknown scale and shift, fitted in their own domain) instead of scale-only.")
    torchscript_path: str = setting("", "torchscript: path of the TorchScript model file.")
    min_anchor_points: int = setting(20, "Sparse points a view must see on valid pixels to be anchored; fewer → the view is left out (prior/torchscript) or kept unscaled (mvs).", check=at_least(3))
    # -- how it runs
    cache_images: int = setting(16, "Images / depth maps kept in memory at once (LRU).", affects_output=False, check=at_least(1))
    device: str = setting("auto", "Torch device: auto (cuda when present), cpu or cuda.", affects_output=False, check=device_choice("torch"))

    def cross_problems(self) -> list[str]:
        """Rules between settings, checked when the config is loaded."""
        if self.estimator == DepthEstimator.torchscript and not Path(self.torchscript_path).expanduser().is_file():
            shown = self.torchscript_path or "(empty)"
            return [f"depth.estimator=torchscript needs depth.torchscript_path set to a TorchScript model file (got {shown}, not a file)"]
        return []


@dataclass(kw_only=True)
class MvsConfig:
    """Settings of the plane-sweep estimator (``depth.estimator=mvs``): section ``mvs``, part of the depth stage's fingerprint."""

    num_neighbors: int = setting(5, "neighbour views per reference view (ranked by shared sparse points weighted by triangulation angle).", check=at_least(1))
    neighbor_angle_deg: float = setting(10.0, "a neighbour whose median triangulation angle (deg) with the reference is below this has its co-visibility score scaled down proportionally.", check=between(0, 180, open_low=True))
    max_neighbor_angle_deg: float = setting(60.0, "neighbours with a median triangulation angle above this (deg) are not used.", check=between(0, 180, open_low=True))
    num_hypotheses: int = setting(96, "depth hypotheses of the full sweep on the coarsest pyramid level (uniform in inverse depth).", check=at_least(3))
    pyramid_levels: int = setting(2, "coarse-to-fine levels (each halves the resolution; 1 = a single full-resolution sweep).", check=at_least(1))
    fine_hypotheses: int = setting(8, "hypotheses per pixel on each finer level: the upsampled estimate shifted to span ± fine_radius coarser steps.", check=at_least(2))
    fine_radius: float = setting(2.0, "half-width of the finer levels' search interval, in hypothesis steps of the coarser level.", check=greater_than(0))
    edge_radius: int = setting(1, "finer levels also try the coarser estimate's local min and max depth over (2r+1)^2 coarser pixels, so depth edges can move (0 = off).", check=at_least(0))
    propagation_shifts: tuple[int, ...] = setting((3, 8), "at full resolution each pixel also tries the smoothed estimate shifted by these pixel distances left/right/up/down (moves depth edges, fills weak texture).", check=each(at_least(1)))
    polish_hypotheses: int = setting(5, "final full-resolution sweep of this many hypotheses at half the last step, for sub-hypothesis accuracy (0 = off).", check=at_least(0))
    polish_iterations: int = setting(1, "number of polish sweeps (each re-centres on the smoothed estimate and halves the step).", check=at_least(0))
    smooth_radius: int = setting(2, "the finer sweeps are centred on the previous estimate median-filtered over (2r+1)^2 pixels (coherent surfaces for the NCC windows; 0 = unfiltered).", check=at_least(0))
    offset_penalty: float = setting(0.05, "cost added at the ends of a finer sweep (quadratic in the offset), keeping weakly textured pixels near the smoothed estimate.", check=at_least(0))
    ncc_window: int = setting(5, "side of the square NCC window in pixels (odd).", check=odd_at_least(3))
    best_k: int = setting(1, "per pixel, the matching cost is the mean over the best_k best neighbours (occlusion-robust).", check=at_least(1))
    cost_truncation: float = setting(2.0, "per-neighbour matching costs (1 - NCC, in [0, 2]) are clamped at this before the best_k mean, so occluded neighbours shift rather than bend the cost curve (2 = off).", check=greater_than(0))
    min_ncc: float = setting(0.3, "pixels whose aggregated NCC is below this are invalid.", check=between(-1, 1))
    range_percentile: float = setting(2.0, "depth range of a view = [p, 100-p] percentiles of the depths of its sparse points, widened by range_margin.", check=between(0, 50, open_high=True))
    range_margin: float = setting(0.25, "relative widening of the depth range (near / (1 + m), far · (1 + m)).", check=at_least(0))
    plane_candidates: int = setting(1, "dominant planes fitted to the sparse points (RANSAC; floors, table tops, walls) whose depth every pixel also tries, keeping it where it matches better (0 = off).", check=at_least(0))
    plane_max_gap: float = setting(0.25, "a plane's depth is tried only where it is within this relative (inverse-depth) distance of the pixel's estimate: an object pixel that took the floor behind it would be depth that is too far, which carves the true surface out of the TSDF (knot F@1 %: no limit 0.942, 0.25 0.946).", check=greater_than(0))
    plane_distance: float = setting(0.005, "RANSAC inlier distance of the plane fit, as a fraction of the diagonal of the sparse points' 2-98 percentile box.", check=greater_than(0))
    plane_min_inliers: float = setting(0.1, "a fitted plane is used only when at least this fraction of the sparse points lie on it.", check=between(0, 1))
    cross_view_candidates: bool = setting(True, "after the first pass every view also tries, per pixel, the surfaces its geo_neighbors found (their maps reprojected into it) and keeps whichever matches best (recovers thin and briefly seen surfaces).")
    geometric_filter: bool = setting(True, "second pass that keeps only pixels whose depth agrees with at least geo_min_consistent neighbour maps.")
    geo_neighbors: int = setting(6, "views checked by the geometric filter (most co-visible first, same angle rules as the matching neighbours).", check=at_least(1))
    geo_min_consistent: int = setting(1, "neighbour maps that must agree with a pixel (geometric filter).", check=at_least(0))
    geo_max_reproj_px: float = setting(2.0, "forward-backward reprojection error (pixels) below which a neighbour agrees.", check=greater_than(0))
    geo_max_rel_depth: float = setting(0.02, "relative depth difference below which a neighbour agrees.", check=greater_than(0))
    geo_free_space_margin: float = setting(0.05, "a neighbour contradicts a pixel when it sees a surface more than this (relative) behind the pixel's point.", check=at_least(0))
    geo_unverified_min_confidence: float = setting(0.5, "a pixel no neighbour agrees with is still kept when no neighbour contradicts it and its confidence is at least this (occluded regions; above 1 = never).", check=at_least(0))
    geo_average: bool = setting(True, "replace a kept pixel's depth by the mean of its own and the agreeing neighbours' depths.")
    rescale_tolerance: float = setting(0.05, "the sparse-point scale of a map is applied only if it differs from 1 by more than this (then a warning is logged).", check=at_least(0))
    # -- how it runs
    chunk_pixels: int = setting(1 << 20, "pixels x hypotheses x neighbours scored at once (bounds memory: about 60 bytes each).", affects_output=False, check=at_least(1))

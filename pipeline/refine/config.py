"""Settings of the refine stage (losses, optimizer, acceptance gate); light to import: checked when the config loads."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.settings import (
    at_least,
    between,
    device_choice,
    greater_than,
    increasing_positive,
    or_automatic,
    setting,
)


@dataclass(kw_only=True)
class RefineConfig:
    lr: float = setting(
        2e-3, "Adam learning rate of the δz pyramid: one step changes the depth by about lr relatively.",
        check=greater_than(0))
    steps: int = setting(
        400, "Optimizer steps; each refines one group of views_per_batch views, so a view is updated steps / "
        "ceil(views / views_per_batch) times.", check=at_least(0))
    samples_per_view: int = setting(1024, "Pixels sampled per view per step for the multiview loss.", check=at_least(1))
    views_per_batch: int = setting(
        8, "Views refined per step (bounds the memory of a step: about views_per_batch full-resolution maps and their "
        "gradients).", check=at_least(1))
    max_resident_views: int = setting(
        24, "Views whose optimizer tensors stay in memory (about 7.5 MiB per view at 480x360); the other groups take "
        "turns in one resident slot from scratch files under refine/, with the same result.",
        affects_output=False, check=at_least(1))
    steps_per_visit: int = setting(
        1, "Consecutive steps a group of views is refined before the next group's turn (1: round robin, one step each; "
        "more: fewer reads and writes of offloaded groups).", check=at_least(1))
    parallel_groups: int = setting(
        2, "Groups refined per round, each reading the other views' depth as the round found it, so a multi-core CPU "
        "runs them side by side (1: each step reads the step before; used with steps_per_visit 1 and no offloading).",
        check=at_least(1))
    num_neighbors: int = setting(4, "Neighbour views per view for L_mv (most shared sparse points).", check=at_least(0))
    pyramid_strides: tuple[int, ...] = setting(
        (1, 2, 4, 8, 16, 32), "Strides in pixels of the summed δz grids (1 = per-pixel; larger = smoother, "
        "low-frequency corrections).", check=increasing_positive())
    weight_mv: float = setting(2.0, "Weight of the multiview reprojection loss L_mv.", check=at_least(0))
    weight_edge: float = setting(0.02, "Weight of the edge-aware smoothness L_edge.", check=at_least(0))
    weight_surf: float = setting(0.01, "Weight of the surface smoothness L_surf.", check=at_least(0))
    weight_mag: float = setting(
        0.005, "Weight of the magnitude penalty L_mag = mean(|δz| / (depth_init + 1e-2)).", check=at_least(0))
    weight_anchor: float = setting(1.0, "Weight of the sparse-point anchoring loss L_anchor.", check=at_least(0))
    weight_photo: float = setting(
        1.0, "Weight of the photometric loss L_photo: 1 − ZNCC of each sampled pixel's window, warped through the "
        "predicted depth into the best neighbour images (0 = off).", check=at_least(0))
    photo_samples_per_view: int = setting(
        384, "Pixels sampled per view per step for L_photo (each with its whole window).", check=at_least(1))
    photo_radius: int = setting(
        2, "L_photo window radius in pixels ((2r+1)^2 taps, about half with photo_checkerboard, each warped through "
        "its own predicted depth; spread out proportionally on maps larger than depth.reference_side).",
        check=at_least(1))
    photo_checkerboard: bool = setting(
        True, "L_photo reads only the window's taps on a checkerboard ((2r+1)^2 // 2 + 1 taps over the same extent: a "
        "quarter less refine time for the same meshes).")
    photo_sigma_color: float = setting(
        0.1, "L_photo adaptive support: a tap's weight falls as exp(-|grey difference to the centre| / this) (grey "
        "levels in [0, 1]).", check=greater_than(0))
    photo_best_k: int = setting(
        2, "L_photo compares each pixel with this many best-matching neighbour images (the others may not see it).",
        check=at_least(1))
    photo_occlusion_tol: float = setting(
        0.05, "L_photo leaves a neighbour out of a pixel that lies more than this (relative depth) behind the "
        "neighbour's current surface: occluded there.", check=greater_than(0))
    photo_blur: float = setting(
        1.5, "L_photo uses images blurred by a Gaussian of this sigma (pixels, proportionally more on maps larger than "
        "depth.reference_side) for the first half of the steps (a wider basin), sharp ones after (0 = sharp "
        "throughout).", check=at_least(0))
    photo_min_stride: int = setting(
        2, "L_photo moves only the δz pyramid levels of at least this stride in pixels (1 = all; per-pixel levels turn "
        "its sparse gradients into noise).", check=at_least(1))
    photo_min_texture: float = setting(
        0.01, "L_photo ignores pixels whose window's grey-level standard deviation is below this (grey levels in [0, "
        "1]; no evidence there).", check=at_least(0))
    huber_delta: float = setting(
        1e-2, "Huber threshold δ of the reprojection and anchor residuals (relative depth: 1e-2 = 1 % of the depth).",
        check=greater_than(0))
    occlusion_tol: float = setting(
        0.25, "Z-buffer test: a sample counts only if |Z_sel - sampled2| / (Z_sel + 1e-6) < occlusion_tol.",
        check=greater_than(0))
    occlusion_tol_behind: float = setting(
        0.01, "One-sided z-buffer test: a sample lying behind the neighbour's surface by more than this relative depth "
        "is occluded there and dropped (in front = a real conflict, kept up to occlusion_tol).", check=greater_than(0))
    edge_alpha: float = setting(
        10.0, "Edge sensitivity α of the smoothness weights exp(-α |∇I|) (image in [0, 1]; 0 = uniform).",
        check=at_least(0))
    smooth_depth_edge: float = setting(
        0.0, "L_edge and L_surf ignore pixel pairs whose initial depths differ by more than this relative amount (a "
        "depth edge in the input; 0 = off).", check=at_least(0))
    keep_if_more_consistent: bool = setting(
        True, "After optimizing, a pixel keeps its refined depth only where it agrees with more neighbour maps "
        "(refined vs refined) than its initial depth did (initial vs initial), else the initial depth stays.")
    keep_if_photo_consistent: bool = setting(
        True, "keep_if_more_consistent also requires that the refined depth matches the neighbour images at least as "
        "well as the initial depth (NCC over 5x5 windows, wider above depth.reference_side as in the depth stage, "
        "best neighbour); needs the images.")
    max_correction: float = setting(
        0.0, "keep_if_more_consistent: a refined depth that moved more than this relative amount keeps the initial "
        "depth instead (0 = no limit).", check=at_least(0))
    accept_neighbors: int = setting(
        6, "Neighbour maps checked by keep_if_more_consistent (most shared sparse points first).", check=at_least(1))
    accept_reproj_px: float = setting(
        2.0, "keep_if_more_consistent: forward-backward reprojection error (pixels, times side / depth.reference_side "
        "for larger maps) below which a neighbour agrees.",
        check=greater_than(0))
    accept_rel_depth: float = setting(
        0.01, "keep_if_more_consistent: relative depth difference below which a neighbour agrees.",
        check=greater_than(0))
    restore_dropped: bool = setting(
        True, "Also refine the pixels the depth stage's consistency filter dropped and keep those the evidence "
        "supports (a neighbour agrees, or the photos match and no view sees through them).")
    restore_max_photo_cost: float = setting(
        0.3, "A pixel no neighbour map agrees with is supported only if its matching cost 1 − NCC (5x5, wider above "
        "depth.reference_side; best neighbour image) is at most this.", check=between(0, 2))
    accept_photo_margin: float = setting(
        0.05, "keep_if_more_consistent also keeps a refined depth that as many neighbour maps agree with as with the "
        "initial one when its matching cost is lower by more than this.", check=at_least(0))
    accept_free_space_margin: float = setting(
        0.05, "A neighbour contradicts a pixel when it sees a surface more than this (relative) behind the pixel's "
        "point.", check=at_least(0))
    use_confidence: bool = setting(True, "Weight L_mv samples by the depth maps' confidence (source × neighbour).")
    lr_final_ratio: float = setting(
        0.1, "Cosine learning-rate decay: the last step uses lr × lr_final_ratio (1 = constant).",
        check=between(0, 1, open_low=True))
    max_anchor_points: int = setting(
        4096, "At most this many sparse points per view for L_anchor (random subset, seeded).", check=at_least(1))
    seed: int = setting(0, "Random seed (pixel sampling, anchor subsets).", check=at_least(0))
    cpu_threads: int | None = setting(
        1, "Torch CPU threads while refining on the CPU (null: torch's default thread count).",
        affects_output=False, check=or_automatic(at_least(1)))
    cpu_workers: int | None = setting(
        None, "Threads on the CPU for the groups of a round and the views of keep_if_more_consistent (null: one per "
        "CPU core; the result is the same for any count).",
        affects_output=False, check=or_automatic(at_least(1)))
    log_every: int = setting(
        10, "Refresh the progress bar (one device sync) every N steps; every step is still logged.",
        affects_output=False, check=at_least(1))
    device: str = setting(
        "auto", "Torch device: auto (cuda when present), cpu or cuda.",
        affects_output=False, check=device_choice("torch"))

"""Settings of the refine stage (losses, optimizer, acceptance gate); light to import: checked when the config loads."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import at_least, between, device_choice, greater_than, increasing_positive, setting


@dataclass(kw_only=True)
class RefineConfig:
    lr: float = setting(2e-3, "Adam learning rate of the δz pyramid: one step changes the depth by about lr relatively (the research value 5e-5 was a network's; it cannot remove outliers here, see the README table).", check=greater_than(0))
    steps: int = setting(400, "Optimizer steps; each refines one group of views_per_batch views, so a view is updated steps / ceil(views / views_per_batch) times.", check=at_least(0))
    samples_per_view: int = setting(1024, "Pixels sampled per view per step for the multiview loss.", check=at_least(1))
    views_per_batch: int = setting(8, "Views refined per step (bounds the memory of a step: about views_per_batch full-resolution maps and their gradients).", check=at_least(1))
    max_resident_views: int = setting(24, "Views whose optimizer tensors stay in memory (about 7.5 MiB per view at 480x360; every view's current depth, 1.3 MiB, stays regardless). With more views, the groups beyond this budget take turns in one resident slot and wait in scratch files under refine/ (their δz grids, Adam state and fixed per-view tensors, the same 7.5 MiB per view): the same result, paid with disk reads and writes at each turn (fewer with steps_per_visit > 1). At least one group of views_per_batch views is resident.", affects_output=False, check=at_least(1))
    steps_per_visit: int = setting(1, "Consecutive steps a group of views is refined before the next group's turn (1: round robin, one step each). Larger values make fewer turns, so offloaded groups (max_resident_views) are read and written less often, but a group then takes several steps against the same neighbour depths.", check=at_least(1))
    num_neighbors: int = setting(4, "Neighbour views per view for L_mv (most shared sparse points).", check=at_least(0))
    pyramid_strides: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), "Strides in pixels of the summed δz grids (1 = per-pixel; larger = smoother, low-frequency corrections).", check=increasing_positive())
    weight_mv: float = setting(2.0, "Weight of the multiview reprojection loss L_mv.", check=at_least(0))
    weight_edge: float = setting(0.02, "Weight of the edge-aware smoothness L_edge.", check=at_least(0))
    weight_surf: float = setting(0.01, "Weight of the surface smoothness L_surf.", check=at_least(0))
    weight_mag: float = setting(0.005, "Weight of the magnitude penalty L_mag = mean(|δz| / (depth_init + 1e-2)).", check=at_least(0))
    weight_anchor: float = setting(1.0, "Weight of the sparse-point anchoring loss L_anchor.", check=at_least(0))
    huber_delta: float = setting(1e-2, "Huber threshold δ of the reprojection and anchor residuals (relative depth: 1e-2 = 1 % of the depth).", check=greater_than(0))
    occlusion_tol: float = setting(0.25, "Z-buffer test: a sample counts only if |Z_sel - sampled2| / (Z_sel + 1e-6) < occlusion_tol.", check=greater_than(0))
    occlusion_tol_behind: float = setting(0.01, "One-sided z-buffer test: a sample lying behind the neighbour's surface by more than this relative depth is occluded there and dropped (in front = a real conflict, kept up to occlusion_tol). Measured (COLMAP cameras, 24 views): 0.05 pulled surfaces seen by few views toward the occluders in front of them (blob fused F@1 % 0.929); 0.01 keeps them (0.933); 0.005 drops so many noisy samples that the remaining in-front conflicts push depth back (0.902).", check=greater_than(0))
    edge_alpha: float = setting(10.0, "Edge sensitivity α of the smoothness weights exp(-α |∇I|) (image in [0, 1]; 0 = uniform).", check=at_least(0))
    smooth_depth_edge: float = setting(0.0, "L_edge and L_surf ignore pixel pairs whose initial depths differ by more than this relative amount (a depth edge in the input; 0 = off).", check=at_least(0))
    keep_if_more_consistent: bool = setting(True, "After optimizing, a pixel keeps its refined depth only where it agrees with more neighbour maps (refined vs refined) than its initial depth did (initial vs initial); elsewhere the initial depth stays. Refinement then never replaces a depth by one the other views support less (measured: unsupported corrections in briefly seen regions cost F-score).")
    keep_if_photo_consistent: bool = setting(True, "keep_if_more_consistent also requires that the refined depth matches the neighbour images at least as well as the initial depth (NCC over 5x5 windows, best neighbour, as in the depth stage); needs the images. Measured (24 views, 480x360, COLMAP cameras, fused F@1 %): blob 0.939 -> 0.942 vs the consistency test alone; it stops moves onto the wrong surface that a neighbour's equally wrong map seems to confirm.")
    max_correction: float = setting(0.0, "keep_if_more_consistent: a refined depth that moved more than this relative amount keeps the initial depth instead (0 = no limit). 0.01 made the blob benchmark's fused F@1 % beat --skip refine (0.935 vs 0.934) but leaves outliers and warps above 1 % uncorrected.", check=at_least(0))
    accept_neighbors: int = setting(6, "Neighbour maps checked by keep_if_more_consistent (most shared sparse points first).", check=at_least(1))
    accept_reproj_px: float = setting(2.0, "keep_if_more_consistent: forward-backward reprojection error (pixels) below which a neighbour agrees.", check=greater_than(0))
    accept_rel_depth: float = setting(0.01, "keep_if_more_consistent: relative depth difference below which a neighbour agrees.", check=greater_than(0))
    use_confidence: bool = setting(True, "Weight L_mv samples by the depth maps' confidence (source × neighbour).")
    lr_final_ratio: float = setting(0.1, "Cosine learning-rate decay: the last step uses lr × lr_final_ratio (1 = constant).", check=between(0, 1, open_low=True))
    max_anchor_points: int = setting(4096, "At most this many sparse points per view for L_anchor (random subset, seeded).", check=at_least(1))
    seed: int = setting(0, "Random seed (pixel sampling, anchor subsets).", check=at_least(0))
    cpu_threads: int = setting(1, "Torch CPU threads while refining (0 = torch's default). 1 is the default because two threads on a shared, loaded 2-core machine ran 16x slower than one; the results are the same.", affects_output=False, check=at_least(0))
    log_every: int = setting(10, "Refresh the progress bar (one device sync) every N steps; every step is still logged.", affects_output=False, check=at_least(1))
    device: str = setting("auto", "Torch device: auto (cuda when present), cpu or cuda.", affects_output=False, check=device_choice("torch"))

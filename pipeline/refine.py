"""refine stage: multi-view refinement of the depth maps (``depth_pred = depth_init + δz``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StageNotImplemented
from pipeline.settings import setting
from pipeline.stage import StageContext


@dataclass(kw_only=True)
class RefineConfig:
    lr: float = setting(5e-5, "Adam learning rate.")
    samples_per_view: int = setting(1024, "Pixels sampled per view per step for the multiview loss.")
    weight_mv: float = setting(2.0, "Weight of the multiview reprojection loss L_mv.")
    weight_edge: float = setting(0.02, "Weight of the edge-aware smoothness L_edge.")
    weight_surf: float = setting(0.01, "Weight of the surface smoothness L_surf.")
    weight_mag: float = setting(0.005, "Weight of the magnitude penalty L_mag = mean(|δz| / (depth_init + 1e-2)).")
    weight_anchor: float = setting(0.1, "Weight of the sparse-point anchoring loss L_anchor.")
    huber_delta: float = setting(1e-2, "Huber threshold δ for the reprojection residuals (normalized-frame depth units).")
    occlusion_tol: float = setting(0.25, "Z-buffer test: a sample counts only if |Z_sel - sampled2| / (Z_sel + 1e-6) < occlusion_tol.")
    seed: int = setting(0, "Random seed (sampling, initialisation).")
    device: str = setting("auto", "Torch device: auto (cuda when present), cpu or cuda.", affects_output=False)


def run(ctx: StageContext) -> None:
    raise StageNotImplemented("the refine stage is not implemented yet")

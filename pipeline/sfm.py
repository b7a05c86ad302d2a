"""sfm stage: COLMAP sparse structure-from-motion through pycolmap.

Writes ``OUT/sfm/model`` (undistorted PINHOLE cameras, poses and sparse
points in the normalized frame), ``OUT/sfm/images`` (undistorted images) and
``OUT/sfm/normalization.json``; the engine publishes the model as ``OUT/sparse``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.errors import StageNotImplemented
from pipeline.settings import setting
from pipeline.stage import StageContext


class Matcher(str, enum.Enum):
    exhaustive = "exhaustive"
    sequential = "sequential"


@dataclass(kw_only=True)
class SfmConfig:
    matcher: Matcher = setting(Matcher.exhaustive, "Feature matching: exhaustive (small sets) or sequential (video frames).")
    max_image_size: int = setting(2000, "Longest image side in pixels for SIFT extraction and undistortion; larger images are downscaled.")
    max_num_features: int = setting(8192, "Maximum SIFT features per image.")
    sequential_overlap: int = setting(10, "Sequential matching: number of following frames each frame is matched with.")
    min_registered: int = setting(3, "Fail when fewer images than this register.")
    use_existing_model: bool = setting(True, "Use SCENE_DIR/sparse/0 (or SCENE_DIR/sparse) instead of running SfM when present.")
    seed: int = setting(0, "Random seed for COLMAP (RANSAC, mapping) so runs are repeatable.")
    num_threads: int = setting(-1, "CPU threads for COLMAP (-1: all).", affects_output=False)


def run(ctx: StageContext) -> None:
    raise StageNotImplemented("the sfm stage is not implemented yet")

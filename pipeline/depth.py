"""depth stage: initial per-view depth maps, anchored to the sparse points.

Writes ``OUT/depth/views/<stem>.npz`` per view (see :func:`pipeline.io` readers).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.errors import StageNotImplemented
from pipeline.settings import setting
from pipeline.stage import StageContext


class DepthEstimator(str, enum.Enum):
    mvs = "mvs"
    prior = "prior"
    torchscript = "torchscript"


@dataclass(kw_only=True)
class DepthConfig:
    estimator: DepthEstimator = setting(DepthEstimator.mvs, "Initial depth estimator: mvs (plane-sweep stereo, no weights), prior (SCENE_DIR/depth_prior files) or torchscript (a model file).")
    device: str = setting("auto", "Torch device: auto (cuda when present), cpu or cuda.", affects_output=False)


def run(ctx: StageContext) -> None:
    raise StageNotImplemented("the depth stage is not implemented yet")

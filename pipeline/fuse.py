"""fuse stage: TSDF fusion (Open3D VoxelBlockGrid) of the depth maps into a coloured mesh."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StageNotImplemented
from pipeline.settings import setting
from pipeline.stage import StageContext


@dataclass(kw_only=True)
class FuseConfig:
    voxel_size: float = setting(0.0, "TSDF voxel size in normalized-frame units (0: derived from the sparse points and cameras).")
    device: str = setting("auto", "Open3D device: auto (CUDA:0 when present), cpu or cuda.", affects_output=False)


def run(ctx: StageContext) -> None:
    raise StageNotImplemented("the fuse stage is not implemented yet")

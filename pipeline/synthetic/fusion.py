"""Ground-truth depth fused by the fuse stage's code, for tests and benchmarks (the upper bound of
docs/conventions.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core.io import DepthMap, SfmScene, load_rgb
from pipeline.fuse.config import FuseConfig
from pipeline.fuse.stage import resolve_params
from pipeline.fuse.tsdf import FusionFrame, FusionParams, FusionResult, Progress, fuse_depth_maps


def ground_truth_frames(scene_dir: Path, scene: SfmScene) -> Iterator[FusionFrame]:
    """The GT depth maps of a rendered scene (``recon synth``) as frames in ``scene``'s normalized frame.

    ``scene`` is :func:`pipeline.synthetic.groundtruth.scene_from_ground_truth` of ``scene_dir``; GT depth is scaled
    by its normalization. Yields one view at a time.
    """
    from pipeline.synthetic.groundtruth import gt_depth_path

    scale = float(np.cbrt(np.linalg.det(scene.normalized_from_sfm[:3, :3])))
    for v in scene.views:
        depth = np.load(gt_depth_path(Path(scene_dir) / "gt", v.name)).astype(np.float32) * np.float32(scale)
        valid = depth > 0
        dm = DepthMap(name=v.name, depth=depth, confidence=valid.astype(np.float32), valid=valid, K=v.K,
                      cam_from_world=v.cam_from_world)
        yield FusionFrame(dm, lambda path=v.image_path: load_rgb(path))


def fuse_ground_truth(scene_dir: Path, cfg: FuseConfig | None = None, device: str = "auto", *,
                      progress: Progress | None = None) -> tuple[FusionResult, SfmScene, FusionParams]:
    """Fuse the ground-truth depth of a rendered scene (the upper bound of docs/conventions.md) without a workspace.

    Sizes are derived exactly as in the stage, from :func:`pipeline.synthetic.groundtruth.scene_from_ground_truth`
    (true cameras, sparse points sampled from GT depth). The mesh is in that scene's normalized frame:
    ``np.linalg.inv(scene.normalized_from_sfm)`` maps it to the GT frame.
    """
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    scene = scene_from_ground_truth(Path(scene_dir))
    params = resolve_params(cfg or FuseConfig(), scene)
    result = fuse_depth_maps(lambda: ground_truth_frames(Path(scene_dir), scene), params, device, progress=progress,
                             total=len(scene.views))
    return result, scene, params

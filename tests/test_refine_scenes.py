"""Refinement end to end on a small rendered scene: depth stage → refine → fuse → score against the ground truth.

Two cases of issue 18: the default plane-sweep depth (refinement must not cost
the mesh anything) and monocular-like priors (relative inverse depth, smoothed
edges, a different warp per view: refinement must raise the F-score by a wide
margin). Both use the true cameras of 10 views at 320x240.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.evaluate import evaluate_meshes
from pipeline.analysis.metrics import GtViews
from pipeline.core.io import load_depth_map, load_rgb
from pipeline.core.workspace import Workspace, view_stem
from pipeline.depth.stage import (
    DepthConfig,
    DepthEstimator,
    MvsConfig,
    PriorKind,
    compute_depth_maps,
    filter_input_path,
)
from pipeline.fuse.config import FuseConfig
from pipeline.fuse.stage import map_focal_scale, resolve_params
from pipeline.fuse.tsdf import FusionFrame, fuse_depth_maps
from pipeline.refine.stage import RefineConfig, refine_depth_maps
from pipeline.synthetic.groundtruth import load_gt_depth, scene_from_ground_truth
from pipeline.synthetic.priors import STRENGTHS, monocular_prior

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    """10 views, 320x240, of the blob object (rendered once)."""
    from pipeline.synthetic.render import render_scene

    return render_scene(tmp_path_factory.mktemp("refine_scenes") / "blob", shape="blob", n_views=10, width=320,
                        height=240, seed=0)


@pytest.fixture(scope="module")
def scene(scene_dir):
    return scene_from_ground_truth(scene_dir)


def _fused_scores(scene_dir, scene, maps) -> dict:
    """``maps`` fused with the fuse defaults and scored like ``recon eval`` (F at 0.5 % and 1 % of the object
    diagonal)."""
    params = resolve_params(FuseConfig(), scene, map_focal_scale(maps[0], scene.views[0]))
    frames = lambda: (FusionFrame(dm, lambda p=v.image_path: load_rgb(p)) for dm, v in zip(maps, scene.views))  # noqa: E731
    mesh = fuse_depth_maps(frames, params, "cpu", total=len(maps)).mesh
    info = json.loads((scene_dir / "gt" / "scene.json").read_text())
    box = (np.asarray(info["object_bbox_min"]), np.asarray(info["object_bbox_max"]))
    r = evaluate_meshes(mesh, scene_dir / "gt" / "mesh.ply", gt_from_est=np.linalg.inv(scene.normalized_from_sfm),
                        crop_box=box, diagonal=float(info["object_diagonal"]), gt_views=GtViews.load(scene_dir / "gt"),
                        thresholds_rel=(0.005, 0.01))
    return {"recall@0.5": r["thresholds"]["0.5%"]["recall"], "F@0.5": r["thresholds"]["0.5%"]["fscore"],
            "F@1": r["thresholds"]["1%"]["fscore"], "chamfer": r["chamfer_rel"]}


def _refine(ws, scene, mvs_cfg, refine_cfg):
    """The depth stage's maps of ``ws`` and their refinement with the stage's inputs (images, pre-filter candidates)."""
    init = [load_depth_map(ws.depth_view(v.name)) for v in scene.views]
    images = [load_rgb(v.image_path, max_size=max(m.depth.shape)) for v, m in zip(scene.views, init)]
    cands = [load_depth_map(p) if (p := filter_input_path(ws, mvs_cfg, v.name)).exists() else None for v in scene.views]
    refined, log = refine_depth_maps(scene.views, init, scene.points, refine_cfg, "cpu", images=images,
                                     candidates=cands)
    return init, refined, log


def test_refining_plane_sweep_depth_keeps_the_mesh(scene_dir, scene, tmp_path):
    """Plane-sweep depth (the default): refinement must not cost the mesh more than Open3D's noise.

    Measured (10 views 320x240, defaults): recall@0.5 % 0.786 → 0.783, F@0.5 % 0.864 → 0.862, F@1 % 0.915 → 0.913
    (issue 18 asks for a gain here and does not have it yet); asserted: no loss beyond 0.01, and some dropped pixels
    restored.
    """
    ws = Workspace.create(scene_dir, tmp_path / "out")
    cfg = DepthConfig(device="cpu")
    compute_depth_maps(scene, ws, cfg, MvsConfig())
    init, refined, log = _refine(ws, scene, MvsConfig(), RefineConfig())
    before, after = _fused_scores(scene_dir, scene, init), _fused_scores(scene_dir, scene, refined)
    assert after["F@0.5"] > before["F@0.5"] - 0.01, (before, after)
    assert after["recall@0.5"] > before["recall@0.5"] - 0.01, (before, after)
    assert np.mean([s["restored_fraction"] for s in log["views"].values()]) > 0


def test_refining_monocular_priors_raises_the_fscore(scene_dir, scene, tmp_path):
    """Medium priors (:data:`STRENGTHS`): measured F@1 % 0.515 → 0.877, F@0.5 % 0.280 → 0.732, Chamfer 1.17 → 0.49 %
    of the diagonal; asserted: F@1 % at least +0.2, Chamfer lower, and more pixels that a neighbour map agrees with."""
    ws = Workspace(scene_dir=tmp_path / "scene", out_dir=tmp_path / "out")
    (ws.scene_dir / "depth_prior").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for v in scene.views:
        np.save(ws.scene_dir / "depth_prior" / f"{view_stem(v.name)}.npy",
                monocular_prior(load_gt_depth(scene_dir / "gt", v.name), rng, STRENGTHS["medium"]))
    cfg = DepthConfig(estimator=DepthEstimator.prior, prior_kind=PriorKind.inverse_depth, prior_affine=True,
                      device="cpu")
    compute_depth_maps(scene, ws, cfg, MvsConfig())
    init, refined, log = _refine(ws, scene, MvsConfig(), RefineConfig())
    before, after = _fused_scores(scene_dir, scene, init), _fused_scores(scene_dir, scene, refined)
    assert after["F@1"] > before["F@1"] + 0.2, (before, after)
    assert after["chamfer"] < before["chamfer"], (before, after)
    stats = log["views"].values()
    assert np.mean([s["consistent_refined"] for s in stats]) > np.mean([s["consistent_init"] for s in stats]) + 0.1

"""Diagnose checks on scenes with known answers: correct vs deliberately inverted cameras."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.analysis.diagnose import (
    cameras_facing_scene_fraction,
    depth_stats,
    points_in_front_fraction,
    refine_gate_checks,
    reprojection_errors,
)
from pipeline.core.poses import invert_pose
from pipeline.synthetic.groundtruth import scene_from_ground_truth
from pipeline.synthetic.render import render_scene


@pytest.fixture(scope="module")
def gt_scene(tmp_path_factory):
    scene_dir = render_scene(tmp_path_factory.mktemp("diag") / "s", shape="blob", n_views=6, width=96, height=72)
    return scene_from_ground_truth(scene_dir, n_points=600)


def test_true_cameras_pass(gt_scene):
    assert points_in_front_fraction(gt_scene) == 1.0
    assert cameras_facing_scene_fraction(gt_scene) == 1.0


def _observations(scene, view):
    """Exact keypoints: the sparse points projected with the true pose."""
    pc = scene.points[view.point_ids] @ view.cam_from_world[:3, :3].T + view.cam_from_world[:3, 3]
    return (pc[:, :2] / pc[:, 2:]) * np.diag(view.K)[:2] + view.K[:2, 2]


def test_inverted_cameras_are_flagged_by_reprojection(gt_scene):
    for v in gt_scene.views:
        uv = _observations(gt_scene, v)
        good = reprojection_errors(gt_scene.points, v.point_ids, uv, v.K, v.cam_from_world)
        bad = reprojection_errors(gt_scene.points, v.point_ids, uv, v.K, invert_pose(v.cam_from_world))
        assert np.median(good) < 1e-6
        assert np.median(bad) > 20.0  # far beyond the 4 px verdict threshold


def test_depth_stats_ignore_invalid():
    s = depth_stats(np.array([1.0, 3.0, np.nan]))
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}


# ---- `recon diagnose` on a real run, as written and with its cameras deliberately inverted -----------

RUN_FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=30", "--no-progress"]


@pytest.fixture(scope="module")
def finished_out(tmp_path_factory):
    """OUT of a finished ``recon run`` on a rendered 10-view 240x180 scene (about 10 s)."""
    from click.testing import CliRunner

    import cli

    scene = render_scene(tmp_path_factory.mktemp("diag_run") / "blob", shape="blob", n_views=10, width=240, height=180,
                         seed=0)
    result = CliRunner().invoke(cli.main, ["run", str(scene), *RUN_FAST])
    assert result.exit_code == 0, result.output
    return scene / "recon"


def invert_model_poses(model_dir) -> None:
    """Rewrite a COLMAP model with every pose inverted (camera→world stored where world→camera belongs)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    for frame_id in list(rec.frames):
        frame = rec.frames[frame_id]
        if frame.has_pose():
            frame.rig_from_world = frame.rig_from_world.inverse()
    rec.write_binary(str(model_dir))


def diagnose_cli(out):
    from click.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.main, ["diagnose", str(out)])


@pytest.mark.slow
def test_cli_passes_a_good_run(finished_out):
    result = diagnose_cli(finished_out)
    assert result.exit_code == 0, result.output
    for check in ("extrinsic convention", "reprojection with stored poses", "cameras outside the surface",
                  "over-smoothing", "anchoring residuals"):
        assert f"[OK  ] {check}" in result.output, check
    assert "DELTA mean" in result.output and "INIT mean" in result.output and "PRED mean" in result.output


@pytest.mark.slow
def test_cli_flags_a_run_whose_cameras_were_inverted(finished_out, tmp_path):
    import shutil

    out = tmp_path / "recon"
    shutil.copytree(finished_out, out)
    invert_model_poses(out / "sfm" / "model")
    invert_model_poses(out / "sparse")
    result = diagnose_cli(out)
    assert result.exit_code == 1, result.output
    lines = {ln.split("]", 1)[1].split(":", 1)[0].strip(): ln for ln in result.output.splitlines()
             if ln.startswith("[")}
    assert lines["extrinsic convention"].startswith("[FAIL]")
    assert "camera→world where world→camera is expected" in lines["extrinsic convention"]
    assert lines["reprojection with stored poses"].startswith("[FAIL]")


@pytest.mark.slow
def test_cli_flags_inverted_published_cameras_only(finished_out, tmp_path):
    """OUT/sparse (the cameras users take downstream) inverted, the sfm cache intact: still a failure."""
    import shutil

    out = tmp_path / "recon"
    shutil.copytree(finished_out, out)
    invert_model_poses(out / "sparse")
    result = diagnose_cli(out)
    assert result.exit_code == 1, result.output
    assert "[OK  ] extrinsic convention" in result.output
    assert "[FAIL] reprojection with stored poses" in result.output and "wrong extrinsic convention" in result.output


@pytest.mark.slow
def test_cli_warns_when_refinement_did_nothing(finished_out, tmp_path):
    import shutil

    from pipeline.core.io import load_depth_map, save_depth_map

    out = tmp_path / "recon"
    shutil.copytree(finished_out, out)
    for path in sorted((out / "refine" / "views").glob("*.npz")):
        dm = load_depth_map(path)
        save_depth_map(path, dataclasses.replace(dm, depth=dm.depth_init.copy()))
    result = diagnose_cli(out)
    assert result.exit_code == 0, result.output  # a warning, not a failure
    assert "[WARN] over-smoothing" in result.output
    assert "DELTA mean 0 std 0" in result.output


def test_anchor_residuals_of_exact_and_scaled_depth(gt_scene):
    """GT depth read at its own sparse points: residual ~0; the same map 3 % deeper: residual 3 %."""
    from pathlib import Path

    from pipeline.analysis.diagnose import anchor_residuals
    from pipeline.core.io import DepthMap

    v = gt_scene.views[0]
    scene_dir = Path(v.image_path).parents[1]
    depth = np.load(scene_dir / "gt" / "depth" / f"{Path(v.name).stem}.npy") * gt_scene.normalized_from_sfm[0, 0]
    dm = DepthMap(name=v.name, depth=depth.astype(np.float32), confidence=np.ones_like(depth, np.float32),
                  valid=depth > 0, K=v.K, cam_from_world=v.cam_from_world)
    r = anchor_residuals(dm, gt_scene.points[v.point_ids])
    assert len(r) > 0.9 * len(v.point_ids) and np.median(r) < 5e-3
    r = anchor_residuals(dataclasses.replace(dm, depth=dm.depth * 1.03), gt_scene.points[v.point_ids])
    assert np.median(r) == pytest.approx(0.03, abs=5e-3)


def test_refine_gate_checks_flag_a_refinement_that_changed_nothing_or_broke_agreement():
    idle = [{"refined_fraction": 0.002, "restored_fraction": 0.0, "consistent_init": 0.9,
             "consistent_refined": 0.9}] * 3
    worse = [{"refined_fraction": 0.4, "restored_fraction": 0.01, "consistent_init": 0.9,
              "consistent_refined": 0.8}] * 3
    good = [{"refined_fraction": 0.4, "restored_fraction": 0.01, "consistent_init": 0.8, "consistent_refined": 0.9}] * 3
    verdicts = lambda stats: {c.name: c.verdict for c in refine_gate_checks(stats)}  # noqa: E731
    assert verdicts(idle) == {"refinement changed the depth": "warn", "view consistency after refinement": "ok"}
    assert verdicts(worse) == {"refinement changed the depth": "ok", "view consistency after refinement": "warn"}
    assert verdicts(good) == {"refinement changed the depth": "ok", "view consistency after refinement": "ok"}
    assert refine_gate_checks([{}]) == []  # maps written before these statistics existed: nothing to say

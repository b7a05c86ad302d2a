"""Diagnose checks on scenes with known answers: correct vs deliberately inverted cameras."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.diagnose import cameras_facing_scene_fraction, depth_stats, points_in_front_fraction, reprojection_errors
from pipeline.geometry import invert_pose
from pipeline.groundtruth import scene_from_ground_truth
from pipeline.synth import render_scene


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

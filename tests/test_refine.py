"""The refine stage: helpers, the optimization on a rendered scene, robustness, and the stage's I/O."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ReconConfig, load_config
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.geometry import sample_image
from pipeline.core.io import DepthMap, load_depth_map, load_rgb, save_depth_map
from pipeline.core.workspace import Workspace
from pipeline.refine import gate as gate_mod
from pipeline.refine import losses
from pipeline.refine import optimizer as optimizer_mod
from pipeline.refine import scene as scene_mod
from pipeline.refine import stage as refine_mod
from pipeline.refine.gate import evidence_stats, keep_more_consistent
from pipeline.refine.optimizer import LOG_COLUMNS, round_size
from pipeline.refine.pyramid import sample_views, upsample2x, upsample_sum, upsample_sum_pair, view_groups
from pipeline.refine.scene import covisible_neighbors
from pipeline.refine.stage import RefineConfig, refine_depth_maps
from pipeline.synthetic.corruptions import corrupt_depth, depth_error, ground_truth_depths
from pipeline.synthetic.groundtruth import scene_from_ground_truth

# ---- helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])  # one channel: the 1-D gather
def test_sample_views_matches_sample_image(device, channels):
    torch.manual_seed(0)
    maps = torch.rand(5, channels, 17, 23, device=device)
    view = torch.randint(0, 5, (2, 300), device=device)
    uv = torch.rand(2, 300, 2, device=device) * torch.tensor([27.0, 21.0], device=device) - 2.0  # some outside
    out = sample_views(maps.permute(0, 2, 3, 1).contiguous(), view, uv)
    expected = torch.stack([torch.stack([sample_image(maps[view[b, n]][None], uv[b, n][None, None])[0, :, 0]
                                         for n in range(300)], -1) for b in range(2)])
    assert out.shape == (2, channels, 300)
    assert torch.allclose(out, expected, atol=1e-5)
    if channels == 1:  # with gradients (the hand-written backward pass), the same values
        uv_g = uv.clone().requires_grad_(True)
        assert torch.allclose(sample_views(maps.permute(0, 2, 3, 1).contiguous(), view, uv_g), expected, atol=1e-5)


def test_all_finite_flags_nan_and_inf_on_the_fused_and_the_plain_path():
    from pipeline.refine.optimizer import all_finite

    finite = [torch.randn(3, 4), torch.randn(5)]
    assert bool(all_finite(finite)) and bool(all_finite([]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not bool(all_finite([*finite, torch.tensor([1.0, bad])]))
        assert not bool(all_finite([torch.tensor([bad]).expand(4)]))  # an expanded tensor: the plain path
    kept = [t.clone() for t in finite]
    all_finite(kept)
    assert all(torch.equal(a, b) for a, b in zip(kept, finite))  # the check changes nothing


def test_sample_views_gradient_wrt_uv():
    maps = torch.zeros(1, 4, 4, 1)
    maps[0, :, :, 0] = torch.arange(4.0)  # depth = column index: d/du = 1 inside
    uv = torch.tensor([[[1.7, 2.2]]], requires_grad=True)
    (g,) = torch.autograd.grad(sample_views(maps, torch.zeros(1, 1, dtype=torch.long), uv).sum(), uv)
    assert torch.allclose(g, torch.tensor([[[1.0, 0.0]]]))


def test_sample_views_hand_written_gradient_equals_autograd():
    """_BilinearRead's backward pass against autograd through the same interpolation (several channels, samples
    outside the image where the clamp zeroes the gradient)."""
    from pipeline.refine.pyramid import _bilinear

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 9, 11, 3, generator=g, dtype=torch.float64)
    view = torch.randint(0, 4, (2, 200), generator=g)
    uv = (torch.rand(2, 200, 2, generator=g, dtype=torch.float64) * torch.tensor([15.0, 13.0]) - 2.0)
    weight = torch.rand(2, 3, 200, generator=g, dtype=torch.float64)
    uv_a = uv.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((sample_views(maps, view, uv_a) * weight).sum(), uv_a)
    uv_b = uv.clone().requires_grad_(True)
    x, y = (uv_b[..., 0] - 0.5).clamp(0, 10), (uv_b[..., 1] - 0.5).clamp(0, 8)
    values = _bilinear(maps.reshape(-1, 3), view * 99, x, y, 11, 9)[0]  # plain autograd
    (expected,) = torch.autograd.grad((values.permute(0, 2, 1) * weight).sum(), uv_b)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert (grad == 0).any() and (grad != 0).any()


def _plain_upsample2x(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """upsample2x's weighted sums written plainly (differentiable by autograd)."""
    xp = F.pad(x, (1, 1, 0, 0), mode="replicate")
    y = torch.stack([0.25 * xp[..., :-2] + 0.75 * x, 0.75 * x + 0.25 * xp[..., 2:]], -1).flatten(-2)
    yp = F.pad(y, (0, 0, 1, 1), mode="replicate")
    y = torch.stack([0.25 * yp[..., :-2, :] + 0.75 * y, 0.75 * y + 0.25 * yp[..., 2:, :]], -2).flatten(-3, -2)
    return y[..., :height, :width]


@pytest.mark.parametrize("shape, size", [((6, 8), (12, 16)), ((5, 7), (9, 13)), ((1, 1), (2, 2)), ((1, 3), (1, 5)),
                                         ((2, 3), (4, 5))])
def test_upsample2x_hand_written_backward_is_the_adjoint(shape, size):
    """upsample2x (values written into the interleaved output, hand-written backward pass) against autograd through
    the plain weighted sums: the same values bit for bit, the adjoint as gradient (cropped odd sizes, borders, single
    cells, two cells)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *shape, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 1, *size, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((upsample2x(xa, *size) * weight).sum(), xa)
    (expected,) = torch.autograd.grad((_plain_upsample2x(xb, *size) * weight).sum(), xb)
    assert torch.equal(upsample2x(x, *size), _plain_upsample2x(x, *size))
    x32 = x.float()
    assert torch.equal(upsample2x(x32, *size), _plain_upsample2x(x32, *size))
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 8), (5, 7)])
def test_upsample2x_matches_interpolate(shape):
    x = torch.rand(2, 1, *shape)
    H, W = 2 * shape[0], 2 * shape[1]
    ref = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    assert torch.allclose(upsample2x(x, H, W), ref, atol=1e-6)
    assert upsample2x(x, H - 1, W - 1).shape[-2:] == (H - 1, W - 1)  # odd sizes: cropped


def test_upsample_sum_of_constant_levels():
    grids = [torch.full((1, 1, 45, 60), 0.1), torch.full((1, 1, 23, 30), 0.2), torch.full((1, 1, 3, 4), 0.3)]
    out = upsample_sum(grids, 90, 120)
    assert out.shape == (1, 1, 90, 120) and torch.allclose(out, torch.full_like(out, 0.6))


@pytest.mark.parametrize("n_fine", [0, 1, 2, 5])
def test_upsample_sum_pair_is_two_upsample_sums(n_fine):
    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(2, 1, h, w, generator=g, requires_grad=True)
             for h, w in ((45, 60), (23, 30), (12, 15), (6, 8), (3, 4))]
    total, photo = upsample_sum_pair(grids, 45, 60, n_fine)
    detached = [x.detach() if i < n_fine else x for i, x in enumerate(grids)]
    assert torch.equal(total, upsample_sum(grids, 45, 60)) and torch.equal(photo, upsample_sum(detached, 45, 60))
    (photo.sum() + 0 * total.sum()).backward()
    for i, x in enumerate(grids):  # the photo sum reaches only the coarse levels
        assert (x.grad is None or not x.grad.any()) if i < n_fine else x.grad.abs().sum() > 0


def test_round_size():
    assert round_size(RefineConfig(), 3) == 2  # two groups per round by default
    assert round_size(RefineConfig(parallel_groups=4), 3) == 3 and round_size(RefineConfig(), 1) == 1
    assert round_size(RefineConfig(steps_per_visit=2), 3) == 1  # consecutive steps of one group: no rounds


def test_view_groups_partition_and_interleave():
    groups = view_groups(24, 8)
    assert len(groups) == 3 and sorted(np.concatenate(groups).tolist()) == list(range(24))
    assert groups[0].tolist() == [0, 3, 6, 9, 12, 15, 18, 21]
    assert [len(g) for g in view_groups(10, 8)] == [5, 5]
    assert [len(g) for g in view_groups(3, 8)] == [3]


def test_covisible_neighbors_rank_by_shared_points_then_distance():
    from pipeline.core.io import View

    def view(name, ids, x):
        T = np.eye(4)
        T[0, 3] = -x
        return View(name=name, K=np.eye(3), cam_from_world=T, width=4, height=4, image_path=None,
                    point_ids=np.array(ids))

    views = [view("a", [0, 1, 2, 3], 0.0), view("b", [0, 1, 2], 5.0), view("c", [3], 1.0), view("d", [], 0.5)]
    nbr = covisible_neighbors(views, 2)
    assert nbr.shape == (4, 2)
    assert nbr[0].tolist() == [1, 2]  # 3 shared points, then 1
    assert nbr[3].tolist() == [0, 2]  # no shared points: nearest centres
    assert covisible_neighbors(views[:1], 4).shape == (1, 0)


# ---- a rendered scene ----------------------------------------------------------------------

def _render_blob(folder, *, n_views: int, width: int, height: int):
    """The blob scene rendered into ``folder``: (scene_dir, SfmScene with true cameras, GT depth per view, images)."""
    from pipeline.synthetic.render import render_scene

    scene_dir = render_scene(folder / "blob", shape="blob", n_views=n_views, width=width, height=height, seed=0)
    scene = scene_from_ground_truth(scene_dir)
    gts = ground_truth_depths(scene_dir, scene.views, scene.normalized_from_sfm)
    images = [load_rgb(v.image_path) for v in scene.views]
    return scene_dir, scene, gts, images


@pytest.fixture(scope="module")
def blob_scene(tmp_path_factory):
    """10 views 320x240 of the blob scene (rendered once), as (scene_dir, SfmScene, GT depth, images)."""
    return _render_blob(tmp_path_factory.mktemp("refine"), n_views=10, width=320, height=240)


CHECKED = {"geometric_filter": {}}
"""The stats mark of a map the depth stage checked against its neighbours (the refine gate trusts its pixels)."""


def _initial_maps(scene, gts, kind: str, seed: int = 0) -> list[DepthMap]:
    """Corrupted GT maps; ``mvs`` ones stand for the depth stage's checked maps (marked so)."""
    rng = np.random.default_rng(seed)
    out = []
    for v, g in zip(scene.views, gts):
        d, valid, conf = corrupt_depth(g, kind, rng)
        out.append(DepthMap(name=v.name, depth=d, confidence=conf, valid=valid, K=v.K, cam_from_world=v.cam_from_world,
                            stats=dict(CHECKED) if kind == "mvs" else {}))
    return out


def _mean_error(maps, gts) -> float:
    """Pixel-weighted mean relative depth error over every view."""
    errs = [depth_error(m.depth, g, m.valid) for m, g in zip(maps, gts)]
    return float(sum(e["mean"] * e["pixels"] for e in errs) / sum(e["pixels"] for e in errs))


@pytest.fixture(scope="module")
def refined(blob_scene):
    """Default-setting refinement of both corruptions, run once: {kind: (init, refined, log)}."""
    _, scene, gts, images = blob_scene
    out = {}
    for kind in ("warp", "mvs"):
        init = _initial_maps(scene, gts, kind)
        maps, log = refine_depth_maps(scene.views, init, scene.points, RefineConfig(), "cpu", images=images)
        out[kind] = (init, maps, log)
    return out


@pytest.mark.slow
def test_refinement_removes_smooth_warp(blob_scene, refined):
    """GT × (1 + 0.02 sin(low-frequency field)) × (1 + 0.5 % noise): measured mean relative error
    1.33 % → 0.79 % (−41 %; 0.69 % with refine.occlusion_tol_behind=0.05, −52 % before the keep_if_more_consistent
    gate); asserted: at least −30 % and the median halved."""
    _, _, gts, _ = blob_scene
    init, maps, log = refined["warp"]
    before, after = _mean_error(init, gts), _mean_error(maps, gts)
    assert before > 0.01
    assert after < 0.7 * before, f"mean relative depth error {before:.4f} → {after:.4f}"
    med_before = np.median([depth_error(m.depth, g, m.valid)["median"] for m, g in zip(init, gts)])
    med_after = np.median([depth_error(m.depth, g, m.valid)["median"] for m, g in zip(maps, gts)])
    assert med_after < 0.5 * med_before
    assert log["skipped_steps"] == 0


@pytest.mark.slow
def test_refinement_removes_mvs_noise_and_outliers(blob_scene, refined):
    """GT × (1 + 0.5 % noise), 3 % outliers (±5-30 %), 3 % holes: measured mean relative error
    0.91 % → 0.52 % (−44 %; −81 % before the keep_if_more_consistent gate, which keeps the noisy initial
    depth wherever the neighbours already agree with it within 1 %, and is what makes fused meshes better
    on real MVS depth); asserted: at least −35 %. The holes stay holes."""
    _, _, gts, _ = blob_scene
    init, maps, _ = refined["mvs"]
    before, after = _mean_error(init, gts), _mean_error(maps, gts)
    assert after < 0.65 * before, f"mean relative depth error {before:.4f} → {after:.4f}"
    for dm0, dm in zip(init, maps):
        assert np.array_equal(dm.valid, dm0.valid)
        assert (dm.depth[~dm.valid] == 0).all()


def test_refined_maps_contract(refined):
    init, maps, log = refined["mvs"]
    for dm0, dm in zip(init, maps):
        assert dm.name == dm0.name and dm.depth.dtype == np.float32 and dm.depth.shape == dm0.depth.shape
        assert np.isfinite(dm.depth).all() and (dm.depth[dm.valid] > 0).all()
        np.testing.assert_array_equal(dm.depth_init, np.where(dm.valid, dm0.depth, 0))
        delta = (dm.depth - dm.depth_init)[dm.valid]
        assert set(dm.stats) >= {"INIT", "PRED", "DELTA"}
        assert dm.stats["DELTA"]["mean"] == pytest.approx(float(delta.mean()), abs=1e-6)
        assert dm.stats["PRED"]["max"] == pytest.approx(float(dm.depth[dm.valid].max()), rel=1e-6)
        assert set(dm.stats["INIT"]) == {"mean", "std", "min", "max"}
    steps = log["steps"]
    assert len(steps) == RefineConfig().steps and set(steps[0]) == {"step", *LOG_COLUMNS}
    assert steps[0]["dz_std"] == 0.0 and steps[-1]["dz_std"] > 1e-4  # starts at δz = 0, then moves
    assert all(np.isfinite(s["loss"]) for s in steps)
    assert set(log["views"]) == {dm.name for dm in maps}


def test_deterministic_on_cpu(blob_scene):
    _, scene, gts, images = blob_scene
    init = _initial_maps(scene, gts, "mvs", seed=1)
    cfg = RefineConfig(steps=12, views_per_batch=4)
    a, log_a = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=images)
    # the second run gates its views one at a time, the first in parallel threads (two, or one per core)
    b, log_b = refine_depth_maps(scene.views, init, scene.points, dataclasses.replace(cfg, cpu_workers=1), "cpu",
                                 images=images)
    a_more, _ = refine_depth_maps(scene.views, init, scene.points, dataclasses.replace(cfg, cpu_workers=3), "cpu",
                                  images=images)
    for x, y, z in zip(a, b, a_more):
        np.testing.assert_array_equal(x.depth, y.depth)
        np.testing.assert_array_equal(x.valid, y.valid)
        np.testing.assert_array_equal(z.depth, y.depth)
    assert [s["loss"] for s in log_a["steps"]] == [s["loss"] for s in log_b["steps"]]
    assert log_a["views"] == log_b["views"]
    c, _ = refine_depth_maps(scene.views, init, scene.points, dataclasses.replace(cfg, seed=5), "cpu", images=images)
    assert any(not np.array_equal(x.depth, z.depth) for x, z in zip(a, c))


def test_mv_only_preset_runs(blob_scene):
    _, scene, gts, images = blob_scene
    cfg = dataclasses.replace(load_config(presets=["mv-only"]).refine, steps=12)
    assert cfg.weight_edge == cfg.weight_surf == cfg.weight_mag == cfg.weight_anchor == cfg.weight_photo == 0.0
    init = _initial_maps(scene, gts, "warp")
    maps, log = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=None)
    assert all(np.isfinite(m.depth).all() for m in maps)
    assert all(s[k] == 0.0 for s in log["steps"] for k in ("L_edge", "L_surf", "L_mag", "L_anchor", "L_photo"))
    assert log["steps"][-1]["L_mv"] > 0 and log["steps"][-1]["dz_std"] > 0


def test_runs_on_device(blob_scene, device):
    """The same code on every available device (CPU always, CUDA when present)."""
    _, scene, gts, images = blob_scene
    init = _initial_maps(scene, gts, "mvs")[:4]
    maps, log = refine_depth_maps(scene.views[:4], init, scene.points, RefineConfig(steps=6), device, images=images[:4])
    assert log["device"].startswith(device.type)
    assert all(np.isfinite(m.depth).all() for m in maps) and log["skipped_steps"] == 0


def test_non_finite_step_is_skipped_and_halves_lr(blob_scene, monkeypatch, caplog):
    _, scene, gts, images = blob_scene
    init = _initial_maps(scene, gts, "mvs")[:4]
    calls = {"n": 0}
    real = losses.anchor_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(losses, "anchor_loss", flaky)
    # one thread: the third call of the loss is step 2's (two groups, rounds of steps 0-1, 2-3, ...)
    cfg = RefineConfig(steps=8, views_per_batch=2, log_every=4, cpu_workers=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.refine.optimizer"):
        maps, log = refine_depth_maps(scene.views[:4], init, scene.points, cfg, "cpu", images=images[:4])
    steps = log["steps"]
    assert log["skipped_steps"] == 1 and steps[2]["finite"] == 0.0
    # the halved rate applies from the next round on (step 3 ran from the same state as step 2)
    assert steps[3]["lr"] == pytest.approx(optimizer_mod._lr_at(cfg, 3))
    assert steps[4]["lr"] == pytest.approx(0.5 * optimizer_mod._lr_at(cfg, 4))
    assert "skipped" in caplog.text
    assert all(np.isfinite(m.depth).all() for m in maps)
    assert np.isfinite([s["loss"] for i, s in enumerate(steps) if i != 2]).all()


def test_bad_settings_are_reported(blob_scene):
    _, scene, gts, _ = blob_scene
    init = _initial_maps(scene, gts, "mvs")[:2]
    with pytest.raises(ReconError, match="pyramid_strides"):
        refine_depth_maps(scene.views[:2], init, scene.points, RefineConfig(steps=1, pyramid_strides=(4, 2)), "cpu")
    with pytest.raises(ReconError, match="lr"):
        refine_depth_maps(scene.views[:2], init, scene.points, RefineConfig(steps=1, lr=0.0), "cpu")


# ---- the stage -----------------------------------------------------------------------------

def test_run_stage_writes_views_and_log(blob_scene, tmp_path, monkeypatch):
    import pipeline.core.io

    scene_dir, scene, gts, _ = blob_scene
    ws = Workspace.create(scene_dir, tmp_path / "out")
    ctx = StageContext(ws=ws, config=ReconConfig(), name="refine", fingerprint="test", show_progress=False)
    monkeypatch.setattr(pipeline.core.io, "load_sfm_scene", lambda _ws: scene)
    with pytest.raises(ReconError, match="no depth maps"):
        refine_mod.run(ctx)

    for dm in _initial_maps(scene, gts, "mvs"):
        save_depth_map(ws.depth_view(dm.name), dm)
    ctx.config.refine.steps = 10
    refine_mod.run(ctx)
    for v in scene.views:
        dm = load_depth_map(ws.refine_view(v.name))
        assert dm.depth_init is not None and np.isfinite(dm.depth).all()
        assert {"INIT", "PRED", "DELTA"} <= set(dm.stats)
    import json

    log = json.loads(ws.refine_log.read_text())
    assert len(log["steps"]) == 10 and set(log["steps"][0]) == {"step", *LOG_COLUMNS}
    assert ctx.summary["views"] == len(scene.views) and ctx.summary["skipped_steps"] == 0
    # Everything done: a second run does not rewrite anything.
    mtime = ws.refine_view(scene.views[0].name).stat().st_mtime_ns
    refine_mod.run(ctx)
    assert ws.refine_view(scene.views[0].name).stat().st_mtime_ns == mtime


def _gt_maps(scene, gts) -> list[DepthMap]:
    """Ground-truth maps (refined = initial = GT) of every view."""
    return [DepthMap(name=v.name, depth=g.astype(np.float32), confidence=(g > 0).astype(np.float32), valid=g > 0, K=v.K,
                     cam_from_world=v.cam_from_world, depth_init=g.astype(np.float32), stats=dict(CHECKED))
            for v, g in zip(scene.views, gts)]


def test_keep_more_consistent_keeps_whichever_depth_the_neighbours_support(blob_scene):
    """View 0: the initial map is 5 % off in the left band, the "refined" one in the right band; the gate
    returns the ground truth in both bands (neighbours agree with GT), and the initial depth where both are equal."""
    _, scene, gts, _ = blob_scene
    maps = _gt_maps(scene, gts)
    g0 = gts[0]
    left, right = np.zeros_like(maps[0].valid), np.zeros_like(maps[0].valid)
    left[60:180, 60:140], right[60:180, 180:260] = True, True
    init0, refined0 = g0.copy(), g0.copy()
    init0[left] *= 1.05
    refined0[right] *= 1.05
    maps[0] = replace(maps[0], depth=refined0.astype(np.float32), depth_init=init0.astype(np.float32))
    out, stats = keep_more_consistent(scene.views, maps, RefineConfig(), torch.device("cpu"))
    v0 = out[0].valid
    # refined kept where neighbours see the band (measured: 88.5 % of it; the rest no neighbour sees, so the initial
    # depth stays)
    assert np.mean(np.isclose(out[0].depth[left & v0], g0[left & v0], rtol=1e-6)) > 0.8
    # refined rejected, initial kept (measured: all but 3 of 9600 pixels, at depth edges)
    assert np.mean(np.isclose(out[0].depth[right & v0], g0[right & v0], rtol=1e-6)) > 0.995
    assert 0.1 < stats[scene.views[0].name]["refined_fraction"] < 0.6
    for a, b in zip(out[1:], maps[1:]):
        np.testing.assert_array_equal(a.depth, b.depth)


def test_photometric_costs_prefer_the_true_depth(blob_scene):
    """The depth-stage matching cost (1 - NCC, best neighbour) of view 0: ground truth beats GT x 1.05 on most
    pixels."""
    from pipeline.depth.plane_sweep import OUTSIDE_COST as mvs_outside

    _, scene, gts, images = blob_scene
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    g0 = gts[0]
    h, w = g0.shape
    sources = [(t(scene_mod._gray(images[j], h, w))[None, None], t(scene.views[j].K), scene.views[j].cam_from_world)
               for j in (1, 2, 9)]
    costs = gate_mod.photometric_costs(t(scene_mod._gray(images[0], h, w))[None, None], t(scene.views[0].K),
                                       scene.views[0].cam_from_world, sources,
                                       torch.stack([t(g0), t(g0 * 1.05)])).numpy()
    assert costs.shape == (2, h, w) and np.isfinite(costs).all()
    v = (g0 > 0) & (costs.max(0) < mvs_outside)
    # measured: median cost 0.010 at the true depth, 0.69 at +5 %; the true depth is cheaper on 94 % of the pixels
    assert np.median(costs[0][v]) < 0.15 and np.median(costs[1][v]) > 0.3
    assert np.mean(costs[0][v] < costs[1][v]) > 0.9


def test_photo_check_rejects_a_wrong_depth_the_neighbours_maps_repeat(blob_scene):
    """View 0's "refined" map is 5 % too far in a band and every neighbour's refined map was made to agree with it
    (the band splatted into them): the consistency test alone keeps the band, the photometric check does not."""
    from pipeline.core.poses import invert_pose
    from pipeline.depth.consistency import splat_depth

    _, scene, gts, images = blob_scene
    maps = _gt_maps(scene, gts)
    g0 = gts[0]
    band = np.zeros_like(maps[0].valid)
    band[60:180, 120:220] = True
    wrong0 = np.where(band & maps[0].valid, g0 * 1.05, g0).astype(np.float32)
    maps[0] = replace(maps[0], depth=wrong0)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    only_band = t(np.where(band, wrong0, 0.0))
    for j in range(1, len(maps)):
        dj = maps[j]
        inv = splat_depth(only_band, t(maps[0].K), t(dj.K), t(dj.cam_from_world @ invert_pose(maps[0].cam_from_world)),
                          *dj.depth.shape).numpy()
        maps[j] = replace(dj, depth=np.where((inv > 0) & dj.valid, 1.0 / np.maximum(inv, 1e-9),
                                             dj.depth).astype(np.float32))
    v0 = band & maps[0].valid
    cfg = RefineConfig()
    geometric, _ = keep_more_consistent(scene.views, maps, cfg, torch.device("cpu"))
    photo, stats = keep_more_consistent(scene.views, maps, cfg, torch.device("cpu"), images=images)
    off, _ = keep_more_consistent(scene.views, maps, replace(cfg, keep_if_photo_consistent=False), torch.device("cpu"),
                                  images=images)
    kept = lambda out: float(np.mean(np.isclose(out[0].depth[v0], wrong0[v0], rtol=1e-6)))  # noqa: E731
    # measured: the consistency test keeps 29 % of the band (where the splatted neighbours see it), with the photometric
    # check 0.4 %
    assert kept(geometric) > 0.2 and kept(off) == kept(geometric)
    assert kept(photo) < 0.05
    np.testing.assert_allclose(photo[0].depth[v0 & ~np.isclose(photo[0].depth, wrong0)],
                               g0[v0 & ~np.isclose(photo[0].depth, wrong0)], rtol=1e-6)


def test_cuda_out_of_memory_falls_back_to_the_cpu(blob_scene, tmp_path, monkeypatch, caplog):
    """The stage on a (simulated) GPU that runs out of memory: a warning, then the same refinement on the CPU."""
    import logging

    import pipeline.core.io

    scene_dir, scene, gts, _ = blob_scene
    ws = Workspace.create(scene_dir, tmp_path / "out")
    ctx = StageContext(ws=ws, config=ReconConfig(), name="refine", fingerprint="test", show_progress=False)
    monkeypatch.setattr(pipeline.core.io, "load_sfm_scene", lambda _ws: scene)
    for dm in _initial_maps(scene, gts, "mvs"):
        save_depth_map(ws.depth_view(dm.name), dm)
    ctx.config.refine.steps = 5
    real, devices = refine_mod.refine_depth_maps, []

    def gpu_then_cpu(views, init, points, cfg, device, **kwargs):
        devices.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(views, init, points, cfg, device, **kwargs)

    monkeypatch.setattr(refine_mod, "default_device", lambda _pref: torch.device("cuda"))
    monkeypatch.setattr(refine_mod, "refine_depth_maps", gpu_then_cpu)
    with caplog.at_level(logging.WARNING):
        refine_mod.run(ctx)
    assert devices == ["cuda", "cpu"]
    assert "out of memory" in caplog.text.lower() and "cpu" in caplog.text.lower()
    assert all(ws.refine_view(v.name).exists() for v in scene.views)


def test_max_correction_keeps_the_initial_depth_of_large_moves(blob_scene):
    """With max_correction, a refined depth more than that (relative) away from the initial one is not kept."""
    _, scene, gts, _ = blob_scene
    maps = _gt_maps(scene, gts)
    band = np.zeros_like(maps[0].valid)
    band[60:180, 60:140] = True
    init0 = gts[0].copy()
    init0[band] *= 1.05  # the refined map (GT) corrects it by ~5 %
    maps[0] = replace(maps[0], depth_init=init0.astype(np.float32))
    v0 = maps[0].valid & band
    free, _ = keep_more_consistent(scene.views, maps, RefineConfig(), torch.device("cpu"))
    capped, stats = keep_more_consistent(scene.views, maps, RefineConfig(max_correction=0.01), torch.device("cpu"))
    assert np.mean(np.isclose(free[0].depth[v0], gts[0][v0], rtol=1e-6)) > 0.8
    np.testing.assert_array_equal(capped[0].depth[v0], init0[v0].astype(np.float32))
    assert stats[scene.views[0].name]["refined_fraction"] == 0.0


# ---- memory: offloaded groups, streamed inputs and outputs, scratch files ------------------

@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    """12 views 160x120 of the blob scene with warp-corrupted initial maps: (scene_dir, SfmScene, GT depth, images,
    init)."""
    scene_dir, scene, gts, images = _render_blob(tmp_path_factory.mktemp("refine_small"), n_views=12, width=160,
                                                 height=120)
    return scene_dir, scene, gts, images, _initial_maps(scene, gts, "warp")


def _assert_same_maps(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.name == y.name and x.stats == y.stats
        for key in ("depth", "depth_init", "valid", "confidence", "K", "cam_from_world"):
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key), err_msg=f"{x.name}: {key}")


def _without_seconds(log):
    return {k: v for k, v in log.items() if k != "seconds"}


@pytest.mark.parametrize("max_resident_views", [4, 8])
def test_offloaded_groups_give_the_same_maps(small_scene, tmp_path, caplog, max_resident_views):
    """3 groups of 4 views; max_resident_views 4: all three take turns in one slot, 8: the first stays and
    two take turns. Their tensors go through scratch files as raw bytes, so the result is bit-identical."""
    _, scene, _, images, init = small_scene
    cfg = RefineConfig(steps=20, views_per_batch=4)
    resident, log_resident = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=images)
    with caplog.at_level(logging.INFO, logger="pipeline.refine.stage"):
        offloaded, log_offloaded = refine_depth_maps(scene.views, init, scene.points,
                                                     replace(cfg, max_resident_views=max_resident_views), "cpu",
                                                     images=images, scratch_dir=tmp_path)
    assert "wait in scratch files" in caplog.text and "group turns read from scratch files" in caplog.text
    _assert_same_maps(offloaded, resident)
    assert _without_seconds(log_offloaded) == _without_seconds(log_resident)
    assert list(tmp_path.iterdir()) == []  # the call's scratch folder is gone


def test_offloaded_groups_with_several_steps_per_visit(small_scene):
    """Offloading with steps_per_visit=3 (each group refined 3 steps in a row, 3 groups through one slot):
    deterministic, finite, and as good as the round robin on the warp corruption. Measured mean relative
    error 1.336 % → 0.643 % (round robin, all resident: 0.640 %); asserted: at least −40 % and within 5 %
    of the round robin."""
    _, scene, gts, images, init = small_scene
    cfg = RefineConfig(steps=150, views_per_batch=4)
    baseline, _ = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=images)
    visits = replace(cfg, max_resident_views=4, steps_per_visit=3)
    a, log_a = refine_depth_maps(scene.views, init, scene.points, visits, "cpu", images=images)
    b, log_b = refine_depth_maps(scene.views, init, scene.points, visits, "cpu", images=images)
    _assert_same_maps(a, b)
    assert _without_seconds(log_a) == _without_seconds(log_b)
    assert all(np.isfinite(m.depth).all() for m in a) and log_a["skipped_steps"] == 0
    before, after, after_baseline = _mean_error(init, gts), _mean_error(a, gts), _mean_error(baseline, gts)
    assert after < 0.6 * before, f"mean relative depth error {before:.5f} → {after:.5f}"
    assert after < 1.05 * after_baseline, f"steps_per_visit=3: {after:.5f}, round robin {after_baseline:.5f}"
    assert any(not np.array_equal(x.depth, y.depth) for x, y in zip(a, baseline))  # a different schedule


def test_lazy_inputs_and_sink(small_scene):
    """Lazily loaded inputs and a sink give the maps of the plain call; each view's map is emitted once."""
    from pipeline.core.io import LazySequence

    _, scene, _, images, init = small_scene
    cfg = RefineConfig(steps=10, views_per_batch=4)
    plain, log_plain = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=images)
    loads = {"init": 0, "image": 0}

    def load(kind, items):
        def get(i):
            loads[kind] += 1
            return items[i]
        return get

    got = {}
    out, log = refine_depth_maps(scene.views, LazySequence(len(init), load("init", init)), scene.points, cfg, "cpu",
                                 images=LazySequence(len(images), load("image", images)), sink=got.__setitem__)
    assert out == [] and sorted(got) == list(range(len(init)))
    _assert_same_maps([got[i] for i in range(len(init))], plain)
    assert _without_seconds(log) == _without_seconds(log_plain)
    # each image once for the groups (built once when all are resident), once for L_photo's image table, once for the
    # gate
    assert loads["image"] == 3 * len(images)
    assert loads["init"] <= 4 * len(init)  # sizes, current maps, group tensors, final maps


def _stage(scene_dir, scene, init, tmp_path, monkeypatch, **settings):
    import pipeline.core.io

    ws = Workspace.create(scene_dir, tmp_path / "out")
    ctx = StageContext(ws=ws, config=ReconConfig(), name="refine", fingerprint="test", show_progress=False)
    monkeypatch.setattr(pipeline.core.io, "load_sfm_scene", lambda _ws: scene)
    for dm in init:
        save_depth_map(ws.depth_view(dm.name), dm)
    for key, value in settings.items():
        setattr(ctx.config.refine, key, value)
    return ws, ctx


def test_stage_writes_the_maps_of_the_in_memory_call(small_scene, tmp_path, monkeypatch):
    """The streaming stage (lazy inputs, maps written one by one) writes exactly what refine_depth_maps returns
    for the same inputs read from the files, and leaves no scratch or temporary file behind."""
    import json

    from pipeline.core.io import load_rgb

    scene_dir, scene, _, _, init = small_scene
    ws, ctx = _stage(scene_dir, scene, init, tmp_path, monkeypatch, steps=15, views_per_batch=4)
    refine_mod.run(ctx)
    loaded = [load_depth_map(ws.depth_view(v.name)) for v in scene.views]
    images = [load_rgb(v.image_path, max_size=max(dm.depth.shape)) for v, dm in zip(scene.views, loaded)]
    expected, log = refine_depth_maps(scene.views, loaded, scene.points, ctx.config.refine, "cpu", images=images)
    _assert_same_maps([load_depth_map(ws.refine_view(v.name)) for v in scene.views], expected)
    assert _without_seconds(json.loads(ws.refine_log.read_text())) == json.loads(json.dumps(_without_seconds(log)))
    assert not ws.refine_scratch.exists()
    assert [p for p in ws.stage_dir("refine").rglob(".*")] == []


def test_scratch_files_are_removed_after_the_stage_and_after_a_failure(small_scene, tmp_path, monkeypatch):
    """Offloading stage: scratch files exist while it runs and are gone after it; a failure after the
    optimization (in the consistency gate) leaves neither scratch files nor any refined map."""
    scene_dir, scene, _, _, init = small_scene
    ws, ctx = _stage(scene_dir, scene, init, tmp_path, monkeypatch, steps=6, views_per_batch=4, max_resident_views=4)
    seen = []
    real_gate = refine_mod._gate

    def gate(*args, **kwargs):
        seen.append(sorted(p.name for p in ws.refine_scratch.rglob("*") if p.is_file()))
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(refine_mod, "_gate", gate)
    refine_mod.run(ctx)
    assert any(name.endswith(".state") for name in seen[0]) and any(name.startswith("ungated") for name in seen[0])
    assert not ws.refine_scratch.exists() and all(ws.refine_view(v.name).exists() for v in scene.views)

    ws, ctx = _stage(scene_dir, scene, init, tmp_path / "failing", monkeypatch, steps=6, views_per_batch=4,
                     max_resident_views=4)

    def failing_gate(views, load, cfg, device, emit, images=None):
        emit(0, load(0))  # one map final, then a failure
        raise RuntimeError("simulated failure in the gate")

    monkeypatch.setattr(refine_mod, "_gate", failing_gate)
    with pytest.raises(RuntimeError, match="simulated"):
        refine_mod.run(ctx)
    assert not ws.refine_scratch.exists()
    assert not any(ws.refine_view(v.name).exists() for v in scene.views) and not ws.refine_log.exists()


def test_sample_views_decode_reads_compact_maps(device):
    """The (depth, weight with −1 = invalid) storage of the neighbour maps reads as the 3-channel maps did."""
    torch.manual_seed(0)
    depth, conf = torch.rand(3, 9, 11, device=device), torch.rand(3, 9, 11, device=device)
    valid = torch.rand(3, 9, 11, device=device) > 0.3
    full = torch.stack([depth * valid, valid.float(), conf * valid], -1)
    compact = torch.stack([depth * valid, torch.where(valid, conf, torch.full_like(conf, -1.0))], -1)
    view = torch.randint(0, 3, (2, 200), device=device)
    uv = torch.rand(2, 200, 2, device=device) * torch.tensor([13.0, 11.0], device=device) - 1.0
    assert torch.equal(sample_views(compact, view, uv, scene_mod._decode_current), sample_views(full, view, uv))


def test_gate_restores_what_a_neighbour_confirms_and_drops_a_floater_others_see_through(blob_scene):
    """View 0 holds two restored candidates (pixels the depth stage dropped): a true-surface patch the neighbours'
    maps confirm is kept; a patch at 60 % of the true depth, through which the neighbours see the surface behind, is
    not."""
    _, scene, gts, images = blob_scene
    maps = _gt_maps(scene, gts)
    g0 = gts[0]
    true_patch, floater = np.zeros_like(maps[0].valid), np.zeros_like(maps[0].valid)
    true_patch[80:140, 60:120], floater[80:140, 200:260] = True, True
    true_patch &= maps[0].valid
    floater &= maps[0].valid
    depth = np.where(floater, 0.6 * g0, g0).astype(np.float32)
    maps[0] = replace(maps[0], depth=depth, depth_init=depth, restored=true_patch | floater)
    out, stats = keep_more_consistent(scene.views, maps, RefineConfig(), torch.device("cpu"), images=images)
    v0 = out[0].valid
    # measured: see the numbers in the assertion message
    assert v0[true_patch].mean() > 0.8 and out[0].restored[true_patch].mean() > 0.8
    assert v0[floater].mean() < 0.05, v0[floater].mean()
    assert (v0 | ~maps[0].valid | true_patch | floater).all()  # the checked pixels all stay
    assert stats[scene.views[0].name]["restored_fraction"] > 0


def test_gate_keeps_only_supported_pixels_of_an_unchecked_prior(blob_scene):
    """A map the depth stage did not check (a prior): pixels no neighbour agrees with and whose photos do not match
    go."""
    _, scene, gts, images = blob_scene
    maps = _gt_maps(scene, gts)
    wrong = np.zeros_like(maps[0].valid)
    wrong[60:180, 100:200] = True
    wrong &= maps[0].valid
    d = np.where(wrong, gts[0] * 1.1, gts[0]).astype(np.float32)
    maps = [replace(m, stats={}) for m in maps]
    exact, _ = keep_more_consistent(scene.views, maps, RefineConfig(), torch.device("cpu"), images=images)
    maps[0] = replace(maps[0], depth=d, depth_init=d)
    out, _ = keep_more_consistent(scene.views, maps, RefineConfig(), torch.device("cpu"), images=images)
    assert out[0].valid[wrong].mean() < 0.1
    # Elsewhere the pixels a neighbour sees are kept, as they are for the unmodified GT prior (floor seen by view 0
    # alone goes).
    right = maps[0].valid & ~wrong
    assert exact[0].valid[right].mean() > 0.5
    assert out[0].valid[right].mean() > exact[0].valid[right].mean() - 0.02


def test_evidence_stats_compare_the_initial_pixels_with_the_kept_ones():
    init_valid = np.array([[True, True, True, False]])
    keep = np.array([[True, True, False, True]])
    take = np.array([[False, True, False, True]])  # pixel 1 refined, pixel 3 restored
    count_init, count_ref = np.array([[1, 0, 0, 0]]), np.array([[0, 2, 0, 1]])
    photo_init, photo_ref = np.array([[0.2, 0.6, 0.4, 2.0]]), np.array([[0.9, 0.1, 0.4, 0.3]])
    s = evidence_stats(init_valid, keep, take, count_init, count_ref, photo_init, photo_ref)
    assert s["consistent_init"] == pytest.approx(1 / 3) and s["consistent_refined"] == pytest.approx(1.0)
    assert s["photo_cost_init"] == pytest.approx(0.4) and s["photo_cost_refined"] == pytest.approx(0.2)
    assert np.isnan(evidence_stats(init_valid, keep, take, count_init, count_ref, None, None)["photo_cost_refined"])


def test_fused_adam_step_equals_the_tensor_op_update_and_skips_non_finite_steps():
    """torch's fused Adam kernel (used where available) and the tensor-op update: same grids, moments and step
    counts over steps with a changing learning rate, a non-finite step skipped by both."""
    import types

    from pipeline.refine.optimizer import _adam_step, _fused_adam

    def state():
        g = torch.Generator().manual_seed(0)
        shapes = [(2, 1, 36, 48), (2, 1, 18, 24), (2, 1, 9, 12)]
        return types.SimpleNamespace(grids=[torch.randn(s, generator=g) for s in shapes],
                                     exp_avg=[torch.zeros(s) for s in shapes],
                                     exp_avg_sq=[torch.zeros(s) for s in shapes], adam_steps=torch.zeros(()))

    fused, plain = state(), state()
    if not _fused_adam(state(), [torch.zeros_like(x) for x in fused.grids], torch.tensor(True), torch.tensor(0.0),
                       0.9, 0.999, 1e-8):
        pytest.skip("this torch has no fused Adam kernel for the CPU")
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        grads = [torch.randn(x.shape, generator=g) for x in fused.grids]
        if step % 7 == 3:
            grads[1][0, 0, 0, 0] = float("nan")
        finite = torch.stack([torch.isfinite(x).all() for x in grads]).all()
        lr = torch.tensor(0.01 * (1 - step / 40))
        before = [x.clone() for x in fused.grids]
        _adam_step(fused, grads, finite, lr, fused=True)
        _adam_step(plain, grads, finite, lr, fused=False)
        if not finite:
            assert all(torch.equal(a, b) for a, b in zip(before, fused.grids))
    assert float(fused.adam_steps) == float(plain.adam_steps) == 26
    for name in ("grids", "exp_avg", "exp_avg_sq"):
        for a, b in zip(getattr(fused, name), getattr(plain, name)):
            assert torch.allclose(a, b, atol=1e-5)


def test_the_gate_widens_its_pixel_tolerance_and_window_on_maps_the_depth_stage_scaled(blob_scene, monkeypatch):
    """Maps marked ``pixel_scale`` 2 (twice ``depth.reference_side``): reprojection tolerance x 2, NCC window 11."""
    from pipeline.depth import consistency as consistency_mod

    _, scene, gts, images = blob_scene
    seen: dict[str, set] = {"reproj": set(), "window": set()}
    real_consistency, real_costs = consistency_mod.geometric_consistency, gate_mod.photometric_costs

    def spy_consistency(depth, K, others, max_reproj_px, *args):
        seen["reproj"].add(max_reproj_px)
        return real_consistency(depth, K, others, max_reproj_px, *args)

    def spy_costs(*args):
        seen["window"].add(args[-1])
        return real_costs(*args)

    monkeypatch.setattr(consistency_mod, "geometric_consistency", spy_consistency)
    monkeypatch.setattr(gate_mod, "photometric_costs", spy_costs)
    cfg = RefineConfig()
    keep_more_consistent(scene.views, _gt_maps(scene, gts), cfg, torch.device("cpu"), images=images)
    assert seen == {"reproj": {cfg.accept_reproj_px}, "window": {5}}
    seen["reproj"].clear(), seen["window"].clear()
    scaled = [replace(m, stats={**m.stats, "pixel_scale": 2.0}) for m in _gt_maps(scene, gts)]
    keep_more_consistent(scene.views, scaled, cfg, torch.device("cpu"), images=images)
    assert seen == {"reproj": {2 * cfg.accept_reproj_px}, "window": {11}}


def test_l_photo_blur_and_window_follow_the_maps_the_depth_stage_scaled(blob_scene):
    _, scene, gts, images = blob_scene
    cfg = RefineConfig()
    maps = _gt_maps(scene, gts)
    tables, _ = scene_mod._scene_tables(scene.views, maps, scene.points, cfg, torch.device("cpu"))
    plain = scene_mod.photo_inputs(images, tables, cfg, torch.device("cpu"))
    taps = losses.window_offsets(cfg.photo_radius, checkerboard=cfg.photo_checkerboard)
    assert tables.pixel_scale == 1.0 and torch.equal(plain.offsets, taps)
    maps[3] = replace(maps[3], stats={**maps[3].stats, "pixel_scale": 2.0})
    tables, _ = scene_mod._scene_tables(scene.views, maps, scene.points, cfg, torch.device("cpu"))
    wide = scene_mod.photo_inputs(images, tables, cfg, torch.device("cpu"))
    assert tables.pixel_scale == 2.0
    assert torch.equal(wide.offsets, 2 * plain.offsets)  # same taps, twice as far apart
    assert torch.equal(wide.images[0], plain.images[0])  # the sharp images do not change
    # the blurred ones are blurred more: less contrast left
    assert wide.images[1].float().std() < plain.images[1].float().std()

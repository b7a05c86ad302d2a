"""depth stage: initial per-view depth maps, anchored to the sparse points.

Estimators (``depth.estimator``), all behind :class:`~pipeline.depth.estimators.Estimator`:

* ``mvs`` (default, no weights): coarse-to-fine plane-sweep stereo in torch
  (:mod:`pipeline.depth.coarse_to_fine`) against ``mvs.num_neighbors`` neighbour views chosen from
  SfM co-visibility and triangulation angle, over a depth range taken from
  the sparse points the view sees. Its maps are metric in the normalized
  frame already; the sparse-point scale is measured and recorded, and applied
  only when it is off by more than ``mvs.rescale_tolerance`` (a per-view
  rescale of a correct map would only add noise and break multi-view
  consistency; a large deviation means a broken pose and is warned about).
* ``prior``: user files ``SCENE_DIR/depth_prior/<stem>.npy`` (float) or
  ``.png`` (16-bit), depth or inverse depth (``prior_kind``), optionally
  affine-invariant (``prior_affine``); always aligned to the sparse points.
* ``torchscript``: a TorchScript model (``torchscript_path``) mapping
  ``(1, 3, H, W)`` RGB in [0, 1] to ``(1, 1, H, W)`` / ``(1, H, W)`` / ``(H, W)``
  depth or inverse depth (``prior_kind``, ``prior_affine``); aligned like a prior.

A view that cannot be estimated or anchored (no neighbours, a missing or
malformed prior, too few sparse points) is warned about by name and left out;
if every view fails the stage raises :class:`~pipeline.core.errors.ReconError`.

Output, per view (:class:`pipeline.core.io.DepthMap`, ``OUT/depth/views/<stem>.npz``):
depth (normalized frame, 0 where invalid), confidence, valid mask, ``K`` at the
working resolution, ``cam_from_world`` and stats (anchoring, range, timings).

Two passes when the geometric-consistency filter is on (``mvs`` only): pass 1
writes every raw map to ``OUT/depth/raw/<stem>.npz``; pass 2, which needs all
of them, checks each pixel against its neighbours' raw maps and writes the
filtered map to ``OUT/depth/views``. Each pass skips views whose file exists,
and only the files in ``views/`` are read downstream, so an interrupted run
resumes without ever mixing filtered and unfiltered maps under one name.

The estimators are in :mod:`pipeline.depth.estimators`, what they need per view (working size,
neighbours, depth range, scene planes) in :mod:`pipeline.depth.views`, the cross-view passes' maths in
:mod:`pipeline.depth.consistency`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.geometry import default_device
from pipeline.core.io import DepthMap, SfmScene, View, load_depth_map, load_sfm_scene, save_depth_map
from pipeline.core.poses import invert_pose
from pipeline.core.workers import cpu_workers, map_in_threads
from pipeline.core.workspace import Workspace
from pipeline.depth import anchoring, consistency
from pipeline.depth.config import DepthConfig, DepthEstimator, MvsConfig, PriorKind  # noqa: F401 - re-exported
from pipeline.depth.estimators import _LRU, Estimate, MvsEstimator, make_estimator
from pipeline.depth.views import (
    ViewFailure,
    resolution_scale,
    resolve_max_image_side,
    sparse_in_view,
    stereo_neighbors,
)

logger = logging.getLogger(__name__)


# ---- paths ---------------------------------------------------------------------------------------

def raw_depth_path(ws: Workspace, image_name: str) -> Path:
    """Pass-1 (unfiltered) map of a view: ``OUT/depth/raw/<key>.npz``."""
    final = ws.depth_view(image_name)
    return final.parent.parent / "raw" / final.name


def adopted_depth_path(ws: Workspace, image_name: str) -> Path:
    """Map of a view after cross-view candidates (pass 1b), before the filter: ``OUT/depth/adopted/<key>.npz``."""
    final = ws.depth_view(image_name)
    return final.parent.parent / "adopted" / final.name


# ---- anchoring --------------------------------------------------------------------------------------

def anchor_estimate(est: Estimate, scene: SfmScene, view: View, cfg: DepthConfig, mvs_cfg: MvsConfig,
                    log: logging.Logger) -> tuple[np.ndarray, np.ndarray, dict]:
    """Align a raw map to the sparse points of its view: (depth (H, W) float32, valid (H, W), stats).

    mvs maps (metric already) are rescaled only when the fitted scale is off by
    more than ``mvs.rescale_tolerance``; prior/torchscript maps are always aligned.

    Raises:
        ViewFailure: a prior/torchscript map that cannot be anchored.
    """
    h, w = est.values.shape
    uv, z = sparse_in_view(scene, view, est.K, (w, h))
    is_mvs = cfg.estimator == DepthEstimator.mvs
    try:
        res = anchoring.anchor(est.values, est.valid, uv, z, domain=est.domain, affine=est.affine,
                               min_points=cfg.min_anchor_points)
    except anchoring.AnchorError as exc:
        if is_mvs:
            log.warning("%s: depth map not checked against the sparse points (%s); kept unscaled", view.name, exc)
            depth = np.where(est.valid, est.values, 0).astype(np.float32)
            return depth, est.valid.copy(), {"applied": False, "error": str(exc)}
        source = est.stats.get("source", view.name)
        raise ViewFailure(f"{source}: cannot anchor the map of {view.name} to the sparse points: {exc}") from exc
    stats = res.as_dict()
    if is_mvs:
        apply = abs(res.scale - 1.0) > mvs_cfg.rescale_tolerance
        if apply:
            log.warning("%s: mvs depth is off the sparse points by scale %.3f (median error %.1f %%); "
                        "rescaled — check the SfM poses",
                        view.name, res.scale, 100 * res.residual_before)
        else:
            stats["residual_after"] = stats["residual_before"]
        stats["applied"] = apply
        if not apply:
            depth = np.where(est.valid, est.values, 0).astype(np.float32)
            return depth, est.valid.copy(), stats
    else:
        stats["applied"] = True
    depth, valid = anchoring.apply_anchor(est.values, est.valid, res)
    return depth, valid, stats


# ---- the two passes ---------------------------------------------------------------------------------

BarFactory = Callable[..., tqdm]


def _no_bar(**kwargs: Any) -> tqdm:
    return tqdm(disable=True, **kwargs)


@dataclass
class DepthRunResult:
    """What :func:`compute_depth_maps` did (for the run summary)."""

    written: list[str]
    """Views with a final map (written now or already there)."""
    failed: dict[str, str]
    """View name → why it was left out."""
    seconds: list[float]
    """Wall seconds of each view estimated in this run (pass 1; views run side by side with several workers)."""
    cpu_seconds: list[float]
    estimate_seconds: float = 0.0
    """Wall seconds of pass 1 in this run, all views."""
    filter_seconds: float = 0.0
    candidates_seconds: float = 0.0
    valid_fraction: list[float] = field(default_factory=list)
    pixel_scale: float = 1.0
    """Largest factor the pixel-sized settings were scaled by for a map (``depth.reference_side``)."""

    def summary(self) -> dict[str, Any]:
        return {
            "views": len(self.written),
            "failed": len(self.failed),
            "mean_valid_fraction": round(float(np.mean(self.valid_fraction)), 4) if self.valid_fraction else None,
            # pass-1 wall time per view (with parallel workers, less than each view's own seconds)
            "seconds_per_view": (round(self.estimate_seconds / len(self.seconds), 3) if self.estimate_seconds > 0
                                 else round(float(np.mean(self.seconds)), 3) if self.seconds else None),
            "cpu_seconds_per_view": round(float(np.mean(self.cpu_seconds)), 3) if self.cpu_seconds else None,
            "filter_seconds": round(self.filter_seconds, 3),
            "candidates_seconds": round(self.candidates_seconds, 3),
            "pixel_scale": round(self.pixel_scale, 3),
        }


def with_working_side(cfg: DepthConfig, device: torch.device) -> DepthConfig:
    """``cfg`` with an automatic ``max_image_side`` resolved for ``device`` (:func:`resolve_max_image_side`)."""
    return dataclasses.replace(cfg, max_image_side=resolve_max_image_side(cfg.max_image_side, str(device)))


def uses_two_passes(cfg: DepthConfig, mvs_cfg: MvsConfig) -> bool:
    """True when pass 1 writes raw maps that later passes (cross-view candidates, geometric filter) turn into the final
    ones."""
    return cfg.estimator == DepthEstimator.mvs and (mvs_cfg.geometric_filter or mvs_cfg.cross_view_candidates)


def filter_input_path(ws: Workspace, mvs_cfg: MvsConfig, image_name: str) -> Path:
    """The map the geometric filter reads: after cross-view candidates when those run, else the raw map."""
    return adopted_depth_path(ws, image_name) if mvs_cfg.cross_view_candidates else raw_depth_path(ws, image_name)


def first_pass_path(ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig, image_name: str) -> Path:
    """Where pass 1 writes the map of ``image_name`` (raw map when a filter pass follows, else the final map)."""
    return raw_depth_path(ws, image_name) if uses_two_passes(cfg, mvs_cfg) else ws.depth_view(image_name)


def estimate_views(scene: SfmScene, ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig,
                   indices: list[int] | None = None, *, bar: BarFactory = _no_bar,
                   log: logging.Logger = logger) -> DepthRunResult:
    """Pass 1 for the views ``indices`` of ``scene`` (all when None): estimate and anchor, one file per view.

    Views whose pass-1 file exists are skipped, so this is resumable and can be
    split over workers (e.g. Ray tasks) sharing the workspace: every view's file
    depends only on the scene, the inputs and the settings, never on which worker made it.
    Only ``seconds``/``cpu_seconds``/``failed`` of the result are filled.
    """
    device = default_device(cfg.device)
    cfg = with_working_side(cfg, device)
    wanted = range(len(scene.views)) if indices is None else indices
    result = DepthRunResult(written=[], failed={}, seconds=[], cpu_seconds=[])
    todo = [i for i in wanted if not first_pass_path(ws, cfg, mvs_cfg, scene.views[i].name).exists()]
    estimator = make_estimator(scene, ws, cfg, mvs_cfg, device) if todo else None
    workers = cpu_workers(cfg.cpu_workers, device) if cfg.estimator == DepthEstimator.mvs else 1

    def one(i: int) -> tuple[np.ndarray, dict[str, Any]] | str:
        """Estimate, anchor and write view ``i``: (valid mask, anchoring stats), or why it failed."""
        view = scene.views[i]
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            assert estimator is not None
            est = estimator.estimate(i)
            depth, valid, anchor_stats = anchor_estimate(est, scene, view, cfg, mvs_cfg, log)
        except ViewFailure as exc:
            return str(exc)
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
        stats = {
            "estimator": cfg.estimator.value,
            "anchoring": anchor_stats,
            "valid_fraction": float(valid.mean()),
            "seconds": seconds,
            "cpu_seconds": cpu,
            "workers": workers,
            "pixel_scale": resolution_scale(depth.shape[::-1], cfg.reference_side),
            **est.stats,
        }
        confidence = np.where(valid, est.confidence, 0.0).astype(np.float32)
        save_depth_map(first_pass_path(ws, cfg, mvs_cfg, view.name),
                       DepthMap(name=view.name, depth=depth, confidence=confidence, valid=valid,
                                K=est.K, cam_from_world=view.cam_from_world, stats=stats))
        return valid, stats

    started = time.perf_counter()
    with bar(desc="depth maps", total=len(wanted), unit="view") as pbar:
        pbar.update(len(wanted) - len(todo))
        for i, outcome in map_in_threads(one, todo, workers):
            if isinstance(outcome, str):
                log.warning("depth: %s; view left out", outcome)
                result.failed[scene.views[i].name] = outcome
                pbar.update(1)
                continue
            valid, stats = outcome
            result.seconds.append(stats["seconds"])
            result.cpu_seconds.append(stats["cpu_seconds"])
            pbar.set_postfix(valid=f"{valid.mean():.2f}", scale=f"{stats['anchoring'].get('scale', 1.0):.3f}")
            pbar.update(1)
    if result.seconds:
        result.estimate_seconds = time.perf_counter() - started
    return result


def compute_depth_maps(scene: SfmScene, ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig, *,
                       bar: BarFactory = _no_bar, log: logging.Logger = logger) -> DepthRunResult:
    """Estimate, anchor (and filter) a depth map per view of ``scene``; writes ``ws.depth_view`` files.

    Views whose file exists are skipped (per pass). Raises ReconError when no view gets a map.
    """
    if not scene.views:
        raise ReconError("the SfM model has no registered views; nothing to estimate depth for")
    device = default_device(cfg.device)
    cfg = with_working_side(cfg, device)
    two_pass = uses_two_passes(cfg, mvs_cfg)
    result = estimate_views(scene, ws, cfg, mvs_cfg, bar=bar, log=log)

    if two_pass and mvs_cfg.cross_view_candidates:
        t0 = time.perf_counter()
        adopted_path = (lambda name: adopted_depth_path(ws, name)) if mvs_cfg.geometric_filter else ws.depth_view
        _cross_view_pass(scene, ws, cfg, mvs_cfg, device, bar, adopted_path)
        result.candidates_seconds = time.perf_counter() - t0
    if two_pass and mvs_cfg.geometric_filter:
        t0 = time.perf_counter()
        _geometric_filter_pass(scene, ws, cfg, mvs_cfg, device, bar, result)
        result.filter_seconds = time.perf_counter() - t0

    estimated_now = bool(result.seconds)
    for v in scene.views:
        path = ws.depth_view(v.name)
        if path.exists():
            result.written.append(v.name)
            result.failed.pop(v.name, None)
            stats = load_depth_map(path).stats
            result.valid_fraction.append(float(stats.get("valid_fraction", 0.0)))
            result.pixel_scale = max(result.pixel_scale, float(stats.get("pixel_scale", 1.0)))
            if not estimated_now and "seconds" in stats:  # estimated earlier or by other workers: report their timing
                result.seconds.append(float(stats["seconds"]))
                result.cpu_seconds.append(float(stats.get("cpu_seconds", stats["seconds"])))
    if not result.written:
        reasons = "; ".join(list(result.failed.values())[:3])
        raise ReconError(f"no view got a depth map ({len(result.failed)} failed: {reasons}); "
                         "fix the inputs or choose another depth.estimator")
    return result


def _cross_view_pass(scene: SfmScene, ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig, device: torch.device,
                     bar: BarFactory, out_path: Callable[[str], Path]) -> None:
    """Pass 1b: raw maps → maps that also tried the neighbours' surfaces
    (:func:`pipeline.depth.consistency.adopt_candidates`).

    Candidates come from the ``geo_neighbors`` views' raw maps splatted into
    the view; the matching cost uses the view's usual matching neighbours.
    Confidence becomes min(raw confidence, NCC of the kept depth), so an
    adopted surface is kept by the filter only when a neighbour agrees with it.
    """
    names = [v.name for v in scene.views]
    have_raw = [raw_depth_path(ws, n).exists() for n in names]
    todo = [i for i, n in enumerate(names) if have_raw[i] and not out_path(n).exists()]
    if not todo:
        return
    estimator = MvsEstimator(scene, cfg, mvs_cfg, device)
    geo_neighbors = stereo_neighbors(scene, mvs_cfg.geo_neighbors, mvs_cfg.neighbor_angle_deg,
                                     mvs_cfg.max_neighbor_angle_deg)
    maps = _LRU(cfg.cache_images, lambda i: load_depth_map(raw_depth_path(ws, names[i])))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    def one(i: int) -> float:
        """Adopt view ``i``'s candidates and write it; the share of its pixels that adopted one."""
        dm = maps.get(i)
        h, w = dm.depth.shape
        with torch.no_grad():
            candidates = []
            for j in geo_neighbors[i]:
                if have_raw[j]:
                    dj = maps.get(j)
                    candidates.append(consistency.splat_depth(
                        t(dj.depth), t(dj.K), t(dm.K), t(dm.cam_from_world @ invert_pose(dj.cam_from_world)), h, w))
            src_images, K_srcs, poses = estimator.sources(i)
            depth, ncc, adopted = consistency.adopt_candidates(estimator.images.get(i), t(dm.K), src_images, K_srcs,
                                                               poses, t(dm.depth), candidates,
                                                               estimator.settings_for(i))
        valid = (depth > 0).cpu().numpy()
        confidence = np.where(valid, np.minimum(dm.confidence, ncc.clamp(0.0, 1.0).cpu().numpy()),
                              0.0).astype(np.float32)
        stats = dict(dm.stats)
        stats["pass1_valid_fraction"] = stats.get("valid_fraction", 0.0)
        stats["valid_fraction"] = float(valid.mean())
        stats["cross_view"] = {"candidate_views": len(candidates), "adopted_fraction": float(adopted.float().mean())}
        save_depth_map(out_path(dm.name), DepthMap(name=dm.name, depth=depth.cpu().numpy(), confidence=confidence,
                                                   valid=valid, K=dm.K, cam_from_world=dm.cam_from_world,
                                                   stats=stats))
        return stats["cross_view"]["adopted_fraction"]

    with bar(desc="cross-view candidates", total=len(todo), unit="view") as pbar:
        for _, adopted_fraction in map_in_threads(one, todo, cpu_workers(cfg.cpu_workers, device)):
            pbar.set_postfix(adopted=f"{adopted_fraction:.2f}")
            pbar.update(1)


def _geometric_filter_pass(scene: SfmScene, ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig, device: torch.device,
                           bar: BarFactory, result: DepthRunResult) -> None:
    """Pass 2: raw maps → filtered maps (``ws.depth_view``), skipping views already filtered."""
    names = [v.name for v in scene.views]
    have_raw = [filter_input_path(ws, mvs_cfg, n).exists() for n in names]
    geo_neighbors = stereo_neighbors(scene, mvs_cfg.geo_neighbors, mvs_cfg.neighbor_angle_deg,
                                     mvs_cfg.max_neighbor_angle_deg)
    todo = [i for i, n in enumerate(names) if have_raw[i] and not ws.depth_view(n).exists()]
    if not todo:
        return
    maps = _LRU(cfg.cache_images, lambda i: load_depth_map(filter_input_path(ws, mvs_cfg, names[i])))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    def one(i: int) -> float:
        """Filter view ``i`` against its neighbours and write it; the share of its pixels kept."""
        dm = maps.get(i)
        nbrs = [j for j in geo_neighbors[i] if have_raw[j]]
        neighbours = []
        for j in nbrs:
            dj = maps.get(j)
            neighbours.append((t(dj.depth), t(dj.K), t(dj.cam_from_world @ invert_pose(dm.cam_from_world))))
        with torch.no_grad():
            max_reproj_px = mvs_cfg.geo_max_reproj_px * resolution_scale(dm.depth.shape[::-1], cfg.reference_side)
            cons = consistency.geometric_consistency(t(dm.depth), t(dm.K), neighbours, max_reproj_px,
                                                     mvs_cfg.geo_max_rel_depth, mvs_cfg.geo_free_space_margin)
        agreed = (cons.count >= mvs_cfg.geo_min_consistent).cpu().numpy()
        unverified = (((cons.count == 0) & (cons.violations == 0)).cpu().numpy()
                      & (dm.confidence >= mvs_cfg.geo_unverified_min_confidence))
        keep = (agreed | unverified) & dm.valid
        depth = (cons.mean_depth.cpu().numpy() if mvs_cfg.geo_average else dm.depth)
        depth = np.where(keep, depth, 0.0).astype(np.float32)
        stats = dict(dm.stats)
        stats["raw_valid_fraction"] = stats.get("valid_fraction", 0.0)
        stats["valid_fraction"] = float(keep.mean())
        stats["geometric_filter"] = {"neighbors_checked": len(neighbours),
                                     "kept_of_valid": float(keep.sum() / max(1, dm.valid.sum())),
                                     "unverified_of_kept": float((unverified & keep).sum() / max(1, keep.sum()))}
        save_depth_map(ws.depth_view(dm.name), DepthMap(name=dm.name, depth=depth,
                                                        confidence=np.where(keep, dm.confidence, 0.0), valid=keep,
                                                        K=dm.K, cam_from_world=dm.cam_from_world, stats=stats))
        return float(keep.mean())

    with bar(desc="consistency filter", total=len(todo), unit="view") as pbar:
        for _, kept in map_in_threads(one, todo, cpu_workers(cfg.cpu_workers, device)):
            pbar.set_postfix(kept=f"{kept:.2f}")
            pbar.update(1)


def run(ctx: StageContext) -> None:
    """Initial depth of every registered view (see the module docstring)."""
    cfg: DepthConfig = ctx.settings
    scene = load_sfm_scene(ctx.ws)
    res = compute_depth_maps(scene, ctx.ws, cfg, ctx.config.mvs, bar=ctx.bar, log=ctx.logger)
    ctx.summary.update(res.summary())
    ctx.summary["estimator"] = cfg.estimator.value
    ctx.summary["max_image_side"] = resolve_max_image_side(cfg.max_image_side, str(default_device(cfg.device)))
    if res.failed:
        ctx.summary["left_out"] = sorted(res.failed)
    side = ctx.summary["max_image_side"]
    ctx.logger.info("depth maps of %d view(s) (%d left out) at %s, mean valid fraction %s, %s s per view",
                    len(res.written), len(res.failed), f"up to {side} px" if side else "full resolution",
                    ctx.summary["mean_valid_fraction"], ctx.summary["seconds_per_view"])
    if res.pixel_scale > 1.0 and cfg.estimator == DepthEstimator.mvs:
        ctx.logger.info("depth: windows, propagation shifts and pyramid scaled by up to %.2f for maps larger than "
                        "depth.reference_side=%d px", res.pixel_scale, cfg.reference_side)

"""The refine stage's acceptance gate: which refined depths to keep, by the evidence of the neighbours.

Per pixel, the refined depth is kept where more neighbour maps agree with it
than with the initial depth (:func:`agreement_counts`; geometric consistency
of :mod:`pipeline.depth.plane_sweep`) and, with photos, it matches the
neighbour images no worse (:func:`photometric_costs`); pixels the depth stage
dropped (restored candidates) and pixels of unchecked priors are kept only
where :func:`supported`. :func:`gate_choice` is that rule, :func:`_gate` runs
it one view at a time, :func:`keep_more_consistent` on in-memory maps;
:func:`change_stats` and :func:`evidence_stats` are the per-view statistics
of ``refine/log.json``, the report and ``recon diagnose``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.core.io import DepthMap, View
from pipeline.core.workers import cpu_workers, map_in_threads
from pipeline.refine.config import RefineConfig
from pipeline.refine.scene import _gray, covisible_neighbors


def value_stats(values: np.ndarray) -> dict[str, float]:
    """mean/std/min/max of an array (zeros when empty)."""
    if values.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    v = values.astype(np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def agreement_counts(depths: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                     Ks: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                     cam_from_world: Mapping[int, np.ndarray] | Sequence[np.ndarray], index: int,
                     neighbors: Sequence[int], *, reproj_px: float, rel_depth: float) -> np.ndarray:
    """Per pixel of view ``index``: how many ``neighbors`` agree with its depth (int (H, W)).

    ``depths`` are (H, W) maps (0 where invalid), ``Ks`` their intrinsics, each
    indexed by view (every view, or a mapping holding at least ``index`` and
    ``neighbors``); agreement is :func:`pipeline.depth.consistency.geometric_consistency`
    (forward-backward reprojection within ``reproj_px`` pixels and ``rel_depth``
    relative depth).
    """
    from pipeline.core.poses import invert_pose
    from pipeline.depth.consistency import geometric_consistency

    world_from_ref = invert_pose(cam_from_world[index])
    others = [(depths[j], Ks[j],
               torch.as_tensor(cam_from_world[j] @ world_from_ref, dtype=torch.float32, device=depths[j].device))
              for j in neighbors]
    with torch.no_grad():
        cons = geometric_consistency(depths[index], Ks[index], others, reproj_px, rel_depth)
    return cons.count.cpu().numpy()


NCC_WINDOW = 5
"""Side in pixels of the gate's NCC windows on maps up to ``depth.reference_side`` (the depth stage's default)."""


def photometric_costs(ref_gray_11hw: torch.Tensor, K_ref_33: torch.Tensor, cam_from_world_ref: np.ndarray,
                      sources: Sequence[tuple[torch.Tensor, torch.Tensor, np.ndarray]], depths_dhw: torch.Tensor,
                      window: int = NCC_WINDOW) -> torch.Tensor:
    """Matching cost ``1 - NCC`` (D, H, W) of each candidate depth map against the best neighbour image.

    The depth stage's cost (:func:`pipeline.depth.plane_sweep.sweep_cost`, ``best_k = 1``):
    grayscale windows of ``window`` pixels, a pixel's window warped through
    its own candidate depth. ``sources`` are (grayscale (1, 1, h, w), K (3, 3),
    cam_from_world (4, 4)) of the neighbours; depths are camera z (0 = none:
    cost of a far-away point, irrelevant where the caller masks invalid pixels).
    """
    from pipeline.core.poses import invert_pose
    from pipeline.depth import plane_sweep as mvs

    H, W = depths_dhw.shape[-2:]
    ref = mvs.reference_stats(ref_gray_11hw, window)
    world_from_ref = invert_pose(cam_from_world_ref)
    prepared = [mvs.make_source(g, K_ref_33, K_j,
                                torch.as_tensor(pose_j @ world_from_ref, dtype=torch.float32, device=g.device), H, W)
                for g, K_j, pose_j in sources]
    inv = torch.where(depths_dhw > 0, depths_dhw.clamp(min=1e-6).reciprocal(), torch.full_like(depths_dhw, 1e-6))
    with torch.no_grad():
        return mvs.sweep_cost(ref, prepared, inv, 1, 1 << 20)


def change_stats(depth_init: np.ndarray, depth: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """INIT / PRED / DELTA statistics (mean, std, min, max) over the valid pixels, and the valid fraction."""
    return {"INIT": value_stats(depth_init[valid]), "PRED": value_stats(depth[valid]),
            "DELTA": value_stats((depth - depth_init)[valid]), "valid_fraction": float(valid.mean())}


def keep_more_consistent(
    views: Sequence[View], maps: Sequence[DepthMap], cfg: RefineConfig, device: torch.device,
    images: Sequence[np.ndarray | None] | None = None,
) -> tuple[list[DepthMap], dict[str, dict[str, Any]]]:
    """Refined depth where more neighbours agree with it than with the initial depth, initial depth elsewhere.

    With ``images`` (one per view) and ``cfg.keep_if_photo_consistent``, the
    refined depth must also match the neighbour images at least as well as the
    initial depth (:func:`photometric_costs`).

    Returns the maps (same order) and their statistics (:func:`change_stats` plus
    ``refined_fraction``: share of valid pixels that kept the refined depth).
    """
    out: list[DepthMap | None] = [None] * len(maps)
    stats = _gate(views, maps.__getitem__, cfg, device, out.__setitem__, images)
    return out, stats  # type: ignore[return-value]


def supported(count: np.ndarray, violations: np.ndarray, photo_cost: np.ndarray | None,
              max_photo_cost: float) -> np.ndarray:
    """Pixels whose depth the evidence supports: a neighbour map agrees, or the photos match (``photo_cost``
    at most ``max_photo_cost``; None: no photos) and no neighbour sees through the point ("keep unless
    contradicted")."""
    photo_ok = np.zeros_like(count, dtype=bool) if photo_cost is None else photo_cost <= max_photo_cost
    return (count >= 1) | ((violations == 0) & photo_ok)


def gate_choice(trusted: np.ndarray, restored: np.ndarray, count_ref: np.ndarray, count_init: np.ndarray,
                supported_ref: np.ndarray, photo_ref: np.ndarray | None, photo_init: np.ndarray | None,
                margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, which depth the gate keeps: (take the refined depth, keep the pixel at all), both bool (H, W).

    * A pixel of a *trusted* initial map (the depth stage checked it against its
      neighbours): the refined depth where more neighbour maps agree with it than
      with the initial one and its photos match no worse, or where as many agree
      and its photos match better by more than ``margin``; the initial depth
      elsewhere. The pixel is always kept.
    * A pixel the depth stage dropped (``restored``), or one of an untrusted
      initial map (a prior nothing checked): the refined depth, kept only where
      ``supported_ref`` (:func:`supported`).
    """
    if photo_ref is None or photo_init is None:
        better = count_ref > count_init
    else:
        better = (((count_ref > count_init) & (photo_ref <= photo_init))
                  | ((count_ref >= count_init) & (photo_ref < photo_init - margin)))
    checked = trusted & ~restored
    take = np.where(checked, better, supported_ref)
    keep = checked | supported_ref
    return take & keep, keep


def evidence_stats(init_valid: np.ndarray, keep: np.ndarray, take: np.ndarray, count_init: np.ndarray,
                   count_ref: np.ndarray, photo_init: np.ndarray | None,
                   photo_ref: np.ndarray | None) -> dict[str, float]:
    """Before/after evidence of one view for the report and ``recon diagnose``.

    ``consistent_init`` / ``consistent_refined``: share of the initial valid
    pixels / of the kept pixels that at least one neighbour map agrees with;
    ``photo_cost_init`` / ``photo_cost_refined``: their mean matching cost
    1 − NCC (5x5 at up to depth.reference_side, best neighbour; NaN without photos). The kept depth is the
    refined one where ``take``, the initial one elsewhere.
    """
    count_out = np.where(take, count_ref, count_init)
    out = {"consistent_init": float((count_init[init_valid] >= 1).mean()) if init_valid.any() else float("nan"),
           "consistent_refined": float((count_out[keep] >= 1).mean()) if keep.any() else float("nan"),
           "photo_cost_init": float("nan"), "photo_cost_refined": float("nan")}
    if photo_init is not None and photo_ref is not None:
        cost_out = np.where(take, photo_ref, photo_init)
        a, b = photo_init[init_valid], cost_out[keep]
        out["photo_cost_init"] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        out["photo_cost_refined"] = float(np.nanmean(b)) if np.isfinite(b).any() else float("nan")
    return out


def _gate(views: Sequence[View], load: Callable[[int], DepthMap], cfg: RefineConfig, device: torch.device,
          emit: Callable[[int, DepthMap], None],
          images: Sequence[np.ndarray | None] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`keep_more_consistent` one view at a time: ``load(i)`` gives view i's refined map (with
    ``depth_init`` and ``restored``), ``emit(i, map)`` takes the gated one; only a few views' maps are held at once.

    Neighbour evidence is each view's refined (and initial) depth at the pixels
    the depth stage checked, or at every pixel of a map it did not check
    (a prior); restored candidates of other views are never evidence.
    """
    from pipeline.core.poses import invert_pose
    from pipeline.depth.consistency import geometric_consistency
    from pipeline.depth.views import scaled_window

    neighbors = covisible_neighbors(views, cfg.accept_neighbors)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    workers = cpu_workers(cfg.cpu_workers, device)
    cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]] = OrderedDict()
    capacity = 2 * (neighbors.shape[1] + 1) * workers
    lock = threading.Lock()  # the caches are shared by the view threads

    def evidence(dm: DepthMap) -> np.ndarray:
        restored = dm.restored if dm.restored is not None else np.zeros_like(dm.valid)
        return dm.valid & ~restored

    def tensors(j: int, dm: DepthMap | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """View j's evidence (initial, refined, K, pose), each map converted once while it stays in the small cache."""
        with lock:
            if j in cache:
                cache.move_to_end(j)
                return cache[j]
            dm = load(j) if dm is None else dm
            ev = evidence(dm)
            cache[j] = (t(np.where(ev, dm.depth_init, 0.0)), t(np.where(ev, dm.depth, 0.0)), t(dm.K),
                        np.asarray(dm.cam_from_world, np.float64))
            while len(cache) > capacity:
                cache.popitem(last=False)
            return cache[j]

    photo = cfg.keep_if_photo_consistent and images is not None
    grays: OrderedDict[int, torch.Tensor | None] = OrderedDict()

    def gray(j: int, shape: tuple[int, int]) -> torch.Tensor | None:
        """View j's grayscale image (1, 1, H, W) at its map's resolution (small cache), None without an image."""
        with lock:
            if j not in grays:
                g = _gray(images[j], *shape)  # type: ignore[index]
                grays[j] = None if g is None else t(g)[None, None]
                while len(grays) > capacity:
                    grays.popitem(last=False)
            grays.move_to_end(j)
            return grays[j]

    def consistency(entries: Mapping[int, tuple], i: int, depth: np.ndarray, which: int, nb: Sequence[int],
                    pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """(agreeing neighbours, neighbours that see through) of ``depth`` in view i against the neighbours' initial (0)
        or refined (1) evidence."""
        pose_i = entries[i][3]
        others = [(entries[j][which], entries[j][2], t(entries[j][3] @ invert_pose(pose_i))) for j in nb]
        with torch.no_grad():
            c = geometric_consistency(t(depth), entries[i][2], others, cfg.accept_reproj_px * pixel_scale,
                                      cfg.accept_rel_depth, cfg.accept_free_space_margin)
        return c.count.cpu().numpy(), c.violations.cpu().numpy()

    def one(i: int) -> dict[str, Any]:
        """Gate view i, hand it to ``emit``; its statistics."""
        dm = load(i)
        nb = neighbors[i].tolist()
        entries = {j: tensors(j, dm if j == i else None) for j in [i, *nb]}
        restored = dm.restored if dm.restored is not None else np.zeros_like(dm.valid)
        trusted = "geometric_filter" in dm.stats  # the depth stage checked these maps against their neighbours
        init_depth = np.where(dm.valid & ~restored, dm.depth_init, 0.0)
        ref_depth = np.where(dm.valid, dm.depth, 0.0)
        # maps larger than depth.reference_side: pixel tolerances and windows grow with them, as in the depth stage
        scale = float(dm.stats.get("pixel_scale", 1.0))
        count_init, _ = consistency(entries, i, init_depth, 0, nb, scale)
        count_ref, violations_ref = consistency(entries, i, ref_depth, 1, nb, scale)
        photo_ref = photo_init = None
        if photo:
            ref_gray = gray(i, dm.depth.shape)
            src = [(gray(j, tuple(entries[j][0].shape)), entries[j][2], entries[j][3]) for j in nb]
            src = [s_ for s_ in src if s_[0] is not None]
            if ref_gray is not None and src:
                with torch.no_grad():
                    costs = photometric_costs(ref_gray, entries[i][2], entries[i][3], src,
                                              torch.stack([t(init_depth), t(ref_depth)]),
                                              scaled_window(NCC_WINDOW, scale)).cpu().numpy()
                photo_init, photo_ref = costs[0], costs[1]
        # An unchecked prior's pixel needs a neighbour map that agrees; photos alone only restore pixels the
        # depth stage dropped.
        sup = (supported(count_ref, violations_ref, photo_ref, cfg.restore_max_photo_cost)
               if trusted else count_ref >= 1) & dm.valid
        take, keep = gate_choice(np.full(dm.valid.shape, trusted), restored, count_ref, count_init, sup, photo_ref,
                                 photo_init, cfg.accept_photo_margin)
        keep &= dm.valid
        if cfg.max_correction > 0:
            take &= np.abs(dm.depth - dm.depth_init) <= cfg.max_correction * dm.depth_init
            keep &= take | (trusted & ~restored)
        depth = np.where(keep, np.where(take, dm.depth, dm.depth_init), 0.0).astype(np.float32)
        kept_restored = keep & restored
        s = {**change_stats(dm.depth_init, depth, keep),
             "refined_fraction": float((take & keep & ~restored).sum() / max(1, (dm.valid & ~restored).sum())),
             "restored_fraction": float(kept_restored.sum() / max(1, keep.sum())),
             "dropped_fraction": float((dm.valid & ~keep).sum() / max(1, dm.valid.sum())),
             **evidence_stats(dm.valid & ~restored, keep, take, count_init, count_ref, photo_init, photo_ref)}
        emit(i, replace(dm, depth=depth, valid=keep, confidence=np.where(keep, dm.confidence, 0.0).astype(np.float32),
                        depth_init=np.where(keep, dm.depth_init, 0.0).astype(np.float32), restored=kept_restored,
                        stats={**dm.stats, **s}))
        return s

    stats: dict[str, dict[str, Any]] = {}
    for i, s in map_in_threads(one, range(len(views)), workers):
        stats[views[i].name] = s
    return {v.name: stats[v.name] for v in views}

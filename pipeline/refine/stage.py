"""refine stage: multi-view refinement of the depth maps (``depth_pred = depth_init + δz``).

Model
-----
Each view's correction is a *multi-resolution pyramid* of log-depth grids
``r_l`` (strides :attr:`RefineConfig.pyramid_strides`: 1, 2, 4 ... 32 pixels),
upsampled coarse-to-fine (bilinear) and summed::

    r(p)          = Σ_l upsample(r_l)(p)
    depth_pred(p) = depth_init(p) · exp(r(p)),    δz = depth_pred − depth_init

All grids start at 0, so δz = 0 at step 0. Coarse grids make smooth,
low-frequency corrections (a per-view warp or scale drift) with a handful of
parameters, the stride-1 grid fixes single pixels (noise, outliers); ``exp``
keeps the depth positive and makes one Adam step of size ``lr`` a *relative*
depth change of about ``lr``, the same on every scene. The loss is

    weight_mv·L_mv + weight_anchor·L_anchor + weight_edge·L_edge + weight_surf·L_surf + weight_mag·L_mag

(:mod:`pipeline.refine.losses`). The views are split into groups of at most
``views_per_batch`` (interleaved, so neighbouring cameras fall in different
groups); each step refines one group in turn: every view samples
``samples_per_view`` valid pixels, projects them into its ``num_neighbors``
most co-visible views and compares with the neighbours' *current* predicted
depth, read bilinearly as this step's fixed target (every view is a source
in turn, so the consistency is symmetric over a round). Steps go in rounds
of ``parallel_groups`` groups that read the same state of the other views
and publish their predictions together, so on a multi-core CPU a round's
steps run side by side (``cpu_workers`` threads, the same result for any
count).

Everything lives on the torch device (CUDA when present, else CPU; the same
code). The inner loop neither copies between host and device nor
synchronises: per-step diagnostics go into a device tensor read every
``log_every`` steps, and a step whose loss or gradient is not finite is
skipped *on the device* (Adam's update is multiplied by a 0/1 flag) and
halves the learning rate; it is warned about at the next log.

I/O
---
:func:`run` reads ``OUT/depth/views/<stem>.npz`` and the sfm cache, calls
:func:`refine_depth_maps` and writes ``OUT/refine/views/<stem>.npz`` (with
``depth_init`` and INIT/PRED/DELTA statistics) and ``OUT/refine/log.json``
(settings, per-step losses and Δz statistics, per-view statistics).

Modules
-------
:mod:`pipeline.refine.pyramid` (the δz pyramid, groups of views, their
scratch files), :mod:`pipeline.refine.scene` (the optimization's inputs),
:mod:`pipeline.refine.optimizer` (the loop), :mod:`pipeline.refine.gate`
(the acceptance gate), :mod:`pipeline.refine.losses` (the loss terms); this
module joins them (:func:`refine_depth_maps`) and runs the stage (:func:`run`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.geometry import default_device
from pipeline.core.io import DepthMap, LazySequence, View, load_depth_map, save_scratch_depth_map
from pipeline.core.oom import call_with_oom_fallback
from pipeline.core.settings import check_section, fingerprint_fields
from pipeline.core.workers import torch_threads
from pipeline.refine import losses
from pipeline.refine.config import RefineConfig  # noqa: F401 - re-exported
from pipeline.refine.gate import _gate
from pipeline.refine.optimizer import LOG_COLUMNS, _finalize, _optimize
from pipeline.refine.pyramid import _GroupStore, _scratch_folder, view_groups
from pipeline.refine.scene import _build_group, _scene_tables, photo_inputs

logger = logging.getLogger(__name__)


# ---- the refinement ----------------------------------------------------------------------

def refine_depth_maps(
    views: Sequence[View],
    init: Sequence[DepthMap],
    points: np.ndarray,
    cfg: RefineConfig,
    device: torch.device | str = "cpu",
    *,
    images: Sequence[np.ndarray | None] | None = None,
    bar: Any = None,
    sink: Callable[[int, DepthMap], None] | None = None,
    scratch_dir: Path | None = None,
    candidates: Sequence[DepthMap | None] | None = None,
) -> tuple[list[DepthMap], dict[str, Any]]:
    """Refine the depth maps of a scene jointly (the core of the stage; no file I/O but its own scratch files).

    Memory: besides every view's current depth (the multiview targets) and small
    per-view tables, only the groups of views that ``cfg.max_resident_views``
    allows are in memory; ``init`` and ``images`` are read one view at a time
    (and more than once), so they may be :class:`pipeline.core.io.LazySequence`\\ s that
    load each item from its file, and with ``sink`` the refined maps are handed
    over one by one instead of being collected.

    Args:
        views: the scene's views (``point_ids`` for anchoring, co-visibility for neighbours).
        init: one initial :class:`DepthMap` per view (same order), normalized frame; its
            ``K`` and ``cam_from_world`` are used (the depth map's own resolution).
        points: (M, 3) sparse points (normalized frame), indexed by ``View.point_ids``.
        cfg: settings.
        device: torch device.
        images: optional per-view RGB/gray images (any resolution; resized to the
            depth maps) for the edge-aware weights; None = uniform weights.
        bar: optional tqdm-like bar (``update``, ``set_postfix``).
        sink: optional ``sink(index in views, refined map)``, called once per view
            after the optimization; the returned list is then empty.
        scratch_dir: folder in which this call makes its own scratch folder (offloaded
            groups, maps awaiting the consistency gate), removed before it returns, also
            after an error; None: the system's temporary folder.
        candidates: optional per-view maps of the depth stage before its consistency filter:
            their pixels that ``init`` lacks are refined too and kept where the evidence
            supports them (:func:`with_candidates`, the gate).
    Returns:
        (refined maps in the order of ``views`` — ``depth = depth_init + δz``, 0 where
        invalid, ``depth_init`` set, ``stats`` with INIT/PRED/DELTA mean/std/min/max —
        or ``[]`` with ``sink``; and the log dict).
    """
    check_section(cfg, "refine")  # before cpu_threads is used
    if candidates is not None and cfg.restore_dropped:
        merged = LazySequence(len(init), lambda i: with_candidates(init[i], candidates[i]))
    else:
        merged = LazySequence(len(init), lambda i: with_candidates(init[i], None))
    with torch_threads(cfg.cpu_threads if torch.device(device).type == "cpu" else None):
        return _refine(views, merged, points, cfg, device, images=images, bar=bar, sink=sink, scratch_dir=scratch_dir)


def with_candidates(dm: DepthMap, candidate: DepthMap | None) -> DepthMap:
    """``dm`` plus the pixels of ``candidate`` (the same view before the depth stage's filter) that ``dm`` lacks.

    Those pixels get confidence 0 (L_mv neither pulls them nor lets them pull
    a neighbour; L_photo, the anchors and the smoothness terms refine them) and
    are marked in ``restored``; the gate keeps them only where the evidence
    supports them.
    """
    none = np.zeros(dm.depth.shape, bool)
    if candidate is None or candidate.depth.shape != dm.depth.shape:
        return replace(dm, restored=none)
    c = np.asarray(candidate.depth, np.float32)
    extra = np.asarray(candidate.valid, bool) & ~np.asarray(dm.valid, bool) & np.isfinite(c) & (c > losses.MIN_DEPTH)
    return replace(dm, depth=np.where(extra, c, dm.depth).astype(np.float32), valid=dm.valid | extra,
                   confidence=np.where(extra, 0.0, dm.confidence).astype(np.float32), restored=extra)


def _refine(
    views: Sequence[View],
    init: Sequence[DepthMap],
    points: np.ndarray,
    cfg: RefineConfig,
    device: torch.device | str = "cpu",
    *,
    images: Sequence[np.ndarray | None] | None = None,
    bar: Any = None,
    sink: Callable[[int, DepthMap], None] | None = None,
    scratch_dir: Path | None = None,
) -> tuple[list[DepthMap], dict[str, Any]]:
    if len(views) != len(init) or not views:
        raise ValueError(f"need one depth map per view, got {len(views)} views and {len(init)} maps")
    device = torch.device(device)
    started = time.perf_counter()
    # Storage order: the members of each group side by side.
    groups_idx = view_groups(len(views), cfg.views_per_batch)
    order = np.concatenate(groups_idx)
    spans = np.cumsum([0] + [len(g) for g in groups_idx])
    spans = [(int(a), int(b)) for a, b in zip(spans[:-1], spans[1:])]
    views_s = [views[i] for i in order]
    init_s = LazySequence(len(views), lambda pos: init[order[pos]])
    images_s = LazySequence(len(views), lambda pos: images[order[pos]]) if images is not None else None
    out: list[DepthMap | None] = [None] * len(views) if sink is None else []

    def emit(pos: int, dm: DepthMap) -> None:
        if sink is None:
            out[order[pos]] = dm
        else:
            sink(int(order[pos]), dm)

    with _scratch_folder(scratch_dir) as scratch:
        tables, current = _scene_tables(views_s, init_s, np.asarray(points, np.float64).reshape(-1, 3), cfg, device)
        store = _GroupStore(spans, lambda a, b: _build_group(a, b, init_s, images_s, tables, cfg, device),
                            cfg.max_resident_views, scratch, device)
        if store.offloading:
            logger.info("refine: %d views, %d in memory at once (refine.max_resident_views=%d): "
                        "%d of %d groups wait in scratch files between turns",
                        len(views),
                        sum(b - a for a, b in spans[: store.kept]) + max(b - a for a, b in spans[store.kept:]),
                        cfg.max_resident_views, len(spans) - store.kept, len(spans))
        photo_images = None
        if cfg.weight_photo > 0 and images_s is not None:
            photo_images = photo_inputs(images_s, tables, cfg, device)
            if photo_images is None:
                logger.warning("refine: a view has no image; L_photo is off")
        hist = _optimize(store, current, cfg, device, bar, photo_images)
        del current, photo_images
        if store.offloading:
            logger.info("refine: %d group turns read from scratch files", store.swaps)
        if cfg.keep_if_more_consistent:
            ungated = lambda pos: scratch() / f"ungated{pos:05d}.npz"  # noqa: E731
            _finalize(store, views_s, init_s, lambda pos, dm: save_scratch_depth_map(ungated(pos), dm))
            stats = _gate(views_s, lambda pos: load_depth_map(ungated(pos)), cfg, device, emit, images_s)
        else:
            stats = _finalize(store, views_s, init_s, emit, keep_restored=False)
    log = {
        "settings": fingerprint_fields(cfg),
        "device": str(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "num_views": len(views),
        "resolution": [tables.width, tables.height],
        "neighbors": {views_s[i].name: [views_s[j].name for j in row] for i, row in enumerate(tables.nbr.tolist())},
        "skipped_steps": int((hist[:, -1] == 0).sum()),
        "seconds": round(time.perf_counter() - started, 3),
        "steps": [{"step": i, **{k: float(hist[i, j]) for j, k in enumerate(LOG_COLUMNS)}} for i in range(cfg.steps)],
        "views": {v.name: stats[v.name] for v in views},
    }
    return out, log  # type: ignore[return-value]


# ---- the stage ---------------------------------------------------------------------------

def run(ctx: StageContext) -> None:
    """Refine every view's depth map; writes ``refine/views/<stem>.npz`` and ``refine/log.json``.

    Inputs are read lazily (one view's depth map and image at a time) and each
    refined map is written as soon as it is final, to the stage's scratch folder;
    the maps are moved into ``refine/views/`` only once the whole refinement has
    succeeded (a GPU out-of-memory retry on the CPU never mixes in maps of the
    failed attempt). The scratch folder is removed when the stage ends.
    """
    from pipeline.core.cache import write_json_atomic
    from pipeline.core.io import load_rgb, load_sfm_scene, save_depth_map

    ws, cfg = ctx.ws, ctx.settings
    scene = load_sfm_scene(ws)
    views = [v for v in scene.views if ws.depth_view(v.name).exists()]
    missing = len(scene.views) - len(views)
    if missing:
        ctx.logger.warning("refine: %d view(s) have no initial depth map and are left out", missing)
    if not views:
        raise ReconError(f"{ws.stage_dir('depth')}: no depth maps to refine; "
                         f"run `recon stage depth {ws.scene_dir}` first")
    if all(ws.refine_view(v.name).exists() for v in views) and ws.refine_log.exists():
        ctx.logger.info("refine: all %d views already refined", len(views))
        return
    for v in views:
        if not v.image_path.exists():
            raise ReconError(f"{v.image_path}: undistorted image missing from the sfm cache; "
                             f"re-run `recon run {ws.scene_dir} --force sfm`")
    shapes: dict[int, tuple[int, int]] = {}

    def load_init(i: int) -> DepthMap:
        dm = load_depth_map(ws.depth_view(views[i].name))
        shapes[i] = dm.depth.shape
        return dm

    def load_image(i: int) -> np.ndarray:  # only for edge weights at the depth resolution
        shape = shapes[i] if i in shapes else load_init(i).depth.shape
        return load_rgb(views[i].image_path, max_size=max(shape))

    def load_candidate(i: int) -> DepthMap | None:  # the depth stage's map before its consistency filter (mvs only)
        from pipeline.depth.stage import filter_input_path

        path = filter_input_path(ws, ctx.config.mvs, views[i].name)
        return load_depth_map(path) if path.exists() and path != ws.depth_view(views[i].name) else None

    init, images = LazySequence(len(views), load_init), LazySequence(len(views), load_image)
    candidates = LazySequence(len(views), load_candidate)
    device = default_device(cfg.device)
    h, w = init[0].depth.shape
    ctx.logger.info("refine: %d views at %dx%d on %s, %d steps", len(views), w, h, device, cfg.steps)
    scratch = ws.refine_scratch
    shutil.rmtree(scratch, ignore_errors=True)
    finished = scratch / "views"

    def write(i: int, dm: DepthMap) -> None:
        path = ws.refine_view(views[i].name)
        if not path.exists():
            save_depth_map(finished / path.name, dm)

    bar = ctx.bar(desc="refine depth", total=cfg.steps, unit="step")
    try:
        # views_per_batch changes the result, so an out-of-memory GPU goes straight to the CPU (same settings).
        _, log = call_with_oom_fallback(
            lambda _batch, dev: refine_depth_maps(views, init, scene.points, cfg, dev, images=images, bar=bar,
                                                  sink=write, scratch_dir=scratch, candidates=candidates),
            batch=cfg.views_per_batch, min_batch=cfg.views_per_batch, device=device, what="refinement",
            setting="refine.views_per_batch", log=ctx.logger).value
        ws.refine_view(views[0].name).parent.mkdir(parents=True, exist_ok=True)
        for v in views:
            path = ws.refine_view(v.name)
            if (finished / path.name).exists():
                os.replace(finished / path.name, path)
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    write_json_atomic(ws.refine_log, log)
    last = log["steps"][-1] if log["steps"] else {}
    deltas = [s["DELTA"] for s in log["views"].values()]
    ctx.summary.update({
        "views": len(views),
        "steps": cfg.steps,
        "device": str(device),
        "dz_mean": round(float(np.mean([d["mean"] for d in deltas])), 6),
        "dz_std": round(float(np.mean([d["std"] for d in deltas])), 6),
        "mv_kept": round(float(last.get("mv_kept", 0.0)), 3),
        "skipped_steps": log["skipped_steps"],
        "refined_fraction": round(float(np.mean([s.get("refined_fraction", 1.0) for s in log["views"].values()])), 4),
        "restored_fraction": round(float(np.mean([s.get("restored_fraction", 0.0) for s in log["views"].values()])), 4),
        "dropped_fraction": round(float(np.mean([s.get("dropped_fraction", 0.0) for s in log["views"].values()])), 4),
    })

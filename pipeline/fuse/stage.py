"""fuse stage: TSDF fusion (Open3D ``VoxelBlockGrid``) of the depth maps into a coloured mesh.

Input: the refined depth maps (``OUT/refine/views``), or the initial ones
(``OUT/depth/views``) when refine is skipped, with the colours of the
undistorted images resized to each depth map's resolution. Output:
``OUT/fuse/mesh.ply`` (binary PLY, vertex colours and normals) in the
normalized frame — the frame of ``OUT/sparse``; the engine publishes it as
``OUT/mesh.ply``.

How the automatic sizes are derived (every one can be set as an absolute
value instead, 0 = auto; all in normalized-frame units, where the median
depth of the sparse points is 1):

* **voxel size** = ``voxel_factor`` x the median *pixel footprint* of the
  sparse points, ``z / f`` over every (point, view) observation, with ``f``
  the focal length at the depth maps' resolution. One voxel per depth pixel
  at the typical depth: finer voxels add no information, coarser ones lose
  detail. On the synthetic scenes (24 views 480x360) this is ~0.3 % of the
  object diagonal, and ground-truth depth fuses to F@0.5 % ≈ 0.99.
* **truncation** = ``trunc_voxels`` x voxel size.
* **depth cut-off** = ``depth_max_factor`` x the 99th percentile of the
  sparse points' depths.
* **region of interest** (``crop``): the sparse points seen by ≥ 2 views that
  lie inside the frustum of at least ``crop_view_fraction`` of the most-viewed
  point's cameras (the region the cameras look at, e.g. the object of an
  orbit), their ``crop_percentile`` .. ``100 - crop_percentile`` percentile
  box per axis, grown on every side by ``crop_margin`` x its diagonal. Only voxel
  blocks that touch this box are allocated and the mesh is cropped to it.
* **block count**: a first pass over the depth maps counts the distinct
  voxel blocks they touch (inside the region), so the hash map is allocated
  once at the right size. A map that still drops blocks (Open3D's CUDA hash
  map can) is detected after every view and the fusion restarts with twice
  the capacity; a grid larger than ``max_memory_gb`` fails with a clear error.

The fusion itself (:func:`pipeline.fuse.tsdf.fuse_depth_maps`, with Open3D's
pixel convention) is in :mod:`pipeline.fuse.tsdf`, the cleaning of the fused
surface (views, region, small components, visibility) in
:mod:`pipeline.fuse.clean`. This module resolves the ``fuse.*`` settings into
absolute sizes from the sparse points (:func:`resolve_params`), checks the
masks and the poses, and runs the stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.io import (
    DepthMap,
    SfmScene,
    View,
    displayed_size,
    find_masks,
    load_depth_map,
    load_rgb,
    load_sfm_scene,
    read_mask,
)
from pipeline.core.settings import check_section
from pipeline.core.workspace import Workspace
from pipeline.fuse.clean import write_mesh_ply
from pipeline.fuse.config import FuseConfig  # noqa: F401 - re-exported
from pipeline.fuse.tsdf import FusionFrame, FusionParams, fuse_depth_maps

logger = logging.getLogger(__name__)


# ---- automatic sizes from the sparse points ------------------------------------------------------------


def observed_depths_and_focals(scene: SfmScene) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame depth ``z`` and focal length ``f`` (pixels, full image) of every (point, view) observation.

    Returns:
        (z (K,), f (K,)) float64; ``f = sqrt(fx * fy)`` of the observing view.
    """
    zs, fs = [], []
    for v in scene.views:
        if len(v.point_ids) == 0:
            continue
        p = scene.points[v.point_ids]
        z = p @ v.cam_from_world[2, :3] + v.cam_from_world[2, 3]
        zs.append(z)
        fs.append(np.full(len(z), np.sqrt(v.K[0, 0] * v.K[1, 1])))
    if not zs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(zs), np.concatenate(fs)


def check_poses(z_obs: np.ndarray, min_front_fraction: float = 0.5) -> None:
    """Fail clearly when the sparse points are not in front of the cameras that observe them.

    World→camera poses put (almost) every observation at positive depth;
    camera→world poses read as world→camera put most of them behind.

    Raises:
        ReconError: no observations, or too few in front of their cameras.
    """
    if len(z_obs) == 0:
        raise ReconError("the SfM model has no sparse points observed by the cameras; "
                         "fusion sizes its grid from them — re-run sfm")
    front = float(np.mean(z_obs > 0))
    if front < min_front_fraction:
        raise ReconError(
            f"only {100 * front:.0f} % of the sparse observations lie in front of their cameras: "
            "the poses look camera→world, but recon expects world→camera (cam_from_world); "
            "fix the supplied model or re-run sfm"
        )


def auto_voxel_size(z_obs: np.ndarray, f_obs: np.ndarray, focal_scale: float, factor: float) -> float:
    """``factor`` x the median pixel footprint ``z / (f * focal_scale)`` of the observations (normalized units).

    Args:
        z_obs, f_obs: see :func:`observed_depths_and_focals`.
        focal_scale: depth-map resolution / image resolution (e.g. 0.5 for half-resolution depth).
    """
    ok = z_obs > 0
    return float(factor * np.median(z_obs[ok] / (f_obs[ok] * focal_scale)))


def auto_depth_max(z_obs: np.ndarray, factor: float, percentile: float = 99.0) -> float:
    """``factor`` x the ``percentile`` of the observations' positive depths."""
    return float(factor * np.percentile(z_obs[z_obs > 0], percentile))


def frustum_counts(scene: SfmScene, depth_max: float) -> np.ndarray:
    """(M,) number of views whose frustum (inside the image, ``0 < z <= depth_max``) holds each sparse point.

    Occlusion is ignored: this measures where the cameras *look*, not what they see.
    """
    counts = np.zeros(len(scene.points), dtype=np.int64)
    for v in scene.views:
        pc = scene.points @ v.cam_from_world[:3, :3].T + v.cam_from_world[:3, 3]
        z = pc[:, 2]
        zs = np.maximum(z, 1e-12)
        u = v.K[0, 0] * pc[:, 0] / zs + v.K[0, 2]
        w = v.K[1, 1] * pc[:, 1] / zs + v.K[1, 2]
        counts += (z > 0) & (z <= depth_max) & (u >= 0) & (u < v.width) & (w >= 0) & (w < v.height)
    return counts


def track_lengths(scene: SfmScene) -> np.ndarray:
    """(M,) number of views that observe each sparse point."""
    counts = np.zeros(len(scene.points), dtype=np.int64)
    for v in scene.views:
        np.add.at(counts, v.point_ids, 1)
    return counts


def camera_roi(scene: SfmScene, depth_max: float, *, view_fraction: float, percentile: float,
               margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box (min (3,), max (3,)) of the region the cameras look at (see the module docstring)."""
    pts = scene.points
    tracks = track_lengths(scene)
    cand = tracks >= 2
    if cand.sum() < 10:
        cand = tracks >= 1
    if cand.sum() < 10:
        cand = np.ones(len(pts), dtype=bool)
    counts = frustum_counts(scene, depth_max)
    keep = cand & (counts >= view_fraction * counts[cand].max())
    sel = pts[keep] if keep.sum() >= 4 else pts[cand]
    lo = np.percentile(sel, percentile, axis=0)
    hi = np.percentile(sel, 100.0 - percentile, axis=0)
    grow = margin * float(np.linalg.norm(hi - lo))  # isotropic: a flat box still gets room above its top
    return lo - grow, hi + grow


def map_focal_scale(dm: DepthMap, view: View) -> float:
    """Ratio of a depth map's focal length to its view's full-resolution one (the maps' resolution / the images')."""
    return float(np.sqrt(dm.K[0, 0] * dm.K[1, 1] / (view.K[0, 0] * view.K[1, 1])))


def resolve_params(cfg: FuseConfig, scene: SfmScene, focal_scale: float = 1.0) -> FusionParams:
    """Absolute fusion parameters: the settings, with None = derived from the sparse points and cameras.

    Args:
        focal_scale: depth-map focal length / image focal length (depth maps at a working resolution).

    Raises:
        ReconError: no usable sparse points, inverted poses, or a non-positive setting.
    """
    z_obs, f_obs = observed_depths_and_focals(scene)
    check_poses(z_obs)
    voxel = (cfg.voxel_size if cfg.voxel_size is not None
             else auto_voxel_size(z_obs, f_obs, focal_scale, cfg.voxel_factor))
    trunc = cfg.sdf_trunc if cfg.sdf_trunc is not None else cfg.trunc_voxels * voxel
    depth_max = cfg.depth_max if cfg.depth_max is not None else auto_depth_max(z_obs, cfg.depth_max_factor)
    if not (voxel > 0 and trunc > 0 and depth_max > 0 and np.isfinite([voxel, trunc, depth_max]).all()):
        raise ReconError(f"fusion sizes must be positive (voxel {voxel}, truncation {trunc}, depth_max {depth_max}); "
                         "check the fuse.* settings")
    if cfg.block_resolution < 2 or cfg.min_views < 1:
        raise ReconError("fuse.block_resolution must be >= 2 and fuse.min_views >= 1")
    check_section(cfg, "fuse", runtime=False)
    roi_min = roi_max = None
    if cfg.crop:
        lo, hi = camera_roi(scene, depth_max, view_fraction=cfg.crop_view_fraction, percentile=cfg.crop_percentile,
                            margin=cfg.crop_margin)
        roi_min, roi_max = tuple(float(x) for x in lo), tuple(float(x) for x in hi)
    return FusionParams(
        voxel_size=float(voxel), sdf_trunc=float(trunc), depth_max=float(depth_max),
        block_resolution=int(cfg.block_resolution), block_count=int(cfg.block_count or 0),
        min_confidence=float(cfg.min_confidence), min_views=int(cfg.min_views),
        roi_min=roi_min, roi_max=roi_max, min_component_fraction=float(cfg.min_component_fraction),
        visibility_margin=float(cfg.visibility_margin), visibility_agree=float(cfg.visibility_agree),
        max_memory_gb=float(cfg.max_memory_gb),
    )


# ---- the stage -------------------------------------------------------------------------------------------


def check_masks(ws: Workspace, cfg: FuseConfig) -> None:
    """Check ``SCENE_DIR/masks`` before any stage runs: every mask readable and of its photo's size (or
    ``fuse.resize_masks``); masks that fit no photo, or two, are named in a warning and not used.

    Raises:
        ReconError: a mask that cannot be read, or one of another size than its photo, naming it.
    """
    from pipeline.sfm.inputs import scene_images

    if not ws.masks_dir.is_dir():
        return
    photos = {p.relative_to(ws.images_dir).as_posix(): p for p in scene_images(ws)}
    found, unmatched, shared = find_masks(ws.masks_dir, list(photos))
    if unmatched:
        logger.warning("%s: %d mask file(s) match no photo and are not used "
                       "(a mask is named <photo name>.png or <photo stem>.png): %s",
                       ws.masks_dir, len(unmatched),
                       ", ".join(p.relative_to(ws.masks_dir).as_posix() for p in unmatched[:8]))
    if shared:
        logger.warning("%s: mask file(s) that fit two photos are not used (name them <photo name>.png, "
                       "e.g. a.jpg.png): %s",
                       ws.masks_dir, ", ".join(p.relative_to(ws.masks_dir).as_posix() for p in shared[:8]))
    for name, mask in found.items():
        read_mask(mask, (2, 2))  # decodes the file: a corrupt mask fails now, not after SfM and depth
        size, photo_size = displayed_size(mask), displayed_size(photos[name])
        if size != photo_size and not cfg.resize_masks:
            raise ReconError(f"{mask}: the mask is {size[0]}x{size[1]} but its photo {name} is "
                             f"{photo_size[0]}x{photo_size[1]}; save the mask at the photo's size, "
                             "or set fuse.resize_masks=true to stretch it")



def import_fusion_libraries() -> None:
    """Import what fusion imports on its way (Open3D and its tensor core, torch, SciPy's graph routines) now.

    The stage then says it has a spare core, and the export's libraries load in a background thread; two threads
    importing Open3D at once can see it half-loaded (``No module named 'open3d.pybind.core'``), so this stage's
    own imports come first (:func:`pipeline.core.lazy.import_in_background`).
    """
    import open3d.core  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401
    import torch  # noqa: F401


def run(ctx: StageContext) -> None:
    """Fuse the refined (or, with refine skipped, the initial) depth maps into ``OUT/fuse/mesh.ply``."""
    t0 = time.perf_counter()
    cfg: FuseConfig = ctx.settings
    ws = ctx.ws
    scene = load_sfm_scene(ws)
    source = "depth" if "refine" in ctx.skipped else "refine"
    path_of = ws.depth_view if source == "depth" else ws.refine_view
    views = [(v, path_of(v.name)) for v in scene.views]
    present = [(v, p) for v, p in views if p.exists()]
    if not present:
        raise ReconError(f"{ws.stage_dir(source)}: no depth maps to fuse; "
                         f"run `recon stage {source} {ws.scene_dir}` first")
    if len(present) < len(views):
        missing = [v.name for v, p in views if not p.exists()]
        ctx.logger.warning("fusing %d of %d views; no %s depth map for: %s", len(present), len(views), source,
                           ", ".join(missing[:8]))

    first_view, first_path = present[0]
    first = load_depth_map(first_path)
    params = resolve_params(cfg, scene, map_focal_scale(first, first_view))
    ctx.logger.info(
        "fusing %d depth maps (%s stage): voxel %.4g, truncation %.4g, depth_max %.3g%s",
        len(present), source, params.voxel_size, params.sdf_trunc, params.depth_max,
        "" if params.roi is None else f", region {np.round(params.roi[0], 3).tolist()} .. "
                                      f"{np.round(params.roi[1], 3).tolist()}",
    )

    masks, _, _ = find_masks(ws.masks_dir, [v.name for v, _ in present])

    def frames() -> Iterator[FusionFrame]:
        for view, path in present:
            dm = load_depth_map(path)
            rgb = lambda path=view.image_path: load_rgb(path)  # noqa: E731 - read only when integrating
            yield FusionFrame(dm, rgb, read_mask(masks[view.name], dm.shape) if view.name in masks else None)

    import_fusion_libraries()  # before the later stages' libraries load beside it (they import Open3D too)
    ctx.spare_core()  # Open3D integrates the views one after the other
    result = fuse_depth_maps(
        frames, params, cfg.device, total=len(present),
        progress=lambda it, desc, total: ctx.progress(it, desc=desc, total=total, unit="view"),
    )
    write_mesh_ply(result.mesh, ws.fuse_mesh)
    ctx.summary.update(
        vertices=len(result.mesh.vertices),
        faces=len(result.mesh.triangles),
        voxel_size=round(params.voxel_size, 6),
        sdf_trunc=round(params.sdf_trunc, 6),
        depth_max=round(params.depth_max, 4),
        views=result.stats["views_fused"],
        source=source,
        blocks=result.stats["blocks"],
        seconds=round(time.perf_counter() - t0, 2),
        params={k: v for k, v in asdict(params).items()},
    )
    ctx.logger.info("fused mesh: %d vertices, %d faces (%s)", len(result.mesh.vertices), len(result.mesh.triangles),
                    ws.fuse_mesh)

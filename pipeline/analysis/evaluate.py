"""Geometry evaluation against ground truth (``recon eval OUT --gt GT``).

This module holds the entry point, the mesh scoring and the depth-map metrics; the surface
sampling and metrics are in :mod:`pipeline.analysis.metrics`, the alignment in
:mod:`pipeline.analysis.alignment`.

Metric protocol (Tanks and Temples / DTU style; every length in GT units)
--------------------------------------------------------------------------

1. **Alignment.** The reconstruction lives in its own (normalized) frame. The
   similarity ``x_gt = s R x_est + t`` is estimated from the camera centres
   (``OUT/sparse`` vs ``GT/cameras.json``, matched by image name) with RANSAC
   over camera triples (a camera is an inlier within 5 % of the GT cameras'
   RMS spread) and a least-squares (Umeyama) refit on the inliers
   (:func:`pipeline.analysis.alignment.align_from_cameras`), so a few badly registered cameras do not
   move it; optionally refined by point-to-plane ICP (rigid, on the samples
   of step 3, correspondences within 1 % of the diagonal). ``align=False``
   scores a mesh that is already in the GT frame.
2. **Crop.** Both surfaces are scored inside the GT object's bounding box
   (``scene.json`` ``object_bbox_min/max``; the GT mesh's box for a bare
   mesh) grown on every side by ``margin`` × the diagonal (default 5 %), so a
   strip of floor around the object counts but the room does not. The
   diagonal is ``scene.json``'s ``object_diagonal`` (else the box's own).
3. **Sampling.** Each surface is sampled uniformly by area (seeded) at a
   spacing ``h`` = half the smallest threshold, at most ``max_points`` points
   (then ``h`` grows; the spacing used is reported). Samples are drawn on
   triangles that touch the box grown by a further ``max_dist`` and the
   *sources* are the samples inside the crop box. GT samples count only where
   the GT surface is seen by at least ``min_views`` (default 1) GT cameras,
   like DTU's observation masks: the sample is in front of the camera,
   projects inside its image, and the GT depth read there (bilinear, nearest
   across depth edges) is > 0 and within 1 % of the sample's z. Without GT
   cameras (a bare GT mesh) every GT sample counts.
4. **Distances** are point-to-*mesh*, not point-to-point: accuracy = distance
   of each reconstructed sample to the GT surface, completeness = distance of
   each GT sample to the reconstructed surface. They are computed exactly
   (Open3D ``RaycastingScene.compute_distance``) for every point within
   ``2·τ_max + 4h`` of the other surface (found with a k-d tree on its
   samples) and from the k-d tree otherwise; all distances are capped at
   ``max_dist`` = max(10 % of the diagonal, 2·τ_max) (the share capped is
   reported). No reconstructed surface inside the box is an error.
   Because distances are to the surface, the sample density only sets the
   statistical precision, not a bias.
5. **Numbers.** accuracy and completeness: mean and median distance;
   Chamfer = (mean accuracy + mean completeness) / 2; at each threshold τ:
   precision = share of accuracy distances < τ, recall = share of
   completeness distances < τ, F = 2PR / (P + R) (0 when P + R = 0). Sample
   shares estimate shares of surface *area*. Thresholds are relative to
   the GT object's diagonal (default 0.5 % and 1 %) or absolute. Every length
   is also given divided by the diagonal (``*_rel``).
6. **Depth maps** (when ``OUT`` holds depth/refine caches and GT depth
   exists): each valid pixel of a cached map is back-projected with its own
   camera (normalized frame), mapped to the GT frame by the alignment and
   projected into the GT camera of the same image; its GT-camera z (GT
   units: the alignment's scale turns normalized depth into GT depth) is
   compared with the GT depth read there (bilinear, nearest across depth
   edges). This handles any working resolution and intrinsics. Over all
   pixels of all views: AbsRel = mean |d − d_gt| / d_gt, RMSE (GT units),
   δ<1.01 / 1.05 / 1.25 = share with max(d/d_gt, d_gt/d) below the bound.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.analysis.alignment import align_to_gt_cameras, match_cameras, read_colmap_poses, refine_icp
from pipeline.analysis.metrics import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_DIST_REL,
    DEFAULT_MAX_POINTS,
    DEFAULT_THRESHOLDS_REL,
    GtViews,
    Mesh,
    _Surface,
    as_mesh,
    inside_box,
    sample_depth,
    surface_metrics,
    threshold_table,
    visible_count,
)
from pipeline.core.errors import ReconError
from pipeline.core.geometry import backproject, inside_image, pixel_grid, project, transform_points
from pipeline.core.poses import invert_pose

logger = logging.getLogger(__name__)

DELTA_BOUNDS: tuple[float, ...] = (1.01, 1.05, 1.25)


def evaluate_meshes(
    est_mesh: Mesh | Path,
    gt_mesh: Mesh | Path,
    *,
    gt_from_est: np.ndarray | None = None,
    crop_box: tuple[np.ndarray, np.ndarray] | None = None,
    diagonal: float | None = None,
    thresholds_rel: Sequence[float] | None = DEFAULT_THRESHOLDS_REL,
    threshold_abs: float | Sequence[float] | None = None,
    margin: float = DEFAULT_MARGIN,
    max_dist_rel: float = DEFAULT_MAX_DIST_REL,
    gt_views: GtViews | None = None,
    min_views: int = 1,
    icp: bool = False,
    icp_max_dist_rel: float = 0.01,
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a reconstructed mesh against a GT mesh (protocol in the module docstring).

    Args:
        est_mesh, gt_mesh: meshes or mesh files.
        gt_from_est: 4x4 similarity applied to ``est_mesh`` first (None: identity).
        crop_box: (min (3,), max (3,)) of the GT object, GT frame (None: GT mesh bounds).
        diagonal: length the relative thresholds refer to (None: the crop box diagonal).
        thresholds_rel: F-score thresholds as fractions of ``diagonal``.
        threshold_abs: extra absolute threshold(s), GT units.
        margin: crop box growth per side, fraction of ``diagonal``.
        max_dist_rel: distance cap, fraction of ``diagonal``.
        gt_views: GT cameras + depth for the visibility filter of GT samples (None: no filter).
        min_views: a GT sample counts when at least this many GT views see it.
        icp: refine the alignment with point-to-plane ICP (max distance ``icp_max_dist_rel`` × diagonal).
        max_points: most samples per surface.
    Returns:
        JSON-able dict: ``accuracy``, ``completeness``, ``chamfer``, ``thresholds``,
        ``crop_box``, ``samples``, ``gt_from_est`` (final, ICP included) ...
    """
    started = time.perf_counter()
    est, gt = as_mesh(est_mesh), as_mesh(gt_mesh)
    T = np.eye(4) if gt_from_est is None else np.asarray(gt_from_est, dtype=np.float64)
    lo, hi = ((np.asarray(crop_box[0], np.float64), np.asarray(crop_box[1], np.float64)) if crop_box is not None
              else gt.bounds())
    if np.any(hi < lo):
        raise ReconError(f"empty crop box {lo.tolist()} .. {hi.tolist()}")
    diagonal = float(diagonal) if diagonal is not None else float(np.linalg.norm(hi - lo))
    if not diagonal > 0:
        raise ReconError("the GT object has a zero-size bounding box; cannot set relative thresholds")
    thresholds = threshold_table(diagonal, thresholds_rel, threshold_abs)
    tau_min, tau_max = min(thresholds.values()), max(thresholds.values())
    cap = max(max_dist_rel * diagonal, 2.0 * tau_max)
    box_lo, box_hi = lo - margin * diagonal, hi + margin * diagonal
    # Work in box-centred coordinates: Open3D's distance queries run in float32.
    centre = 0.5 * (box_lo + box_hi)
    shift = np.eye(4)
    shift[:3, 3] = -centre
    gt_c = gt.transformed(shift)
    b_lo, b_hi = box_lo - centre, box_hi - centre
    g_lo, g_hi = b_lo - cap, b_hi + cap
    spacing = 0.5 * tau_min
    rng = np.random.default_rng(seed)

    gt_surf = _Surface.build(gt_c, g_lo, g_hi, spacing, max_points, rng)
    if len(gt_surf.points) == 0:
        raise ReconError("the GT mesh has no surface inside the evaluation box; check the GT bounding box")
    est_surf = _Surface.build(est.transformed(shift @ T), g_lo, g_hi, spacing, max_points, rng)
    icp_info = None
    if icp and len(est_surf.points):
        icp_dist = icp_max_dist_rel * diagonal
        e_in, g_in = inside_box(est_surf.points, b_lo, b_hi), inside_box(gt_surf.points, b_lo, b_hi)
        T_icp = refine_icp(est_surf.points[e_in], gt_surf.points[g_in], gt_surf.normals[g_in], icp_dist)
        T = np.linalg.inv(shift) @ T_icp @ shift @ T
        est_surf = _Surface.build(est.transformed(shift @ T), g_lo, g_hi, spacing, max_points, rng)
        icp_info = {"max_dist": icp_dist,
                    "rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(T_icp[:3, :3]) - 1) / 2, -1, 1)))),
                    "translation": float(np.linalg.norm(T_icp[:3, 3]))}

    est_src = est_surf.points[inside_box(est_surf.points, b_lo, b_hi)]
    if len(est_src) == 0:
        raise ReconError("no reconstructed surface inside the GT object's box (after alignment); check the alignment, "
                         "or --no-align only for meshes in the GT frame")
    gt_in = gt_surf.points[inside_box(gt_surf.points, b_lo, b_hi)]
    visible_fraction = 1.0
    if gt_views is not None:
        seen = visible_count(gt_in + centre, gt_views) >= min_views
        visible_fraction = float(seen.mean()) if len(seen) else 0.0
        gt_in = gt_in[seen]
    if len(gt_in) == 0:
        raise ReconError("no GT surface seen by the GT cameras inside the evaluation box; check the GT folder")
    exact = 2.0 * tau_max + 4.0 * max(gt_surf.spacing, est_surf.spacing if math.isfinite(est_surf.spacing) else 0.0)
    d_acc = gt_surf.distance(est_src, exact, cap)
    d_comp = est_surf.distance(gt_in, exact, cap) if len(est_surf.points) else np.full(len(gt_in), cap)

    out = surface_metrics(d_acc, d_comp, thresholds, diagonal)
    out.update({
        "diagonal": diagonal,
        "crop_box": {"min": box_lo.tolist(), "max": box_hi.tolist(), "margin": margin},
        "max_dist": cap,
        "capped": {"accuracy": float(np.mean(d_acc >= cap)), "completeness": float(np.mean(d_comp >= cap))},
        "samples": {"est": int(len(est_src)), "gt": int(len(gt_in)), "gt_visible_fraction": visible_fraction,
                    "spacing_est": est_surf.spacing, "spacing_gt": gt_surf.spacing,
                    "visibility_filter": gt_views is not None},
        "gt_from_est": T.tolist(),
        "icp": icp_info,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return out


# ---- depth maps ----------------------------------------------------------------------------

def _depth_in_gt(uv_n2: np.ndarray, depth_n: np.ndarray, K_est: np.ndarray, est_cam_from_world: np.ndarray,
                 gt_from_est: np.ndarray, depth_gt: np.ndarray, K_gt: np.ndarray,
                 gt_cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z (N,), g (N,), paired (N,) bool): estimated points' depth in the GT camera (GT units) and the GT depth
    there."""
    gtcam_from_estcam = (np.asarray(gt_cam_from_world) @ np.asarray(gt_from_est)
                         @ invert_pose(np.asarray(est_cam_from_world, dtype=np.float64)))
    pts = backproject(torch.from_numpy(uv_n2)[None], torch.from_numpy(depth_n)[None],
                      torch.as_tensor(K_est, dtype=torch.float64)[None])
    pts_gt = transform_points(torch.as_tensor(gtcam_from_estcam, dtype=torch.float64)[None], pts)
    uv_gt, z = project(pts_gt, torch.as_tensor(K_gt, dtype=torch.float64)[None])
    hg, wg = depth_gt.shape
    keep = (z[0] > 1e-9) & inside_image(uv_gt[0], hg, wg)
    uv_gt, z = uv_gt[0].numpy(), z[0].numpy()
    g = sample_depth(np.asarray(depth_gt, dtype=np.float64), np.where(keep.numpy()[:, None], uv_gt, -1.0))
    return z, g, keep.numpy() & (g > 0)


def depth_pairs(depth_est: np.ndarray, valid_est: np.ndarray, K_est: np.ndarray, est_cam_from_world: np.ndarray,
                gt_from_est: np.ndarray, depth_gt: np.ndarray, K_gt: np.ndarray,
                gt_cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (estimated depth, GT depth), both GT units, for the valid pixels of one map.

    Each valid pixel centre is back-projected with its depth and camera (est
    frame), mapped by ``gt_from_est`` (a similarity, so its z in the GT camera
    is the estimated depth in GT units) and projected into the GT camera,
    where the GT depth is read (:func:`sample_depth`). Pixels that land
    outside the GT image, behind it or on GT background (depth 0) are dropped.

    Args:
        depth_est, valid_est: (H, W) estimated depth (est units) and validity.
        K_est, est_cam_from_world: its intrinsics (at H, W) and pose (est frame).
        gt_from_est: 4x4 similarity est → GT frame.
        depth_gt: (Hg, Wg) GT z-depth (0 = none); K_gt, gt_cam_from_world: GT camera.
    Returns:
        (pred (P,), gt (P,)).
    """
    h, w = depth_est.shape
    ok = valid_est & np.isfinite(depth_est) & (depth_est > 0)
    if not ok.any():
        return np.zeros(0), np.zeros(0)
    uv = pixel_grid(h, w, dtype=torch.float64).numpy()[ok]
    z, g, paired = _depth_in_gt(uv, depth_est[ok].astype(np.float64), K_est, est_cam_from_world, gt_from_est, depth_gt,
                                K_gt, gt_cam_from_world)
    return z[paired], g[paired]


def depth_error_image(depth_est: np.ndarray, valid_est: np.ndarray, K_est: np.ndarray, est_cam_from_world: np.ndarray,
                      gt_from_est: np.ndarray, depth_gt: np.ndarray, K_gt: np.ndarray,
                      gt_cam_from_world: np.ndarray) -> np.ndarray:
    """(H, W) signed relative depth error ``(z − g) / g`` of each valid pixel (> 0: too far), NaN where
    :func:`depth_pairs` has no pair.

    The pixel-wise form of :func:`depth_pairs` (same arguments and pairing).
    """
    h, w = depth_est.shape
    out = np.full((h, w), np.nan)
    ok = valid_est & np.isfinite(depth_est) & (depth_est > 0)
    if not ok.any():
        return out
    uv = pixel_grid(h, w, dtype=torch.float64).numpy()[ok]
    z, g, paired = _depth_in_gt(uv, depth_est[ok].astype(np.float64), K_est, est_cam_from_world, gt_from_est, depth_gt,
                                K_gt, gt_cam_from_world)
    err = np.full(len(z), np.nan)
    err[paired] = (z[paired] - g[paired]) / g[paired]
    out[ok] = err
    return out


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """AbsRel, RMSE (units of the inputs), MAE and δ<1.01/1.05/1.25 over paired depths."""
    if len(gt) == 0:
        return {"pixels": 0}
    ratio = np.maximum(pred / gt, gt / np.maximum(pred, 1e-12))
    out = {
        "pixels": int(len(gt)),
        "abs_rel": float(np.mean(np.abs(pred - gt) / gt)),
        "rmse": float(np.sqrt(np.mean((pred - gt) ** 2))),
        "mae": float(np.mean(np.abs(pred - gt))),
    }
    for b in DELTA_BOUNDS:
        out[f"delta_{b:g}"] = float(np.mean(ratio < b))
    return out


def evaluate_depth_stage(paths: dict[str, Path], gt_views: GtViews, gt_names: dict[str, str],
                         gt_from_est: np.ndarray) -> dict[str, Any] | None:
    """Depth metrics over the cached maps ``paths`` (image name → ``.npz``) that exist; None when none do.

    ``gt_names`` maps the estimated image names to GT names.
    """
    from pipeline.core.io import load_depth_map

    preds, gts, valid_fracs, views = [], [], [], 0
    for name, path in sorted(paths.items()):
        if not path.is_file():
            continue
        depth_gt = gt_views.depth(gt_names[name])
        if depth_gt is None:
            continue
        dm = load_depth_map(path)
        K_gt, T_gt = gt_views.cameras[gt_names[name]]
        p, g = depth_pairs(dm.depth, dm.valid, dm.K, dm.cam_from_world, gt_from_est, depth_gt, K_gt, T_gt)
        preds.append(p)
        gts.append(g)
        valid_fracs.append(float(np.mean(dm.valid)))
        views += 1
    if views == 0:
        return None
    out: dict[str, Any] = depth_metrics(np.concatenate(preds), np.concatenate(gts))
    out["views"] = views
    out["valid_fraction"] = float(np.mean(valid_fracs))
    return out


# ---- entry point ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GroundTruthInput:
    """What a GT argument resolves to."""

    mesh: Path
    gt_dir: Path | None
    crop_box: tuple[np.ndarray, np.ndarray] | None
    diagonal: float | None


def resolve_ground_truth(gt: Path) -> GroundTruthInput:
    """A scene's ``gt/`` folder, the scene folder holding ``gt/``, or a bare mesh file."""
    gt = Path(gt)
    if gt.is_file():
        return GroundTruthInput(gt, None, None, None)
    if not gt.is_dir():
        raise ReconError(f"{gt}: ground truth not found; pass a scene's gt/ folder, the scene folder or a mesh file")
    if not (gt / "mesh.ply").is_file() and (gt / "gt").is_dir():
        gt = gt / "gt"
    mesh = gt / "mesh.ply"
    if not mesh.is_file():
        raise ReconError(f"{gt}: no mesh.ply; pass a scene's gt/ folder (as written by `recon synth`) "
                         "or a GT mesh file")
    box, diagonal = None, None
    scene_json = gt / "scene.json"
    if scene_json.is_file():
        try:
            info = json.loads(scene_json.read_text())
        except ValueError as exc:
            raise ReconError(f"{scene_json}: not valid JSON ({exc})") from exc
        if "object_bbox_min" in info and "object_bbox_max" in info:
            box = (np.asarray(info["object_bbox_min"], np.float64), np.asarray(info["object_bbox_max"], np.float64))
            diagonal = float(info.get("object_diagonal") or np.linalg.norm(box[1] - box[0]))
    return GroundTruthInput(mesh, gt if (gt / "cameras.json").is_file() else None, box, diagonal)


def _find_sparse(out: Path) -> Path | None:
    for cand in ((out / "sparse",) if out.is_dir() else (out.parent / "sparse", out.parent.parent / "sparse")):
        if (cand / "images.bin").exists() or (cand / "images.txt").exists():
            return cand
    return None


def evaluate_reconstruction(
    out_dir: Path,
    gt: Path,
    *,
    thresholds_rel: Sequence[float] | None = DEFAULT_THRESHOLDS_REL,
    threshold_abs: float | Sequence[float] | None = None,
    align: bool = True,
    icp: bool = False,
    margin: float = DEFAULT_MARGIN,
    cameras: Path | None = None,
    json_path: Path | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a recon output (or a mesh file) against ground truth; writes the result as JSON.

    Args:
        out_dir: a recon output folder (``mesh.ply``, ``sparse/``, depth caches) or a mesh file.
        gt: a scene's ``gt/`` folder, the scene folder holding ``gt/``, or a GT mesh file.
        thresholds_rel: F-score thresholds, fractions of the GT object diagonal.
        threshold_abs: absolute F-score threshold(s) in GT units (added to the relative ones).
        align: align by the cameras (False: the mesh is already in the GT frame).
        icp: refine the camera alignment with point-to-plane ICP.
        margin: crop box growth per side, fraction of the GT object diagonal.
        cameras: COLMAP model of the reconstruction's cameras (default ``OUT/sparse``;
            for a mesh file, ``sparse/`` beside it or one folder up).
        json_path: where to write the result (default ``OUT/eval.json``, or
            ``<mesh stem>.eval.json`` beside a mesh file).
    Returns:
        The result dict (also written to ``json_path``): the surface metrics of
        :func:`evaluate_meshes` plus ``alignment``, ``depth`` (per stage) and inputs.
    Raises:
        ReconError: missing or unreadable inputs, too few shared cameras, ...
    """
    from pipeline.core.cache import write_json_atomic
    from pipeline.core.workspace import Workspace

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        est_mesh = out_dir / "mesh.ply"
        if not est_mesh.is_file():
            raise ReconError(f"{out_dir}: no mesh.ply; run `recon run` to the end first, or pass a mesh file")
        default_json = out_dir / "eval.json"
    elif out_dir.is_file():
        est_mesh = out_dir
        default_json = out_dir.with_name(f"{out_dir.stem}.eval.json")
    else:
        raise ReconError(f"{out_dir}: not found; pass a recon output folder or a mesh file")
    gt_in = resolve_ground_truth(gt)
    gt_views = GtViews.load(gt_in.gt_dir) if gt_in.gt_dir is not None else None

    sparse = Path(cameras) if cameras is not None else _find_sparse(out_dir)
    est_poses: dict[str, np.ndarray] = {}
    if sparse is not None and (align or gt_views is not None):
        est_poses = read_colmap_poses(sparse)
    pairs: list[tuple[str, str]] = []
    alignment: dict[str, Any]
    if align:
        if gt_views is None:
            raise ReconError(f"{gt}: no GT cameras (cameras.json) to align with; pass the scene's gt/ folder, "
                             "or --no-align for a mesh already in the GT frame")
        if sparse is None:
            raise ReconError(f"{out_dir}: no cameras (sparse/ COLMAP model) to align with; pass --no-align for a mesh "
                             "already in the GT frame")
        sim, pairs = align_to_gt_cameras(est_poses, gt_views, source=sparse, seed=seed)
        T = sim.matrix()
        alignment = {"method": "cameras", "scale": sim.scale, "cameras_common": len(pairs),
                     "cameras_inliers": int(sim.inliers.sum()),
                     "outlier_cameras": [a for (a, _), ok in zip(pairs, sim.inliers) if not ok],
                     "rms_camera_error": sim.rms}
        if sim.inliers.mean() < 0.5:
            logger.warning("only %d of %d cameras agree with the alignment; the scores may be meaningless",
                           int(sim.inliers.sum()), len(pairs))
    else:
        T = np.eye(4)
        alignment = {"method": "none"}
        if gt_views is not None and est_poses:
            pairs = match_cameras(est_poses, {n: c[1] for n, c in gt_views.cameras.items()})

    result: dict[str, Any] = {"est_mesh": str(est_mesh), "gt_mesh": str(gt_in.mesh),
                              "gt_dir": str(gt_in.gt_dir) if gt_in.gt_dir else None}
    result.update(evaluate_meshes(est_mesh, gt_in.mesh, gt_from_est=T, crop_box=gt_in.crop_box, diagonal=gt_in.diagonal,
                                  thresholds_rel=thresholds_rel, threshold_abs=threshold_abs, margin=margin,
                                  gt_views=gt_views, icp=icp, max_points=max_points, seed=seed))
    if "rms_camera_error" in alignment:
        alignment["rms_camera_error_rel"] = alignment["rms_camera_error"] / result["diagonal"]
    alignment["gt_from_est"] = result.pop("gt_from_est")
    alignment["icp"] = result.pop("icp")
    result["alignment"] = alignment

    depth: dict[str, Any] = {}
    if out_dir.is_dir() and gt_views is not None and pairs:
        ws = Workspace(scene_dir=out_dir, out_dir=out_dir)
        names = dict(pairs)
        for stage, path_of in (("depth", ws.depth_view), ("refine", ws.refine_view)):
            stats = evaluate_depth_stage({n: path_of(n) for n in names}, gt_views, names,
                                         np.asarray(alignment["gt_from_est"]))
            if stats is not None:
                depth[stage] = stats
    result["depth"] = depth
    result["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(Path(json_path) if json_path is not None else default_json, result)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A few human-readable lines of an evaluation result (for ``recon eval``)."""
    lines = [f"mesh {result.get('est_mesh', '?')} vs {result.get('gt_mesh', '?')} (diagonal {result['diagonal']:.4g})"]
    al = result.get("alignment", {})
    if al.get("method") == "cameras":
        lines.append(f"  alignment: scale {al['scale']:.4g}, {al['cameras_inliers']}/{al['cameras_common']} cameras, "
                     f"rms camera error {al['rms_camera_error']:.3g}" + (", ICP" if al.get("icp") else ""))
    acc, comp = result["accuracy"], result["completeness"]
    lines.append(f"  accuracy     mean {acc['mean']:.4g} ({100 * acc['mean_rel']:.3f} %)  median {acc['median']:.4g}")
    lines.append(f"  completeness mean {comp['mean']:.4g} ({100 * comp['mean_rel']:.3f} %)  median "
                 f"{comp['median']:.4g}")
    lines.append(f"  chamfer      {result['chamfer']:.4g} ({100 * result['chamfer_rel']:.3f} %)")
    for label, t in result["thresholds"].items():
        lines.append(f"  F@{label:<8} {t['fscore']:.4f}  (precision {t['precision']:.4f}, recall {t['recall']:.4f}, "
                     f"τ = {t['threshold']:.4g})")
    for stage, d in result.get("depth", {}).items():
        if d.get("pixels"):
            lines.append(f"  depth[{stage}] AbsRel {d['abs_rel']:.4f}  RMSE {d['rmse']:.4g}  δ<1.01 "
                         f"{d['delta_1.01']:.3f}  δ<1.05 {d['delta_1.05']:.3f}  δ<1.25 {d['delta_1.25']:.3f}  "
                         f"({d['views']} views)")
    return "\n".join(lines)

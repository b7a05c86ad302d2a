"""``recon diagnose``: checks a run the way the research notes did by hand.

* per-view INIT / PRED / DELTA depth statistics (mean, std, min, max);
* extrinsic convention: poses must be world→camera — the sparse points lie in
  front of the cameras that observe them, the cameras look towards the scene,
  and camera centres lie outside the fused surface;
* over-smoothing: Δz ≈ 0 everywhere means the regularizers dominate;
* anchoring residuals: the initial and the refined depth at the projections
  of the sparse points a view sees vs those points' depths.

Each check yields a verdict: ``ok``, ``warn`` or ``fail``; ``recon diagnose``
exits non-zero when one fails.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.geometry import project, transform_points
from pipeline.core.io import DepthMap, SfmScene, load_depth_map, load_sfm_scene
from pipeline.core.poses import invert_pose
from pipeline.core.raycast import NO_FACE, LoadedMesh, load_mesh
from pipeline.core.workspace import Workspace

logger = logging.getLogger(__name__)

FRONT_FRACTION_OK = 0.95
"""Share of sparse observations that must lie in front of their camera."""
OVERSMOOTH_REL_STD = 1e-4
REFINED_FRACTION_WARN = 0.01
"""Share of pixels that kept their refined depth (median over views) below which refinement changed (almost) nothing."""
CONSISTENCY_DROP_WARN = 0.02
"""Drop in the share of pixels a neighbour map agrees with (initial → refined, mean over views) that flags less
consistent views."""
"""Δz std relative to the mean depth below which refinement did (almost) nothing."""
FACING_FRACTION_OK = 0.9
"""Share of cameras whose optical axis must point towards the sparse points."""
REPROJECTION_OK_PX = 4.0
"""Median reprojection error (px) of OUT/sparse above which its poses do not explain its keypoints."""
OUTSIDE_FRACTION_OK = 0.9
"""Share of cameras that must lie outside the fused surface."""
ANCHOR_RESIDUAL_WARN = 0.05
"""Median relative depth residual at the sparse points above which the depth maps disagree with their anchors."""


@dataclass
class Check:
    name: str
    verdict: str
    detail: str


def depth_stats(values: np.ndarray) -> dict[str, float]:
    """mean/std/min/max of finite values (NaN when empty)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def points_in_front_fraction(scene: SfmScene, *, inverted: bool = False) -> float:
    """Share of (view, observed point) pairs with the point at positive depth in that camera.

    ``inverted``: the same with every pose inverted (as if the model held
    camera→world poses): near 1 there means the stored convention is wrong.
    """
    total = front = 0
    for v in scene.views:
        if len(v.point_ids) == 0:
            continue
        p = scene.points[v.point_ids]
        T = invert_pose(v.cam_from_world) if inverted else v.cam_from_world
        z = p @ T[2, :3] + T[2, 3]
        total += len(z)
        front += int((z > 0).sum())
    return front / total if total else float("nan")


def reprojection_errors(points: np.ndarray, point_ids: np.ndarray, uv: np.ndarray, K: np.ndarray,
                        cam_from_world: np.ndarray) -> np.ndarray:
    """Pixel distance between observed keypoints ``uv`` (N, 2) and the projections of their 3D points.

    Points behind the camera get an infinite error: a pose with the wrong
    convention cannot explain the observations.
    """
    pc = points[point_ids] @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = (pc[:, :2] / z[:, None]) * np.diag(K)[:2] + K[:2, 2]
    err = np.linalg.norm(proj - uv, axis=1)
    return np.where(z > 0, err, np.inf)


def model_reprojection_error(sparse_dir: Path) -> float:
    """Median reprojection error (px) of a COLMAP model folder, recomputed from its poses as they are written."""
    import pycolmap

    return reconstruction_reprojection_error(pycolmap.Reconstruction(str(sparse_dir)))


def reconstruction_reprojection_error(rec: Any) -> float:
    """Median reprojection error (px) of a ``pycolmap.Reconstruction``: NaN without observations, inf when
    most observed points lie behind their camera (see :func:`reprojection_errors`)."""
    ids = sorted(rec.point3D_ids())
    index = {p: i for i, p in enumerate(ids)}
    points = np.array([rec.points3D[p].xyz for p in ids]).reshape(-1, 3)
    errs = []
    for image_id in rec.reg_image_ids():
        im = rec.images[image_id]
        obs = [(index[p.point3D_id], p.xy) for p in im.points2D if p.has_point3D() and p.point3D_id in index]
        if not obs:
            continue
        T = np.eye(4)
        T[:3, :4] = im.cam_from_world().matrix()
        pid = np.array([o[0] for o in obs])
        uv = np.array([o[1] for o in obs])
        errs.append(reprojection_errors(points, pid, uv, np.asarray(im.camera.calibration_matrix()), T))
    return float(np.median(np.concatenate(errs))) if errs else float("nan")


def cameras_facing_scene_fraction(scene: SfmScene) -> float:
    """Share of cameras whose optical axis points towards the median sparse point (angle < 90°)."""
    if len(scene.points) == 0:
        return float("nan")
    centre = np.median(scene.points, axis=0)
    ok = 0
    for v in scene.views:
        axis = v.cam_from_world[2, :3]  # camera z axis in world coordinates
        ok += int(np.dot(axis, centre - v.center) > 0)
    return ok / len(scene.views)


def cameras_outside_mesh_fraction(scene: SfmScene, mesh: str | Path | LoadedMesh | None) -> float:
    """Share of cameras that see the mesh in front of them and are not enclosed by it (NaN without triangles).

    A camera inside a closed surface sees it in every direction; one outside
    sees it only in part of its view. We cast the camera's pixel rays (coarse
    grid) and the reversed rays: an outside camera has hits ahead and few behind.
    ``mesh``: a mesh file, or one already read (:func:`pipeline.core.raycast.load_mesh`).
    """
    if isinstance(mesh, (str, Path)):
        mesh = load_mesh(Path(mesh))
    if mesh is None:
        return float("nan")
    outside = 0
    for v in scene.views:
        us, vs = np.meshgrid(np.linspace(0.5, v.width - 0.5, 16), np.linspace(0.5, v.height - 0.5, 12))
        d_cam = np.stack([(us - v.K[0, 2]) / v.K[0, 0], (vs - v.K[1, 2]) / v.K[1, 1], np.ones_like(us)],
                         -1).reshape(-1, 3)
        d_world = d_cam @ v.cam_from_world[:3, :3]  # R^T d
        d_world /= np.linalg.norm(d_world, axis=1, keepdims=True)
        ahead = (mesh.raycaster.cast(v.center, d_world)[0] != NO_FACE).mean()
        behind = (mesh.raycaster.cast(v.center, -d_world)[0] != NO_FACE).mean()
        outside += int(ahead > 0.2 and behind < 0.9)
    return outside / len(scene.views)


def anchor_residuals(dm: DepthMap, points: np.ndarray) -> np.ndarray:
    """Relative residuals ``|d − z| / z`` of a depth map at the sparse points it sees.

    Args:
        dm: a cached depth map (depth in normalized units at its own resolution, its ``K`` and pose).
        points: (N, 3) sparse points observed by the view (normalized frame).
    Returns:
        (M,) residuals for the points in front of the camera that project
        onto a valid pixel (nearest pixel, COLMAP pixel convention).
    """
    if len(points) == 0:
        return np.zeros(0)
    T = torch.as_tensor(dm.cam_from_world, dtype=torch.float64)[None]
    K = torch.as_tensor(dm.K, dtype=torch.float64)[None]
    uv, z = project(transform_points(T, torch.as_tensor(points, dtype=torch.float64)[None]), K)
    uv, z = uv[0].numpy(), z[0].numpy()
    h, w = dm.depth.shape
    col, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
    ok = (z > 1e-9) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    col, row = col[ok].astype(np.int64), row[ok].astype(np.int64)
    d, valid = dm.depth[row, col].astype(np.float64), dm.valid[row, col]
    return np.abs(d[valid] - z[ok][valid]) / z[ok][valid]


def _finite(stats: list[dict[str, Any]], key: str) -> np.ndarray:
    v = np.array([s[key] for s in stats if isinstance(s.get(key), (int, float))], dtype=float)
    return v[np.isfinite(v)]


def refine_gate_checks(stats: list[dict[str, Any]]) -> list[Check]:
    """Checks on the refine gate's per-view statistics: did refinement change anything, did the views agree more or
    less."""
    checks: list[Check] = []
    refined, restored = _finite(stats, "refined_fraction"), _finite(stats, "restored_fraction")
    if len(refined):
        med, rest = float(np.median(refined)), float(np.mean(restored)) if len(restored) else 0.0
        if med < REFINED_FRACTION_WARN and rest < REFINED_FRACTION_WARN:
            checks.append(Check("refinement changed the depth", "warn",
                                f"only {med:.1%} of pixels kept their refined depth (median over views) and {rest:.1%} "
                                "were restored: refinement changed almost nothing (the regularizers or the gate win; "
                                "try refine.weight_photo or a higher refine.lr)"))
        else:
            checks.append(Check("refinement changed the depth", "ok",
                                f"{med:.1%} of pixels kept their refined depth (median), {rest:.1%} restored"))
    before, after = _finite(stats, "consistent_init"), _finite(stats, "consistent_refined")
    if len(before) and len(after):
        b, a = float(np.mean(before)), float(np.mean(after))
        detail = f"pixels a neighbour map agrees with: {b:.1%} initial → {a:.1%} refined (mean over views)"
        if a < b - CONSISTENCY_DROP_WARN:
            checks.append(Check("view consistency after refinement", "warn",
                                detail + ": refinement made the views less consistent"))
        else:
            checks.append(Check("view consistency after refinement", "ok", detail))
    return checks


def diagnose(ws: Workspace, mesh: LoadedMesh | None = None) -> dict[str, Any]:
    """Run every check that the available caches allow; returns a JSON-able report.

    ``mesh``: ``OUT/mesh.ply`` already read (:func:`pipeline.core.raycast.load_mesh`); None: read here.
    """
    checks: list[Check] = []
    views: dict[str, dict[str, Any]] = {}
    scene = load_sfm_scene(ws)

    front = points_in_front_fraction(scene)
    front_inv = points_in_front_fraction(scene, inverted=True)
    facing = cameras_facing_scene_fraction(scene)
    where = f"{ws.sfm_model_dir}"
    if not np.isfinite(front):
        checks.append(Check("extrinsic convention", "warn",
                            f"{where}: no sparse observations to check the poses against"))
    elif front >= FRONT_FRACTION_OK and facing >= FACING_FRACTION_OK:
        checks.append(Check("extrinsic convention", "ok",
                            f"{front:.1%} of sparse observations in front of their camera, "
                            f"{facing:.0%} of cameras face the sparse points: poses are world→camera (cam_from_world)"))
    else:
        hint = (f"; with every pose inverted {front_inv:.1%} would be: the poses are camera→world where world→camera "
                "is expected (invert them: R' = Rᵀ, t' = −Rᵀt)"
                if front_inv >= FRONT_FRACTION_OK else "; the poses are wrong or the model is broken")
        checks.append(Check("extrinsic convention", "fail",
                            f"{where}: only {front:.1%} of sparse observations lie in front of their camera and "
                            f"{facing:.0%} of cameras face the sparse points{hint}"))
    if ws.sparse_dir.exists():
        err = model_reprojection_error(ws.sparse_dir)
        if np.isnan(err):
            checks.append(Check("reprojection with stored poses", "warn",
                                f"{ws.sparse_dir}: no 3D points with observations to check the poses"))
        else:
            verdict = "ok" if err < REPROJECTION_OK_PX else "fail"
            detail = (f"{ws.sparse_dir}: median reprojection error {err:.2f} px with the poses as written"
                      if np.isfinite(err) else
                      f"{ws.sparse_dir}: most sparse points lie behind the cameras that observe them "
                      "with the poses as written")
            if verdict == "fail":
                detail += (": the poses do not explain the keypoints (wrong extrinsic convention, e.g. camera→world "
                           "written as world→camera)")
            checks.append(Check("reprojection with stored poses", verdict, detail))
    if ws.mesh_path.exists():
        outside = cameras_outside_mesh_fraction(scene, mesh if mesh is not None else ws.mesh_path)
        verdict = "ok" if outside >= OUTSIDE_FRACTION_OK else "fail"
        detail = f"{outside:.0%} of cameras see the mesh ahead and lie outside it"
        if verdict == "fail":
            detail += ": cameras inside or behind the fused surface (wrong pose convention, or a fused blob)"
        checks.append(Check("cameras outside the surface", verdict, detail))

    deltas_rel = []
    gate_stats: list[dict[str, Any]] = []
    residuals: dict[str, list[np.ndarray]] = {"INIT": [], "PRED": []}
    anchoring: dict[str, dict[str, Any]] = {}
    for v in scene.views:
        row: dict[str, Any] = {}
        anchor_row: dict[str, Any] = {}
        points = scene.points[v.point_ids]
        if ws.depth_view(v.name).exists():
            init = load_depth_map(ws.depth_view(v.name))
            row["INIT"] = depth_stats(np.where(init.valid, init.depth, np.nan))
            r = anchor_residuals(init, points)
            residuals["INIT"].append(r)
            anchor_row["INIT"] = {"points": int(len(r)), "median_rel": float(np.median(r)) if len(r) else float("nan")}
            if isinstance(init.stats.get("anchoring"), dict):
                anchor_row["depth_stage"] = {k: init.stats["anchoring"].get(k)
                                             for k in ("scale", "shift", "n_points", "residual_after", "applied")}
        if ws.refine_view(v.name).exists():
            ref = load_depth_map(ws.refine_view(v.name))
            row["PRED"] = depth_stats(np.where(ref.valid, ref.depth, np.nan))
            gate_stats.append(ref.stats)
            r = anchor_residuals(ref, points)
            residuals["PRED"].append(r)
            anchor_row["PRED"] = {"points": int(len(r)), "median_rel": float(np.median(r)) if len(r) else float("nan")}
            if ref.depth_init is not None:
                delta = np.where(ref.valid, ref.depth - ref.depth_init, np.nan)
                row["DELTA"] = depth_stats(delta)
                if np.isfinite(row["DELTA"]["std"]) and row["PRED"]["mean"] > 0:
                    deltas_rel.append(row["DELTA"]["std"] / row["PRED"]["mean"])
        views[v.name] = row
        if anchor_row:
            anchoring[v.name] = anchor_row

    if deltas_rel:
        med = float(np.median(deltas_rel))
        if med < OVERSMOOTH_REL_STD:
            checks.append(Check("over-smoothing", "warn",
                                f"Δz std is {med:.1e} of the depth: refinement barely moved the depth (regularizers "
                                "dominate, or lr too small)"))
        else:
            checks.append(Check("over-smoothing", "ok", f"median Δz std = {med:.2e} of the depth"))
    checks.extend(refine_gate_checks(gate_stats))
    med = {k: float(np.median(np.concatenate(r))) for k, r in residuals.items() if r and sum(len(x) for x in r)}
    if med:
        n = {k: int(sum(len(x) for x in residuals[k])) for k in med}
        detail = "; ".join(f"{k} depth vs sparse points: median |d − z|/z = {m:.2%} over {n[k]} points"
                           for k, m in med.items())
        worst = max(med.values())
        if worst > ANCHOR_RESIDUAL_WARN:
            checks.append(Check("anchoring residuals", "warn",
                                detail + ": the depth maps disagree with the scale anchors"))
        elif "PRED" in med and "INIT" in med and med["PRED"] > 2 * med["INIT"] + 1e-3:
            checks.append(Check("anchoring residuals", "warn",
                                detail + ": refinement drifted away from the scale anchors "
                                         "(raise refine.weight_anchor)"))
        else:
            checks.append(Check("anchoring residuals", "ok", detail))
    elif views and any(views.values()):
        checks.append(Check("anchoring residuals", "warn", "no sparse point projects onto a valid depth pixel"))
    return {"checks": [asdict(c) for c in checks], "views": views, "anchoring": anchoring,
            "num_views": len(scene.views), "num_points": int(len(scene.points))}


def worst_verdict(report: dict[str, Any]) -> str:
    order = {"ok": 0, "warn": 1, "fail": 2}
    return max((c["verdict"] for c in report["checks"]), key=order.__getitem__, default="ok")

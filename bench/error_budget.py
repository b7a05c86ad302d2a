"""Error budget of a fused mesh: which depth-map errors limit its F-score (a ground-truth oracle).

    python bench/error_budget.py SCENE OUT                       # the maps OUT's fuse stage read
    python bench/error_budget.py SCENE OUT_SKIP --refined OUT_RUN  # + what OUT_RUN's refinement fixed

``SCENE`` is a rendered scene (``recon synth`` / ``bench/run_bench.py``: ``gt/``
with cameras, depth and mesh), ``OUT`` a finished ``recon run`` of it. Each
*variant* rewrites the depth maps the fuse stage read (``OUT/refine/views``,
or ``OUT/depth/views`` for a run with ``--skip refine``) using the GT depth,
fuses them again with the run's fuse settings (``OUT/config.yaml``, then any
``--set`` overrides) and scores
the mesh with :func:`pipeline.analysis.evaluate.evaluate_meshes`, the protocol of
``recon eval``. The gain of a variant over ``as-run`` bounds what any
correction of those pixels — refinement included — can add to the mesh.

Variants (``e`` = signed relative depth error against GT,
:func:`pipeline.analysis.evaluate.depth_error_image`):

* ``as-run`` — unchanged (reproduces the run up to Open3D's nondeterminism);
* ``fix err >= 5%`` / ``fix 1-5%`` — those pixels get their GT depth;
  ``fix 1-5% at edges`` / ``elsewhere`` split the latter by depth edges in the
  map (a > 5 % depth jump within 3 pixels);
* ``drop err >= 1%`` — those pixels removed;
* ``restore dropped err < 5%`` — pixels the depth stage's consistency filter
  removed (valid in ``OUT/depth/adopted``, invalid in the fused map) whose
  adopted depth was within 5 % put back with that depth;
* ``fill dropped`` — every pixel the filter removed gets its GT depth;
* with ``--refined OUT_RUN``: ``fix 1-5% refinement fixed`` / ``... left`` —
  the 1-5 % pixels whose refined depth in ``OUT_RUN/refine/views`` is within
  1 % / is not, set to GT (which errors the refinement can reach, and what
  they are worth), and ``refined where better`` — each pixel takes the
  refined depth where it is closer to GT (a perfect per-pixel gate).

Prints a markdown table and writes ``OUT/error_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter, minimum_filter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.analysis.alignment import align_to_gt_cameras, read_colmap_poses  # noqa: E402
from pipeline.analysis.evaluate import depth_error_image, evaluate_meshes, resolve_ground_truth  # noqa: E402
from pipeline.analysis.metrics import GtViews  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.core.errors import ReconError  # noqa: E402
from pipeline.core.io import DepthMap, load_depth_map, load_rgb, load_sfm_scene  # noqa: E402
from pipeline.core.workspace import Workspace  # noqa: E402
from pipeline.depth.stage import adopted_depth_path  # noqa: E402
from pipeline.fuse.stage import map_focal_scale, resolve_params  # noqa: E402
from pipeline.fuse.tsdf import FusionFrame, fuse_depth_maps  # noqa: E402

EDGE_JUMP = 0.05
"""A pixel is at a depth edge when its 7x7 neighbourhood spans a relative depth jump above this."""


@dataclass
class ViewData:
    """One view: the fused map, its GT error image and the optional companions."""

    dm: DepthMap
    err: np.ndarray
    adopted: DepthMap | None = None
    adopted_err: np.ndarray | None = None
    refined: DepthMap | None = None
    refined_err: np.ndarray | None = None

    def gt_depth(self) -> np.ndarray:
        """The GT depth of each valid pixel in map units: ``depth / (1 + e)``."""
        return self.dm.depth / (1.0 + np.nan_to_num(self.err))


def depth_edges(depth: np.ndarray, jump: float = EDGE_JUMP, size: int = 7) -> np.ndarray:
    """Pixels whose ``size`` x ``size`` neighbourhood spans a relative depth jump above ``jump`` (invalid = 0
    ignored)."""
    hi = maximum_filter(depth, size)
    lo = minimum_filter(np.where(depth > 0, depth, np.inf), size)
    return (depth > 0) & (hi > lo * (1.0 + jump))


def _with(dm: DepthMap, depth: np.ndarray, valid: np.ndarray, confidence: np.ndarray | None = None) -> DepthMap:
    conf = dm.confidence if confidence is None else confidence
    return replace(dm, depth=np.where(valid, depth, 0.0).astype(np.float32), valid=valid,
                   confidence=np.where(valid, conf, 0.0).astype(np.float32))


def _band(e: np.ndarray, lo: float, hi: float = np.inf) -> np.ndarray:
    a = np.abs(np.nan_to_num(e, nan=-1.0))
    return (a >= lo) & (a < hi)


Variant = Callable[[ViewData], tuple[DepthMap, int]]


def fix(select: Callable[[ViewData], np.ndarray]) -> Variant:
    """Selected pixels get their GT depth."""
    def apply(v: ViewData) -> tuple[DepthMap, int]:
        sel = select(v) & v.dm.valid
        return _with(v.dm, np.where(sel, v.gt_depth(), v.dm.depth), v.dm.valid), int(sel.sum())
    return apply


def drop(select: Callable[[ViewData], np.ndarray]) -> Variant:
    def apply(v: ViewData) -> tuple[DepthMap, int]:
        sel = select(v) & v.dm.valid
        return _with(v.dm, v.dm.depth, v.dm.valid & ~sel), int(sel.sum())
    return apply


def restore_dropped(max_err: float | None) -> Variant:
    """Filter-dropped pixels back: with their adopted depth where it was within ``max_err``, or all with GT depth
    (None)."""
    def apply(v: ViewData) -> tuple[DepthMap, int]:
        assert v.adopted is not None and v.adopted_err is not None
        dropped = v.adopted.valid & ~v.dm.valid & np.isfinite(v.adopted_err)
        if max_err is None:
            depth = v.adopted.depth / (1.0 + np.nan_to_num(v.adopted_err))
        else:
            dropped &= np.abs(np.nan_to_num(v.adopted_err)) < max_err
            depth = v.adopted.depth
        conf = np.where(dropped, 1.0 if max_err is None else v.adopted.confidence, v.dm.confidence)
        return _with(v.dm, np.where(dropped, depth, v.dm.depth), v.dm.valid | dropped, conf), int(dropped.sum())
    return apply


def refined_where_better(v: ViewData) -> tuple[DepthMap, int]:
    assert v.refined is not None and v.refined_err is not None
    sel = (v.dm.valid & v.refined.valid & np.isfinite(v.err) & np.isfinite(v.refined_err)
           & (np.abs(v.refined_err) < np.abs(v.err)))
    return _with(v.dm, np.where(sel, v.refined.depth, v.dm.depth), v.dm.valid), int(sel.sum())


def variants(have_adopted: bool, have_refined: bool) -> dict[str, Variant]:
    mid = lambda v: _band(v.err, 0.01, 0.05)  # noqa: E731
    out: dict[str, Variant] = {
        "as-run": lambda v: (v.dm, 0),
        "fix err >= 5%": fix(lambda v: _band(v.err, 0.05)),
        "fix 1-5%": fix(mid),
        "fix 1-5% at edges": fix(lambda v: mid(v) & depth_edges(v.dm.depth)),
        "fix 1-5% elsewhere": fix(lambda v: mid(v) & ~depth_edges(v.dm.depth)),
        "drop err >= 1%": drop(lambda v: _band(v.err, 0.01)),
    }
    if have_adopted:
        out["restore dropped err < 5%"] = restore_dropped(0.05)
        out["fill dropped (GT)"] = restore_dropped(None)
    if have_refined:
        reached = lambda v: np.abs(np.nan_to_num(v.refined_err, nan=1.0)) < 0.01  # noqa: E731
        out["fix 1-5% refinement fixed"] = fix(lambda v: mid(v) & reached(v))
        out["fix 1-5% refinement left"] = fix(lambda v: mid(v) & ~reached(v))
        out["refined where better"] = refined_where_better
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scene", type=Path, help="rendered scene folder (with gt/)")
    ap.add_argument("out", type=Path, help="recon output folder of that scene (finished run)")
    ap.add_argument("--refined", type=Path, default=None,
                    help="another output folder of the scene whose refine/views to compare with")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the run's config for the fusions (e.g. fuse.trunc_voxels=6)")
    ap.add_argument("--device", default="cpu", help="Open3D device for the fusions")
    args = ap.parse_args(argv)

    ws = Workspace(args.scene, args.out)
    scene = load_sfm_scene(ws)
    source = "refine" if all(ws.refine_view(v.name).exists() for v in scene.views) else "depth"
    path_of = ws.refine_view if source == "refine" else ws.depth_view
    gt_in = resolve_ground_truth(args.scene / "gt")
    gt_views = GtViews.load(gt_in.gt_dir)
    gt_from_est = align_to_gt_cameras(read_colmap_poses(args.out / "sparse"), gt_views,
                                      source=args.out / "sparse")[0].matrix()
    cfg = load_config(files=[args.out / "config.yaml"] if (args.out / "config.yaml").exists() else [],
                      overrides=args.overrides)
    ws_ref = Workspace(args.scene, args.refined) if args.refined is not None else None

    def error(dm: DepthMap, name: str) -> np.ndarray:
        K_gt, T_gt = gt_views.cameras[name]
        return depth_error_image(dm.depth, dm.valid, dm.K, dm.cam_from_world, gt_from_est, gt_views.depth(name), K_gt,
                                 T_gt)

    data: list[ViewData] = []
    for v in scene.views:
        dm = load_depth_map(path_of(v.name))
        vd = ViewData(dm, error(dm, v.name))
        if adopted_depth_path(ws, v.name).exists():
            vd.adopted = load_depth_map(adopted_depth_path(ws, v.name))
            vd.adopted_err = error(vd.adopted, v.name)
        if ws_ref is not None:
            vd.refined = load_depth_map(ws_ref.refine_view(v.name))
            vd.refined_err = error(vd.refined, v.name)
        data.append(vd)
    have_adopted = all(d.adopted is not None for d in data)
    first = data[0].dm
    params = resolve_params(cfg.fuse, scene, map_focal_scale(first, scene.views[0]))
    rgbs = [load_rgb(v.image_path) for v in scene.views]  # read once, fused by every variant

    errs = np.concatenate([d.err[np.isfinite(d.err)] for d in data])
    print(f"{args.out} ({source} maps): {len(errs)} pixels with GT; |e|<1%: {np.mean(np.abs(errs) < 0.01):.4f}, "
          f"1-5%: {np.mean(_band(errs, 0.01, 0.05)):.4f}, >=5%: {np.mean(_band(errs, 0.05)):.4f}", flush=True)
    rows: list[dict[str, Any]] = []
    for name, apply in variants(have_adopted, ws_ref is not None).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        maps, changed = zip(*(apply(d) for d in data))
        frames = lambda: (FusionFrame(dm, rgb, None) for dm, rgb in zip(maps, rgbs))  # noqa: E731
        mesh = fuse_depth_maps(frames, params, args.device, total=len(maps)).mesh
        m = evaluate_meshes(mesh, gt_in.mesh, gt_from_est=gt_from_est, crop_box=gt_in.crop_box, diagonal=gt_in.diagonal,
                            gt_views=gt_views)
        t = m["thresholds"]
        row = {"variant": name, "pixels_changed": int(sum(changed)), "f_0.5": t["0.5%"]["fscore"],
               "f_1": t["1%"]["fscore"], "precision_1": t["1%"]["precision"], "recall_1": t["1%"]["recall"],
               "chamfer_pct": 100 * m["chamfer_rel"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"  {name:28s} changed {row['pixels_changed']:8d}  F@1 {row['f_1']:.4f}  Chamfer "
              f"{row['chamfer_pct']:.3f} %", flush=True)
    base = next((r for r in rows if r["variant"] == "as-run"), None)
    print("\n| variant | pixels changed | F@0.5 % | F@1 % | ΔF@1 vs as-run | Chamfer % |\n|---|---|---|---|---|---|")
    for r in rows:
        delta = f"{r['f_1'] - base['f_1']:+.4f}" if base else "-"
        print(f"| {r['variant']} | {r['pixels_changed']} | {r['f_0.5']:.4f} | {r['f_1']:.4f} | {delta} | "
              f"{r['chamfer_pct']:.3f} |")
    (args.out / "error_budget.json").write_text(json.dumps({"scene": str(args.scene), "out": str(args.out),
                                                            "source": source, "overrides": args.overrides,
                                                            "refined": str(args.refined) if args.refined else None,
                                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

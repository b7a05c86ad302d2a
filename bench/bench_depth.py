"""Benchmark of the depth stage: time and peak memory per view, depth error and fused F-score vs ground truth.

    python bench/bench_depth.py                                  # blob, thin, knot: 24 views 480x360
    python bench/bench_depth.py --shapes knot --set best_k=2 --set num_hypotheses=96
    python bench/bench_depth.py --views 12 --width 320 --height 240 --json /tmp/depth.json

For each rendered scene (``WORK/scenes/<shape>_<views>v_<w>x<h>_s<seed>``, the
naming of ``bench/run_bench.py`` and ``bench/bench_fuse.py``, so renders are
shared; rendered when missing) a subprocess runs
:func:`pipeline.depth.stage.compute_depth_maps` on the scene's *true* cameras
(:func:`pipeline.synthetic.groundtruth.scene_from_ground_truth`: true poses, sparse
points sampled from GT depth, normalized frame) — the sfm stage is another
engineer's, so this measures the depth stage alone — writing the maps to
``WORK/depth/<scene>/``. Reported per scene:

* time per view (wall and CPU seconds of pass 1, the estimation, averaged over
  the views; the geometric filter pass separately) and the peak RSS of that
  subprocess (``VmHWM``, imports included). Other work on the machine
  inflates wall time; CPU time is the steadier number.
* depth error of the final (filtered) and raw maps against GT depth over their
  valid pixels (:func:`pipeline.analysis.evaluate.depth_metrics`: AbsRel, δ<1.01,
  δ<1.05) and the valid fraction; the same inside the GT object's box grown
  by 5 % of its diagonal ("obj").
* unless ``--no-fuse``: the final maps fused with the fuse stage's defaults
  (:func:`pipeline.fuse.tsdf.fuse_depth_maps`, i.e. ``recon run --skip refine``)
  and scored like ``recon eval`` (:func:`pipeline.analysis.evaluate.evaluate_meshes`,
  GT ``mesh.ply`` in the object box + 5 %): F@0.5 % and F@1 % of the object
  diagonal.

Prints a markdown table and writes JSON (``--json``, default ``WORK/bench_depth.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synthetic.render import render_or_reuse

REPO = Path(__file__).resolve().parents[1]


def parse_overrides(items: list[str]):
    """``key=value`` strings (section ``depth.`` or ``mvs.`` optional: a bare key is looked up in both) → the
    (depth, mvs) settings, type-checked like ``--set``."""
    import dataclasses

    from pipeline.config import load_config
    from pipeline.depth.config import MvsConfig

    mvs_names = {f.name for f in dataclasses.fields(MvsConfig)}

    def full(item: str) -> str:
        if item.startswith(("depth.", "mvs.")):
            return item
        return f"{'mvs' if item.split('=', 1)[0].strip() in mvs_names else 'depth'}.{item}"

    cfg = load_config(overrides=[full(i) for i in items])
    return cfg.depth, cfg.mvs


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` from ``/proc/self/status`` where available: unlike ``ru_maxrss``,
    which Linux carries over ``fork`` + ``exec`` (a worker would report its
    parent's peak when that is larger), it starts afresh at ``exec``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(scene_dir: Path, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Depth maps of one scene in this process; JSON-able timings and memory."""
    from pipeline.core.workspace import Workspace
    from pipeline.depth.stage import compute_depth_maps
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    depth_cfg, mvs_cfg = parse_overrides(overrides)
    scene = scene_from_ground_truth(scene_dir)
    ws = Workspace.create(scene_dir, out_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = compute_depth_maps(scene, ws, depth_cfg, mvs_cfg)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "seconds_per_view": float(np.mean(result.seconds)),
        "cpu_seconds_per_view": float(np.mean(result.cpu_seconds)),
        "seconds_per_view_max": float(np.max(result.seconds)),
        "filter_seconds": round(result.filter_seconds, 3),
        "candidates_seconds": round(result.candidates_seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "views": len(result.written),
        "failed": result.failed,
        "torch_threads": __import__("torch").get_num_threads(),
    }


def depth_errors(scene_dir: Path, out_dir: Path, which: str) -> dict[str, Any]:
    """Depth metrics of the cached maps (``which``: ``views`` = final, ``raw``) against GT depth (normalized frame)."""
    import torch

    from pipeline.analysis.evaluate import depth_metrics
    from pipeline.core.io import load_depth_map
    from pipeline.core.workspace import Workspace
    from pipeline.depth.stage import raw_depth_path
    from pipeline.synthetic.groundtruth import gt_depth_path, scene_from_ground_truth

    scene = scene_from_ground_truth(scene_dir)
    ws = Workspace.create(scene_dir, out_dir)
    path_of = ws.depth_view if which == "views" else (lambda name: raw_depth_path(ws, name))
    info = json.loads((scene_dir / "gt" / "scene.json").read_text())
    T = scene.normalized_from_sfm
    s = float(T[0, 0])
    lo, hi = np.asarray(info["object_bbox_min"]) * s + T[:3, 3], np.asarray(info["object_bbox_max"]) * s + T[:3, 3]
    margin = 0.05 * np.linalg.norm(hi - lo)
    pred, gt, pred_o, gt_o, valid, valid_o = [], [], [], [], [], []
    for v in scene.views:
        if not path_of(v.name).exists():
            continue
        dm = load_depth_map(path_of(v.name))
        g = np.load(gt_depth_path(scene_dir / "gt", v.name)).astype(np.float64) * s
        h, w = dm.shape
        if g.shape != (h, w):
            g = torch.nn.functional.interpolate(torch.from_numpy(g)[None, None], size=(h, w),
                                                mode="nearest")[0, 0].numpy()
        K = dm.K
        u, vv = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        X = np.stack([(u - K[0, 2]) / K[0, 0] * g, (vv - K[1, 2]) / K[1, 1] * g, g], -1)
        Xw = (X - v.cam_from_world[:3, 3]) @ v.cam_from_world[:3, :3]
        box = np.all((Xw > lo - margin) & (Xw < hi + margin), -1) & (g > 0)
        m = dm.valid & (g > 0)
        pred.append(dm.depth[m])
        gt.append(g[m])
        pred_o.append(dm.depth[m & box])
        gt_o.append(g[m & box])
        valid.append(m.sum() / max(1, (g > 0).sum()))
        valid_o.append((m & box).sum() / max(1, box.sum()))
    out = {"all": depth_metrics(np.concatenate(pred), np.concatenate(gt)),
           "obj": depth_metrics(np.concatenate(pred_o), np.concatenate(gt_o))}
    out["all"]["valid_fraction"] = float(np.mean(valid))
    out["obj"]["valid_fraction"] = float(np.mean(valid_o))
    return out


def fuse_and_score(scene_dir: Path, out_dir: Path, max_points: int) -> dict[str, Any]:
    """Fuse the final maps with the fuse stage's defaults and score them like ``recon eval``."""
    from pipeline.core.io import load_depth_map
    from pipeline.core.workspace import Workspace
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    scene = scene_from_ground_truth(scene_dir)
    ws = Workspace.create(scene_dir, out_dir)
    views = [v for v in scene.views if ws.depth_view(v.name).exists()]
    return score_maps(scene_dir, scene, views, lambda i: load_depth_map(ws.depth_view(views[i].name)), max_points)


def score_maps(scene_dir: Path, scene, views, map_of: Callable[[int], Any],
               max_points: int = 400_000) -> dict[str, Any]:
    """Fuse ``map_of(i)`` (the DepthMap of ``views[i]``, loaded when fused) with the fuse defaults; score like ``recon
    eval``.

    Ground truth: the scene's ``gt/mesh.ply`` cropped to the object box + 5 %, F at 0.5 % and 1 % of the object
    diagonal.
    """
    from pipeline.analysis.evaluate import evaluate_meshes
    from pipeline.analysis.metrics import GtViews
    from pipeline.core.io import load_rgb
    from pipeline.fuse.config import FuseConfig
    from pipeline.fuse.stage import map_focal_scale, resolve_params
    from pipeline.fuse.tsdf import FusionFrame, fuse_depth_maps

    first = map_of(0)
    params = resolve_params(FuseConfig(), scene, map_focal_scale(first, views[0]))

    def frames():
        for i, v in enumerate(views):
            yield FusionFrame(map_of(i), lambda path=v.image_path: load_rgb(path))

    fused = fuse_depth_maps(frames, params, "auto", total=len(views))
    info = json.loads((scene_dir / "gt" / "scene.json").read_text())
    box = (np.asarray(info["object_bbox_min"]), np.asarray(info["object_bbox_max"]))
    return evaluate_meshes(fused.mesh, scene_dir / "gt" / "mesh.ply",
                           gt_from_est=np.linalg.inv(scene.normalized_from_sfm), crop_box=box,
                           diagonal=float(info["object_diagonal"]), gt_views=GtViews.load(scene_dir / "gt"),
                           thresholds_rel=(0.005, 0.01), max_points=max_points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="work folder (scenes/, depth/, bench_depth.json) [bench/results]")
    p.add_argument("--shapes", nargs="+", default=["blob", "thin", "knot"],
                   help="rendered shapes (pipeline.synthetic.shapes.SHAPES) [%(default)s]")
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="depth or mvs setting override, e.g. best_k=2 (repeatable)")
    p.add_argument("--no-fuse", action="store_true", help="skip fusing and scoring the maps (F-scores)")
    p.add_argument("--max-points", type=int, default=400_000, help="samples per surface in the evaluation")
    p.add_argument("--json", type=Path, default=None, help="result file [WORK/bench_depth.json]")
    p.add_argument("--worker", nargs=2, metavar=("SCENE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args.set), default=str))
        return

    from pipeline.core.cache import write_json_atomic
    from pipeline.synthetic.shapes import SHAPES

    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; shapes: {', '.join(SHAPES)}")
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        scene, _ = render_or_reuse(args.work / "scenes", shape, n_views=args.views, width=args.width,
                                   height=args.height, seed=args.seed)
        out_dir = args.work / "depth" / scene.name
        shutil.rmtree(out_dir, ignore_errors=True)  # time every view
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(scene), str(out_dir)]
        cmd += [a for s in args.set for a in ("--set", s)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            rows.append({"scene": scene.name, "shape": shape, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            print(f"{scene.name}: depth failed: {rows[-1]['error']}", file=sys.stderr)
            continue
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        row: dict[str, Any] = {"scene": scene.name, "shape": shape, "run": run,
                               "final": depth_errors(scene, out_dir, "views"),
                               "raw": depth_errors(scene, out_dir, "raw")}
        if not args.no_fuse:
            row["fused"] = fuse_and_score(scene, out_dir, args.max_points)
        rows.append(row)

    print(f"\nDepth stage ({args.views} views {args.width}x{args.height}; true cameras via scene_from_ground_truth, "
          "not the sfm stage"
          + (f"; {' '.join(args.set)}" if args.set else "") + ")\n")
    print("| scene | s/view (wall) | CPU s/view | filter s | peak RSS MiB | maps | AbsRel | δ<1.01 | δ<1.05 | valid | "
          "obj AbsRel | obj δ<1.01 | obj valid | raw δ<1.01 | raw valid | F@0.5% | F@1% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scene']} | error: {r['error']} |")
            continue
        t, f, raw = r["run"], r["final"], r["raw"]
        fs = r.get("fused", {}).get("thresholds", {})
        f05 = f"{fs['0.5%']['fscore']:.4f}" if fs else "-"
        f1 = f"{fs['1%']['fscore']:.4f}" if fs else "-"
        print(f"| {r['scene']} | {t['seconds_per_view']:.2f} | {t['cpu_seconds_per_view']:.2f} | "
              f"{t['filter_seconds']:.1f} | {t['peak_rss_mib']:.0f} | {t['views']} | {f['all']['abs_rel']:.4f} | "
              f"{f['all']['delta_1.01']:.3f} | {f['all']['delta_1.05']:.3f} | {f['all']['valid_fraction']:.3f} | "
              f"{f['obj']['abs_rel']:.4f} | {f['obj']['delta_1.01']:.3f} | {f['obj']['valid_fraction']:.3f} | "
              f"{raw['all']['delta_1.01']:.3f} | {raw['all']['valid_fraction']:.3f} | {f05} | {f1} |")
    out = args.json or (args.work / "bench_depth.json")
    write_json_atomic(out, {"views": args.views, "width": args.width, "height": args.height, "seed": args.seed,
                            "overrides": args.set,
                            "cameras": "ground truth (pipeline.synthetic.groundtruth.scene_from_ground_truth), "
                                       "not the sfm stage",
                            "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

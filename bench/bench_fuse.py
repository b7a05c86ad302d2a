"""Benchmark of the fuse stage: ground-truth depth → TSDF, the upper bound of docs/conventions.md.

    python bench/bench_fuse.py                                   # blob, thin, knot: 24 views 480x360
    python bench/bench_fuse.py --shapes knot --set voxel_factor=1.5 --set trunc_voxels=5
    python bench/bench_fuse.py --views 12 --width 320 --height 240

For each rendered scene (``WORK/scenes/<shape>_<views>v_<w>x<h>_s<seed>``, the
naming of ``bench/run_bench.py``, so renders are shared; rendered when missing)
a subprocess fuses the GT depth maps and colours with
:func:`pipeline.synthetic.fusion.fuse_ground_truth` — sizes derived automatically from the
true cameras and sparse points sampled from GT depth, exactly as the stage
derives them — and writes the mesh in the GT frame to
``WORK/fuse/<scene>/mesh.ply``. Its fusion time (load + count + integrate +
extract + clean; wall and CPU seconds — other work on the machine inflates the
wall time) and peak RSS (``ru_maxrss`` of that subprocess, imports
included) are reported. The mesh is then scored with
:func:`pipeline.analysis.evaluate.evaluate_meshes`, the protocol of ``recon eval``
(GT ``mesh.ply``, GT object box + 5 % of its diagonal, GT samples that a GT
camera sees), and once more against ``gt/object.ply`` alone (the floor strip
inside the box then counts as error). Prints a markdown table and writes
``WORK/bench_fuse.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synthetic.render import render_or_reuse

REPO = Path(__file__).resolve().parents[1]


def parse_overrides(items: list[str]):
    """``key=value`` strings (section ``fuse.`` optional) → the fuse settings, type-checked like ``--set``."""
    from pipeline.config import load_config

    return load_config(overrides=[i if i.startswith("fuse.") else f"fuse.{i}" for i in items]).fuse


def worker(scene: Path, mesh_path: Path, device: str, overrides: list[str]) -> dict[str, Any]:
    """Fuse one scene's GT depth (this process), write the mesh in the GT frame; JSON-able numbers."""
    import open3d as o3d

    from pipeline.synthetic.fusion import fuse_ground_truth

    started, cpu_started = time.perf_counter(), time.process_time()
    result, sfm_scene, params = fuse_ground_truth(scene, parse_overrides(overrides), device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    mesh = result.mesh
    mesh.transform(np.linalg.inv(sfm_scene.normalized_from_sfm))
    mesh_path.parent.mkdir(parents=True, exist_ok=True)
    o3d.io.write_triangle_mesh(str(mesh_path), mesh)
    scale = float(sfm_scene.normalized_from_sfm[0, 0])
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "voxel_size_gt": params.voxel_size / scale,
        "params": {k: v for k, v in vars(params).items()},
        "stats": result.stats,
        "vertices": len(mesh.vertices),
        "faces": len(mesh.triangles),
    }


def score(mesh_path: Path, scene: Path, gt_mesh: str, max_points: int) -> dict[str, Any]:
    from pipeline.analysis.evaluate import evaluate_meshes
    from pipeline.analysis.metrics import GtViews

    info = json.loads((scene / "gt" / "scene.json").read_text())
    box = (np.asarray(info["object_bbox_min"]), np.asarray(info["object_bbox_max"]))
    return evaluate_meshes(mesh_path, scene / "gt" / gt_mesh, crop_box=box, diagonal=float(info["object_diagonal"]),
                           gt_views=GtViews.load(scene / "gt"), thresholds_rel=(0.005, 0.01), max_points=max_points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="work folder (scenes/, fuse/, bench_fuse.json) [bench/results]")
    p.add_argument("--shapes", nargs="+", default=["blob", "thin", "knot"],
                   help="rendered shapes (pipeline.synthetic.shapes.SHAPES) [%(default)s]")
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="Open3D device: auto, cpu or cuda [auto]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fuse setting override, e.g. voxel_factor=1.5 (repeatable)")
    p.add_argument("--max-points", type=int, default=400_000, help="samples per surface in the evaluation")
    p.add_argument("--json", type=Path, default=None, help="result file [WORK/bench_fuse.json]")
    p.add_argument("--worker", nargs=2, metavar=("SCENE", "MESH"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args.device, args.set), default=str))
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
        mesh_path = args.work / "fuse" / scene.name / "mesh.ply"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(scene), str(mesh_path), "--device",
               args.device]
        cmd += [a for s in args.set for a in ("--set", s)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            rows.append({"scene": scene.name, "shape": shape, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            print(f"{scene.name}: fusion failed: {rows[-1]['error']}", file=sys.stderr)
            continue
        fused = json.loads(proc.stdout.strip().splitlines()[-1])
        full = score(mesh_path, scene, "mesh.ply", args.max_points)
        obj = score(mesh_path, scene, "object.ply", args.max_points)
        rows.append({"scene": scene.name, "shape": shape, "fusion": fused, "eval": full, "eval_object_only": obj})

    print(f"\nGT depth -> TSDF ({args.views} views {args.width}x{args.height}, device {args.device}"
          + (f", {' '.join(args.set)}" if args.set else "") + ")\n")
    print("| scene | voxel (% diag) | vertices | F@0.5% | F@1% | Chamfer (% diag) | F@0.5% obj-only | Chamfer obj-only "
          "| fusion s (wall) | fusion CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scene']} | error: {r['error']} |")
            continue
        e, o, f = r["eval"], r["eval_object_only"], r["fusion"]
        diag = e["diagonal"]
        print(f"| {r['scene']} | {100 * f['voxel_size_gt'] / diag:.3f} | {f['vertices']} | "
              f"{e['thresholds']['0.5%']['fscore']:.4f} | {e['thresholds']['1%']['fscore']:.4f} | "
              f"{100 * e['chamfer_rel']:.3f} | {o['thresholds']['0.5%']['fscore']:.4f} | "
              f"{100 * o['chamfer_rel']:.3f} | {f['seconds']:.2f} | {f['cpu_seconds']:.2f} | {f['peak_rss_mib']:.0f} |")
    out = args.json or (args.work / "bench_fuse.json")
    write_json_atomic(out, {"views": args.views, "width": args.width, "height": args.height, "seed": args.seed,
                            "device": args.device, "overrides": args.set, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

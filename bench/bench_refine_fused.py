"""Fused F-score of the depth stage's maps with and without refinement (and its consistency gate).

    python bench/bench_depth.py --shapes blob thin knot            # depth maps on true cameras → bench/results/depth/
    python bench/bench_refine_fused.py --shapes blob thin knot     # refine them three ways, fuse, score

For each scene of ``WORK/depth/<scene>`` (written by ``bench/bench_depth.py``)
the final depth maps are (a) fused as they are (``--skip refine``), (b)
refined with the defaults but ``keep_if_more_consistent=False``, (c) refined
with the defaults; each set is fused with the fuse defaults and scored like
``recon eval`` (GT ``mesh.ply`` in the object box + 5 %). Also the depth error
against GT depth (AbsRel, δ<1.01) over the valid pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def depth_error(scene_dir: Path, views, maps, scale: float) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from pipeline.synthetic.groundtruth import load_gt_depth

    errs = []
    for v, dm in zip(views, maps):
        g = load_gt_depth(scene_dir / "gt", v.name) * scale
        g = F.interpolate(torch.as_tensor(g, dtype=torch.float32)[None, None], size=dm.depth.shape,
                          mode="nearest")[0, 0].numpy()
        m = dm.valid & (g > 0)
        errs.append(np.abs(dm.depth[m] - g[m]) / g[m])
    e = np.concatenate(errs)
    return {"abs_rel": float(e.mean()), "delta_1.01": float((e < 0.01).mean())}


def fused_scores(scene_dir: Path, scene, views, maps) -> dict[str, float]:
    """F@0.5 %, F@1 % and Chamfer (% of the diagonal) of ``maps`` fused (:func:`bench_depth.score_maps`)."""
    from bench_depth import score_maps

    r = score_maps(scene_dir, scene, views, lambda i: maps[i])
    t = r["thresholds"]
    return {"F@0.5%": t["0.5%"]["fscore"], "F@1%": t["1%"]["fscore"], "chamfer_%": 100 * r["chamfer_rel"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="bench_depth.py's work folder [bench/results]")
    p.add_argument("--shapes", nargs="+", default=["blob", "thin", "knot"])
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from pipeline.core.io import load_depth_map, load_rgb
    from pipeline.core.workspace import Workspace
    from pipeline.refine.stage import RefineConfig, refine_depth_maps
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    rows = []
    for shape in args.shapes:
        name = f"{shape}_{args.views}v_{args.width}x{args.height}_s{args.seed}"
        scene_dir, out = args.work / "scenes" / name, args.work / "depth" / name
        if not out.exists():
            raise SystemExit(f"{out}: no depth maps; run `python bench/bench_depth.py --work {args.work} --shapes "
                             f"{shape}` first")
        scene = scene_from_ground_truth(scene_dir)
        ws = Workspace.create(scene_dir, out)
        views = [v for v in scene.views if ws.depth_view(v.name).exists()]
        init = [load_depth_map(ws.depth_view(v.name)) for v in views]
        images = [load_rgb(v.image_path, max_size=max(dm.depth.shape)) for v, dm in zip(views, init)]
        scale = float(scene.normalized_from_sfm[0, 0])
        variants = {"skip refine": init}
        seconds = {}
        for label, gate in (("refined, no gate", False), ("refined, gate", True)):
            t0 = time.perf_counter()
            variants[label], _ = refine_depth_maps(views, init, scene.points,
                                                   dataclasses.replace(RefineConfig(), keep_if_more_consistent=gate),
                                                   "cpu", images=images)
            seconds[label] = time.perf_counter() - t0
        for label, maps in variants.items():
            row = {"scene": name, "variant": label, "seconds": seconds.get(label),
                   **depth_error(scene_dir, views, maps, scale), **fused_scores(scene_dir, scene, views, maps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| scene | variant | AbsRel | δ<1.01 | F@0.5 % | F@1 % | Chamfer % |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scene']} | {r['variant']} | {r['abs_rel']:.4f} | {r['delta_1.01']:.3f} | {r['F@0.5%']:.4f} | "
              f"{r['F@1%']:.4f} | {r['chamfer_%']:.3f} |")


if __name__ == "__main__":
    main()

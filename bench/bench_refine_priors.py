"""Refinement of plane-sweep depth and of monocular-like priors: fused F-score with and without the refine stage.

    python bench/bench_refine_priors.py                                   # blob knot thin × mvs mild medium strong
    python bench/bench_refine_priors.py --shapes knot --inputs medium --set refine.weight_photo=0

For each rendered scene (``WORK/scenes/<shape>_<views>v_<w>x<h>_s<seed>``,
shared with ``bench/bench_depth.py``) and each input, on the scene's *true*
cameras (:func:`pipeline.synthetic.groundtruth.scene_from_ground_truth`):

* ``mvs``: the depth stage's default plane sweep;
* ``mild`` / ``medium`` / ``strong``: ``depth.estimator=prior`` reading
  relative inverse depth made from the GT depth by
  :func:`pipeline.synthetic.priors.monocular_prior` (unknown scale and shift,
  smoothed edges, a different low-frequency warp and gamma per view), anchored
  by the depth stage to the sparse points.

The depth maps are fused as they are (``recon run --skip refine``) and after
:func:`pipeline.refine.stage.refine_depth_maps` with the refine defaults (plus
``--set`` overrides), each with the fuse defaults, and scored like
``recon eval``. Also reported: the refine wall time, Δz std relative to the
depth, the median anchor residual before → after, and the share of pixels a
neighbour map agrees with before → after (the gate's statistics).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

INPUTS = ("mvs", "mild", "medium", "strong")


def _depth_maps(scene_dir: Path, scene, work: Path, which: str, seed: int):
    """Run the depth stage for ``which`` input into ``work``; returns (Workspace, MvsConfig)."""
    from pipeline.core.workspace import Workspace, view_stem
    from pipeline.depth.stage import (
        DepthConfig,
        DepthEstimator,
        MvsConfig,
        PriorKind,
        compute_depth_maps,
    )
    from pipeline.synthetic.groundtruth import load_gt_depth
    from pipeline.synthetic.priors import STRENGTHS, monocular_prior

    shutil.rmtree(work, ignore_errors=True)
    if which == "mvs":
        ws = Workspace.create(scene_dir, work / "out")
        cfg = DepthConfig(device="cpu")
    else:
        ws = Workspace(scene_dir=work / "scene", out_dir=work / "out")
        (ws.scene_dir / "depth_prior").mkdir(parents=True)
        rng = np.random.default_rng(seed)
        for v in scene.views:
            prior = monocular_prior(load_gt_depth(scene_dir / "gt", v.name), rng, STRENGTHS[which])
            np.save(ws.scene_dir / "depth_prior" / f"{view_stem(v.name)}.npy", prior)
        cfg = DepthConfig(estimator=DepthEstimator.prior, prior_kind=PriorKind.inverse_depth, prior_affine=True,
                          device="cpu")
    mvs_cfg = MvsConfig()
    compute_depth_maps(scene, ws, cfg, mvs_cfg)
    return ws, mvs_cfg


def _anchor_residual(maps, scene) -> float:
    from pipeline.analysis.diagnose import anchor_residuals

    r = np.concatenate([anchor_residuals(dm, scene.points[v.point_ids]) for dm, v in zip(maps, scene.views)])
    return float(np.median(r)) if len(r) else float("nan")


def run_case(scene_dir: Path, work: Path, which: str, seed: int, overrides: list[str],
             max_points: int) -> dict[str, Any]:
    from bench_depth import score_maps

    from pipeline.config import load_config
    from pipeline.core.io import load_depth_map, load_rgb
    from pipeline.depth.stage import filter_input_path
    from pipeline.refine.stage import refine_depth_maps
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    scene = scene_from_ground_truth(scene_dir)
    ws, mvs_cfg = _depth_maps(scene_dir, scene, work, which, seed)
    cfg = load_config(overrides=overrides).refine
    init = [load_depth_map(ws.depth_view(v.name)) for v in scene.views]
    images = [load_rgb(v.image_path, max_size=max(m.depth.shape)) for v, m in zip(scene.views, init)]
    cands = [load_depth_map(p) if (p := filter_input_path(ws, mvs_cfg, v.name)).exists() else None for v in scene.views]
    t0 = time.perf_counter()
    refined, log = refine_depth_maps(scene.views, init, scene.points, cfg, "cpu", images=images, candidates=cands)
    seconds = time.perf_counter() - t0

    def scores(maps) -> dict[str, float]:
        t = score_maps(scene_dir, scene, scene.views, lambda i: maps[i], max_points)
        th = t["thresholds"]
        return {"F@0.5%": th["0.5%"]["fscore"], "P@0.5%": th["0.5%"]["precision"], "R@0.5%": th["0.5%"]["recall"],
                "F@1%": th["1%"]["fscore"], "chamfer_%": 100 * t["chamfer_rel"]}

    stats = list(log["views"].values())
    mean = lambda k: float(np.nanmean([s[k] for s in stats]))  # noqa: E731
    dz_rel = [float(np.std((r.depth - r.depth_init)[r.valid]) / np.mean(r.depth[r.valid])) for r in refined
              if r.valid.any()]
    return {"input": which, "skip": scores(init), "refine": scores(refined), "refine_seconds": seconds,
            "dz_std_rel": float(np.median(dz_rel)) if dz_rel else float("nan"),
            "anchor_residual": [_anchor_residual(init, scene), _anchor_residual(refined, scene)],
            "consistent": [mean("consistent_init"), mean("consistent_refined")],
            "refined_fraction": mean("refined_fraction"), "restored_fraction": mean("restored_fraction")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="work folder (scenes/, refine_priors/) [bench/results]")
    p.add_argument("--shapes", nargs="+", default=["blob", "knot", "thin"])
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0, help="render and prior seed")
    p.add_argument("--set", action="append", default=[], metavar="refine.KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--max-points", type=int, default=400_000)
    p.add_argument("--json", type=Path, default=None, help="result file [WORK/bench_refine_priors.json]")
    args = p.parse_args()

    from pipeline.core.cache import write_json_atomic
    from pipeline.synthetic.render import render_or_reuse

    rows = []
    for shape in args.shapes:
        scene_dir, _ = render_or_reuse(args.work / "scenes", shape, n_views=args.views, width=args.width,
                                       height=args.height, seed=args.seed)
        for which in args.inputs:
            row = {"scene": scene_dir.name, **run_case(scene_dir, args.work / "refine_priors" / scene_dir.name / which,
                                                       which, args.seed, args.set, args.max_points)}
            rows.append(row)
            s, r = row["skip"], row["refine"]
            print(f"{scene_dir.name} {which}: F@1 % {s['F@1%']:.4f} -> {r['F@1%']:.4f}, refine "
                  f"{row['refine_seconds']:.0f} s", flush=True)

    print(f"\nRefinement ({args.views} views {args.width}x{args.height}, true cameras"
          + (f"; {' '.join(args.set)}" if args.set else "") + ")\n")
    print("| scene | input | skip F@0.5% / F@1% / Chamfer | refined F@0.5% / F@1% / Chamfer | R@0.5% skip → refined | "
          "anchor residual | agreeing px | Δz std/z | refine s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, f = r["skip"], r["refine"]
        print(f"| {r['scene']} | {r['input']} | {s['F@0.5%']:.4f} / {s['F@1%']:.4f} / {s['chamfer_%']:.3f} | "
              f"{f['F@0.5%']:.4f} / {f['F@1%']:.4f} / {f['chamfer_%']:.3f} | {s['R@0.5%']:.4f} → {f['R@0.5%']:.4f} | "
              f"{r['anchor_residual'][0]:.2%} → {r['anchor_residual'][1]:.2%} | "
              f"{r['consistent'][0]:.1%} → {r['consistent'][1]:.1%} | {r['dz_std_rel']:.3f} | "
              f"{r['refine_seconds']:.0f} |")
    out = args.json or (args.work / "bench_refine_priors.json")
    write_json_atomic(out, {"views": args.views, "width": args.width, "height": args.height, "seed": args.seed,
                            "overrides": args.set, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

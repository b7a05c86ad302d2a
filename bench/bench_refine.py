"""Benchmark of the refine stage: time, peak memory and depth error before/after on rendered scenes.

Each case renders (once, cached) a synthetic scene with ``pipeline.synthetic.render``,
builds its initial depth maps from the ground truth with a known corruption
(``warp``: smooth per-view 1 + 2 % sin field and 0.5 % noise; ``mvs``: 0.5 %
noise, 3 % outliers of ±5-30 %, 3 % holes) or runs the depth stage's
plane-sweep MVS on the true cameras (``real``), refines them with
:func:`pipeline.refine.stage.refine_depth_maps` and measures against the GT depth.
Every case runs in a fresh process so its peak RSS (``getrusage``) is its own.

Example (the numbers in the refine README table)::

    python bench/bench_refine.py --shapes blob,thin,knot --views 24 --width 480 --height 360 \
        --corruptions warp,mvs,real --out bench/results/refine.json
    python bench/bench_refine.py --lr 5e-5 2e-3 ...   # the learning-rate comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def scene_dir_for(cache: Path, shape: str, views: int, width: int, height: int, seed: int) -> Path:
    return cache / f"{shape}_{views}v_{width}x{height}_s{seed}"


def ensure_scene(cache: Path, shape: str, views: int, width: int, height: int, seed: int) -> Path:
    """Render the scene unless a complete rendering is cached."""
    from pipeline.synthetic.render import render_scene

    out = scene_dir_for(cache, shape, views, width, height, seed)
    if not (out / "gt" / "scene.json").exists():
        render_scene(out, shape=shape, n_views=views, width=width, height=height, seed=seed)
    return out


def run_case(args: dict) -> dict:
    """One refinement in this (fresh) process; returns the measurements."""
    import torch

    from pipeline.core.geometry import default_device
    from pipeline.core.io import DepthMap, load_rgb
    from pipeline.refine.stage import RefineConfig, refine_depth_maps
    from pipeline.synthetic.corruptions import corrupt_depth, depth_error, ground_truth_depths
    from pipeline.synthetic.groundtruth import scene_from_ground_truth

    scene_dir = Path(args["scene_dir"])
    scene = scene_from_ground_truth(scene_dir)
    gts = ground_truth_depths(scene_dir, scene.views, scene.normalized_from_sfm)
    if args["corruption"] == "real":
        # The depth stage's plane-sweep MVS on the true cameras (cached beside the scene).
        from pipeline.core.io import load_depth_map
        from pipeline.core.workspace import Workspace
        from pipeline.depth.stage import DepthConfig, MvsConfig, compute_depth_maps

        ws = Workspace.create(scene_dir, scene_dir / "recon_bench")
        compute_depth_maps(scene, ws, DepthConfig(), MvsConfig())
        keep = [i for i, v in enumerate(scene.views) if ws.depth_view(v.name).exists()]
        init = [load_depth_map(ws.depth_view(scene.views[i].name)) for i in keep]
        scene = dataclasses.replace(scene, views=[scene.views[i] for i in keep])
        gts = [gts[i] for i in keep]
        if init[0].depth.shape != gts[0].shape:
            raise SystemExit(f"real init at {init[0].depth.shape} but GT at {gts[0].shape}: render at "
                             "depth.max_image_side or below")
    else:
        rng = np.random.default_rng(args["seed"])
        init = []
        for v, g in zip(scene.views, gts):
            d, valid, conf = corrupt_depth(g, args["corruption"], rng)
            init.append(DepthMap(name=v.name, depth=d, confidence=conf, valid=valid, K=v.K,
                                 cam_from_world=v.cam_from_world))
    images = [load_rgb(v.image_path) for v in scene.views]
    import yaml

    from pipeline.core.settings import coerce, resolved_hints

    cfg = RefineConfig()
    hints = resolved_hints(RefineConfig)
    for key, value in args["overrides"].items():
        if key not in hints:
            raise SystemExit(f"unknown refine setting {key!r}; valid: {', '.join(hints)}")
        setattr(cfg, key, coerce(yaml.safe_load(value), hints[key], f"refine.{key}"))
    device = default_device(args["device"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    maps, log = refine_depth_maps(scene.views, init, scene.points, cfg, device, images=images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def errors(ms: list) -> dict:
        es = [depth_error(m.depth, g, m.valid) for m, g in zip(ms, gts)]
        n = sum(e["pixels"] for e in es)
        allerr = np.concatenate([np.abs(m.depth[m.valid & (g > 0)] - g[m.valid & (g > 0)]) / g[m.valid & (g > 0)]
                                 for m, g in zip(ms, gts)])
        return {"mean": float(sum(e["mean"] * e["pixels"] for e in es) / n), "median": float(np.median(allerr)),
                "p99": float(np.percentile(allerr, 99)), "within_1pct": float((allerr < 0.01).mean())}

    before, after = errors(init), errors(maps)
    return {
        "scene": scene_dir.name, "corruption": args["corruption"], "views": len(scene.views),
        "resolution": f"{init[0].depth.shape[1]}x{init[0].depth.shape[0]}", "lr": cfg.lr, "steps": cfg.steps,
        "device": str(device), "torch_threads": log.get("torch_threads"), "refine_s": round(seconds, 2),
        "peak_rss_mb": round(rss_peak, 1), "rss_before_refine_mb": round(rss_before, 1),
        "error_before": before, "error_after": after,
        "mean_reduction": 1.0 - after["mean"] / before["mean"], "skipped_steps": log["skipped_steps"],
        "final": {k: log["steps"][-1][k] for k in ("L_mv", "dz_mean", "dz_std", "mv_kept")} if log["steps"] else {},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="blob,thin,knot", help="comma-separated synth shapes")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--scene-seed", type=int, default=0, help="render seed")
    ap.add_argument("--seed", type=int, default=0, help="corruption seed")
    ap.add_argument("--corruptions", default="warp,mvs,real",
                    help="initial depth, comma-separated: warp (GT, smooth 2 %% warp + noise), mvs (GT + noise, "
                         "outliers, holes), real (the depth stage's plane-sweep MVS)")
    ap.add_argument("--lr", type=float, nargs="*", default=None,
                    help="learning rates to compare (default: the RefineConfig default)")
    ap.add_argument("--steps", type=int, default=None, help="override refine.steps")
    ap.add_argument("--threads", type=int, default=None,
                    help="override refine.cpu_threads (>= 1; --set cpu_threads=null: torch's default)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override any RefineConfig field")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", type=Path, default=Path("bench/results/scenes"),
                    help="rendered scenes are cached here")
    ap.add_argument("--out", type=Path, default=Path("bench/results/refine.json"))
    args = ap.parse_args(argv)

    overrides: dict[str, str] = dict(s.split("=", 1) for s in args.sets)
    if args.steps is not None:
        overrides["steps"] = str(args.steps)
    if args.threads is not None:
        overrides["cpu_threads"] = str(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rows = []
    for shape in args.shapes.split(","):
        scene_dir = ensure_scene(args.cache_dir, shape, args.views, args.width, args.height, args.scene_seed)
        for corruption in args.corruptions.split(","):
            for lr in args.lr or [None]:
                case_over = dict(overrides) | ({"lr": str(lr)} if lr is not None else {})
                with ctx.Pool(1) as pool:
                    row = pool.apply(run_case, ({"scene_dir": str(scene_dir), "corruption": corruption,
                                                 "seed": args.seed, "overrides": case_over, "device": args.device},))
                rows.append(row)
                print(f"  {row['scene']:<24} {corruption:<5} lr={row['lr']:.0e}  {row['refine_s']:6.1f} s  "
                      f"err {row['error_before']['mean']:.3%} → {row['error_after']['mean']:.3%}", file=sys.stderr,
                      flush=True)

    header = (f"{'scene':<24} {'init':<5} {'lr':>6} {'steps':>5} {'time s':>7} {'peak MB':>8} "
              f"{'mean err before→after':>24} {'median before→after':>22} {'<1% after':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        b, a = r["error_before"], r["error_after"]
        print(f"{r['scene']:<24} {r['corruption']:<5} {r['lr']:>6.0e} {r['steps']:>5} {r['refine_s']:>7.1f} "
              f"{r['peak_rss_mb']:>8.0f} {b['mean']:>10.3%} → {a['mean']:<8.3%} ({-r['mean_reduction']:+.0%}) "
              f"{b['median']:>8.3%} → {a['median']:<8.3%} {a['within_1pct']:>9.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(), "cases": rows},
                                   indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Depth and refine stages on a chosen torch device (a CUDA GPU): time, peak memory, and agreement with the CPU.

The GPU machines this project is sometimes lent have torch but neither
pycolmap nor Open3D, so the benchmark works from a *pack* made beforehand on
a machine that has them: the SfM scene of an existing run (views, cameras,
sparse points; pickled), its undistorted images, and the scene planes the
depth stage fits with Open3D (a few milliseconds of CPU work, done here so
that the device run needs no Open3D). On the device the depth stage
(:func:`pipeline.depth.stage.compute_depth_maps`, all passes) and the refine stage
(:func:`pipeline.refine.stage.refine_depth_maps`) run with their default settings,
and their maps come back in a compact form to compare with a CPU run of the
same pack (``compare``), including the depth error against the scene's
ground-truth depth.

Usage::

    # on this machine: pack a finished run (OUT has sfm/ and eval.json from `recon eval`)
    python bench/bench_device.py pack OUT PACK
    # anywhere: run both stages on a device; timings in RESULT/timings.json
    python bench/bench_device.py run PACK RESULT --device cuda
    python bench/bench_device.py run PACK RESULT_CPU --device cpu
    # agreement of the two runs, and each one's depth error against GT
    python bench/bench_device.py compare PACK RESULT RESULT_CPU --gt SCENE/gt
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAPS_PER_FILE = 8
"""Views per result file (keeps every file well under the device tool's 16 MB)."""


def pack(out_dir: Path, pack_dir: Path) -> None:
    """Write ``pack_dir``: scene.pkl (views and sparse points), images/, planes.npy, alignment.json (if OUT was
    evaluated)."""
    from pipeline.core.io import load_sfm_scene
    from pipeline.core.workspace import Workspace
    from pipeline.depth.config import MvsConfig
    from pipeline.depth.views import fit_scene_planes

    ws = Workspace(scene_dir=out_dir, out_dir=out_dir)
    scene = load_sfm_scene(ws)
    cfg = MvsConfig()
    planes = fit_scene_planes(scene.points, cfg.plane_candidates, cfg.plane_distance, cfg.plane_min_inliers)
    pack_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ws.sfm_images_dir, pack_dir / "images", dirs_exist_ok=True)
    scene = replace(scene, views=[replace(v, image_path=Path(v.image_path.name)) for v in scene.views])
    (pack_dir / "scene.pkl").write_bytes(pickle.dumps(scene))
    np.save(pack_dir / "planes.npy", np.asarray(planes, dtype=np.float64).reshape(-1, 4))
    if (out_dir / "eval.json").exists():
        alignment = json.loads((out_dir / "eval.json").read_text())["alignment"]
        (pack_dir / "alignment.json").write_text(json.dumps({"gt_from_est": alignment["gt_from_est"]}))
    print(f"packed {len(scene.views)} views, {len(scene.points)} points, {len(planes)} plane(s) into {pack_dir}")


def load_pack(pack_dir: Path):
    scene = pickle.loads((pack_dir / "scene.pkl").read_bytes())
    views = [replace(v, image_path=pack_dir / "images" / v.image_path.name) for v in scene.views]
    return replace(scene, views=views), [p for p in np.load(pack_dir / "planes.npy")]


def save_maps(folder: Path, stem: str, maps) -> None:
    """Depth (float32, 0 where invalid) and confidence (float16) of each map, MAPS_PER_FILE views per file."""
    for start in range(0, len(maps), MAPS_PER_FILE):
        part = maps[start:start + MAPS_PER_FILE]
        np.savez_compressed(folder / f"{stem}_{start // MAPS_PER_FILE}.npz",
                            names=np.array([m.name for m in part]),
                            depth=np.stack([np.where(m.valid, m.depth, 0.0).astype(np.float32) for m in part]),
                            confidence=np.stack([m.confidence.astype(np.float16) for m in part]))


def load_maps(folder: Path, stem: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for f in sorted(folder.glob(f"{stem}_*.npz")):
        with np.load(f) as z:
            for name, d, c in zip(z["names"], z["depth"], z["confidence"]):
                out[str(name)] = (d, c.astype(np.float32))
    return out


def run(pack_dir: Path, result_dir: Path, device_name: str) -> None:
    """Depth then refine on ``device_name``; writes timings.json and the maps to ``result_dir``."""
    import torch

    from pipeline.core.io import load_depth_map, load_rgb
    from pipeline.core.workspace import Workspace
    from pipeline.depth import estimators as depth_estimators
    from pipeline.depth.stage import DepthConfig, MvsConfig, compute_depth_maps
    from pipeline.refine.stage import RefineConfig, refine_depth_maps

    scene, planes = load_pack(pack_dir)
    # fitted at pack time (Open3D may be missing here)
    depth_estimators.fit_scene_planes = lambda *args, **kwargs: planes
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    result_dir.mkdir(parents=True, exist_ok=True)
    timings: dict = {"device": (torch.cuda.get_device_name(device) if cuda
                                else platform.processor() or platform.machine()),
                     "torch": torch.__version__, "views": len(scene.views), "cpu_threads": torch.get_num_threads()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(scene_dir=pack_dir, out_dir=Path(tmp))
        if cuda:  # CUDA context and kernels loaded outside the timed region
            torch.zeros(1, device=device).sum().item()
            torch.cuda.reset_peak_memory_stats(device)
        depth_cfg = DepthConfig(device=device_name)
        sync()
        t0 = time.perf_counter()
        res = compute_depth_maps(scene, ws, depth_cfg, MvsConfig())
        sync()
        timings["depth_s"] = time.perf_counter() - t0
        timings["depth_passes_s"] = {"estimate": float(np.sum(res.seconds)), "candidates": res.candidates_seconds,
                                     "filter": res.filter_seconds}
        if cuda:
            timings["depth_peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        views = [v for v in scene.views if ws.depth_view(v.name).exists()]
        init = [load_depth_map(ws.depth_view(v.name)) for v in views]
        save_maps(result_dir, "depth", init)
        images = [load_rgb(v.image_path, max_size=max(m.depth.shape)) for v, m in zip(views, init)]
        refine_cfg = RefineConfig(device=device_name)
        sync()
        t0 = time.perf_counter()
        refined, _ = refine_depth_maps(views, init, scene.points, refine_cfg, device, images=images,
                                       scratch_dir=Path(tmp) / "scratch")
        sync()
        timings["refine_s"] = time.perf_counter() - t0
        if cuda:
            timings["refine_peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        save_maps(result_dir, "refine", refined)
    (result_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings, indent=2))


def compare(pack_dir: Path, results: list[Path], gt_dir: Path | None) -> None:
    """Per stage: share of pixels valid in both runs and their relative depth difference; each run's error against
    GT."""
    from pipeline.analysis.evaluate import depth_metrics, depth_pairs
    from pipeline.analysis.metrics import GtViews

    scene, _ = load_pack(pack_dir)
    by_name = {v.name: v for v in scene.views}
    alignment = pack_dir / "alignment.json"
    gt = GtViews.load(gt_dir) if gt_dir is not None and alignment.exists() else None
    gt_from_est = np.asarray(json.loads(alignment.read_text())["gt_from_est"]) if gt is not None else None
    for stage in ("depth", "refine"):
        runs = [load_maps(r, stage) for r in results]
        for r, maps in zip(results, runs):
            if gt is None:
                continue
            pred, ref = [], []
            for name, (d, _) in maps.items():
                v = by_name[name]
                K = _map_intrinsics(v, d.shape)
                p, g = depth_pairs(d, d > 0, K, v.cam_from_world, gt_from_est, gt.depth(name), *gt.cameras[name])
                pred.append(p)
                ref.append(g)
            m = depth_metrics(np.concatenate(pred), np.concatenate(ref))
            print(f"{stage} {r.name}: vs GT AbsRel {m['abs_rel']:.4f} δ<1.01 {m['delta_1.01']:.3f} ({len(maps)} views)")
        if len(runs) == 2:
            a, b = runs
            both = valid_a = valid_b = 0
            rel = []
            for name in a.keys() & b.keys():
                da, db = a[name][0], b[name][0]
                va, vb = da > 0, db > 0
                both += int((va & vb).sum())
                valid_a += int(va.sum())
                valid_b += int(vb.sum())
                rel.append(np.abs(da - db)[va & vb] / da[va & vb])
            rel = np.concatenate(rel)
            print(f"{stage} {results[0].name} vs {results[1].name}: valid {valid_a} / {valid_b}, both {both}; "
                  f"|Δd|/d median {np.median(rel):.2e}, share < 1e-3 {np.mean(rel < 1e-3):.4f}, "
                  f"< 1e-2 {np.mean(rel < 1e-2):.4f}")


def _map_intrinsics(view, shape_hw) -> np.ndarray:
    """Intrinsics of a depth map of ``shape_hw`` made from ``view`` (the depth stage's working size)."""
    from pipeline.depth.views import working_intrinsics

    return working_intrinsics(view, (shape_hw[1], shape_hw[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument("pack", type=Path)
    r = sub.add_parser("run")
    r.add_argument("pack", type=Path)
    r.add_argument("result", type=Path)
    r.add_argument("--device", default="cuda")
    c = sub.add_parser("compare")
    c.add_argument("pack", type=Path)
    c.add_argument("results", type=Path, nargs="+")
    c.add_argument("--gt", type=Path)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.out, args.pack)
    elif args.cmd == "run":
        run(args.pack, args.result, args.device)
    else:
        compare(args.pack, args.results, args.gt)


if __name__ == "__main__":
    main()

"""Benchmark: decimation and texturing, measured on rendered scenes (issue 20).

    python bench/bench_texture.py                                  # blob, knot + spot, bob: 24 + 6 held-back views
    python bench/bench_texture.py --shapes blob --models --views 24 --held-out 6 --width 480 --height 360

For each scene it renders ``views + held_out`` views with ground truth
(``recon synth``), keeps every ``(views + held_out) / held_out``-th view out of
the reconstruction, and runs ``recon run --until fuse`` on the rest. Then, in
this process:

* **Decimation.** ``OUT/mesh.ply`` is decimated 10x and 20x with each library
  (fast-simplification, Open3D); each mesh is scored like ``recon eval`` (F@0.5 %,
  Chamfer against the GT mesh, aligned by the cameras) and its flipped faces
  counted (faces whose normal points against the full mesh's surface normal at
  their centroid).
* **Appearance.** Unlit renders of the vertex-coloured full mesh, the
  vertex-coloured 200 k-face mesh and the textured 200 k-face mesh
  (:func:`pipeline.export.texture.texture_mesh`) from the held-back GT cameras
  and from a sixth of the input cameras (GT cameras mapped into the
  reconstruction's frame by the camera alignment; the original photos, not
  COLMAP's undistorted crops), compared with the photos on the object (GT
  object mesh in front, per the GT depth): PSNR and SSIM
  (:mod:`pipeline.analysis.appearance`).
  A figure per scene (held-back photo | textured | vertex-coloured 1 M) goes to
  ``WORK/figures``.

Prints markdown tables and writes ``WORK/bench_texture.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_bench import recon_command, run_measured  # noqa: E402

from pipeline.analysis.alignment import align_to_gt_cameras, read_colmap_poses  # noqa: E402
from pipeline.analysis.appearance import photometric_scores, render_mesh_colors  # noqa: E402
from pipeline.analysis.evaluate import evaluate_reconstruction  # noqa: E402
from pipeline.analysis.metrics import GtViews  # noqa: E402
from pipeline.core.io import load_rgb, load_sfm_scene  # noqa: E402
from pipeline.core.poses import transform_pose_by_similarity  # noqa: E402
from pipeline.core.raycast import MeshRaycaster  # noqa: E402
from pipeline.core.workspace import Workspace  # noqa: E402
from pipeline.export.decimate import decimate_arrays, transfer_vertex_colors  # noqa: E402
from pipeline.export.texture import TextureSettings, texture_mesh  # noqa: E402
from pipeline.synthetic.groundtruth import load_gt_depth  # noqa: E402

TEXTURED_FACES = 200_000


def prepare_scene(work: Path, name: str, shape: str, object_mesh: Path | None, views: int, held_out: int,
                  width: int, height: int) -> tuple[Path, Path, list[str]]:
    """Render ``views + held_out`` views into WORK/full/<name>; copy the kept photos to WORK/scenes/<name>.

    Returns (full scene folder with gt/, reconstruction scene folder, held-back image names).
    """
    full = work / "full" / name
    total = views + held_out
    if not (full / "gt" / "cameras.json").is_file():
        from pipeline.synthetic.render import render_scene

        render_scene(full, shape=shape, n_views=total, width=width, height=height, object_mesh=object_mesh,
                     compress_depth=True)
    names = sorted(p.name for p in (full / "images").iterdir())
    step = total / max(held_out, 1)
    held = {names[int(round(i * step + step / 2)) % total] for i in range(held_out)}
    scene = work / "scenes" / name
    if not (scene / "images").is_dir():
        (scene / "images").mkdir(parents=True)
        for n in names:
            if n not in held:
                shutil.copy2(full / "images" / n, scene / "images" / n)
    return full, scene, sorted(held)


def object_mask(gt_object: MeshRaycaster, gt_depth: np.ndarray, K: np.ndarray, pose: np.ndarray,
                width: int, height: int) -> np.ndarray:
    """(H, W) bool: the GT object is the first surface along the pixel's ray."""
    hits = gt_object.cast_view(K, pose, width, height)
    return hits.hit & (np.abs(hits.depth - gt_depth) <= 0.005 * gt_depth)


def flipped_fraction(full_vertices: np.ndarray, full_faces: np.ndarray, vertices: np.ndarray,
                     faces: np.ndarray) -> float:
    """Fraction of faces whose normal points against that of the nearest full-mesh face."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(full_vertices.astype(np.float32)),
                        o3d.core.Tensor(full_faces.astype(np.uint32)))
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    closest = scene.compute_closest_points(o3d.core.Tensor(tri.mean(1).astype(np.float32)))
    ref = closest["primitive_normals"].numpy()
    return float(((normals * ref).sum(1) < 0).mean())


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    import trimesh

    trimesh.Trimesh(vertices, faces, process=False).export(path)


def decimation_rows(out: Path, gt_dir: Path, vertices: np.ndarray, faces: np.ndarray, work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    cached = work / "rows.json"
    if cached.is_file() and cached.stat().st_mtime > (out / "mesh.ply").stat().st_mtime:
        return json.loads(cached.read_text())
    rows = []
    base = evaluate_reconstruction(out / "mesh.ply", gt_dir, cameras=out / "sparse", json_path=work / "full.eval.json")
    rows.append({"method": "none", "ratio": 1, "faces": len(faces), "seconds": 0.0,
                 "f05": base["thresholds"]["0.5%"]["fscore"], "chamfer": base["chamfer_rel"], "flipped": 0.0})
    for method in ("fast", "open3d"):
        for ratio in (10, 20):
            started = time.perf_counter()
            v, f = decimate_arrays(vertices, faces, len(faces) // ratio, method)
            seconds = time.perf_counter() - started
            path = work / f"dec_{method}_{ratio}.ply"
            write_ply(path, v, f)
            ev = evaluate_reconstruction(path, gt_dir, cameras=out / "sparse", json_path=path.with_suffix(".json"))
            rows.append({"method": method, "ratio": ratio, "faces": len(f), "seconds": round(seconds, 2),
                         "f05": ev["thresholds"]["0.5%"]["fscore"], "chamfer": ev["chamfer_rel"],
                         "flipped": flipped_fraction(vertices, faces, v, f)})
    cached.write_text(json.dumps(rows, indent=2))
    return rows


def appearance_rows(full: Path, out: Path, held: list[str], figures: Path, name: str,
                    settings: TextureSettings) -> tuple[list[dict], dict]:
    import trimesh
    from PIL import Image

    ws = Workspace(scene_dir=out, out_dir=out)
    scene = load_sfm_scene(ws)
    mesh = trimesh.load(out / "mesh.ply", process=False)
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3]
    started = time.perf_counter()
    dv, df = decimate_arrays(vertices, faces, TEXTURED_FACES)
    dcolors = transfer_vertex_colors(vertices, colors, dv)
    decimate_s = time.perf_counter() - started
    started = time.perf_counter()
    textured = texture_mesh(dv, df, scene.views, settings)
    texture_s = time.perf_counter() - started
    variants = {
        "vertex colours, full": (MeshRaycaster(vertices, faces), faces, {"vertex_colors": colors}),
        f"vertex colours, {len(df) // 1000} k": (MeshRaycaster(dv, df), df, {"vertex_colors": dcolors}),
        f"textured, {len(df) // 1000} k": (MeshRaycaster(textured.vertices, textured.faces), textured.faces,
                                           {"uv": textured.uv, "texture": textured.texture}),
    }
    gt_views = GtViews.load(full / "gt")
    import open3d as o3d

    gt_obj = o3d.io.read_triangle_mesh(str(full / "gt" / "object.ply"))
    gt_object = MeshRaycaster(np.asarray(gt_obj.vertices), np.asarray(gt_obj.triangles))
    sim, _ = align_to_gt_cameras(read_colmap_poses(out / "sparse"), gt_views, source=out / "sparse")
    s, R, t = 1.0 / sim.scale, sim.rotation.T, -(sim.rotation.T @ sim.translation) / sim.scale
    cameras = []  # (kind, name, K, pose in the reconstruction's frame, photo, mask)
    for n in held:
        K, pose_gt = gt_views.cameras[n]
        mask = object_mask(gt_object, load_gt_depth(full / "gt", n), K, pose_gt, gt_views.width, gt_views.height)
        cameras.append(("held-back", n, K, transform_pose_by_similarity(pose_gt, s, R, t),
                        load_rgb(full / "images" / n).astype(np.float32) / 255.0, mask))
    for image in [v.name for v in scene.views][:: max(1, len(scene.views) // 6)]:
        K, pose_gt = gt_views.cameras[image]
        mask = object_mask(gt_object, load_gt_depth(full / "gt", image), K, pose_gt, gt_views.width,
                           gt_views.height)
        cameras.append(("input", image, K, transform_pose_by_similarity(pose_gt, s, R, t),
                        load_rgb(full / "images" / image).astype(np.float32) / 255.0, mask))
    rows, figure = [], None
    for label, (caster, f, colour) in variants.items():
        for kind in ("held-back", "input"):
            scores = []
            for k, n, K, pose, photo, mask in cameras:
                if k != kind:
                    continue
                h, w = photo.shape[:2]
                render, _ = render_mesh_colors(caster, f, K, pose, w, h, **colour)
                scores.append(photometric_scores(render, photo, mask))
                if kind == "held-back" and n == held[0]:
                    figure = {**(figure or {"photo": photo}), label: render}
            if scores:
                rows.append({"scene": name, "mesh": label, "views": kind, "n": len(scores),
                             "psnr": float(np.mean([x["psnr"] for x in scores])),
                             "ssim": float(np.mean([x["ssim"] for x in scores]))})
    if figure is not None:
        figures.mkdir(parents=True, exist_ok=True)
        keys = ["photo", f"textured, {len(df) // 1000} k", "vertex colours, full"]
        strip = np.concatenate([figure[k] for k in keys if k in figure], 1)
        Image.fromarray((np.clip(strip, 0, 1) * 255).astype(np.uint8)).save(figures / f"{name}.png")
    timing = {"scene": name, "faces_full": len(faces), "faces": len(df), "decimate_s": round(decimate_s, 2),
              "texture_s": round(texture_s, 2), "texture": textured.stats}
    return rows, timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["blob", "knot"])
    p.add_argument("--models", nargs="*", default=["spot", "bob"])
    p.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "data" / "models")
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--held-out", type=int, default=6)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--work", type=Path, default=Path("/tmp/recon-bench-texture"))
    p.add_argument("--no-decimation", action="store_true", help="skip the decimation comparison")
    p.add_argument("--texels-per-pixel", type=float, default=TextureSettings().texels_per_pixel,
                   help="texture density (export.texels_per_pixel)")
    p.add_argument("--smoothness", type=float, default=TextureSettings().smoothness,
                   help="view-selection smoothness (export.texture_smoothness)")
    args = p.parse_args()
    scenes: list[tuple[str, str, Path | None]] = [(s, s, None) for s in args.shapes]
    for m in args.models:
        obj = next(iter(sorted((args.models_dir / m).glob("*_tri*.obj")) + sorted((args.models_dir / m).glob("*.obj"))),
                   None)
        if obj is None:
            print(f"skipping model {m}: no OBJ in {args.models_dir / m}")
            continue
        scenes.append((m, "mesh", obj))
    results: dict[str, Any] = {"decimation": {}, "appearance": [], "timing": []}
    for name, shape, obj in scenes:
        full, scene, held = prepare_scene(args.work, name, shape, obj, args.views, args.held_out, args.width,
                                          args.height)
        out = args.work / "out" / name
        if not (out / "mesh.ply").is_file():
            res = run_measured([*recon_command(), "run", str(scene), "--out", str(out), "--until", "fuse",
                                "--no-progress"], args.work / "logs" / f"{name}.log", None)
            if res["rc"] != 0:
                print(f"{name}: recon failed: {res.get('error')}")
                continue
        if not args.no_decimation:
            import trimesh

            mesh = trimesh.load(out / "mesh.ply", process=False)
            results["decimation"][name] = decimation_rows(out, full / "gt", np.asarray(mesh.vertices),
                                                          np.asarray(mesh.faces), args.work / "dec" / name)
        rows, timing = appearance_rows(full, out, held, args.work / "figures", name,
                                       TextureSettings(texels_per_pixel=args.texels_per_pixel,
                                                       smoothness=args.smoothness))
        results["appearance"] += rows
        results["timing"].append(timing)
        (args.work / "bench_texture.json").write_text(json.dumps(results, indent=2, default=float))
    print_tables(results)


def print_tables(results: dict[str, Any]) -> None:
    if results["decimation"]:
        print("\n| scene | method | faces | time (s) | F@0.5 % | Chamfer (% diag) | flipped |\n"
              "|---|---|---|---|---|---|---|")
        for name, rows in results["decimation"].items():
            for r in rows:
                print(f"| {name} | {r['method']} {r['ratio']}x | {r['faces']} | {r['seconds']} | {r['f05']:.4f} "
                      f"| {100 * r['chamfer']:.3f} | {r['flipped']:.4%} |")
    print("\n| scene | mesh | views | PSNR (dB) | SSIM |\n|---|---|---|---|---|")
    for r in results["appearance"]:
        print(f"| {r['scene']} | {r['mesh']} | {r['views']} ({r['n']}) | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    print("\n| scene | faces | decimate (s) | texture (s) | texture size | faces seen by no photo |\n"
          "|---|---|---|---|---|---|")
    for t in results["timing"]:
        print(f"| {t['scene']} | {t['faces_full']} → {t['faces']} | {t['decimate_s']} | {t['texture_s']} "
              f"| {t['texture']['texture_size'][0]}x{t['texture']['texture_size'][1]} "
              f"| {t['texture']['faces_unseen']} |")


if __name__ == "__main__":
    main()

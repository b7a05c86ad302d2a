"""Benchmark: render scenes, run recon on them, score the meshes against ground truth.

    python bench/run_bench.py                       # blob, thin, knot + spot, bob (textured models): 24 views 480x360
    python bench/run_bench.py --real                # also the photo sets in ../shared/data/real beside the
                                                      checkout (no GT)
    python bench/run_bench.py --quick --real-sets templeSparseRing   # smoke run: one small scene, reduced settings
    python bench/run_bench.py --shapes blob --models --views 12 --width 320 --height 240

Rendered scenes: the procedural shapes of :data:`pipeline.synthetic.shapes.SHAPES` and the
textured models in ``--models-dir`` (``spot``, ``bob``: their OBJ rendered by
:func:`pipeline.synthetic.render.render_scene` with ``object_mesh``), each with GT.

For each rendered scene (``WORK/scenes/<shape>_<views>v_<w>x<h>``, reused when
already rendered with the same parameters) the driver runs, each stage as its
own ``recon run SCENE --out OUT --until STAGE`` subprocess (earlier stages come
from the cache), so every stage gets its own wall time and peak RSS:

* ``full``     — every stage (refined depth fused);
* ``norefine`` — ``--skip refine``; its ``sfm``/``depth`` caches (stage folders,
  ``sparse/`` and their manifest entries) are *copied from the full run*, so
  both variants fuse the very same initial depth maps and only fuse/export run;
* ``floor``    — the sparse SfM points meshed with COLMAP's screened Poisson
  (``pycolmap.poisson_meshing``; normals from 30 nearest neighbours, oriented
  towards the cameras that see each point): what SfM alone gives;
* ``gt-depth`` — the ground-truth depth maps fused in-process by the fuse stage's
  own code (``pipeline.synthetic.fusion.fuse_ground_truth``, same settings as the
  runs): the upper bound of docs/conventions.md.

Real photo sets (``--real``; no GT): stage times, peak RSS, registered images
and mesh size. A set whose photos carry no focal length in EXIF but that ships
ground-truth intrinsics (``gt_colmap_text/cameras.txt``, e.g. fountain-P11) is
copied with the EXIF tag ``FocalLengthIn35mmFilm`` written from them, so COLMAP
starts from the right focal length (it still refines it).

Every mesh is scored with :func:`pipeline.analysis.evaluate.evaluate_reconstruction`
(alignment from the cameras; the gt-depth mesh is built in the GT frame).
Stage times come from ``OUT/manifest.json`` (``seconds``, the stage's own time);
peak RSS is the subprocess's ``VmHWM`` (``/proc/PID/status``, polled every
0.1 s; see :func:`_poll_peak_rss` for why not ``ru_maxrss``). A failing step leaves an error in its row and the
rest carries on. Prints one markdown table and writes ``WORK/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.evaluate import evaluate_reconstruction
from pipeline.core.cache import write_json_atomic
from pipeline.core.errors import ReconError
from pipeline.graph import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


# ---- subprocesses ----------------------------------------------------------------------

def recon_command() -> list[str]:
    """The ``recon`` CLI of this interpreter's environment (console script, else ``python -m cli``)."""
    script = Path(sys.executable).with_name("recon")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def _poll_peak_rss(pid: int, stop: threading.Event, peak_kib: list[int], interval_s: float = 0.1) -> None:
    """Keep ``peak_kib[0]`` at the largest ``VmHWM`` of ``/proc/PID/status`` seen until ``stop``.

    ``ru_maxrss`` from ``wait4`` is not used: Linux carries the parent's RSS at
    fork time into the child's maximum at ``exec``, so every stage would
    report at least this driver's own memory. ``VmHWM`` belongs to the exec'd
    image alone (a peak in the last ``interval_s`` before exit can be missed).
    """
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak_kib[0] = max(peak_kib[0], int(line.split()[1]))
                        break
        except (OSError, ValueError):
            return
        stop.wait(interval_s)


def run_measured(cmd: list[str], log_path: Path, timeout_s: float | None, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in ``cwd`` (default: this checkout) with ``env`` (default: this process's environment); return
    rc, wall seconds, CPU seconds (user + system of the process and the children it waited for, from ``wait4``),
    peak RSS (MiB, the process's ``VmHWM``) and the last error line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    import subprocess

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or REPO, env=env,
                                start_new_session=True)
        timer = None
        timed_out = threading.Event()
        if timeout_s:
            def _kill() -> None:
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session this call started
                except ProcessLookupError:
                    pass
            timer = threading.Timer(timeout_s, _kill)
            timer.start()
        peak_kib = [0]
        stop = threading.Event()
        poller = threading.Thread(target=_poll_peak_rss, args=(proc.pid, stop, peak_kib), daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            stop.set()
            poller.join()
            if timer is not None:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    out: dict[str, Any] = {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2),
                           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                           "peak_rss_mib": round(peak_kib[0] / 1024.0, 1), "log": str(log_path)}
    if timed_out.is_set():
        out["error"] = f"timed out after {timeout_s:.0f} s"
    elif proc.returncode != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("error:")]
        out["error"] = (errs[-1] if errs else (lines[-1] if lines else f"exit code {proc.returncode}"))[:300]
    return out


def run_stages(scene: Path, out: Path, stages: list[str], extra: list[str], timeout_s: float | None,
               skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One ``recon run --until STAGE`` subprocess per stage; stops at the first failure."""
    records = []
    for stage in stages:
        cmd = recon_command() + ["run", str(scene), "--out", str(out), "--until", stage, "--no-progress", *extra]
        for s in skip:
            cmd += ["--skip", s]
        rec = run_measured(cmd, out.parent / "logs" / f"{out.name}_{stage}.log", timeout_s)
        rec["stage"] = stage
        records.append(rec)
        print(f"    {out.name:<9} {stage:<7} rc={rec['rc']} {rec['wall_s']:7.1f} s  {rec['peak_rss_mib']:7.0f} MiB"
              + (f"  {rec['error']}" if "error" in rec else ""), flush=True)
        if rec["rc"] != 0:
            break
    return records


def manifest_seconds(out: Path) -> dict[str, float]:
    """Stage → seconds recorded in ``OUT/manifest.json`` (stages that finished)."""
    try:
        stages = json.loads((out / "manifest.json").read_text()).get("stages", {})
    except (OSError, ValueError):
        return {}
    return {k: float(v.get("seconds", 0.0)) for k, v in stages.items()}


def manifest_summary(out: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads((out / "manifest.json").read_text())["stages"][stage].get("summary", {})
    except (OSError, ValueError, KeyError):
        return {}


def manifest_fingerprint(out: Path, stage: str) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["stages"][stage]["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def seed_norefine(full: Path, norefine: Path) -> None:
    """Copy the full run's sfm and depth caches (stage folders, ``sparse/``, their manifest entries) into
    ``norefine``."""
    if norefine.exists():
        shutil.rmtree(norefine)
    norefine.mkdir(parents=True)
    for name in ("sfm", "depth", "sparse"):
        shutil.copytree(full / name, norefine / name)
    manifest = json.loads((full / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("sfm", "depth")}
    write_json_atomic(norefine / "manifest.json", manifest)


# ---- baselines ----------------------------------------------------------------------------

def sparse_poisson_floor(out: Path, mesh_path: Path, *, depth: int = 8, trim: float = 2.0) -> dict[str, Any]:
    """Mesh the sfm stage's sparse points (normalized frame) with COLMAP's screened Poisson; write ``mesh_path``.

    Normals: PCA over 30 neighbours, flipped towards the cameras that see the
    point. ``pycolmap.poisson_meshing`` (octree ``depth``, density ``trim``)
    meshes the oriented points.
    """
    import open3d as o3d
    import pycolmap

    from pipeline.core.io import load_sfm_scene
    from pipeline.core.workspace import Workspace

    started = time.perf_counter()
    scene = load_sfm_scene(Workspace(scene_dir=out, out_dir=out))
    points = scene.points
    if len(points) < 10:
        raise ReconError(f"only {len(points)} sparse points; too few to mesh")
    toward = np.zeros_like(points)  # sum of unit directions point → cameras that see it
    for v in scene.views:
        d = v.center - points[v.point_ids]
        toward[v.point_ids] += d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(30))
    normals = np.asarray(pcd.normals)
    normals *= np.where(np.sum(normals * toward, axis=1, keepdims=True) < 0, -1.0, 1.0)
    pcd.normals = o3d.utility.Vector3dVector(normals)
    mesh_path.parent.mkdir(parents=True, exist_ok=True)
    oriented = mesh_path.with_name("sparse_oriented.ply")
    o3d.io.write_point_cloud(str(oriented), pcd)
    options = pycolmap.PoissonMeshingOptions()
    options.depth = depth
    options.trim = trim
    options.num_threads = -1
    options.color = False
    pycolmap.poisson_meshing(oriented, mesh_path, options)
    mesh = o3d.io.read_triangle_mesh(str(mesh_path))
    if len(mesh.triangles) == 0:
        raise ReconError(f"pycolmap.poisson_meshing wrote no triangles from {len(points)} points")
    return {"points": int(len(points)), "method": "pycolmap.poisson_meshing", "depth": depth, "trim": trim,
            "triangles": int(len(mesh.triangles)), "seconds": round(time.perf_counter() - started, 2)}


def gt_depth_upper_bound(scene_dir: Path, mesh_path: Path, fuse_cfg: Any) -> dict[str, Any]:
    """Fuse the GT depth maps (true cameras) with the fuse stage's code; the mesh is written in the GT frame.

    Uses ``pipeline.synthetic.fusion.fuse_ground_truth`` (TSDF sizes derived as in the stage, from
    sparse points sampled on the GT depth, in that scene's normalized frame).
    """
    import open3d as o3d

    from pipeline.synthetic.fusion import fuse_ground_truth

    started = time.perf_counter()
    result, scene, params = fuse_ground_truth(scene_dir, fuse_cfg)
    mesh = result.mesh
    mesh.transform(np.linalg.inv(scene.normalized_from_sfm))
    mesh_path.parent.mkdir(parents=True, exist_ok=True)
    o3d.io.write_triangle_mesh(str(mesh_path), mesh)
    return {"triangles": int(len(mesh.triangles)), "voxel_size_normalized": float(params.voxel_size),
            "seconds": round(time.perf_counter() - started, 2)}


# ---- one scene ------------------------------------------------------------------------------

def render_timed(scenes_dir: Path, shape: str, views: int, width: int, height: int,
                 seed: int) -> tuple[Path, float | None]:
    """The rendered scene folder (see :func:`pipeline.synthetic.render.render_or_reuse`) and its render time (None:
    reused)."""
    from pipeline.synthetic.render import render_or_reuse

    started = time.perf_counter()
    scene, rendered = render_or_reuse(scenes_dir, shape, n_views=views, width=width, height=height, seed=seed)
    return scene, round(time.perf_counter() - started, 2) if rendered else None


def score(out: Path, gt: Path, *, align: bool = True, cameras: Path | None = None, max_points: int) -> dict[str, Any]:
    try:
        return evaluate_reconstruction(out, gt, align=align, cameras=cameras, max_points=max_points)
    except (ReconError, OSError, ValueError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def bench_synthetic(scene: Path, runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    extra = [a for s in args.set for a in ("--set", s)] + [a for c in args.config for a in ("--config", c)]
    full, norefine = runs / "full", runs / "norefine"
    res: dict[str, Any] = {"scene": scene.name, "variants": {}}
    if not args.reuse_runs:
        for d in (full, norefine, runs / "floor", runs / "gtdepth"):
            shutil.rmtree(d, ignore_errors=True)

    full_recs = run_stages(scene, full, list(STAGE_NAMES), extra, args.timeout)
    done = {r["stage"] for r in full_recs if r["rc"] == 0}
    res["variants"]["refined"] = {"runs": full_recs, "seconds": manifest_seconds(full),
                                  "eval": score(full, scene, max_points=args.max_points)
                                  if (full / "mesh.ply").exists() else None}

    if {"sfm", "depth"} <= done:
        seed_norefine(full, norefine)
        nr_recs = run_stages(scene, norefine, ["fuse", "export"], extra, args.timeout, skip=("refine",))
        res["variants"]["initial"] = {"runs": [r for r in full_recs if r["stage"] in ("sfm", "depth")] + nr_recs,
                                      "seconds": manifest_seconds(norefine), "copied_from_full": ["sfm", "depth"],
                                      "eval": score(norefine, scene, max_points=args.max_points)
                                      if (norefine / "mesh.ply").exists() else None}
        rerun = [s for s in ("sfm", "depth") if manifest_fingerprint(norefine, s) != manifest_fingerprint(full, s)]
        if rerun:  # code or settings changed between the two runs: the variants no longer share their depth maps
            res["variants"]["initial"]["error"] = f"{', '.join(rerun)} re-ran instead of reusing the full run's cache"
    else:
        res["variants"]["initial"] = {"runs": [], "error": "needs the full run's sfm and depth stages"}

    floor: dict[str, Any] = {"runs": [r for r in full_recs if r["stage"] == "sfm"], "seconds": {}}
    if "sfm" in done:
        try:
            floor["poisson"] = sparse_poisson_floor(full, runs / "floor" / "mesh.ply")
            floor["seconds"] = {"sfm": manifest_seconds(full).get("sfm", 0.0), "fuse": floor["poisson"]["seconds"]}
            floor["eval"] = score(runs / "floor" / "mesh.ply", scene, cameras=full / "sparse",
                                  max_points=args.max_points)
        except Exception as exc:  # noqa: BLE001 - a benchmark row reports any failure
            floor["error"] = f"{type(exc).__name__}: {exc}"
    else:
        floor["error"] = "needs the sfm stage"
    res["variants"]["floor"] = floor

    upper: dict[str, Any] = {"runs": [], "seconds": {}}
    try:
        from pipeline.config import load_config

        fuse_cfg = load_config([Path(c) for c in args.config], tuple(args.set), ()).fuse
        upper["fuse"] = gt_depth_upper_bound(scene, runs / "gtdepth" / "mesh.ply", fuse_cfg)
        upper["seconds"] = {"fuse": upper["fuse"]["seconds"]}
        upper["eval"] = score(runs / "gtdepth" / "mesh.ply", scene, align=False, max_points=args.max_points)
    except Exception as exc:  # noqa: BLE001
        upper["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    res["variants"]["gt-depth"] = upper
    return res


MODEL_FILES: dict[str, str] = {"spot": "spot/spot_triangulated.obj", "bob": "bob/bob_tri.obj"}
"""Textured models of ``--models-dir`` rendered as objects (OBJ, +y up)."""


def render_model_timed(scenes_dir: Path, name: str, models_dir: Path, views: int, width: int, height: int,
                       seed: int) -> tuple[Path, float | None]:
    """``scenes_dir/model-<name>_<views>v_<W>x<H>_s<seed>`` rendered from the model's OBJ (reused when the parameters
    match)."""
    from pipeline.synthetic.render import render_scene

    obj = models_dir / MODEL_FILES[name]
    if not obj.is_file():
        raise ReconError(f"{obj}: model file not found")
    scene = scenes_dir / f"model-{name}_{views}v_{width}x{height}_s{seed}"
    info = scene / "gt" / "scene.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        cams = json.loads((scene / "gt" / "cameras.json").read_text())
        if ((meta.get("n_views"), meta.get("seed"), meta.get("object_mesh")) == (views, seed, str(obj))
                and (cams.get("width"), cams.get("height")) == (width, height)):
            return scene, None
    started = time.perf_counter()
    render_scene(scene, n_views=views, width=width, height=height, seed=seed, object_mesh=obj, rings=2)
    return scene, round(time.perf_counter() - started, 2)


def gt_focal_px(root: Path) -> tuple[float, int, int] | None:
    """(focal px, width, height) of a photo set's single GT camera (``gt_colmap_text/cameras.txt``), else None."""
    cams = root / "gt_colmap_text" / "cameras.txt"
    if not cams.is_file():
        return None
    rows = [ln.split() for ln in cams.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if len(rows) != 1 or rows[0][1] not in ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"):
        return None
    w, h = int(rows[0][2]), int(rows[0][3])
    params = [float(x) for x in rows[0][4:]]
    f = 0.5 * (params[0] + params[1]) if rows[0][1] in ("PINHOLE", "OPENCV") else params[0]
    return f, w, h


def has_exif_focal(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        ifd = im.getexif().get_ifd(0x8769)
    return bool(ifd.get(0x920A) or ifd.get(0xA405))


def with_focal_exif(images: Path, dest: Path, focal_px: float, width: int, height: int) -> Path:
    """Copy the photos of ``images`` to ``dest/images`` with EXIF FocalLengthIn35mmFilm = focal·35 / max(w, h)
    (COLMAP's prior: focal = f35 / 35 · max side), re-encoded at JPEG quality 95; reused when already there."""
    from PIL import Image

    out = dest / "images"
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    f35 = int(round(focal_px * 35.0 / max(width, height)))
    marker = out / f".focal35_{f35}"
    if marker.exists() and len(list(out.glob("*.jpg"))) == len(files):
        return dest
    out.mkdir(parents=True, exist_ok=True)
    for p in files:
        with Image.open(p) as im:
            exif = im.getexif()
            exif.get_ifd(0x8769)[0xA405] = f35
            im.convert("RGB").save(out / (p.stem + ".jpg"), format="JPEG", quality=95, exif=exif)
    marker.touch()
    return dest


def find_image_folder(root: Path) -> Path | None:
    """The folder to pass to ``recon run``: ``root`` when it holds images/ or photos, else the first subfolder with 3+
    photos."""
    def n_images(d: Path) -> int:
        return sum(1 for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    if (root / "images").is_dir() or n_images(root) >= 3:
        return root
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        if n_images(d) >= 3:
            return d
    return None


def bench_real(root: Path, runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``recon run`` on a photo set without GT: stage times, peak RSS, registration, mesh size."""
    sets = list(args.set) + list(args.real_set)
    extra = [a for s in sets for a in ("--set", s)] + [a for c in args.config for a in ("--config", c)]
    scene = find_image_folder(root)
    res: dict[str, Any] = {"scene": root.name, "real": True, "settings": sets}
    if scene is None:
        res["error"] = "no folder with 3 or more photos"
        return res
    photos = sorted(p for p in (scene / "images" if (scene / "images").is_dir() else scene).iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES)
    focal = gt_focal_px(root)
    if focal is not None and photos and not has_exif_focal(photos[0]):
        scene = with_focal_exif(photos[0].parent, runs / "input", *focal)
        res["focal_prior_px"] = round(focal[0], 2)
    out = runs / "full"
    if not args.reuse_runs:
        shutil.rmtree(out, ignore_errors=True)
    recs = run_stages(scene, out, list(STAGE_NAMES), extra, args.timeout)
    res.update({"images_dir": str(scene), "runs": recs, "seconds": manifest_seconds(out),
                "sfm": manifest_summary(out, "sfm")})
    if (out / "mesh.ply").exists():
        from pipeline.analysis.metrics import load_mesh

        try:
            m = load_mesh(out / "mesh.ply")
            res["mesh"] = {"vertices": int(len(m.vertices)), "triangles": int(len(m.triangles))}
        except ReconError as exc:
            res["mesh"] = {"error": str(exc)}
    return res


# ---- report -------------------------------------------------------------------------------

def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(results: list[dict[str, Any]]) -> str:
    """One markdown table: per scene and variant, stage times, peak RSS and the metrics (lengths in % of the
    diagonal)."""
    head = ["scene", "variant", "sfm s", "depth s", "refine s", "fuse s", "export s", "peak RSS MiB", "F@0.5%", "F@1%",
            "Chamfer %", "acc %", "comp %", "AbsRel", "δ<1.01", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("real"):
            secs = r.get("seconds", {})
            rss = max((x["peak_rss_mib"] for x in r.get("runs", [])), default=None)
            errs = [f"{x['stage']}: {x['error']}" for x in r.get("runs", []) if "error" in x]
            sfm = r.get("sfm", {})
            note = f"registered {sfm.get('registered', '?')}/{sfm.get('images', '?')}"
            if "mesh" in r:
                note += f", mesh {r['mesh'].get('triangles', '?')} triangles"
            if errs:
                note += "; " + "; ".join(errs)
            note = r.get("error", note)
            lines.append("| " + " | ".join([r["scene"], "real (no GT)",
                                            *(_f(secs.get(s), "{:.1f}") for s in STAGE_NAMES), _f(rss, "{:.0f}"),
                                            *["-"] * 7, note.replace("|", "/")]) + " |")
            continue
        for name in ("floor", "initial", "refined", "gt-depth"):
            v = r["variants"].get(name, {})
            secs = v.get("seconds", {})
            rss = max((x["peak_rss_mib"] for x in v.get("runs", [])), default=None)
            ev = v.get("eval") or {}
            notes = [f"{x['stage']}: {x['error']}" for x in v.get("runs", []) if "error" in x]
            if v.get("error"):
                notes.append(v["error"])
            if ev.get("error"):
                notes.append("eval: " + ev["error"])
            th = ev.get("thresholds", {})
            depth_key = {"initial": "depth", "refined": "refine"}.get(name)
            dm = (ev.get("depth") or {}).get(depth_key, {}) if depth_key else {}
            times = [_f(secs.get(s), "{:.1f}") for s in STAGE_NAMES]
            if name == "floor" and "fuse" in secs:
                notes.append("fuse column = Poisson")
            lines.append("| " + " | ".join([
                r["scene"], name, *times, _f(rss, "{:.0f}"),
                _f(th.get("0.5%", {}).get("fscore")), _f(th.get("1%", {}).get("fscore")),
                _f(ev.get("chamfer_rel") and 100 * ev["chamfer_rel"]),
                _f(ev.get("accuracy", {}).get("mean_rel") and 100 * ev["accuracy"]["mean_rel"]),
                _f(ev.get("completeness", {}).get("mean_rel") and 100 * ev["completeness"]["mean_rel"]),
                _f(dm.get("abs_rel"), "{:.4f}"), _f(dm.get("delta_1.01")),
                "; ".join(notes).replace("|", "/")[:200],
            ]) + " |")
    return "\n".join(lines)


def memory_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the peak RSS (MiB) of each stage's own ``recon run --until STAGE`` subprocess."""
    head = ["scene", "run", *(f"{s} MiB" for s in STAGE_NAMES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        runs = [("real (no GT)", r.get("runs", []))] if r.get("real") else [
            (name, r.get("variants", {}).get(name, {}).get("runs", [])) for name in ("refined", "initial")]
        for name, recs in runs:
            by_stage = {x["stage"]: x["peak_rss_mib"] for x in recs if x.get("rc") == 0}
            if by_stage:
                lines.append("| " + " | ".join([r["scene"], name,
                                                *(_f(by_stage.get(s), "{:.0f}") for s in STAGE_NAMES)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.synthetic.shapes import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="work folder (scenes/, runs/, bench.json) [bench/results]")
    p.add_argument("--shapes", nargs="*", default=None, choices=SHAPES,
                   help=f"rendered shapes [{' '.join(SHAPES[:3])}]; none: no shapes")
    p.add_argument("--models", nargs="*", default=None, choices=sorted(MODEL_FILES),
                   help=f"textured models of --models-dir rendered as scenes [{' '.join(MODEL_FILES)} when present]; "
                        "none: no models")
    p.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "data" / "models")
    p.add_argument("--views", type=int, default=None, help="views per rendered scene [24; --quick 12]")
    p.add_argument("--width", type=int, default=None, help="[480; --quick 320]")
    p.add_argument("--height", type=int, default=None, help="[360; --quick 240]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the photo sets in --real-dir (no GT: times, registration, mesh size) [on when "
                        "--real-dir exists, off with --quick]")
    p.add_argument("--real-dir", type=Path, default=REPO.parent / "shared" / "data" / "real")
    p.add_argument("--real-sets", nargs="+", default=None, metavar="NAME",
                   help="only these photo sets of --real-dir [all]; implies --real")
    p.add_argument("--real-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed to `recon run` of the photo sets only (e.g. sfm.max_image_size=1000)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed to every `recon run`")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="passed to every `recon run`")
    p.add_argument("--timeout", type=float, default=None, help="seconds per stage subprocess (killed after)")
    p.add_argument("--max-points", type=int, default=None,
                   help="samples per surface in the evaluation [400000; --quick 100000]")
    p.add_argument("--reuse-runs", action="store_true", help="keep existing run folders (cached stages are not re-run)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: blob only, 12 views 320x240, depth.max_image_side=240, refine.steps=60, "
                        "photo sets at sfm.max_image_size=640 / depth.max_image_side=320 (explicit options win)")
    args = p.parse_args(argv)
    quick = args.quick
    args.shapes = args.shapes if args.shapes is not None else (["blob"] if quick else list(SHAPES[:3]))
    if args.models is None:
        args.models = [] if quick else [m for m in MODEL_FILES if (args.models_dir / MODEL_FILES[m]).is_file()]
    args.views = args.views or (12 if quick else 24)
    args.width = args.width or (320 if quick else 480)
    args.height = args.height or (240 if quick else 360)
    args.max_points = args.max_points or (100_000 if quick else 400_000)
    if quick:
        given = {s.split("=", 1)[0] for s in args.set}
        args.set = [s for s in ("depth.max_image_side=240", "refine.steps=60")
                    if s.split("=", 1)[0] not in given] + args.set
        given |= {s.split("=", 1)[0] for s in args.real_set}
        args.real_set = [s for s in ("sfm.max_image_size=640", "depth.max_image_side=320")
                         if s.split("=", 1)[0] not in given] + args.real_set
    if args.real is None:
        args.real = args.real_sets is not None or (not args.quick and args.real_dir.is_dir())

    scenes_dir, runs_dir = args.work / "scenes", args.work / "runs"
    results: list[dict[str, Any]] = []
    jobs = [(shape, lambda shape=shape: render_timed(scenes_dir, shape, args.views, args.width, args.height, args.seed))
            for shape in args.shapes]
    jobs += [(f"model-{m}", lambda m=m: render_model_timed(scenes_dir, m, args.models_dir, args.views, args.width,
                                                           args.height, args.seed))
             for m in args.models]
    for label, render in jobs:
        print(f"== {label}", flush=True)
        try:
            scene, render_s = render()
        except Exception as exc:  # noqa: BLE001
            results.append({"scene": label, "variants": {"refined": {"error": f"render failed: {exc}"}}})
            continue
        print(f"  scene {scene} ({'rendered in %.1f s' % render_s if render_s is not None else 'reused'})", flush=True)
        res = bench_synthetic(scene, runs_dir / scene.name, args)
        res["render_seconds"] = render_s
        results.append(res)
    if args.real:
        if not args.real_dir.is_dir():
            print(f"no photo sets in {args.real_dir}; --real skipped", flush=True)
        else:
            for root in sorted(d for d in args.real_dir.iterdir()
                               if d.is_dir() and (args.real_sets is None or d.name in args.real_sets)):
                print(f"== real: {root.name}", flush=True)
                try:
                    results.append(bench_real(root, runs_dir / f"real_{root.name}", args))
                except Exception as exc:  # noqa: BLE001 - a benchmark row reports any failure
                    results.append({"scene": root.name, "real": True, "error": f"{type(exc).__name__}: {exc}"})

    md = table(results) + "\n\nPeak RSS per stage (each stage runs in its own process):\n\n" + memory_table(results)
    print("\n" + md)
    args.work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.work / "bench.json",
                      {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": md})
    print(f"\nwrote {args.work / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

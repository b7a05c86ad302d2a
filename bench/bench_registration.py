"""How many photos SfM registers on hard scenes, and whether they are placed right.

    python bench/bench_registration.py --temple ../shared/data/real/templeSparseRing      # the default matrix
    python bench/bench_registration.py --scenes blob:8:1:1@0.2 --code ../other-checkout  # one scene, another checkout

Each scene is a folder of photos with true cameras: the Middlebury
templeSparseRing (16 photos, ``--temple``) or a rendered one
(``SHAPE:VIEWS:RINGS:SEED`` at 320x240, ``recon synth``). ``@C`` makes it hard:
every pixel value times ``C`` plus Gaussian noise of 1.5 grey levels (dark,
low-contrast, noisy photos). Each scene runs ``recon run SCENE --until sfm``
in a fresh process of the checkout ``--code`` (default: this one), so two
checkouts compare on the same photos. Reported per scene: photos registered,
the mapping attempts (``sfm.retry_registered_fraction``), cameras far off
("bad": > 5 % of the ring diameter or > 5 deg after a similarity fit to the
true centres of the good ones), median and max centre error (% of the ring
diameter), median rotation error (deg) and wall seconds. Writes
``WORK/bench_registration.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.poses import umeyama  # noqa: E402

DEFAULT_SCENES = ("temple", "temple@0.25", "temple@0.35", "thin:8:1:2@0.2", "blob:12:2:14@0.15", "knot:8:1:5@0.2",
                  "blob:8:1:1@0.2")


def temple_cameras(folder: Path) -> dict[str, np.ndarray]:
    """``templeSR_par.txt``: name, K (9), R (9), t (3) per line; P = K [R t] (world → camera)."""
    cams = {}
    for line in (folder / "templeSR_par.txt").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 22:
            v = np.array(parts[1:], dtype=np.float64)
            T = np.eye(4)
            T[:3, :3], T[:3, 3] = v[9:18].reshape(3, 3), v[18:21]
            cams[parts[0]] = T
    return cams


def rendered_cameras(scene: Path) -> dict[str, np.ndarray]:
    data = json.loads((scene / "gt" / "cameras.json").read_text())
    return {c["name"]: np.asarray(c["cam_from_world"], dtype=np.float64) for c in data["images"]}


def darken(src: Path, dst: Path, factor: float | None) -> None:
    """``dst`` = ``src`` times ``factor`` plus noise (sigma 1.5, seeded by the name); a plain copy without factor."""
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    if factor is not None:
        rng = np.random.default_rng(sum(map(ord, src.name)))
        rgb = rgb * factor + rng.normal(0.0, 1.5, rgb.shape)
    Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)).save(dst.with_suffix(".png"))


def make_scene(spec: str, work: Path, temple: Path | None) -> tuple[Path, dict[str, np.ndarray]]:
    """Build scene ``spec`` under ``work`` (once); returns it and its true ``cam_from_world`` per photo."""
    base, _, factor = spec.partition("@")
    scene = work / spec.replace(":", "_").replace("@", "_dk")
    images = scene / "images"
    if base == "temple":
        if temple is None:
            raise SystemExit("scene 'temple' needs --temple PATH (templeSparseRing)")
        src_dir, cams = temple, temple_cameras(temple)
    else:
        shape, views, rings, seed = base.split(":")
        src_scene = work / "rendered" / base.replace(":", "_")
        if not (src_scene / "gt" / "cameras.json").exists():
            subprocess.run([sys.executable, "-m", "cli", "synth", shape, str(src_scene), "--views", views, "--rings",
                            rings, "--seed", seed, "--width", "320", "--height", "240"], cwd=REPO, check=True,
                           capture_output=True)
        src_dir, cams = src_scene / "images", rendered_cameras(src_scene)
    if not images.is_dir():
        images.mkdir(parents=True)
        for name in sorted(cams):
            darken(src_dir / name, images / name, float(factor) if factor else None)
    return scene, {Path(n).with_suffix(".png").name: T for n, T in cams.items()}


def camera_errors(model_dir: Path, truth: dict[str, np.ndarray]) -> dict:
    """Registered photos and their pose errors against ``truth`` (similarity fit of the camera centres)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    names, centers, rotations = [], [], []
    for i in rec.reg_image_ids():
        M = rec.images[i].cam_from_world().matrix()
        names.append(rec.images[i].name)
        rotations.append(M[:, :3])
        centers.append(-M[:, :3].T @ M[:, 3])
    out = {"registered": len(names)}
    if len(names) < 3:
        return out
    true_c = {n: -T[:3, :3].T @ T[:3, 3] for n, T in truth.items()}
    all_c = np.array(list(true_c.values()))
    diameter = max(np.linalg.norm(a - b) for a in all_c for b in all_c)
    est, gt = np.array(centers), np.array([true_c[n] for n in names])

    def errors(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, R, t = umeyama(est[keep], gt[keep])
        center = np.linalg.norm((s * (R @ est.T)).T + t - gt, axis=1) / diameter * 100
        rot = [np.degrees(np.arccos(np.clip((np.trace(Re @ R.T @ truth[n][:3, :3].T) - 1) / 2, -1, 1)))
               for n, Re in zip(names, rotations)]
        return center, np.array(rot)

    center, rot = errors(np.ones(len(names), bool))
    good = (center < 10) & (rot < 5)
    if good.sum() >= 3:
        center, rot = errors(good)
    bad = (center > 5) | (rot > 5) if good.sum() >= 3 else np.ones(len(names), bool)
    out.update(bad=int(bad.sum()), center_median_pct=float(np.median(center)), center_max_pct=float(center.max()),
               rotation_median_deg=float(np.median(rot)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", nargs="+", default=list(DEFAULT_SCENES),
                    help="temple[@C] or SHAPE:VIEWS:RINGS:SEED[@C]")
    ap.add_argument("--temple", type=Path, default=None,
                    help="the templeSparseRing folder (photos and templeSR_par.txt)")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose `python -m cli` runs SfM")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "registration",
                    help="work folder [bench/results/registration]")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for every run")
    args = ap.parse_args()
    rows = []
    for spec in args.scenes:
        scene, truth = make_scene(spec, args.work, args.temple)
        out = args.work / "runs" / args.code.resolve().name / scene.name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "cli", "run", str(scene), "--out", str(out), "--until", "sfm",
                              *[x for o in args.overrides for x in ("--set", o)]], cwd=args.code, capture_output=True,
                             text=True)
        row = {"scene": spec, "photos": len(truth), "seconds": round(time.perf_counter() - t0, 1),
               "exit": res.returncode}
        if res.returncode == 0:
            summary = json.loads((out / "manifest.json").read_text())["stages"]["sfm"]["summary"]
            row["attempts"] = [a["registered"] for a in summary.get("mapping_attempts", [])]
            row.update(camera_errors(out / "sfm" / "mapped", truth))
        else:
            row["error"] = (res.stderr.strip().splitlines() or [""])[-1][:160]
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "bench_registration.json").write_text(json.dumps(rows, indent=1))
    print("\n| scene | photos | registered | attempts | bad | centre err. median / max (% ring) | "
          "rotation err. median (deg) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["exit"] != 0:
            print(f"| {r['scene']} | {r['photos']} | fails: {r['error']} | | | | | {r['seconds']} |")
            continue
        errs = (f"{r['center_median_pct']:.2f} / {r['center_max_pct']:.2f} | {r['rotation_median_deg']:.2f}"
                if "bad" in r else "- | -")
        print(f"| {r['scene']} | {r['photos']} | {r['registered']} | {r.get('attempts', '-')} | {r.get('bad', '-')} | "
              f"{errs} | {r['seconds']} |")


if __name__ == "__main__":
    main()

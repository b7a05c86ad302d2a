"""High-resolution photos at several depth-map resolutions: fine-threshold F-scores, time and peak memory per stage.

    python bench/bench_resolution.py                                  # spot, 24 views 1600x1200: 640 px and automatic
    python bench/bench_resolution.py --sides 640 960 1280 auto        # more working resolutions
    python bench/bench_resolution.py --model bob --set refine.steps=200

The scene is a textured model of ``--models-dir`` (default ``spot``) rendered
at ``--width`` x ``--height`` (default 1600x1200, 24 views, reused when
rendered with the same parameters; :func:`run_bench.render_model_timed`).
For each ``--sides`` value (``auto`` = ``depth.max_image_side=null``, which
this machine resolves: :func:`pipeline.depth.views.resolve_max_image_side`)
every stage runs in its own ``recon run --until STAGE`` subprocess
(:func:`run_bench.run_stages`): wall seconds and peak RSS per stage. The sfm
stage does not depend on the depth resolution, so it runs once and its cache
is copied to the other runs. Meshes are scored like ``recon eval`` at F@0.25 %,
0.5 % and 1 % of the object diagonal, with surface samples dense enough for
the finest threshold.

Prints a markdown table and writes ``WORK/bench_resolution.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_bench import manifest_seconds, manifest_summary, render_model_timed, run_stages  # noqa: E402

from pipeline.analysis.evaluate import evaluate_reconstruction  # noqa: E402
from pipeline.core.cache import write_json_atomic  # noqa: E402
from pipeline.graph import STAGE_NAMES  # noqa: E402

THRESHOLDS = (0.0025, 0.005, 0.01)
"""F-score thresholds reported, as fractions of the GT object diagonal."""
MAX_POINTS = 4_000_000
"""Surface samples per mesh for scoring: spacing half the finest threshold (0.125 % of the diagonal) on these models."""


def side_setting(side: str) -> str:
    """``--sides`` value → ``depth.max_image_side`` value (``auto`` → ``null``)."""
    return "null" if side == "auto" else str(int(side))


def seed_sfm(first: Path, out: Path) -> None:
    """Copy the first run's sfm cache (stage folder, ``sparse/``, its manifest entry) into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("sfm", "sparse"):
        shutil.copytree(first / name, out / name)
    manifest = json.loads((first / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k == "sfm"}
    write_json_atomic(out / "manifest.json", manifest)


def run_side(scene: Path, out: Path, side: str, extra: list[str], timeout_s: float | None) -> dict[str, Any]:
    """Every stage at working side ``side``; per-stage seconds and peak RSS, working size, F-scores."""
    stages = [s for s in STAGE_NAMES if not (out / "manifest.json").exists() or s != "sfm"]
    records = run_stages(scene, out, stages, ["--set", f"depth.max_image_side={side_setting(side)}", *extra],
                         timeout_s)
    row: dict[str, Any] = {"side": side, "runs": records,
                           "peak_rss_mib": {r["stage"]: r["peak_rss_mib"] for r in records},
                           "seconds": manifest_seconds(out),
                           "working_side": manifest_summary(out, "depth").get("max_image_side")}
    if any(r["rc"] != 0 for r in records):
        row["error"] = next(r.get("error", "failed") for r in records if r["rc"] != 0)
        return row
    refine = manifest_summary(out, "refine")
    row["refine"] = {k: refine.get(k) for k in ("steps", "refined_fraction", "restored_fraction")}
    ev = evaluate_reconstruction(out, scene / "gt", thresholds_rel=THRESHOLDS, max_points=MAX_POINTS)
    row["fscore"] = {str(t): fscore_at(ev, t) for t in THRESHOLDS}
    row["eval"] = ev
    return row


def fscore_at(ev: dict[str, Any], threshold_rel: float) -> float | None:
    """F-score of ``recon eval``'s result at ``threshold_rel`` x the object diagonal (None if not scored)."""
    for entry in ev.get("thresholds", {}).values():
        if abs(entry["threshold"] / ev["diagonal"] - threshold_rel) < 1e-9:
            return float(entry["fscore"])
    return None


def table(rows: list[dict[str, Any]], scene: str) -> str:
    labels = [f"{100 * t:g} %" for t in THRESHOLDS]
    head = (f"Scene `{scene}`. F-scores at {', '.join(labels)} of the object diagonal; seconds per stage; peak RSS "
            f"(MiB) of each stage's process ({' / '.join(STAGE_NAMES)}; - where the stage was copied).\n\n"
            "| depth.max_image_side | maps | " + " | ".join(f"F@{t}" for t in labels)
            + " | " + " | ".join(STAGE_NAMES) + " | total s | peak MiB per stage |\n|"
            + " --- |" * (4 + len(THRESHOLDS) + len(STAGE_NAMES)) + "\n")
    lines = []
    for r in rows:
        fs = [f"{r['fscore'][str(t)]:.3f}" if r.get("fscore", {}).get(str(t)) is not None else "-"
              for t in THRESHOLDS]
        secs = [f"{r['seconds'].get(s, float('nan')):.1f}" for s in STAGE_NAMES]
        total = sum(r["seconds"].get(s, 0.0) for s in STAGE_NAMES)
        peaks = " / ".join(f"{r['peak_rss_mib'][s]:.0f}" if s in r["peak_rss_mib"] else "-" for s in STAGE_NAMES)
        lines.append(f"| {r['side']} | {r.get('working_side')} px | " + " | ".join(fs) + " | " + " | ".join(secs)
                     + f" | {total:.0f} | {peaks} |" + (f" {r['error']}" if "error" in r else ""))
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="spot", help="textured model of --models-dir (spot or bob)")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "data" / "models")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", nargs="+", default=["640", "auto"],
                    help="depth.max_image_side values to run, in pixels or auto")
    ap.add_argument("--set", action="append", default=[], help="extra SECTION.KEY=VALUE for every run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/recon-bench-resolution"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per stage subprocess")
    ap.add_argument("--table", type=Path, metavar="JSON", help="only print the table of a saved bench_resolution.json")
    args = ap.parse_args(argv)
    if args.table:
        data = json.loads(args.table.read_text())
        print(table(data["rows"], Path(data["scene"]).name))
        return 0

    scene, render_s = render_model_timed(args.work / "scenes", args.model, args.models_dir, args.views, args.width,
                                         args.height, args.seed)
    print(f"scene {scene}" + (f" (rendered in {render_s:.0f} s)" if render_s else " (reused)"), flush=True)
    extra = [x for s in args.set for x in ("--set", s)]
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    for side in args.sides:
        out = args.work / "runs" / f"{scene.name}_side{side}"
        if first is None:
            if out.exists():
                shutil.rmtree(out)
        else:
            seed_sfm(first, out)
        print(f"  depth.max_image_side={side}", flush=True)
        row = run_side(scene, out, side, extra, args.timeout)
        rows.append(row)
        if first is None and (out / "sfm").is_dir():
            first = out
    text = table(rows, scene.name)
    print("\n" + text)
    write_json_atomic(args.work / "bench_resolution.json", {"scene": str(scene), "rows": rows, "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())

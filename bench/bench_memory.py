"""Peak memory per stage against the number of views: is it bounded by resolution and batch settings?

    python bench/bench_memory.py                          # blob, 12 / 24 / 48 views at 480x360, COLMAP SfM
    python bench/bench_memory.py --sfm gt                 # true cameras as the COLMAP model: no matching (faster)
    python bench/bench_memory.py --views 8 16 --width 160 --height 120 --sfm gt --set refine.steps=30   # smoke run
    python bench/bench_memory.py --sfm gt --stages refine   # re-measure one stage on the outputs of an earlier run

For each view count the same object is rendered (``WORK/scenes/<shape>_<views>v_<w>x<h>_s<seed>``,
shared with the other benchmarks) and every stage runs as its own process,
``recon stage NAME SCENE --out OUT --no-upstream``, in order. That process
runs the CLI in-process and, once the stage finished, reads its own peak
resident set size (``VmHWM`` of ``/proc/self/status``: the high-water mark of
this process only, imports included — ``ru_maxrss`` of a child can carry the
parent's RSS from before ``exec``). Reported per stage and view count: peak
RSS (MiB), wall seconds, and what the stage wrote (MiB on disk; for sfm the
COLMAP database separately). The last columns divide the peak at the largest
view count by the peak at the smallest: 1.0 means independent of the number
of views, the view ratio (4.0 for 12 → 48) means linear. Prints a markdown
table and writes ``WORK/bench_memory.json``.

``--sfm gt`` copies each scene and gives it its true cameras as
``sparse/0`` (:func:`pipeline.synthetic.groundtruth.write_gt_model`), so the sfm
stage reads a model instead of matching: use it to measure the later stages
quickly; the default runs COLMAP (whose database grows with the number of
image pairs under exhaustive matching).

``--stages`` runs only the named stages on the output folders an earlier run
with the same options left (they are not wiped then), e.g. to re-measure
refine after changing it without repeating the depth stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sfm", "depth", "refine", "fuse", "export")


def vm_hwm_kib() -> int:
    """Peak resident set size of this process (``VmHWM``, KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(result_path: Path, cli_args: list[str]) -> None:
    """Run ``recon CLI_ARGS`` in this process, then write its exit code, wall time and peak RSS to ``result_path``."""
    sys.path.insert(0, str(REPO))
    import cli

    started = time.perf_counter()
    try:
        cli.main(cli_args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    result_path.write_text(json.dumps({"exit_code": code, "seconds": time.perf_counter() - started,
                                       "vm_hwm_kib": vm_hwm_kib()}))


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def prepare_scene(work: Path, shape: str, views: int, width: int, height: int, seed: int, sfm: str) -> Path:
    """The rendered scene (shared render), or for ``sfm=gt`` a copy holding the true cameras as ``sparse/0``."""
    from pipeline.synthetic.render import render_or_reuse

    scene, _ = render_or_reuse(work / "scenes", shape, n_views=views, width=width, height=height, seed=seed)
    if sfm == "colmap":
        return scene
    from pipeline.synthetic.groundtruth import write_gt_model

    dst = work / "memory" / "scenes" / f"{scene.name}_gtmodel"
    if not (dst / "sparse" / "0" / "images.bin").exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(scene, dst, ignore=shutil.ignore_patterns("recon"))
        write_gt_model(dst, dst / "sparse" / "0")
    return dst


def run_stage(stage: str, scene: Path, out: Path, overrides: list[str], timeout: float) -> dict[str, Any]:
    """One stage in a fresh process; its peak RSS, wall time and output size."""
    result = out.parent / f".{out.name}.{stage}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    args = ["stage", stage, str(scene), "--out", str(out), "--no-upstream", "--no-progress",
            *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(result), "--", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"{stage} on {scene} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(result.read_text())
    result.unlink()
    if row["exit_code"] != 0:
        raise SystemExit(f"{stage} on {scene} exited {row['exit_code']}:\n{proc.stderr[-3000:]}")
    row["peak_rss_mib"] = round(row.pop("vm_hwm_kib") / 1024, 1)
    row["seconds"] = round(row["seconds"], 2)
    row["output_mib"] = round(folder_mib(out / stage), 2)
    if stage == "sfm":
        db = out / "sfm" / "database.db"
        row["database_mib"] = round(db.stat().st_size / 2**20, 2) if db.exists() else 0.0
        manifest = json.loads((out / "manifest.json").read_text())
        row["registered"] = manifest["stages"]["sfm"]["summary"].get("registered")
    return row


def format_table(results: dict[str, Any], views: list[int], stages: tuple[str, ...] = STAGES) -> str:
    lo, hi = views[0], views[-1]
    head = ("| stage | " + " | ".join(f"{v} views: peak MiB (s)" for v in views)
            + f" | peak {hi}/{lo} | views {hi}/{lo} |")
    lines = [head, "|" + " --- |" * (len(views) + 3)]
    for stage in stages:
        cells = []
        for v in views:
            r = results[str(v)][stage]
            extra = f", db {r['database_mib']:.1f} MiB" if r.get("database_mib") else ""
            cells.append(f"{r['peak_rss_mib']:.0f} ({r['seconds']:.1f} s{extra})")
        ratio = results[str(hi)][stage]["peak_rss_mib"] / results[str(lo)][stage]["peak_rss_mib"]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {ratio:.2f} | {hi / lo:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "results",
                   help="work folder (scenes/, memory/, bench_memory.json) [bench/results]")
    p.add_argument("--shape", default="blob", help="rendered shape [blob]")
    p.add_argument("--views", type=int, nargs="+", default=[12, 24, 48], help="view counts [12 24 48]")
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sfm", choices=["colmap", "gt"], default="colmap",
                   help="colmap: real SfM; gt: true cameras as the user's COLMAP model [colmap]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="setting for every stage (repeatable)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage process [3600]")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to run; a subset reuses the output folders of an earlier run, whose upstream stages "
                        "must be done [all]")
    p.add_argument("--json", type=Path, default=None, help="result file [WORK/bench_memory.json]")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.cli_args)
        return

    views = sorted(args.views)
    stages = tuple(s for s in STAGES if s in args.stages)
    overrides = list(args.set) + (["sfm.use_existing_model=false"] if args.sfm == "colmap" else [])
    results: dict[str, Any] = {}
    for n in views:
        scene = prepare_scene(args.work, args.shape, n, args.width, args.height, args.seed, args.sfm)
        out = args.work / "memory" / f"{args.shape}_{n}v_{args.width}x{args.height}_{args.sfm}"
        if stages == STAGES:
            shutil.rmtree(out, ignore_errors=True)
        elif not (out / "manifest.json").exists():
            raise SystemExit(f"{out}: no earlier run to reuse; run all stages first (without --stages)")
        results[str(n)] = {}
        for stage in stages:
            row = run_stage(stage, scene, out, overrides, args.timeout)
            results[str(n)][stage] = row
            print(f"{n:3d} views  {stage:<7} peak {row['peak_rss_mib']:7.1f} MiB  {row['seconds']:7.1f} s  wrote "
                  f"{row['output_mib']:.1f} MiB", flush=True)
    table = format_table(results, views, stages)
    print()
    print(table)
    payload = {
        "shape": args.shape, "width": args.width, "height": args.height, "seed": args.seed, "sfm": args.sfm,
        "settings": overrides, "views": views, "stages": results, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "peak_ratio": {s: round(results[str(views[-1])][s]["peak_rss_mib"]
                                / results[str(views[0])][s]["peak_rss_mib"], 3) for s in stages},
    }
    path = args.json or args.work / "bench_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

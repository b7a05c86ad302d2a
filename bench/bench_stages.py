"""Every stage's time on the rendered scenes, against a baseline measured in the same run (or a saved result).

    python bench/bench_stages.py --baseline HEAD~1              # this checkout and HEAD~1, alternating, same scenes
    python bench/bench_stages.py --baseline main --repeat 3     # medians over 3 runs of each
    python bench/bench_stages.py --baseline-json bench/results/stages_saved.json   # against a saved result
    python bench/bench_stages.py --save bench/results/stages_now.json              # save this run for later
    python bench/bench_stages.py --shapes blob --views 8 --width 160 --height 120 --baseline HEAD \\
        --set refine.steps=20 --work /tmp/recon-bench-stages-smoke                 # smoke run (ratios near 1)

Scenes are rendered by :func:`pipeline.synthetic.render.render_or_reuse` into
``WORK/scenes`` (default: blob and knot, 24 views 480x360; reused when there).
On each scene, ``recon run SCENE --out OUT --no-progress`` runs as a subprocess
for this checkout and, with ``--baseline REV``, for a detached ``git worktree``
of REV at ``WORK/baseline-<sha>`` (reused when present). Each subprocess runs
in its checkout with ``PYTHONPATH`` set to it, so it imports that checkout's
``cli`` and ``pipeline`` rather than the editable install's (checked before the
first run). OUT is deleted before every run, so every stage really runs. The
order alternates (current, baseline, baseline, current, ...) so drift on the
machine falls on both sides.

Per stage: seconds from ``OUT/manifest.json``; per run also the process's wall
time and peak RSS (:func:`run_bench.run_measured`), and the mesh's F@0.5 % and
F@1 % against the scene's ground truth (``recon eval``'s scoring), so a change
that saves time at the cost of quality shows in the same table (differences
under about 0.001 are Open3D's run-to-run noise). Reported: the median over
``--repeat`` runs of each, and current / baseline (ratio of the medians; < 1 =
faster). Absolute seconds move from run to run on shared machines (other jobs,
frequency scaling): compare the *ratios*, which are measured side by side.
Even they move when another job's load changes within a run (with identical
code, wall ratios of 1.18 and 1.37 were seen over 3 pairs on the 2-core
machine while another job ran, 0.99 over 4 pairs when it was steady), so use
``--repeat 3`` or more: with repeats, each scene also shows the spread of the
wall ratio of each (adjacent) pair of runs. A saved result (``--baseline-json``)
was measured under other conditions, so its ratios are only as good as the
machine was steady in between.

Prints one markdown table per scene and the geometric mean over the scenes of
the ratio of the wall totals; writes ``WORK/bench_stages.json`` (and ``--save
PATH``), whose ``scenes[].median.current`` a later ``--baseline-json`` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_bench import manifest_seconds, recon_command, run_measured  # noqa: E402

from pipeline.analysis.evaluate import evaluate_reconstruction  # noqa: E402
from pipeline.core.cache import write_json_atomic  # noqa: E402
from pipeline.graph import STAGE_NAMES  # noqa: E402

DEFAULT_SHAPES = ("blob", "knot")
STAGES_SUM = "stages sum"
"""Row: the sum of the stages' own seconds (manifest)."""
QUALITY_ROWS: dict[str, float] = {"F@0.5 %": 0.005, "F@1 %": 0.01}
"""Rows of F-scores against the scenes' ground truth (threshold as a fraction of the object diagonal)."""
WALL = "total (wall)"
"""Row: the ``recon run`` process's wall seconds (interpreter start, imports, every stage, report)."""
CPU = "total (CPU)"
"""Row: the ``recon run`` process's CPU seconds (user + system, its COLMAP children included): less moved than the
wall time by other jobs that take the machine's cores, though not by those that share its caches."""


# ---- checkouts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkout:
    """A source tree whose ``recon run`` is timed."""

    label: str  # "current" or "baseline"
    root: Path
    rev: str  # commit sha of its HEAD
    dirty: bool  # uncommitted changes to tracked files


def _git(args: list[str], cwd: Path) -> str:
    """Stdout of ``git ARGS`` in ``cwd`` (stripped); exits with git's message on failure."""
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def current_checkout() -> Checkout:
    """This checkout (working tree as it is)."""
    rev = _git(["rev-parse", "HEAD"], REPO)
    dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], REPO))
    return Checkout("current", REPO, rev, dirty)


def baseline_checkout(rev: str, work: Path) -> Checkout:
    """A detached worktree of ``rev`` at ``work/baseline-<sha12>``, added unless it is there at that commit."""
    sha = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], REPO)
    path = work / f"baseline-{sha[:12]}"
    if path.exists():
        have = _git(["rev-parse", "HEAD"], path)
        if have != sha:
            raise SystemExit(f"{path} is at {have[:12]}, not {sha[:12]}; remove it (git worktree remove)")
        print(f"baseline {rev} = {sha[:12]}: reusing {path}", flush=True)
    else:
        work.mkdir(parents=True, exist_ok=True)
        # --force: also when a deleted folder of that name is still registered (a detached commit is safe to force)
        _git(["worktree", "add", "--force", "--detach", str(path), sha], REPO)
        print(f"baseline {rev} = {sha[:12]}: worktree {path}", flush=True)
    return Checkout("baseline", path.resolve(), sha, False)


def checkout_env(checkout: Checkout) -> dict[str, str]:
    """This environment with ``PYTHONPATH`` starting at the checkout, ahead of the editable install's finder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout.root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_imports(checkout: Checkout) -> None:
    """Exit unless a process with the timed runs' directory and environment imports ``cli`` and ``pipeline`` from
    the checkout."""
    code = "import cli, pipeline; print(cli.__file__); print(pipeline.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=checkout.root, env=checkout_env(checkout),
                         capture_output=True, text=True)
    files = [Path(f).resolve() for f in res.stdout.split()]
    if res.returncode != 0 or len(files) != 2 or not all(f.is_relative_to(checkout.root) for f in files):
        raise SystemExit(f"{checkout.label}: `cli`/`pipeline` do not come from {checkout.root}: "
                         f"{res.stdout.strip() or res.stderr.strip()}")


# ---- runs -----------------------------------------------------------------------------------

def run_once(checkout: Checkout, scene: Path, out: Path, log: Path, sets: list[str],
             timeout_s: float | None) -> dict[str, Any]:
    """One ``recon run`` of ``checkout`` on ``scene`` into an emptied ``out``.

    Returns :func:`run_bench.run_measured`'s record (``wall_s`` in s, ``peak_rss_mib`` in MiB) plus ``seconds``,
    stage → seconds of the manifest.
    """
    shutil.rmtree(out, ignore_errors=True)
    # recon_command() is the console script or `python -m cli`; PYTHONPATH and cwd make either import the checkout
    cmd = recon_command() + ["run", str(scene), "--out", str(out), "--no-progress",
                             *[a for s in sets for a in ("--set", s)]]
    rec = run_measured(cmd, log, timeout_s, cwd=checkout.root, env=checkout_env(checkout))
    rec["seconds"] = manifest_seconds(out)
    rec["fscore"] = fscores(out, scene) if rec["rc"] == 0 else {}
    return rec


def fscores(out: Path, scene: Path) -> dict[str, float]:
    """F-scores of ``OUT/mesh.ply`` against the scene's ground truth (``recon eval``'s scoring), by
    :data:`QUALITY_ROWS` label; empty without ``scene/gt`` or when scoring fails."""
    if not (scene / "gt").is_dir():
        return {}
    try:
        ev = evaluate_reconstruction(out, scene / "gt", thresholds_rel=tuple(QUALITY_ROWS.values()))
    except Exception as exc:  # noqa: BLE001 - a failed score leaves the row empty, the timing stands
        print(f"    scoring {out} failed: {type(exc).__name__}: {exc}", flush=True)
        return {}
    by_threshold = {round(e["threshold"] / ev["diagonal"], 9): e["fscore"] for e in ev["thresholds"].values()}
    return {label: float(by_threshold[round(t, 9)]) for label, t in QUALITY_ROWS.items() if round(t, 9) in by_threshold}


def run_order(checkouts: list[Checkout], pair_index: int) -> list[Checkout]:
    """current, baseline for even pairs; baseline, current for odd ones (ABBA), so drift hits both sides."""
    return checkouts if pair_index % 2 == 0 else checkouts[::-1]


def bench_scene(scene: Path, checkouts: list[Checkout], args: argparse.Namespace,
                first_pair: int) -> dict[str, list[dict[str, Any]]]:
    """``args.repeat`` runs of every checkout on ``scene``; label → run records."""
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in checkouts}
    for r in range(args.repeat):
        for checkout in run_order(checkouts, first_pair + r):
            out = args.work / "runs" / scene.name / checkout.label
            log = args.work / "logs" / f"{scene.name}_{checkout.label}_r{r + 1}.log"
            rec = run_once(checkout, scene, out, log, args.set, args.timeout)
            rec["repeat"] = r + 1
            runs[checkout.label].append(rec)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in rec["seconds"].items())
            cpu = f", CPU {rec['cpu_s']:.1f} s" if rec.get("cpu_s") is not None else ""
            print(f"  {checkout.label:<8} r{r + 1} rc={rec['rc']} wall {rec['wall_s']:.1f} s{cpu}, "
                  f"peak {rec['peak_rss_mib']:.0f} MiB ({stages})" + (f"  {rec['error']}" if "error" in rec else ""),
                  flush=True)
    return runs


def medians(records: list[dict[str, Any]]) -> dict[str, float]:
    """Row → median seconds over the successful runs: each stage, ``STAGES_SUM``, ``WALL`` and ``CPU``."""
    ok = [r for r in records if r["rc"] == 0]
    if not ok:
        return {}
    rows: dict[str, list[float]] = {}
    for r in ok:
        for stage, s in r["seconds"].items():
            rows.setdefault(stage, []).append(s)
        rows.setdefault(STAGES_SUM, []).append(sum(r["seconds"].values()))
        rows.setdefault(WALL, []).append(r["wall_s"])
        if r.get("cpu_s") is not None:
            rows.setdefault(CPU, []).append(r["cpu_s"])
    return {k: round(statistics.median(v), 3) for k, v in rows.items()}


def quality_medians(records: list[dict[str, Any]]) -> dict[str, float]:
    """Quality row → median F-score over the successful, scored runs."""
    rows: dict[str, list[float]] = {}
    for r in records:
        for label, f in r.get("fscore", {}).items():
            rows.setdefault(label, []).append(f)
    return {k: round(statistics.median(v), 4) for k, v in rows.items()}


def ratios(current: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Row → current / baseline seconds, for rows in both with a positive baseline."""
    return {k: round(current[k] / baseline[k], 4) for k in current if baseline.get(k, 0.0) > 0.0}


def pair_wall_ratios(runs: dict[str, list[dict[str, Any]]], key: str = "wall_s") -> list[float]:
    """Current / baseline wall seconds (``key``: or ``cpu_s``) of each repeat where both succeeded (the two runs were
    adjacent in time)."""
    by_repeat = {label: {r["repeat"]: r[key] for r in recs if r["rc"] == 0 and r.get(key) is not None}
                 for label, recs in runs.items()}
    cur, base = by_repeat.get("current", {}), by_repeat.get("baseline", {})
    return [round(cur[k] / base[k], 4) for k in sorted(cur) if base.get(k, 0.0) > 0.0]


def geometric_mean(values: list[float]) -> float | None:
    """Geometric mean of positive values (None when there are none)."""
    values = [v for v in values if v > 0.0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ---- report ---------------------------------------------------------------------------------

def row_order(*rows: dict[str, float]) -> list[str]:
    """The stages in pipeline order (stages only one side has at their end), then the total rows."""
    names = {k for r in rows for k in r} - {STAGES_SUM, WALL, CPU}
    known = [s for s in STAGE_NAMES if s in names]
    return known + sorted(names - set(known)) + [STAGES_SUM, WALL] + ([CPU] if any(CPU in r for r in rows) else [])


def _s(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def scene_table(res: dict[str, Any], with_baseline: bool) -> str:
    """Markdown table of one scene: stage | current s | baseline s | ratio (or stage | current s)."""
    cur, base, ratio = res["median"].get("current", {}), res["median"].get("baseline", {}), res.get("ratio", {})
    if with_baseline:
        lines = ["| stage | current s | baseline s | ratio (current/baseline) |", "|---|---|---|---|"]
        lines += [f"| {k} | {_s(cur.get(k))} | {_s(base.get(k))} | {_s(ratio.get(k), '{:.3f}')} |"
                  for k in row_order(cur, base)]
    else:
        lines = ["| stage | current s |", "|---|---|"] + [f"| {k} | {_s(cur.get(k))} |" for k in row_order(cur)]
    q_cur, q_base = res.get("quality", {}).get("current", {}), res.get("quality", {}).get("baseline", {})
    for label in [k for k in QUALITY_ROWS if k in q_cur or k in q_base]:
        a, b = q_cur.get(label), q_base.get(label)
        if with_baseline:
            diff = "-" if a is None or b is None else f"{a - b:+.4f} (difference)"
            lines.append(f"| {label} | {_s(a, '{:.4f}')} | {_s(b, '{:.4f}')} | {diff} |")
        else:
            lines.append(f"| {label} | {_s(a, '{:.4f}')} |")
    return "\n".join(lines)


def scene_heading(res: dict[str, Any]) -> str:
    """``### scene``, the successful runs behind each median, and any errors."""
    counts = ", ".join(f"{sum(r['rc'] == 0 for r in recs)} {label}" for label, recs in res.get("runs", {}).items())
    head = f"### {res['scene']}" + (f" (medians of the successful runs: {counts})" if counts else "")
    pairs = res.get("pair_wall_ratios", [])
    if len(pairs) > 1:
        head += f"\n\nwall ratio of each pair of runs: {min(pairs):.3f} to {max(pairs):.3f} (the noise of the ratios)"
        cpu_pairs = res.get("pair_cpu_ratios", [])
        if len(cpu_pairs) > 1:
            head += f"; of the CPU seconds: {min(cpu_pairs):.3f} to {max(cpu_pairs):.3f}"
    errors = [f"{label} r{r['repeat']}: {r['error']}" for label, recs in res.get("runs", {}).items()
              for r in recs if "error" in r]
    if "error" in res:
        errors.insert(0, res["error"])
    return head + "".join(f"\n\n**failed**: {e}" for e in errors)


# ---- baseline from a saved result ---------------------------------------------------------------

def load_saved(path: Path) -> dict[str, dict[str, float]]:
    """Scene name → the saved run's median seconds of its *current* checkout (rows as :func:`medians`)."""
    data = json.loads(path.read_text())
    return {s["scene"]: s["median"]["current"] for s in data.get("scenes", []) if s.get("median", {}).get("current")}


def saved_note(path: Path, args: argparse.Namespace) -> str:
    """Where the saved baseline comes from, and a warning when it ran with other ``--set`` values or scene sizes."""
    data = json.loads(path.read_text())
    saved = data.get("args", {})
    rev = data.get("checkouts", {}).get("current", {}).get("rev", "?")[:12]
    note = f"baseline: saved result {path} ({rev}, measured {data.get('created', '?')}, not in this run)"
    diffs = [f"{k}={saved[k]} (this run: {vars(args)[k]})" for k in ("set", "views", "width", "height", "seed")
             if k in saved and saved[k] != vars(args)[k]]
    return note + (f"; **it ran with other settings**: {', '.join(diffs)}" if diffs else "")


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="REV", help="git revision timed in the same run (e.g. HEAD~1, main)")
    base.add_argument("--baseline-json", type=Path, metavar="FILE", help="a saved result (--save, bench_stages.json)")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the result here")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="rendered shapes [blob knot]")
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seed", type=int, default=0, help="render seed")
    p.add_argument("--work", type=Path, default=Path("/tmp/recon-bench-stages"),
                   help="scenes, runs, logs, baseline worktrees and bench_stages.json")
    p.add_argument("--repeat", type=int, default=1, help="runs of each checkout per scene (medians reported)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to every run")
    p.add_argument("--timeout", type=float, default=None, help="seconds per `recon run` process (killed after)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.work = args.work.resolve()
    return args


def render(shape: str, args: argparse.Namespace) -> Path:
    """The scene folder of ``shape`` under ``WORK/scenes`` (rendered unless already there)."""
    from pipeline.synthetic.render import render_or_reuse

    started = time.perf_counter()
    scene, rendered = render_or_reuse(args.work / "scenes", shape, n_views=args.views, width=args.width,
                                      height=args.height, seed=args.seed)
    print(f"  scene {scene} ({f'rendered in {time.perf_counter() - started:.1f} s' if rendered else 'reused'})",
          flush=True)
    return scene


def summary_line(results: list[dict[str, Any]]) -> tuple[str, float | None]:
    """The closing line (geometric mean of the scenes' wall-total ratios) and that mean."""
    totals = [r["ratio"][WALL] for r in results if WALL in r.get("ratio", {})]
    gm = geometric_mean(totals)
    if gm is None:
        return "no scene has both totals; no ratio", None
    line = (f"geometric mean of the total (wall) ratio current/baseline over {len(totals)} scene(s): {gm:.3f} "
            f"({'faster' if gm < 1 else 'slower'} by {abs(gm - 1) * 100:.1f} %)")
    cpu = geometric_mean([r["ratio"][CPU] for r in results if CPU in r.get("ratio", {})])
    if cpu is not None:
        line += f"; of the CPU seconds: {cpu:.3f}"
    return line, gm


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkouts = [current_checkout()]
    if args.baseline:
        checkouts.append(baseline_checkout(args.baseline, args.work))
    for c in checkouts:
        check_imports(c)
        print(f"{c.label}: {c.root} @ {c.rev[:12]}{' + uncommitted changes' if c.dirty else ''}", flush=True)
    saved = load_saved(args.baseline_json) if args.baseline_json else None
    note = saved_note(args.baseline_json, args) if args.baseline_json else None
    with_baseline = bool(args.baseline or saved is not None)

    results: list[dict[str, Any]] = []
    for i, shape in enumerate(args.shapes):
        print(f"== {shape}", flush=True)
        try:
            scene = render(shape, args)
        except Exception as exc:  # noqa: BLE001 - the row reports any failure
            error = f"render failed: {type(exc).__name__}: {exc}"
            results.append({"scene": shape, "runs": {}, "median": {}, "error": error})
            continue
        runs = bench_scene(scene, checkouts, args, first_pair=i * args.repeat)
        res: dict[str, Any] = {"scene": scene.name, "path": str(scene), "runs": runs,
                               "median": {label: medians(recs) for label, recs in runs.items()},
                               "quality": {label: quality_medians(recs) for label, recs in runs.items()}}
        if saved is not None:
            res["median"]["baseline"] = saved.get(scene.name, {})
        if with_baseline:
            res["ratio"] = ratios(res["median"]["current"], res["median"].get("baseline", {}))
        if args.baseline:
            res["pair_wall_ratios"] = pair_wall_ratios(runs)
            res["pair_cpu_ratios"] = pair_wall_ratios(runs, "cpu_s")
        results.append(res)

    parts = [scene_heading(r) + "\n\n" + scene_table(r, with_baseline) for r in results]
    line, gm = summary_line(results) if with_baseline else ("no baseline: times of this checkout only", None)
    md = "\n\n".join(([note] if note else []) + parts + [line])
    print("\n" + md)
    data = {"tool": "bench/bench_stages.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "checkouts": {c.label: {"root": str(c.root), "rev": c.rev, "dirty": c.dirty} for c in checkouts}
            | ({"baseline": {"json": str(args.baseline_json)}} if args.baseline_json else {}),
            "scenes": results, "geomean_total_ratio": gm, "table": md}
    for path in [args.work / "bench_stages.json"] + ([args.save] if args.save else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
        print(f"wrote {path}")
    failed = any("error" in res or any(r["rc"] != 0 for recs in res["runs"].values() for r in recs)
                 for res in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

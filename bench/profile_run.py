"""Profile a whole `recon run` with py-spy and summarize where the time goes, per stage (issue 21).

    pip install py-spy
    python bench/profile_run.py SCENE_DIR --work /tmp/recon-profile        # runs, samples, summarizes
    python bench/profile_run.py --summarize RAW.txt                          # summarize an earlier recording

py-spy samples every thread of recon and of its child processes (COLMAP runs
in one) ``--rate`` times a second while the run goes. Each sample's stack is
attributed to the stage whose package (``pipeline.sfm`` … ``pipeline.export``)
appears in it. The summary (markdown, to stdout and ``WORK/profile.md``) lists
per stage the samples, as a share of the run, and the functions that take the
most of them: "self" counts samples whose innermost Python frame is the
function, and "total" counts samples with the function anywhere on the stack.
Sampling, not tracing: shares are what to read, counts move from run to run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

STAGES = ("sfm", "depth", "refine", "fuse", "export")
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def stage_of(frames: list[str]) -> str:
    """The stage a stack belongs to: the first ``pipeline/<stage>/`` file on it, else ``other``."""
    for frame in frames:
        for stage in STAGES:
            if f"pipeline/{stage}/" in frame:
                return stage
    return "other"


def short(frame: str) -> str:
    """``function (package/module.py)`` without the line number and the leading path."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for root in ("site-packages/", "pipeline/", "workflows/"):
        if root in path:
            path = (root if root != "site-packages/" else "") + path.split(root, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarize(raw: Path, top: int = 8) -> str:
    """Markdown summary of a py-spy ``--format raw`` recording (collapsed stacks, ``frames;... count``)."""
    per_stage: Counter = Counter()
    self_time: dict[str, Counter] = defaultdict(Counter)
    total_time: dict[str, Counter] = defaultdict(Counter)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        stage = stage_of(frames)
        per_stage[stage] += n
        python_frames = [short(f) for f in frames if ".py" in f]
        if python_frames:
            self_time[stage][python_frames[-1]] += n
            for name in set(python_frames):
                total_time[stage][name] += n
    grand = sum(per_stage.values()) or 1
    out = [f"Samples: {grand} (all threads and processes). Share of the run per stage:", "",
           "| stage | samples | share |", "| --- | --- | --- |"]
    out += [f"| {s} | {per_stage[s]} | {100 * per_stage[s] / grand:.1f} % |" for s in (*STAGES, "other")
            if per_stage[s]]
    for stage in (*STAGES, "other"):
        if not per_stage[stage]:
            continue
        out += ["", f"### {stage}", "", "| function | self % of stage | total % of stage |", "| --- | --- | --- |"]
        for name, n in self_time[stage].most_common(top):
            out.append(f"| `{name}` | {100 * n / per_stage[stage]:.1f} | "
                       f"{100 * total_time[stage][name] / per_stage[stage]:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scene", nargs="?", type=Path, help="scene folder to run recon on")
    p.add_argument("--work", type=Path, default=Path("/tmp/recon-profile"))
    p.add_argument("--rate", type=int, default=20, help="samples per second")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to recon run")
    p.add_argument("--summarize", type=Path, default=None, metavar="RAW", help="only summarize this recording")
    args = p.parse_args()
    if args.summarize is not None:
        print(summarize(args.summarize), end="")
        return
    if args.scene is None:
        p.error("give a SCENE_DIR, or --summarize RAW")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    recon = Path(sys.executable).with_name("recon")
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.work / "profile_raw.txt"
    cmd = [py_spy, "record", "--subprocesses", "--rate", str(args.rate), "--format", "raw", "-o", str(raw), "--",
           str(recon), "run", str(args.scene), "--out", str(out), "--no-progress"]
    for s in args.set:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    text = summarize(raw)
    (args.work / "profile.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

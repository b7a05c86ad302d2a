"""Faults: SIGKILL at every stage then resume, corrupt caches, concurrent runs, NaN in refinement, CUDA OOM.

The crash tests run the real CLI in a child process on a rendered 8-view
160x120 scene whose true cameras are given as a COLMAP model (so the sfm
stage is deterministic), with small depth/refine settings. A first,
uninterrupted run records every atomic write (``RECON_FAULT_TRACE``, see
:func:`pipeline.core.cache.fault_point`); each crash case then kills a fresh run
with SIGKILL at one of those writes (``RECON_FAULT_KILL_AT``) — either just
before a finished temporary file is moved into place (a stale temporary is
left behind) or just after — or at a random moment, runs ``recon run`` again
and compares the mesh with the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from pipeline.core.cache import FAULT_KILL_ENV, FAULT_TRACE_ENV, file_checksum
from pipeline.core.errors import ReconError
from pipeline.core.oom import call_with_oom_fallback, is_out_of_memory
from pipeline.graph import STAGE_NAMES
from pipeline.synthetic.groundtruth import write_gt_model
from pipeline.synthetic.render import render_scene

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=30"]
KILLS_PER_STAGE = 1
TIMED_KILLS = 1


def recon(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def load_mesh(path: Path) -> trimesh.Trimesh:
    return trimesh.load(path, process=False, force="mesh")


def assert_same_mesh(a_path: Path, b_path: Path) -> None:
    """Same mesh to floating-point tolerance (vertex order may differ)."""
    a, b = load_mesh(a_path), load_mesh(b_path)
    assert len(a.vertices) == len(b.vertices) and len(a.faces) == len(b.faces)
    np.testing.assert_allclose(np.sort(a.vertices, axis=0), np.sort(b.vertices, axis=0), atol=1e-5)


def stale_temporaries(out: Path) -> list[str]:
    """Leftovers of interrupted atomic writes anywhere in the output folder."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*") if p.name != ".lock")


# ---- the scene and the uninterrupted reference -------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_src(tmp_path_factory) -> Path:
    scene = render_scene(tmp_path_factory.mktemp("faults") / "blob8", shape="blob", n_views=8, width=160, height=120,
                         seed=0)
    write_gt_model(scene, scene / "sparse" / "0")
    return scene


def fresh_scene(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("recon"))
    return dst


class Reference:
    def __init__(self, scene: Path, events: list[dict], seconds: float):
        self.scene, self.events, self.seconds = scene, events, seconds

    @property
    def mesh(self) -> Path:
        return self.scene / "recon" / "mesh.ply"

    def stage_events(self) -> dict[str, list[int]]:
        """Stage → numbers of its write events (publishing and its manifest entry count as the stage's)."""
        out: dict[str, list[int]] = {name: [] for name in STAGE_NAMES}
        current = None
        root = self.scene / "recon"
        for e in self.events:
            parts = Path(e["path"]).relative_to(root).parts
            # a stage is built in OUT/.building/<stage>
            first = parts[1] if parts[0] == ".building" and len(parts) > 1 else parts[0]
            if first in STAGE_NAMES:
                current = first
            if current is not None:
                out[current].append(e["n"])
        return out


@pytest.fixture(scope="module")
def reference(scene_src, tmp_path_factory) -> Reference:
    scene = fresh_scene(scene_src, tmp_path_factory.mktemp("ref") / "scene")
    trace = scene.parent / "trace.jsonl"
    t0 = time.perf_counter()
    res = recon("run", str(scene), *FAST, env={FAULT_TRACE_ENV: str(trace)})
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len({e["pid"] for e in events}) == 1
    return Reference(scene, events, seconds)


def kill_points() -> list[tuple[str, int]]:
    """(stage, k): k = 0 kills at the last write before the stage's manifest entry is in place (all its
    work done, nothing recorded); k >= 1 at a write drawn (seeded) from the stage's trace. The per-view
    depth stage gets one of each."""
    return [(name, k) for name in STAGE_NAMES for k in range(KILLS_PER_STAGE)] + [("depth", 1)]


# ---- SIGKILL, then resume ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_stage_writes_atomically(reference):
    per_stage = reference.stage_events()
    assert all(len(per_stage[name]) >= 4 for name in STAGE_NAMES), {k: len(v) for k, v in per_stage.items()}
    assert {e["event"] for e in reference.events} == {"staged", "replaced"}


@pytest.mark.slow
@pytest.mark.parametrize("stage,k", kill_points())
def test_sigkill_at_a_write_then_resume_gives_the_same_mesh(reference, scene_src, tmp_path, stage, k):
    events = reference.stage_events()[stage]
    n = events[-2] if k == 0 else random.Random(f"{stage}-{k}").choice(events[:-2])
    scene = fresh_scene(scene_src, tmp_path / "scene")
    killed = recon("run", str(scene), *FAST, env={FAULT_KILL_ENV: str(n)})
    assert killed.returncode == -signal.SIGKILL, (f"the run was not killed at write {n}: {killed.returncode}\n"
                                                  f"{killed.stderr}")
    resumed = recon("run", str(scene), *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.strip() == ""
    assert_same_mesh(reference.mesh, scene / "recon" / "mesh.ply")
    assert stale_temporaries(scene / "recon") == []
    assert (scene / "recon" / "mesh.glb").exists() and (scene / "recon" / "sparse" / "images.bin").exists()


@pytest.mark.slow
@pytest.mark.parametrize("k", range(TIMED_KILLS))
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_mesh(reference, scene_src, tmp_path, k):
    scene = fresh_scene(scene_src, tmp_path / "scene")
    delay = random.Random(k).uniform(1.0, max(1.5, 0.8 * reference.seconds))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(scene), *FAST], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = recon("run", str(scene), *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_mesh(reference.mesh, scene / "recon" / "mesh.ply")
    assert stale_temporaries(scene / "recon") == []


# ---- corrupt caches are recomputed, never trusted -----------------------------------------------------------------


def _finished_copy(reference: Reference, dst: Path) -> Path:
    """A copy of the finished reference scene (mtimes kept, so every stage stays cached)."""
    shutil.copytree(reference.scene, dst)
    return dst


def _flip_bytes(path: Path, at: float = 0.5, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + n] = bytes(b ^ 0xFF for b in data[i : i + n])
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("victim", [
    "sfm/model/points3D.bin",
    "depth/views/view_003.png.npz",
    "refine/views/view_005.png.npz",
    "fuse/mesh.ply",
])
def test_corrupt_cache_file_is_detected_and_recomputed(reference, tmp_path, victim):
    scene = _finished_copy(reference, tmp_path / "scene")
    stage = victim.split("/")[0]
    _flip_bytes(scene / "recon" / victim)
    res = recon("run", str(scene), *FAST)
    assert res.returncode == 0, res.stderr
    assert f"{stage}: running (output {victim} changed or is corrupt (checksum mismatch))" in res.stdout
    manifest = json.loads((scene / "recon" / "manifest.json").read_text())
    assert manifest["stages"][stage]["outputs"][victim.split("/", 1)[1]] == file_checksum(scene / "recon" / victim)
    assert_same_mesh(reference.mesh, scene / "recon" / "mesh.ply")


# ---- two runs on one output folder -------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_concurrent_run_is_refused(reference, scene_src, tmp_path):
    scene = fresh_scene(scene_src, tmp_path / "scene")
    first = subprocess.Popen([sys.executable, "-m", "cli", "run", str(scene), *FAST], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = scene / "recon" / ".lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
            assert first.poll() is None, "the first run ended before it took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run: it keeps the lock
        second = recon("run", str(scene), *FAST)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(scene / "recon") in lines[0], second.stderr
    assert "another recon run" in lines[0] and "--out" in lines[0]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # the first run was not disturbed
    assert_same_mesh(reference.mesh, scene / "recon" / "mesh.ply")


# ---- NaN/inf during refinement never reaches the mesh ------------------------------------------------------------


@pytest.mark.slow
def test_nan_in_refinement_is_skipped_with_a_warning(reference, scene_src, tmp_path):
    """Every 7th multiview loss is NaN and one step's is +inf: warned, skipped, the mesh is finite and whole."""
    scene = fresh_scene(scene_src, tmp_path / "scene")
    driver = textwrap.dedent("""
        import sys
        import cli
        from pipeline.refine import losses

        real = losses.multiview_loss
        calls = {"n": 0}

        def poisoned(*args, **kwargs):
            calls["n"] += 1
            loss, keep = real(*args, **kwargs)
            if calls["n"] == 3:
                return loss * float("inf"), keep
            return (loss * float("nan") if calls["n"] % 7 == 0 else loss), keep

        losses.multiview_loss = poisoned
        sys.argv = ["recon", *sys.argv[1:]]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", driver, "run", str(scene), *FAST], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "non-finite" in res.stderr
    summary = json.loads((scene / "recon" / "manifest.json").read_text())["stages"]["refine"]["summary"]
    assert summary["skipped_steps"] >= 2
    mesh = load_mesh(scene / "recon" / "mesh.ply")
    assert np.isfinite(mesh.vertices).all()
    ref = load_mesh(reference.mesh)
    assert len(mesh.faces) > 0.9 * len(ref.faces)
    for path in (scene / "recon" / "refine" / "views").glob("*.npz"):
        with np.load(path) as d:
            assert np.isfinite(d["depth"]).all()


# ---- CUDA out of memory: smaller batches, then the CPU -----------------------------------------------------------


def _fake_work(fits_on: dict[str, int], calls: list[tuple[int, str]]):
    """Work that 'runs out of memory' when the batch exceeds ``fits_on[device type]``; result independent of the
    batch."""

    def fn(batch: int, device: torch.device) -> torch.Tensor:
        calls.append((batch, device.type))
        if batch > fits_on.get(device.type, 0):
            if device.type == "cpu":
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 99 bytes")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        x = torch.arange(12.0)
        return sum(chunk.sum() for chunk in x.split(batch))

    return fn


@pytest.mark.parametrize("fits,expected", [
    ({"cuda": 64}, [(64, "cuda")]),
    ({"cuda": 16}, [(64, "cuda"), (32, "cuda"), (16, "cuda")]),
    ({"cuda": 0, "cpu": 64}, [(64, "cuda"), (32, "cuda"), (16, "cuda"), (64, "cpu")]),
    ({"cuda": 0, "cpu": 20}, [(64, "cuda"), (32, "cuda"), (16, "cuda"), (64, "cpu"), (32, "cpu"), (16, "cpu")]),
])
def test_oom_halves_the_batch_then_falls_back_to_cpu(fits, expected, caplog):
    calls: list[tuple[int, str]] = []
    with caplog.at_level("WARNING", logger="pipeline.core.oom"):
        res = call_with_oom_fallback(_fake_work(fits, calls), batch=64, device="cuda", min_batch=16,
                                     what="depth of v.png", setting="mvs.chunk_pixels")
    assert calls == expected
    assert (res.value.item() == pytest.approx(66.0) and (res.batch, res.device.type) == expected[-1]
            and res.retries == len(expected) - 1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(expected) - 1 and all("depth of v.png: out of memory" in w for w in warnings)
    if any(d == "cpu" for _, d in expected):
        assert any("falling back to the CPU" in w for w in warnings)


def test_oom_everywhere_is_one_clear_error():
    calls: list[tuple[int, str]] = []
    with pytest.raises(ReconError) as info:
        call_with_oom_fallback(_fake_work({}, calls), batch=8, device="cuda", min_batch=2, what="refine",
                               setting="refine.chunk")
    message = str(info.value)
    assert "\n" not in message and "out of memory on cpu" in message and "refine.chunk=2" in message
    assert calls == [(8, "cuda"), (4, "cuda"), (2, "cuda"), (8, "cpu"), (4, "cpu"), (2, "cpu")]


def test_oom_without_cpu_fallback_stops_on_the_gpu():
    calls: list[tuple[int, str]] = []
    with pytest.raises(ReconError, match="out of memory on cuda"):
        call_with_oom_fallback(_fake_work({"cpu": 100}, calls), batch=4, device="cuda", what="x", setting="s",
                               cpu_fallback=False)
    assert calls == [(4, "cuda"), (2, "cuda"), (1, "cuda")]


def test_other_errors_are_not_swallowed():
    def broken(batch, device):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        call_with_oom_fallback(broken, batch=4, device="cpu", what="x", setting="s")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory")) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_oom_helper_runs_on_the_available_device(device):
    res = call_with_oom_fallback(lambda b, d: torch.ones(b, device=d).sum(), batch=5, device=device, what="x",
                                 setting="s")
    assert res.value.item() == 5 and res.device.type == device.type and res.retries == 0

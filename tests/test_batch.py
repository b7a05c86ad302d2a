"""``recon batch`` on Ray: resource requests, the table and report, and end to end on a real local cluster.

The end-to-end tests start a Ray cluster on 127.0.0.1 with ``ray start --head``
(its own temp folder and token, every process on the loopback interface), run
``recon batch --address`` on two small rendered scenes and one broken scene,
compare the meshes and per-view depth files with ``recon run``, then run the
batch again with Ray embedded (no ``--address``) and check that every cache is
reused. The cluster is stopped, and checked gone, when the module ends.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner

import cli
from pipeline.core.errors import ReconError
from workflows.batch import LOOPBACK_ENV, format_table, make_jobs, scene_row, write_reports
from workflows.distributed import Resources, SceneJob, SceneOutcome, merge_stage_results, task_options, view_chunks
from workflows.local import StageResult

HAVE_RAY = importlib.util.find_spec("ray") is not None
FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=60", "--set", "sfm.num_threads=1"]
"""Small settings; one SfM thread makes COLMAP's result the same in every process (with several it varies \
run to run)."""
VIEWS_PER_TASK = 4
N_VIEWS = 10


# ---- pure parts ------------------------------------------------------------------------------------

def test_gpu_requested_only_for_accelerated_stages_on_a_gpu_cluster():
    cpu_only = Resources(cluster_gpus=0, cpus_per_task=2, gpus_per_task=1)
    for stages in (("sfm",), ("depth",), ("depth", "refine", "fuse", "export")):
        assert task_options(stages, cpu_only) == {"num_cpus": 2.0}
    gpu = Resources(cluster_gpus=4, cpus_per_task=1, gpus_per_task=0.5)
    assert task_options(("sfm",), gpu) == {"num_cpus": 1.0}
    assert task_options(("export",), gpu) == {"num_cpus": 1.0}
    for stages in (("depth",), ("refine",), ("fuse", "export")):
        assert task_options(stages, gpu) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert task_options(("depth",), Resources(cluster_gpus=4, gpus_per_task=0)) == {"num_cpus": 1.0}


@pytest.mark.parametrize("n, per", [(10, 4), (8, 8), (3, 5), (1, 1), (0, 4)])
def test_view_chunks_cover_every_view_once(n, per):
    chunks = view_chunks(n, per)
    assert [i for c in chunks for i in c] == list(range(n))
    assert all(1 <= len(c) <= per for c in chunks)
    assert len(chunks) == -(-n // per)


def test_view_chunks_off():
    assert view_chunks(10, 0) == []


def test_merge_keeps_the_task_that_ran_each_stage():
    first = [StageResult("sfm", "ran", 3.0, {"registered": 9})]
    rest = [StageResult("sfm", "cached", 3.0), StageResult("depth", "ran", 2.0), StageResult("refine", "skipped")]
    merged = merge_stage_results(first, rest)
    assert merged["sfm"].status == "ran" and merged["sfm"].summary == {"registered": 9}
    assert merged["depth"].status == "ran" and merged["refine"].status == "skipped"


def _outcome(tmp_path: Path, name: str, error: str | None = None) -> SceneOutcome:
    job = SceneJob(scene_dir=str(tmp_path / name))
    stages = {} if error else {
        "sfm": StageResult("sfm", "ran", 4.25, {"registered": 12, "images": 12}),
        "depth": StageResult("depth", "cached", 9.0),
        "refine": StageResult("refine", "skipped"),
        "fuse": StageResult("fuse", "ran", 1.5, {"vertices": 1234, "faces": 2345}),
        "export": StageResult("export", "ran", 0.5),
    }
    return SceneOutcome(job=job, out_dir=str(tmp_path / name / "recon"), stages=stages, error=error, seconds=7.0,
                        evaluation=None if error else {"fscore": {"0.5%": 0.81234, "1%": 0.91234},
                                                       "chamfer_rel": 0.002})


def test_table_and_reports(tmp_path):
    rows = [scene_row(_outcome(tmp_path, "good")),
            scene_row(_outcome(tmp_path, "bad", error="bad/images: only 2 readable image(s)"))]
    assert (rows[0].status == "ok" and rows[0].registered == 12 and rows[0].faces == 2345
            and rows[0].fscore["1%"] == 0.9123)
    assert rows[1].status == "failed" and rows[1].vertices is None
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["scene", "status", "registered"]
    good = lines[1].split()
    assert good[:4] == ["good", "ok", "12", "4.2"] and "cached" in good and "skipped" in good and "0.9123" in good
    assert lines[2].split()[:2] == ["bad", "failed"]
    assert "bad: failed: bad/images: only 2 readable image(s)" in text
    assert lines[-1] == "1 of 2 scene(s) ok, 1 failed"

    csv_path, json_path = write_reports(rows, tmp_path / "report", {"address": "local"})
    records = list(csv.DictReader(csv_path.open()))
    assert [r["scene"] for r in records] == ["good", "bad"]
    assert (records[0]["sfm_status"] == "ran" and float(records[0]["sfm_seconds"]) == 4.25
            and records[0]["fscore_1%"] == "0.9123")
    assert (records[1]["status"] == "failed" and "only 2 readable" in records[1]["error"]
            and records[1]["vertices"] == "")
    data = json.loads(json_path.read_text())
    assert data["address"] == "local" and data["scenes"][1]["error"].startswith("bad/images")


def test_jobs_reject_duplicates_and_colliding_outputs(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x").mkdir(parents=True)
    jobs = make_jobs([tmp_path / "a" / "x", tmp_path / "b" / "x"], overrides=["refine.steps=5"])
    assert jobs[0].out_dir is None and jobs[1].overrides == ("refine.steps=5",)
    with pytest.raises(ReconError, match="twice"):
        make_jobs([tmp_path / "a" / "x", tmp_path / "a" / "x"])
    with pytest.raises(ReconError, match="both write"):
        make_jobs([tmp_path / "a" / "x", tmp_path / "b" / "x"], out_root=tmp_path / "out")


def test_unreachable_or_malformed_address_fails_fast():
    from workflows.batch import check_reachable

    with pytest.raises(ReconError, match="no Ray cluster answers"):
        check_reachable(f"127.0.0.1:{_free_port()}", timeout_s=2)
    with pytest.raises(ReconError, match="HOST:PORT"):
        check_reachable("headnode")
    check_reachable("auto")  # Ray finds the cluster itself


def test_cli_help_and_bad_setting_fails_before_ray(tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(cli.main, ["batch", "--help"])
    assert result.exit_code == 0 and "--address" in result.output and "--parallel" in result.output
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.main, ["batch", str(tmp_path), "--set", "refine.wieght_mv=1", "--no-progress"])
    assert result.exit_code == 1 and "valid keys for refine" in result.output and "Traceback" not in result.output


# ---- end to end on a local Ray cluster ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (our Ray processes carry their temp folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _ray_env(temp_dir: Path, token: str) -> dict[str, str]:
    """Environment of every Ray process of a test: loopback only, its own temp folder and token (nothing in ~/.ray)."""
    return {**os.environ, LOOPBACK_ENV: "0", "RAY_TMPDIR": str(temp_dir), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head`` on 127.0.0.1 (2 CPUs); yields (address, env for clients); stopped and checked gone at the
    end."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    env = _ray_env(temp_dir, secrets.token_hex(32))
    port = _free_port()
    log = temp_dir / "start.log"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
           "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, f"ray start failed:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = _processes_mentioning(str(temp_dir))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running after the cluster stopped: {left}"


def _batch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "batch", *args], capture_output=True, text=True, env=env,
                          cwd=Path(cli.__file__).parent, timeout=600)


def _canonical_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (sorted), faces (in sorted-vertex indices, sorted) and colours: a mesh up to vertex order.

    Open3D's TSDF extraction numbers vertices in a thread-dependent order; the geometry is what must match.
    """
    mesh = trimesh.load(path, process=False)
    v = np.asarray(mesh.vertices)
    order = np.lexsort(v.T[::-1])
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    faces = np.sort(rank[np.asarray(mesh.faces)], axis=1)
    faces = faces[np.lexsort(faces.T[::-1])]
    return v[order], faces, np.asarray(mesh.visual.vertex_colors)[order]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """Two small rendered scenes and a broken one (two photos: too few for SfM)."""
    from pipeline.synthetic.render import render_scene

    root = tmp_path_factory.mktemp("batch")
    out = {"blob": render_scene(root / "blob", shape="blob", n_views=N_VIEWS, width=240, height=180, seed=0),
           "thin": render_scene(root / "thin", shape="thin", n_views=N_VIEWS, width=240, height=180, seed=1)}
    broken = root / "broken" / "images"
    broken.mkdir(parents=True)
    for p in sorted((out["blob"] / "images").iterdir())[:2]:
        shutil.copy(p, broken / p.name)
    out["broken"] = root / "broken"
    return out


@pytest.fixture(scope="module")
def first_batch(ray_cluster, scenes, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict[str, Path]]:
    """``recon run`` on copies of the good scenes (the reference), then ``recon batch --address`` on all three."""
    address, env = ray_cluster
    reference = tmp_path_factory.mktemp("reference")
    refs = {}
    for name in ("blob", "thin"):
        refs[name] = reference / name
        shutil.copytree(scenes[name], refs[name])
        result = CliRunner().invoke(cli.main, ["run", str(refs[name]), *FAST, "--no-progress"])
        assert result.exit_code == 0, result.output
    report = tmp_path_factory.mktemp("report1")
    proc = _batch(*(str(scenes[n]) for n in ("blob", "broken", "thin")), "--address", address, "--report", str(report),
                  "--views-per-task", str(VIEWS_PER_TASK), "--no-progress", *FAST, env=env)
    return proc, report, refs


def _rows(report: Path) -> dict[str, dict]:
    return {r["scene"]: r for r in json.loads((report / "recon_batch.json").read_text())["scenes"]}


@pytest.mark.slow
def test_batch_rows_and_failure_report(first_batch, scenes):
    proc, report, _ = first_batch
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one scene failed
    assert "1 of 3 scene(s) failed (broken)" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    rows = _rows(report)
    assert list(rows) == ["blob", "broken", "thin"]  # the order given
    for name in ("blob", "thin"):
        r = rows[name]
        assert r["status"] == "ok" and r["error"] is None
        assert r["registered"] == N_VIEWS and r["faces"] > 10_000 and r["vertices"] > 5_000
        assert all(r["stages"][s]["status"] == "ran" for s in ("sfm", "depth", "refine", "fuse", "export"))
        assert r["depth_tasks"] == -(-N_VIEWS // VIEWS_PER_TASK)
        assert 0.3 < r["fscore"]["1%"] <= 1.0  # scored against gt/ (low-resolution settings)
        assert (scenes[name] / "recon" / "mesh.ply").is_file() and (scenes[name] / "recon" / "report.html").is_file()
    bad = rows["broken"]
    assert (bad["status"] == "failed" and "only 2 readable image(s)" in bad["error"]
            and str(scenes["broken"]) in bad["error"])
    assert bad["vertices"] is None and bad["fscore"] is None
    table = proc.stdout
    assert "broken: failed: " in table and "2 of 3 scene(s) ok, 1 failed" in table
    assert ({r["scene"]: r["status"] for r in csv.DictReader((report / "recon_batch.csv").open())}
            == {"blob": "ok", "broken": "failed", "thin": "ok"})


@pytest.mark.slow
def test_batch_meshes_equal_recon_run(first_batch, scenes):
    _, _, refs = first_batch
    for name in ("blob", "thin"):
        got = _canonical_mesh(scenes[name] / "recon" / "mesh.ply")
        want = _canonical_mesh(refs[name] / "recon" / "mesh.ply")
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.slow
def test_per_view_depth_tasks_write_the_local_stage_files(first_batch, scenes):
    from pipeline.core.io import load_depth_map

    _, _, refs = first_batch
    for name in ("blob", "thin"):
        for sub in ("raw", "views"):
            ours = sorted((scenes[name] / "recon" / "depth" / sub).glob("*.npz"))
            local = sorted((refs[name] / "recon" / "depth" / sub).glob("*.npz"))
            assert [p.name for p in ours] == [p.name for p in local] and len(ours) == N_VIEWS
            for a, b in zip(ours, local):
                da, db = load_depth_map(a), load_depth_map(b)
                np.testing.assert_array_equal(da.valid, db.valid)
                np.testing.assert_array_equal(da.depth, db.depth)
                np.testing.assert_array_equal(da.confidence, db.confidence)
                np.testing.assert_array_equal(da.K, db.K)


@pytest.mark.slow
def test_second_batch_embedded_reuses_every_cache(first_batch, scenes, tmp_path):
    proc, _, _ = first_batch
    assert proc.returncode == 1, proc.stderr
    files = {p: p.stat().st_mtime_ns for n in ("blob", "thin")
             for sub in ("sfm", "depth", "refine", "fuse", "export") for p in (scenes[n] / "recon" / sub).rglob("*")
             if p.is_file()}
    assert len(files) > 4 * N_VIEWS
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = _ray_env(temp_dir, secrets.token_hex(32))
    env.pop(LOOPBACK_ENV)  # the embedded default binds to loopback by itself
    try:
        again = _batch(*(str(scenes[n]) for n in ("blob", "broken", "thin")), "--report", str(tmp_path), "--num-cpus",
                       "2", "--views-per-task", str(VIEWS_PER_TASK), "--no-progress", *FAST, env=env)
        left = _processes_mentioning(str(temp_dir))
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the embedded Ray left processes running: {left}"
    assert again.returncode == 1, again.stdout + again.stderr
    assert "Ray on this machine" in again.stdout + again.stderr
    rows = _rows(tmp_path)
    for name in ("blob", "thin"):
        r = rows[name]
        assert r["status"] == "ok" and r["depth_tasks"] == 0
        assert ({s: st["status"] for s, st in r["stages"].items()}
                == dict.fromkeys(("sfm", "depth", "refine", "fuse", "export"), "cached"))
    assert rows["broken"]["status"] == "failed" and "only 2 readable image(s)" in rows["broken"]["error"]
    changed = [p for p, t in files.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert not changed, f"a cached run rewrote {changed[:5]}"
    # ... and `recon run` on a scene the batch made finds every stage up to date, too.
    result = CliRunner().invoke(cli.main, ["run", str(scenes["blob"]), *FAST, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.count(" cached ") == 5

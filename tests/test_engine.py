"""Stage engine: fingerprints, invalidation, resume, skip/force/from/until, lock."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import graph as stages
from pipeline.config import load_config
from pipeline.core.cache import run_lock, write_json_atomic
from pipeline.core.context import StageContext
from pipeline.core.errors import LockedError, ReconError
from pipeline.core.workspace import Workspace
from workflows.local import pipeline_status, run_pipeline

VIEWS = [f"v{i}" for i in range(6)]


class FakeStages:
    """Cheap stand-ins for the five stages that record calls and write per-view files."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.views_written: dict[str, list[str]] = {}
        self.crash_after: dict[str, int] = {}

    def make(self, name: str):
        def run(ctx: StageContext) -> None:
            self.calls.append(name)
            written = self.views_written.setdefault(name, [])
            upstream = ctx.settings.__dict__
            for i, v in enumerate(VIEWS):
                path = ctx.stage_dir / "views" / f"{v}.json"
                if path.exists():
                    continue
                if name in self.crash_after and len(written) >= self.crash_after[name]:
                    raise RuntimeError(f"simulated kill in {name}")
                write_json_atomic(path, {"view": v, "settings": str(upstream), "skipped": sorted(ctx.skipped)})
                written.append(v)
            if name == "sfm":
                write_json_atomic(ctx.stage_dir / "model" / "cameras.json", {"settings": str(upstream)})
            if name == "fuse":
                write_json_atomic(ctx.stage_dir / "mesh.ply", {"mesh": True, "skipped": sorted(ctx.skipped)})
            if name == "export":
                write_json_atomic(ctx.stage_dir / "mesh.glb", {"glb": True})
            ctx.summary["views"] = len(VIEWS)

        return run


@pytest.fixture
def fake(monkeypatch):
    f = FakeStages()
    for name, spec in list(stages.BY_NAME.items()):
        monkeypatch.setitem(stages.BY_NAME, name, dataclasses.replace(spec, run=f.make(name)))
    return f


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    (tmp_path / "scene" / "images").mkdir(parents=True)
    return Workspace.create(tmp_path / "scene")


def run(ws, cfg=None, **kw):
    return run_pipeline(ws, cfg or load_config(), show_progress=False, **kw)


def test_first_run_runs_all_then_nothing(fake, ws):
    result = run(ws)
    assert fake.calls == ["sfm", "depth", "refine", "fuse", "export"]
    assert [s.status for s in result.stages] == ["ran"] * 5
    assert (ws.out_dir / "sparse" / "cameras.json").exists()
    assert ws.mesh_path.exists()
    assert ws.config_path.exists()
    fake.calls.clear()
    result = run(ws)
    assert fake.calls == []
    assert [s.status for s in result.stages] == ["cached"] * 5
    assert all(s.state == "done" for s in pipeline_status(ws, load_config()))


def test_changed_setting_reruns_that_stage_and_downstream(fake, ws):
    run(ws)
    fake.calls.clear()
    cfg = load_config(overrides=["refine.weight_edge=0"])
    states = {s.name: s for s in pipeline_status(ws, cfg)}
    assert states["refine"].state == "stale" and "refine.weight_edge" in states["refine"].why
    assert states["fuse"].state == "stale" and states["sfm"].state == "done"
    run(ws, cfg)
    assert fake.calls == ["refine", "fuse", "export"]


def test_setting_that_does_not_affect_output_keeps_cache(fake, ws):
    run(ws)
    fake.calls.clear()
    run(ws, load_config(overrides=["refine.device=cpu"]))
    assert fake.calls == []


def test_sfm_setting_marks_everything_stale(fake, ws):
    run(ws)
    cfg = load_config(overrides=["sfm.max_image_size=640"])
    assert [s.state for s in pipeline_status(ws, cfg)] == ["stale"] * 5
    fake.calls.clear()
    run(ws, cfg)
    assert fake.calls == ["sfm", "depth", "refine", "fuse", "export"]


def test_resume_after_kill_mid_stage_redoes_only_missing_views(fake, ws):
    fake.crash_after["depth"] = 4
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(ws)
    assert fake.views_written["depth"] == VIEWS[:4]
    assert [s.state for s in pipeline_status(ws, load_config())][:2] == ["done", "missing"]
    del fake.crash_after["depth"]
    fake.calls.clear()
    run(ws)
    assert fake.calls == ["depth", "refine", "fuse", "export"]
    assert fake.views_written["depth"] == VIEWS  # the 2 missing views, once each
    assert len(fake.views_written["depth"]) == len(set(fake.views_written["depth"]))


def test_partial_work_of_other_settings_is_not_trusted(fake, ws):
    fake.crash_after["depth"] = 3
    with pytest.raises(RuntimeError):
        run(ws)
    del fake.crash_after["depth"]
    fake.views_written["depth"].clear()
    run(ws, load_config(overrides=["depth.estimator=prior"]))
    assert fake.views_written["depth"] == VIEWS  # all redone: the partial files were for other settings


def test_stale_temp_files_are_removed_on_resume(fake, ws):
    fake.crash_after["depth"] = 2
    with pytest.raises(RuntimeError):
        run(ws)
    # an interrupted stage's work is in its building folder
    leftover = ws.building_dir("depth") / "views" / ".v2.half.json"
    leftover.write_text("{")
    del fake.crash_after["depth"]
    run(ws)
    assert not leftover.exists()


def test_corrupt_output_is_detected_and_recomputed(fake, ws):
    run(ws)
    (ws.stage_dir("depth") / "views" / "v3.json").write_text("garbage")
    st = {s.name: s for s in pipeline_status(ws, load_config())}
    assert st["depth"].state == "stale" and "checksum" in st["depth"].why
    fake.calls.clear()
    run(ws)
    assert fake.calls[0] == "depth"


def test_missing_published_output_is_recomputed(fake, ws):
    run(ws)
    ws.mesh_path.unlink()
    fake.calls.clear()
    run(ws)
    assert "fuse" in fake.calls


def test_skip_refine_fuses_depth(fake, ws):
    result = run(ws, skip=("refine",))
    assert "refine" not in fake.calls
    assert {s.name: s.status for s in result.stages}["refine"] == "skipped"
    assert json.loads(ws.mesh_path.read_text())["skipped"] == ["refine"]
    fake.calls.clear()
    run(ws)  # without --skip, fuse must now read refine: it re-runs
    assert fake.calls == ["refine", "fuse", "export"]


def test_only_skippable_stages_can_be_skipped(fake, ws):
    with pytest.raises(ReconError, match="cannot be skipped"):
        run(ws, skip=("sfm",))


def test_force_from_until(fake, ws):
    run(ws, until="depth")
    assert fake.calls == ["sfm", "depth"]
    fake.calls.clear()
    run(ws, force=("depth",), until="depth")
    assert fake.calls == ["depth"]
    fake.calls.clear()
    run(ws, start_from="fuse")
    assert fake.calls == ["refine", "fuse", "export"]  # refine was never run: computed as upstream
    fake.calls.clear()
    run(ws, start_from="fuse")
    assert fake.calls == ["fuse", "export"]


def test_require_upstream(fake, ws):
    with pytest.raises(ReconError, match="run `recon run"):
        run(ws, until="refine", force=("refine",), require_upstream=True)


def test_second_concurrent_run_is_refused(fake, ws):
    ws.out_dir.mkdir(parents=True)
    with run_lock(ws.lock_path):
        result: list[BaseException] = []

        def other():
            try:
                run(ws)
            except BaseException as exc:  # noqa: BLE001
                result.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert result and isinstance(result[0], LockedError)
    assert "another recon run" in str(result[0])


def test_unreadable_manifest_trusts_nothing(fake, ws):
    run(ws)
    ws.manifest_path.write_text("{not json")
    fake.calls.clear()
    run(ws)
    assert fake.calls == ["sfm", "depth", "refine", "fuse", "export"]


def test_identical_upstream_output_keeps_downstream_cached(fake, ws):
    run(ws)
    fake.calls.clear()
    run(ws, force=("depth",))  # re-run, same settings → same files → nothing downstream to redo
    assert fake.calls == ["depth"]


def test_new_input_image_invalidates_sfm(fake, ws):
    (ws.images_dir / "a.png").write_bytes(b"x")
    run(ws)
    (ws.images_dir / "b.png").write_bytes(b"y")
    st = {s.name: s for s in pipeline_status(ws, load_config())}
    assert st["sfm"].state == "stale" and "input files changed" in st["sfm"].why


def test_a_crash_while_a_stage_reruns_keeps_its_previous_result(fake, ws):
    """The new folder is built in OUT/.building/<stage> and replaces the old one only once complete."""
    run(ws)
    view = ws.stage_dir("depth") / "views" / "v0.json"
    before = view.read_text()
    new_cfg = load_config(overrides=["depth.max_image_side=320"])
    fake.crash_after["depth"] = len(fake.views_written["depth"]) + 2
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(ws, new_cfg)
    assert view.read_text() == before  # the previous result is where it was, and still trusted
    assert [s.state for s in pipeline_status(ws, load_config())] == ["done"] * 5
    assert len(list((ws.building_dir("depth") / "views").glob("*.json"))) == 2
    del fake.crash_after["depth"]
    fake.calls.clear()
    written = len(fake.views_written["depth"])
    run(ws, new_cfg)
    assert fake.calls == ["depth", "refine", "fuse", "export"]
    assert len(fake.views_written["depth"]) - written == len(VIEWS) - 2  # resumed, not redone
    assert "max_image_side': 320" in view.read_text() and not (ws.out_dir / ".building").exists()


def test_a_spare_core_loads_only_the_later_stages_modules(fake, ws, tmp_path, monkeypatch):
    import sys

    modules = tmp_path / "modules"
    modules.mkdir()
    for name in stages.STAGE_NAMES:
        (modules / f"preload_probe_{name}.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(modules))
    for name in stages.STAGE_NAMES:
        monkeypatch.delitem(sys.modules, f"preload_probe_{name}", raising=False)
        spec = stages.BY_NAME[name]
        preload = (f"preload_probe_{name}", "no_such_module_for_recon_tests")  # a missing one is left to the stage
        run_stage = spec.run

        def run_with_spare_core(ctx: StageContext, run_stage=run_stage) -> None:
            if ctx.name == "sfm":
                ctx.spare_core()
            run_stage(ctx)

        monkeypatch.setitem(stages.BY_NAME, name, dataclasses.replace(spec, run=run_with_spare_core, preload=preload))
    run(ws, until="depth")
    assert "preload_probe_depth" in sys.modules
    assert not any(f"preload_probe_{n}" in sys.modules for n in ("sfm", "refine", "fuse", "export"))
    run(ws)  # sfm cached: no stage says it has a spare core, nothing is preloaded
    assert not any(f"preload_probe_{n}" in sys.modules for n in ("refine", "fuse", "export"))
    run(ws, force=("sfm",))
    assert all(f"preload_probe_{n}" in sys.modules for n in ("refine", "fuse", "export"))
    assert fake.calls.count("sfm") == 2


def test_import_in_background_imports_and_ignores_what_is_missing(tmp_path, monkeypatch):
    import sys

    from pipeline.core.lazy import import_in_background

    (tmp_path / "preload_probe_lazy.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "preload_probe_lazy", raising=False)
    assert import_in_background([]) is None
    thread = import_in_background(["no_such_module_for_recon_tests", "preload_probe_lazy"])
    thread.join(timeout=30)
    assert not thread.is_alive() and sys.modules["preload_probe_lazy"].LOADED


def test_torch_loads_while_sfm_maps_not_before_it_starts():
    """The sfm stage imports no torch (a second of a run's critical path); the depth stage preloads it."""
    code = "import sys, pipeline.sfm.stage, pipeline.sfm.colmap_steps; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
    assert "torch" in stages.BY_NAME["depth"].preload

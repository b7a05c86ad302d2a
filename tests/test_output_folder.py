"""Which output folder a run may write into (pipeline.core.output_folder) and the per-view cache keys
(pipeline.core.workspace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.cache import FINGERPRINT_FILE, Manifest, is_recon_output
from pipeline.core.errors import ReconError
from pipeline.core.output_folder import adopt_output_dir, check_output_location, foreign_entries
from pipeline.core.workspace import Workspace, view_key


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    (tmp_path / "scene" / "images").mkdir(parents=True)
    return tmp_path / "scene"


def test_a_new_or_empty_folder_is_adopted_and_marked(scene, tmp_path):
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
            (out / ".lock").write_text("")  # what a run killed at once leaves
        adopt_output_dir(Workspace.create(scene, out))
        assert is_recon_output(out) and json.loads((out / "manifest.json").read_text())["tool"] == "recon"


def test_a_folder_with_other_files_is_refused_unless_forced(scene, tmp_path):
    out = tmp_path / "mine"
    (out / "sfm").mkdir(parents=True)
    (out / "mesh.ply").write_text("my mesh")
    (out / "sfm" / "notes.txt").write_text("notes")
    with pytest.raises(ReconError, match="did not write") as info:
        adopt_output_dir(Workspace.create(scene, out))
    assert "mesh.ply" in str(info.value) and "sfm/" in str(info.value) and "--force-out" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["mesh.ply", "sfm"]
    adopt_output_dir(Workspace.create(scene, out), force=True)
    assert is_recon_output(out) and (out / "mesh.ply").read_text() == "my mesh"


def test_recon_outputs_are_recognised_with_a_lost_or_old_manifest(scene, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    # written before the marker
    (old / "manifest.json").write_text(json.dumps({"version": 1, "updated": 1.0, "stages": {}}))
    assert is_recon_output(old) and foreign_entries(old) == []
    damaged = tmp_path / "damaged"
    (damaged / "sfm").mkdir(parents=True)
    (damaged / "sfm" / FINGERPRINT_FILE).write_text("abc")
    (damaged / "manifest.json").write_text("{not json")
    for name in ("config.yaml", "log.txt", "mesh.ply"):
        (damaged / name).write_text("x")
    assert not is_recon_output(damaged) and foreign_entries(damaged) == []
    adopt_output_dir(Workspace.create(scene, damaged))
    (damaged / "sfm" / FINGERPRINT_FILE).unlink()  # a folder named sfm/ without recon's marker is not recon's
    (damaged / "manifest.json").write_text("[]")
    assert foreign_entries(damaged) == ["config.yaml", "log.txt", "manifest.json", "mesh.ply", "sfm/"]


def test_a_manifest_of_another_tool_is_not_recons(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "my web app", "version": "1.0"}))
    assert not is_recon_output(tmp_path)
    Manifest(tmp_path / "manifest.json")  # and reading it does not fail


@pytest.mark.parametrize("where, needle", [
    ("scene", "is the scene folder"), ("parent", "contains the scene folder"), ("images", "photo folder"),
    ("images/run", "photo folder"), ("masks/run", "mask folder"), ("sparse", "COLMAP model folder"),
])
def test_output_folders_among_the_inputs_are_refused(scene, where, needle):
    out = scene.parent if where == "parent" else scene / where if where != "scene" else scene
    with pytest.raises(ReconError, match=needle) as info:
        check_output_location(Workspace.create(scene, out))
    assert "\n" not in str(info.value) and "--out" in str(info.value)


def test_photos_directly_in_the_scene_folder_may_have_their_output_inside(tmp_path):
    check_output_location(Workspace.create(tmp_path))  # SCENE_DIR/recon: discovery leaves recon outputs out
    check_output_location(Workspace.create(tmp_path, tmp_path / "runs" / "2"))


def test_cache_keys_are_unique_stable_and_never_hidden():
    names = ["a.jpg", "a.png", "x/b.jpg", "x__b.jpg", "x%2Fb.jpg", ".hidden.jpg", "b c é.JPG", "a.jpg.npz"]
    keys = [view_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert keys == [view_key(n) for n in names]
    assert not any(k.startswith(".") or "/" in k for k in keys)
    long = ["é" * 200 + f"{i}.jpg" for i in range(3)]
    long_keys = [view_key(n) for n in long]
    assert len(set(long_keys)) == 3 and all(len(f"{k}.npz".encode()) < 255 - 20 for k in long_keys)
    ws = Workspace.create("/scene", "/out")
    assert ws.depth_view("a.jpg") != ws.depth_view("a.png") and ws.refine_view("x/b.jpg") != ws.refine_view("x__b.jpg")

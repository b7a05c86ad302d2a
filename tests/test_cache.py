"""Atomic writes, checksums and fingerprints."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.cache import (
    atomic_dir,
    atomic_path,
    checksum_tree,
    fingerprint,
    read_npz,
    write_json_atomic,
    write_npz_atomic,
)
from pipeline.core.errors import ReconError
from pipeline.core.io import DepthMap, load_depth_map, save_depth_map


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "a" / "out.npz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_keeps_old_file_until_success(tmp_path: Path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError
    assert target.read_text().strip().startswith("{")
    assert '"v": 1' in target.read_text()


def test_atomic_dir_replaces_whole_folder(tmp_path: Path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    with atomic_dir(target) as tmp:
        (tmp / "b.bin").write_bytes(b"2")
    assert sorted(p.name for p in target.iterdir()) == ["b.bin"]


def test_checksums_ignore_temp_files_and_detect_changes(tmp_path: Path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.npz").write_bytes(b"abc")
    (tmp_path / "v" / ".a.123.npz").write_bytes(b"tmp")
    sums = checksum_tree(tmp_path)
    assert list(sums) == ["v/a.npz"]
    (tmp_path / "v" / "a.npz").write_bytes(b"abd")
    assert checksum_tree(tmp_path) != sums


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_npz_round_trip_and_corrupt_file(tmp_path: Path):
    p = tmp_path / "d.npz"
    write_npz_atomic(p, depth=np.ones((2, 3), np.float32))
    assert read_npz(p)["depth"].shape == (2, 3)
    p.write_bytes(b"not a zip")
    with pytest.raises(ReconError, match="unreadable"):
        read_npz(p)


def test_depth_map_round_trip(tmp_path: Path):
    dm = DepthMap(name="a b/ç.png", depth=np.random.rand(4, 5).astype(np.float32),
                  confidence=np.ones((4, 5), np.float32), valid=np.ones((4, 5), bool), K=np.eye(3),
                  cam_from_world=np.eye(4), stats={"scale": 1.5}, depth_init=np.zeros((4, 5), np.float32))
    save_depth_map(tmp_path / "x.npz", dm)
    back = load_depth_map(tmp_path / "x.npz")
    assert back.name == dm.name and back.stats == {"scale": 1.5}
    np.testing.assert_array_equal(back.depth, dm.depth)
    np.testing.assert_array_equal(back.depth_init, dm.depth_init)


def test_unwritable_output_is_a_clear_error(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(ReconError, match="cannot write here"):
            write_json_atomic(ro / "x.json", {})
    finally:
        ro.chmod(0o700)

"""sfm stage: COLMAP SfM on a rendered scene, the normalized frame, existing models, bad inputs.

One 12-view 320x240 ``blob`` scene is rendered and reconstructed once per
session (with an unreadable JPEG among the photos); the other SfM tests use
existing models (no feature extraction) or fail early.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.io import load_sfm_scene
from pipeline.core.poses import camera_center, umeyama
from pipeline.core.workspace import Workspace
from pipeline.sfm import stage as sfm
from pipeline.sfm.config import CameraMode
from pipeline.sfm.inputs import (
    InputImage,
    camera_groups,
    drop_duplicates,
    pixel_digest,
    prepare_image,
    prepare_inputs,
    scene_images,
)
from pipeline.sfm.stage import sfm_paths
from pipeline.synthetic.groundtruth import load_gt_cameras, write_gt_model
from pipeline.synthetic.render import render_scene
from workflows.local import RunResult, run_pipeline

N_VIEWS = 12
CORRUPT = "corrupt.jpg"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class SfmRun:
    scene_dir: Path
    ws: Workspace
    result: RunResult
    warnings: list[str]


def _run(ws: Workspace, *overrides: str) -> RunResult:
    return run_pipeline(ws, load_config(overrides=list(overrides)), until="sfm", show_progress=False)


@pytest.fixture(scope="session")
def sfm_run(tmp_path_factory) -> SfmRun:
    """The rendered blob scene plus a corrupt JPEG, reconstructed once by the sfm stage."""
    scene = render_scene(tmp_path_factory.mktemp("sfm") / "blob", shape="blob", n_views=N_VIEWS, width=320, height=240,
                         seed=0)
    (scene / "images" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    ws = Workspace.create(scene)
    collect = _Collect()
    # the stage, its modules (pipeline.sfm.inputs: skipped photos) and ctx.logger
    log = logging.getLogger("pipeline.sfm")
    log.addHandler(collect)
    try:
        result = _run(ws)
    finally:
        log.removeHandler(collect)
    return SfmRun(scene_dir=scene, ws=ws, result=result, warnings=collect.messages)


def _gt_centers(scene_dir: Path, names: list[str]) -> np.ndarray:
    cams, _, _ = load_gt_cameras(scene_dir / "gt")
    return np.array([camera_center(cams[n][1]) for n in names])


def _observation_depths(scene) -> np.ndarray:
    return np.concatenate([scene.points[v.point_ids] @ v.cam_from_world[2, :3] + v.cam_from_world[2, 3]
                           for v in scene.views])


# ---- the SfM run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_view_registers_and_cameras_match_ground_truth(sfm_run):
    summary = sfm_run.result.stages[0].summary
    assert summary["images"] == N_VIEWS and summary["registered"] == N_VIEWS
    assert summary["points3D"] > 100 and 0 < summary["reproj_error_px"] < 1.0 and summary["track_length"] > 2
    scene = load_sfm_scene(sfm_run.ws)
    gt_names = sorted(load_gt_cameras(sfm_run.scene_dir / "gt")[0])
    assert [v.name for v in scene.views] == gt_names
    est = np.array([v.center for v in scene.views])
    gt = _gt_centers(sfm_run.scene_dir, gt_names)
    s, R, t = umeyama(est, gt)
    err = np.linalg.norm(s * est @ R.T + t - gt, axis=1)
    radius = np.linalg.norm(gt - gt.mean(0), axis=1).max()
    assert err.max() < 0.01 * radius, f"camera centre error {err.max() / radius:.2%} of the scene radius"


@pytest.mark.slow
def test_normalized_frame_has_unit_median_depth(sfm_run):
    scene = load_sfm_scene(sfm_run.ws)
    depths = _observation_depths(scene)
    assert (depths > 0).all()
    assert abs(np.median(depths) - 1.0) < 1e-6


@pytest.mark.slow
def test_normalization_maps_the_mapped_model_to_the_cached_one(sfm_run):
    ws = sfm_run.ws
    scene = load_sfm_scene(ws)
    data = json.loads(ws.sfm_normalization.read_text())
    T = np.asarray(data["normalized_from_sfm"])
    s, c = data["scale"], np.asarray(data["center"])
    np.testing.assert_allclose(T[:3, :3], s * np.eye(3))
    np.testing.assert_allclose(T[:3, 3], -s * c)
    np.testing.assert_allclose(scene.normalized_from_sfm, T)
    raw = pycolmap.Reconstruction(str(sfm_paths(ws).mapped_dir))
    raw_centers = {raw.images[i].name: raw.images[i].projection_center() for i in raw.reg_image_ids()}
    for v in scene.views:
        mapped = T[:3, :3] @ raw_centers[v.name] + T[:3, 3]
        np.testing.assert_allclose(mapped, v.center, atol=1e-9)
    assert 0.5 < s * np.median([np.linalg.norm(c - x) for x in raw_centers.values()]) < 3  # cameras ~1 unit away


@pytest.mark.slow
def test_outputs_are_undistorted_pinhole_published_and_logged(sfm_run):
    ws = sfm_run.ws
    rec = pycolmap.Reconstruction(str(ws.sfm_model_dir))
    assert {cam.model.name for cam in rec.cameras.values()} == {"PINHOLE"}
    scene = load_sfm_scene(ws)
    for v in scene.views:
        with Image.open(v.image_path) as im:
            assert im.size == (v.width, v.height)
    assert (ws.sparse_dir / "cameras.bin").exists() and (ws.sparse_dir / "points3D.bin").exists()
    log = ws.sfm_log.read_text()
    assert "Feature extraction" in log and "Undistort" in log  # COLMAP's glog output went to the file
    assert ws.sfm_database.exists()


@pytest.mark.slow
def test_corrupt_image_is_skipped_with_a_warning(sfm_run):
    assert any(CORRUPT in m for m in sfm_run.warnings), sfm_run.warnings
    assert not (sfm_paths(sfm_run.ws).input_dir / CORRUPT).exists()
    assert CORRUPT not in {v.name for v in load_sfm_scene(sfm_run.ws).views}


@pytest.mark.slow
def test_second_run_is_cached(sfm_run):
    result = _run(sfm_run.ws)
    assert result.stages[0].status == "cached"


@pytest.mark.slow
def test_interrupted_run_resumes_from_finished_phases(sfm_run, tmp_path, caplog):
    ws = Workspace.create(sfm_run.scene_dir, tmp_path / "out")
    shutil.copytree(sfm_run.ws.out_dir, ws.out_dir, dirs_exist_ok=True)
    paths = sfm_paths(ws)
    before = load_sfm_scene(ws)
    ctx = StageContext(ws=ws, config=load_config(), name="sfm", fingerprint="resume-test", show_progress=False)

    # Killed during mapping: database.db is complete, a half-written temporary database lies around.
    for d in (paths.mapped_dir, ws.sfm_model_dir, ws.sfm_images_dir):
        shutil.rmtree(d)
    ws.sfm_normalization.unlink()
    paths.database_building.write_bytes(b"half a database")
    log = ws.sfm_log.read_text()
    sfm.run(ctx)
    new_log = ws.sfm_log.read_text()[len(log):]
    assert "Feature extraction" not in new_log and "initial image pair" in new_log  # only mapping re-ran
    assert not paths.database_building.exists()

    # Killed during undistortion: the mapped model is reused, nothing before it re-runs.
    shutil.rmtree(ws.sfm_model_dir)
    log = ws.sfm_log.read_text()
    with caplog.at_level(logging.INFO, logger="pipeline.sfm"):  # ctx.logger of the sfm stage
        sfm.run(ctx)
    new_log = ws.sfm_log.read_text()[len(log):]
    assert "initial image pair" not in new_log and "Undistort" in new_log
    assert any("reusing the mapped model" in r.getMessage() for r in caplog.records)
    after = load_sfm_scene(ws)
    np.testing.assert_allclose([v.center for v in after.views], [v.center for v in before.views], atol=1e-6)


# ---- existing COLMAP models ---------------------------------------------------------------------------


def _scene_copy(src: Path, dst: Path, names: list[str]) -> Path:
    (dst / "images").mkdir(parents=True)
    for n in names:
        shutil.copyfile(src / "images" / n, dst / "images" / n)
    return dst


@pytest.fixture
def gt_model_scene(sfm_run, tmp_path) -> Path:
    names = sorted(load_gt_cameras(sfm_run.scene_dir / "gt")[0])
    scene = _scene_copy(sfm_run.scene_dir, tmp_path / "scene", names)
    shutil.copytree(sfm_run.scene_dir / "gt", scene / "gt")
    write_gt_model(scene, scene / "sparse" / "0")
    return scene


@pytest.mark.slow
@pytest.mark.parametrize("max_image_size", [2000, 160])
def test_existing_model_is_used_instead_of_sfm(gt_model_scene, max_image_size, capfd):
    ws = Workspace.create(gt_model_scene)
    result = _run(ws, f"sfm.max_image_size={max_image_size}")
    assert result.stages[0].summary["source"] == "existing model"
    assert not ws.sfm_database.exists()  # no feature extraction, no matching
    assert "Feature extraction" not in ws.sfm_log.read_text()
    assert "Undistort" in ws.sfm_log.read_text()
    assert "undistorters.cc" not in capfd.readouterr().err  # COLMAP's log stays off the console

    scene = load_sfm_scene(ws)
    cams, width, height = load_gt_cameras(gt_model_scene / "gt")
    assert sorted(v.name for v in scene.views) == sorted(cams)
    scale = min(1.0, max_image_size / max(width, height))
    T = scene.normalized_from_sfm
    for v in scene.views:
        K_gt, cam_from_world = cams[v.name]
        assert (v.width, v.height) == (round(width * scale), round(height * scale))
        np.testing.assert_allclose(v.K[:2], K_gt[:2] * scale, rtol=1e-6)
        np.testing.assert_allclose(T[:3, :3] @ camera_center(cam_from_world) + T[:3, 3], v.center, atol=1e-9)
    assert abs(np.median(_observation_depths(scene)) - 1.0) < 1e-6


@pytest.mark.slow
def test_existing_model_with_unknown_image_names_fails(sfm_run, tmp_path):
    names = sorted(load_gt_cameras(sfm_run.scene_dir / "gt")[0])
    scene = _scene_copy(sfm_run.scene_dir, tmp_path / "scene", names)
    shutil.copytree(sfm_run.scene_dir / "gt", scene / "gt")
    write_gt_model(scene, scene / "sparse", extra_name="not_here.png")
    ws = Workspace.create(scene)
    with pytest.raises(ReconError, match="not_here.png") as info:
        _run(ws)
    assert "\n" not in str(info.value)
    assert not ws.sfm_database.exists()


@pytest.mark.slow
def test_existing_model_with_inverted_poses_fails_clearly(sfm_run, tmp_path):
    names = sorted(load_gt_cameras(sfm_run.scene_dir / "gt")[0])
    scene = _scene_copy(sfm_run.scene_dir, tmp_path / "scene", names)
    shutil.copytree(sfm_run.scene_dir / "gt", scene / "gt")
    write_gt_model(scene, scene / "sparse" / "0", invert_poses=True)
    with pytest.raises(ReconError, match="world→camera") as info:
        _run(Workspace.create(scene))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_unreadable_existing_model_fails_clearly(sfm_run, tmp_path):
    scene = _scene_copy(sfm_run.scene_dir, tmp_path / "scene", ["view_000.png", "view_001.png", "view_002.png"])
    model = scene / "sparse" / "0"
    model.mkdir(parents=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        (model / name).write_bytes(bytes(range(100)))
    with pytest.raises(ReconError, match="cannot read the COLMAP model") as info:
        _run(Workspace.create(scene))
    assert str(model) in str(info.value) and "use_existing_model=false" in str(info.value)


# ---- bad inputs ---------------------------------------------------------------------------------------


def _noise_images(folder: Path, n: int, seed: int = 100) -> None:
    """``n`` unrelated smooth-noise photos (160x120): textured, but nothing in common."""
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        noise = (rng.random((15, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(noise).resize((160, 120), Image.Resampling.BICUBIC).save(folder / f"img_{i}.png")


def test_two_images_are_not_enough(tmp_path):
    scene = tmp_path / "scene"
    _noise_images(scene / "images", 2)
    with pytest.raises(ReconError, match="only 2 readable") as info:
        _run(Workspace.create(scene))
    assert str(scene / "images") in str(info.value)


@pytest.mark.slow
def test_non_overlapping_images_fail_clearly(tmp_path):
    _noise_images(tmp_path / "scene" / "images", 4)
    with pytest.raises(ReconError, match="registered") as info:
        _run(Workspace.create(tmp_path / "scene"))
    message = str(info.value)
    assert "no image pair shares enough matching features" in message
    assert "img_0.png" in message and "overlap" in message and "\n" not in message


# ---- units -------------------------------------------------------------------------------------------------


def test_prepare_image_rotates_downscales_and_keeps_focal_exif(tmp_path):
    src, dst = tmp_path / "in.jpg", tmp_path / "out" / "in.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    exif[0x010F] = "Maker"
    exif.get_ifd(0x8769)[0xA405] = 28
    Image.new("RGB", (400, 200), (200, 10, 10)).save(src, quality=95, exif=exif.tobytes())
    prepare_image(src, dst, max_image_size=100, jpeg_quality=95)
    with Image.open(dst) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (50, 100)
        out = im.getexif()
        assert out.get(0x0112, 1) == 1 and out[0x010F] == "Maker" and out.get_ifd(0x8769)[0xA405] == 28


def test_prepare_image_copies_clean_jpegs_and_converts_others(tmp_path):
    clean = tmp_path / "clean.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(clean, quality=90)
    prepare_image(clean, tmp_path / "out" / "clean.jpg", max_image_size=100, jpeg_quality=95)
    assert (tmp_path / "out" / "clean.jpg").read_bytes() == clean.read_bytes()
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(gray16)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 48), (1, 2, 3, 4)).save(rgba)
    for src in (gray16, rgba):
        prepare_image(src, tmp_path / "out" / src.name, max_image_size=100, jpeg_quality=95)
        with Image.open(tmp_path / "out" / src.name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 48)


def test_camera_groups():
    ims = [
        InputImage(name="a.jpg", width=40, height=30, camera_key=(40, 30, "X", "", "", "")),
        InputImage(name="b.jpg", width=40, height=30, camera_key=(40, 30, "X", "", "", "")),
        InputImage(name="c.jpg", width=30, height=40, camera_key=(30, 40, "X", "", "", "")),
    ]
    assert camera_groups(ims, CameraMode.auto) == [["a.jpg", "b.jpg"], ["c.jpg"]]
    assert camera_groups(ims, CameraMode.per_image) == [["a.jpg", "b.jpg", "c.jpg"]]
    with pytest.raises(ReconError, match="camera_mode=single"):
        camera_groups(ims, CameraMode.single)
    assert camera_groups(ims[:2], CameraMode.single) == [["a.jpg", "b.jpg"]]


def test_photos_directly_in_scene_dir_exclude_recon_folders(tmp_path):
    for rel in ("a.png", "b.png", "sub/c.png", "recon/sfm/input/a.png", "masks/a.png", "depth_prior/a.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    files = scene_images(Workspace.create(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.png", "b.png", "sub/c.png"]


@pytest.mark.slow
def test_sfm_is_repeatable_in_another_process(sfm_run, tmp_path):
    """A second `recon stage sfm` in a fresh process, with one thread for extraction and matching where the first used
    every core, gives bit-identical poses and points (mapper_threads=1)."""
    import subprocess
    import sys

    out = tmp_path / "again"
    assert load_config().sfm.num_threads == -1  # the first run used every core
    proc = subprocess.run([sys.executable, "-m", "cli", "stage", "sfm", str(sfm_run.scene_dir), "--out", str(out),
                           "--set", "sfm.num_threads=1"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    first, second = load_sfm_scene(sfm_run.ws), load_sfm_scene(Workspace.create(sfm_run.scene_dir, out))
    assert [v.name for v in first.views] == [v.name for v in second.views]
    for a, b in zip(first.views, second.views):
        np.testing.assert_array_equal(a.cam_from_world, b.cam_from_world)
    np.testing.assert_array_equal(first.points, second.points)


def test_photo_discovery_leaves_out_every_recon_folder_and_matches_any_case(tmp_path):
    """Photos directly in the scene folder, beside earlier runs' outputs wherever they sit (issue: 10 photos became 30,
    then 90)."""
    for rel in ("a.png", "b.JPG", "c.jPeg", "sub/d.Png", "run1/sfm/input/a.png", "elsewhere/deep/run2/mesh.png",
                "elsewhere/deep/run2/depth/x.png", "stage_copy/sfm/images/a.png", ".hidden/e.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (Image.new("RGB", (8, 8)).save(tmp_path / rel, format="PNG") if rel.lower().endswith((".png", ".jpg", ".jpeg"))
         else (tmp_path / rel).write_text("x"))
    (tmp_path / "run1" / "manifest.json").write_text(json.dumps({"tool": "recon", "version": 1, "updated": 0,
                                                                 "stages": {}}))
    # before the marker
    (tmp_path / "elsewhere" / "deep" / "run2" / "manifest.json").write_text(json.dumps({"version": 1, "updated": 0,
                                                                                        "stages": {}}))
    (tmp_path / "stage_copy" / "sfm" / "_fingerprint.txt").write_text("abc")
    files = scene_images(Workspace.create(tmp_path, tmp_path / "run3"))
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.png", "b.JPG", "c.jPeg", "sub/d.Png"]


def test_duplicate_photos_are_used_once_and_named(tmp_path, caplog):
    ims = [InputImage(name=n, width=40, height=30, camera_key=(40, 30), digest=d) for n, d in
           (("a.jpg", "x"), ("b.jpg", "y"), ("copy of a.png", "x"), ("c.jpg", "z"), ("again a.jpg", "x"))]
    with caplog.at_level(logging.WARNING, logger="pipeline.sfm.inputs"):
        kept, duplicates = drop_duplicates(ims, tmp_path)
    assert [im.name for im in kept] == ["a.jpg", "b.jpg", "c.jpg"]
    assert duplicates == {"copy of a.png": "a.jpg", "again a.jpg": "a.jpg"}
    assert sum("copy of a.png" in r.getMessage() and "a.jpg" in r.getMessage() for r in caplog.records) == 1


def test_pixel_digest_sees_through_the_file_format(tmp_path):
    rgb = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png", compress_level=9)
    Image.fromarray(rgb[::-1].copy()).save(tmp_path / "c.png")
    assert pixel_digest(tmp_path / "a.png") == pixel_digest(tmp_path / "b.png") != pixel_digest(tmp_path / "c.png")


def test_too_small_photos_are_skipped_by_name(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((60, 80, 3)) * 255).astype(np.uint8)).save(
            images / f"good_{i}.png")
    Image.new("RGB", (15, 15), "gray").save(images / "tiny.png")
    Image.new("RGB", (2000, 8), "gray").save(images / "strip.png")
    files = sorted(images.iterdir())
    with caplog.at_level(logging.WARNING, logger="pipeline.sfm.inputs"):
        kept = prepare_inputs(files, images, tmp_path / "input", load_config().sfm)
    assert [im.name for im in kept] == ["good_0.png", "good_1.png", "good_2.png"]
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(images / "tiny.png") in m and "15x15" in m for m in warned)
    assert any(str(images / "strip.png") in m and "2000x8" in m for m in warned)


def test_a_native_crash_in_feature_extraction_names_the_photo(tmp_path):
    """COLMAP's affine-shape SIFT segfaults on a photo under 16 pixels a side (what `prepare_inputs` now skips);
    run in its child process, the crash is one line naming the photo, and this process lives on."""
    from pipeline.sfm.colmap_steps import ColmapCrashed, run_step

    folder = tmp_path / "input"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)).save(folder / "tiny one.png")
    cfg = load_config(overrides=["sfm.estimate_affine_shape=true"]).sfm
    try:
        run_step("extract_features", log_path=tmp_path / "colmap.log", what="feature extraction",
                 database=str(tmp_path / "db.db"), input_dir=str(folder), groups=[["tiny one.png"]], cfg=cfg,
                 shared=True)
    except ColmapCrashed as exc:
        assert "tiny one.png" in str(exc) and "SIGSEGV" in str(exc) and "\n" not in str(exc)
        assert str(tmp_path / "colmap.log") in str(exc)
    else:
        pytest.skip("this pycolmap does not crash on a 12x12 image any more")


def test_colmap_steps_give_the_same_features_as_in_process(tmp_path):
    """The child process changes nothing: same keypoints as pycolmap called here."""
    from pipeline.sfm.colmap_steps import run_step

    folder = tmp_path / "input"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8)).resize(
        (160, 120), Image.Resampling.BICUBIC).save(folder / "a.png")
    cfg = load_config().sfm
    events = []
    run_step("extract_features", log_path=tmp_path / "colmap.log", what="feature extraction", on_event=events.append,
             database=str(tmp_path / "child.db"), input_dir=str(folder), groups=[["a.png"]], cfg=cfg, shared=True)
    # the photo is named before it is entered into the database and before its SIFT
    assert events == [{"event": "images", "names": ["a.png"]}] * 2 + [{"event": "done", "n": 1}]
    options = pycolmap.FeatureExtractionOptions()
    options.num_threads, options.max_image_size = 1, cfg.max_image_size
    options.sift.max_num_features, options.sift.estimate_affine_shape = cfg.max_num_features, cfg.estimate_affine_shape
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = cfg.camera_model
    pycolmap.extract_features(tmp_path / "here.db", folder, image_names=["a.png"],
                              camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader, extraction_options=options,
                              device=pycolmap.Device.cpu)

    def keypoints(db_path: Path) -> np.ndarray:
        db = pycolmap.Database.open(db_path)
        try:
            return np.asarray(db.read_keypoints(db.read_image_with_name("a.png").image_id))
        finally:
            db.close()

    np.testing.assert_array_equal(keypoints(tmp_path / "child.db"), keypoints(tmp_path / "here.db"))


def test_threaded_extraction_gives_every_camera_group_its_features(tmp_path):
    """With several threads, photos of two sizes (two camera groups) all get features, and the same ones as with
    one thread (a COLMAP call with one camera for photos of another size skipped them: issue 21's zoo run)."""
    import dataclasses

    from pipeline.sfm.colmap_steps import run_step

    folder = tmp_path / "input"
    folder.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"a.png": (160, 120), "b.png": (160, 120), "c.png": (120, 90), "d.png": (160, 120)}
    for name, size in sizes.items():
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC).save(
            folder / name)
    groups = [["a.png", "b.png", "d.png"], ["c.png"]]

    def counts(threads: int) -> dict[str, tuple[int, int]]:
        cfg = dataclasses.replace(load_config().sfm, num_threads=threads)
        db_path = tmp_path / f"t{threads}.db"
        run_step("extract_features", log_path=tmp_path / "colmap.log", what="feature extraction",
                 database=str(db_path), input_dir=str(folder), groups=groups, cfg=cfg, shared=True)
        db = pycolmap.Database.open(db_path)
        try:
            return {im.name: (im.camera_id, db.num_keypoints_for_image(im.image_id)) for im in db.read_all_images()}
        finally:
            db.close()

    one, several = counts(1), counts(3)
    assert several == one and all(n > 0 for _, n in several.values())
    assert several["a.png"][0] == several["d.png"][0] != several["c.png"][0]


def test_too_few_registered_photos_retry_with_more_features_and_keep_the_best(tmp_path, monkeypatch):
    built, mapped = [], []

    class FakeModel:
        def __init__(self, n: int) -> None:
            self.n = n

        def num_reg_images(self) -> int:
            return self.n

    def fake_features(ctx, images, database, seconds, *, peak_threshold_factor=1.0, what=""):
        built.append((database.name, peak_threshold_factor))

    monkeypatch.setattr(sfm, "_features_and_matches", fake_features)
    ws = Workspace.create(tmp_path)
    images = [InputImage(name=f"{i}.png", width=40, height=30, camera_key=(40, 30)) for i in range(10)]
    for overrides, first, retry, expect_built, expect_best in (
        ([], 10, 10, ["database.db"], 10),                                # all registered: no second attempt
        ([], 4, 9, ["database.db", "database_more_features.db"], 9),      # the retry registers more: kept
        ([], 6, 5, ["database.db", "database_more_features.db"], 6),      # the retry registers fewer: the first is kept
        (["sfm.retry_registered_fraction=0.5"], 6, 9, ["database.db"], 6),
        (["sfm.retry_registered_fraction=0"], 0, 9, ["database.db"], None),
    ):
        built.clear()
        mapped.clear()

        def fake_map_once(ctx, database, n_images, *, relaxed, first=first, retry=retry):
            mapped.append(relaxed)
            n = retry if relaxed else first
            return FakeModel(n) if n else None

        monkeypatch.setattr(sfm, "map_once", fake_map_once)
        ctx = StageContext(ws=ws, config=load_config(overrides=overrides), name="sfm", fingerprint="x",
                           show_progress=False)
        best = sfm._map(ctx, images, {})
        assert [name for name, _ in built] == expect_built, overrides
        assert all(factor == (1.0 if name == "database.db" else 1 / 3) for name, factor in built)
        assert mapped == [False, True][: len(expect_built)]
        assert (best.n if best is not None else None) == expect_best
        assert [a["registered"] for a in ctx.summary["mapping_attempts"]] == [first, retry][: len(expect_built)]


def test_a_corrupt_exif_warning_names_the_photo(tmp_path, caplog):
    """PIL's "Corrupt EXIF data" warning, one line naming the file (it used to say nothing of which photo)."""
    import io

    rgb = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    truncated_ifd = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01"
                     b"\x00\x06\x00\x00\xff\xff")
    rgb.save(buf, "JPEG", exif=truncated_ifd)
    src = tmp_path / "odd exif.jpg"
    src.write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING):
        prepare_image(src, tmp_path / "out.jpg", max_image_size=2000, jpeg_quality=95)
    named = [r.getMessage() for r in caplog.records if "Corrupt EXIF" in r.getMessage()]
    assert named and all(m.startswith(f"{src}: ") for m in named)


def test_mapping_adjusts_the_whole_model_at_the_configured_growth(monkeypatch, tmp_path):
    """sfm.global_ba_growth reaches COLMAP's incremental mapping (images / frames and points ratios)."""
    from pipeline.sfm import colmap_steps

    seen = {}

    def fake_mapping(database, input_dir, work_dir, *, options, **_):
        frames = getattr(options, "ba_global_frames_ratio", None)
        seen["frames"] = options.ba_global_images_ratio if frames is None else frames
        seen["points"] = options.ba_global_points_ratio
        return {}

    monkeypatch.setattr(pycolmap, "incremental_mapping", fake_mapping)
    cfg = load_config(overrides=["sfm.global_ba_growth=1.7"]).sfm
    result = colmap_steps.map_incremental(database=str(tmp_path / "db"), input_dir=str(tmp_path),
                                          work_dir=str(tmp_path / "w"), out_dir=str(tmp_path / "o"), cfg=cfg,
                                          relaxed=False, emit=lambda e: None)
    assert result is None and seen == {"frames": pytest.approx(1.7), "points": pytest.approx(1.7)}
    assert pycolmap.IncrementalPipelineOptions().ba_global_points_ratio == pytest.approx(1.1)  # COLMAP's own default

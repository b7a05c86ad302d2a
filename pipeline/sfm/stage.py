"""sfm stage: COLMAP sparse structure-from-motion through pycolmap.

Writes ``OUT/sfm/model`` (undistorted PINHOLE cameras, poses and sparse
points in the normalized frame), ``OUT/sfm/images`` (undistorted images) and
``OUT/sfm/normalization.json``; the engine publishes the model as ``OUT/sparse``.

Phases, each leaving only complete files behind (so an interrupted run
resumes from the last finished phase and never trusts half-written work):

1. *prepare*: every readable image → ``input/<name>`` (8-bit RGB, EXIF
   orientation applied, longest side ≤ ``max_image_size``; one atomic file
   each, existing ones are kept). Unreadable images are skipped with a warning.
2. *features* + *matching*: SIFT (CPU) and exhaustive or sequential matching
   into a database built under a temporary name and renamed to
   ``database.db`` only once matching finished.
3. *mapping*: incremental mapping (seeded); the largest model is written
   atomically to ``mapped/`` (COLMAP frame, original cameras). With
   ``use_existing_model`` the user's model (``SCENE_DIR/sparse[/0]``) takes
   the place of phases 2-3.
4. *undistort* + *normalize*: PINHOLE cameras, then the similarity
   ``x_n = s (x - c)`` of :func:`pipeline.core.poses.normalizing_similarity`
   (median observation depth of the sparse points = 1).

COLMAP's own log (glog, Ceres) goes to ``OUT/sfm/colmap.log``.

Phase 1 lives in :mod:`pipeline.sfm.inputs`, the user's model in
:mod:`pipeline.sfm.user_model`, the COLMAP calls in :mod:`pipeline.sfm.colmap_steps`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.cache import atomic_dir, raise_if_disk_full, write_json_atomic
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.native_output import native_output_to
from pipeline.core.poses import normalizing_similarity, similarity_matrix
from pipeline.core.settings import check_section
from pipeline.core.workers import available_cpus
from pipeline.core.workspace import Workspace
from pipeline.sfm.colmap_steps import RETRY_PEAK_THRESHOLD_FACTOR, run_step, threads
from pipeline.sfm.config import CameraMode, Matcher, SfmConfig, colmap_camera_model, colmap_camera_models  # noqa: F401 - re-exported
from pipeline.sfm.inputs import InputImage, _names, camera_groups, drop_duplicates, prepare_inputs, scene_files
from pipeline.sfm.user_model import read_user_model

if TYPE_CHECKING:
    import pycolmap

logger = logging.getLogger(__name__)


# ---- paths ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SfmPaths:
    """Files of the sfm stage folder: the :class:`Workspace` ones plus the stage's working files."""

    ws: Workspace

    @property
    def stage_dir(self) -> Path:
        return self.ws.stage_dir("sfm")

    @property
    def input_dir(self) -> Path:
        """Clean copies of the readable input images (8-bit RGB, upright, downscaled), same names."""
        return self.stage_dir / "input"

    @property
    def mapped_dir(self) -> Path:
        """The model before undistortion and normalization (COLMAP frame, original cameras)."""
        return self.stage_dir / "mapped"

    @property
    def database(self) -> Path:
        """Features and verified matches; present only once matching finished."""
        return self.ws.sfm_database

    @property
    def retry_database(self) -> Path:
        """Features of the second attempt (:data:`pipeline.sfm.colmap_steps.RETRY_PEAK_THRESHOLD_FACTOR`) and their
        matches."""
        return self.stage_dir / "database_more_features.db"

    @staticmethod
    def building(database: Path) -> Path:
        """A database while it is being written (a dot name: the engine deletes it on resume)."""
        return database.with_name(f".{database.stem}.building{database.suffix}")

    @property
    def database_building(self) -> Path:
        return self.building(self.database)


def sfm_paths(ws: Workspace) -> SfmPaths:
    """The sfm stage's files for a workspace."""
    return SfmPaths(ws)


# ---- phase 2: features and matches ---------------------------------------------------------------


def num_verified_pairs(database: Path) -> int:
    """Image pairs with enough geometrically verified matches for mapping (COLMAP's ``min_num_matches``)."""
    import pycolmap

    min_matches = pycolmap.IncrementalPipelineOptions().min_num_matches
    db = pycolmap.Database.open(database)
    try:
        _, geometries = db.read_two_view_geometries()
        return sum(1 for g in geometries if len(g.inlier_matches) >= min_matches)
    finally:
        db.close()


def database_image_names(database: Path) -> set[str]:
    """Names of the images in a COLMAP database."""
    import pycolmap

    db = pycolmap.Database.open(database)
    try:
        return {im.name for im in db.read_all_images()}
    finally:
        db.close()


def _remove_database(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        p.unlink(missing_ok=True)


# ---- phase 3: mapping ----------------------------------------------------------------------------


def registered_names(rec: pycolmap.Reconstruction) -> list[str]:
    """Names of the registered images of a model, sorted."""
    return sorted(rec.images[i].name for i in rec.reg_image_ids())


def check_registration(
    registered: Sequence[str], inputs: Sequence[str], cfg: SfmConfig, images_dir: Path, *, source: str, detail: str = ""
) -> list[str]:
    """Fail when fewer than ``min_registered`` images registered; warn, naming them, when any is left out.

    Returns:
        The input images that did not register, sorted.

    Raises:
        ReconError: naming the images that did not register and what to try.
    """
    reg = set(registered)
    missing = [n for n in inputs if n not in reg]
    if len(reg) < max(cfg.min_registered, 2):
        if source == "sfm":
            hints = ["take photos with more overlap (every part seen from 3+ views a few steps apart) of textured, "
                     "static surfaces"]
            if not cfg.estimate_affine_shape:
                hints.append("set sfm.estimate_affine_shape=true for views far apart")
            if cfg.matcher == Matcher.sequential:
                hints.append(f"raise sfm.sequential_overlap (now {cfg.sequential_overlap}) or use "
                             "sfm.matcher=exhaustive")
            hint = ", or ".join(hints)
        else:
            hint = "check the model or set sfm.use_existing_model=false to run SfM"
        raise ReconError(
            f"{images_dir}: only {len(reg)} of {len(inputs)} images registered (need {cfg.min_registered}){detail}; "
            f"not registered: {_names(missing)}; {hint}"
        )
    if missing:
        logger.warning(
            "only %d of %d photos registered; left out of the reconstruction: %s", len(reg), len(inputs),
            _names(missing, limit=20),
        )
    return missing


# ---- phase 4: undistortion and the normalized frame ------------------------------------------------------


def observed_points_and_depths(rec: pycolmap.Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """Sparse points (M, 3) and the camera-frame depth (K,) of every (point, registered image) observation pair.

    A point seen twice in one image (two keypoints in its track) counts once,
    as in :class:`pipeline.core.io.SfmScene` (``View.point_ids`` is unique).
    """
    ids = sorted(rec.point3D_ids())
    points = np.array([rec.points3D[i].xyz for i in ids], dtype=np.float64).reshape(-1, 3)
    index = {pid: k for k, pid in enumerate(ids)}
    depths = []
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        obs = np.unique([index[p.point3D_id] for p in image.get_observation_points2D()
                         if p.point3D_id in index]).astype(np.int64)
        if len(obs) == 0:
            continue
        cam_from_world = image.cam_from_world().matrix()  # (3, 4)
        depths.append(points[obs] @ cam_from_world[2, :3] + cam_from_world[2, 3])
    return points, (np.concatenate(depths) if depths else np.zeros(0))


def normalize_model(rec: pycolmap.Reconstruction) -> tuple[float, np.ndarray, np.ndarray]:
    """Move ``rec`` (in place) into the normalized frame ``x_n = s (x - c)``.

    Returns (s, c (3,), normalized_from_sfm 4x4).

    Raises:
        ReconError: no sparse point in front of a camera.
    """
    import pycolmap

    points, depths = observed_points_and_depths(rec)
    try:
        s, c = normalizing_similarity(points, depths)
    except ValueError as exc:
        raise ReconError(f"the SfM model has no sparse points in front of its cameras ({exc}); "
                         "the later stages need them as scale anchors") from exc
    rec.transform(pycolmap.Sim3d(s, pycolmap.Rotation3d(), -s * c))
    return s, c, similarity_matrix(s, np.eye(3), -s * c)


def undistort_and_normalize(paths: SfmPaths, cfg: SfmConfig) -> pycolmap.Reconstruction:
    """Phase 4: undistort ``mapped/`` to PINHOLE, normalize it and write model, images and normalization.

    Returns the written (normalized) model.
    """
    import pycolmap

    ws = paths.ws
    work = Path(tempfile.mkdtemp(prefix=".undistort.", dir=paths.stage_dir))
    try:
        options = pycolmap.UndistortCameraOptions()
        options.max_image_size = cfg.max_image_size
        with native_output_to(ws.sfm_log):
            pycolmap.undistort_images(
                work, paths.mapped_dir, paths.input_dir, output_type="COLMAP", undistort_options=options,
                jpeg_quality=cfg.jpeg_quality, num_threads=threads(cfg.num_threads),
            )
        raise_if_disk_full(ws.sfm_images_dir)  # a full disk leaves COLMAP's undistorted images and model truncated
        rec = pycolmap.Reconstruction(str(work / "sparse"))
        s, c, normalized_from_sfm = normalize_model(rec)
        with atomic_dir(ws.sfm_images_dir) as tmp:
            for entry in (work / "images").iterdir():
                os.replace(entry, tmp / entry.name)
        write_json_atomic(ws.sfm_normalization, {
            "normalized_from_sfm": normalized_from_sfm,
            "scale": s,
            "center": c,
            "convention": "x_normalized = scale * (x_sfm - center); sfm = the frame of sfm/mapped (COLMAP)",
        })
        with atomic_dir(ws.sfm_model_dir) as tmp:
            rec.write_binary(str(tmp))
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the stage -------------------------------------------------------------------------------------------


def _features_and_matches(ctx: StageContext, images: Sequence[InputImage], database: Path, seconds: dict[str, float], *,
                          peak_threshold_factor: float = 1.0, what: str = "") -> None:
    """SIFT features and verified matches into ``database`` (kept from an interrupted run when it holds these
    images)."""
    cfg: SfmConfig = ctx.settings
    paths = sfm_paths(ctx.ws)
    names = [im.name for im in images]
    building = paths.building(database)
    _remove_database(building)  # never trust a half-written database
    if database.exists() and database_image_names(database) != set(names):
        _remove_database(database)
    if database.exists():
        return
    log = ctx.ws.sfm_log
    t0 = time.perf_counter()
    with ctx.bar(desc=f"SIFT features{what}", total=len(names), unit="img") as bar:
        run_step("extract_features", log_path=log, what="feature extraction",
                 on_event=lambda event: bar.update(event["n"]) if event.get("event") == "done" else None,
                 database=str(building), input_dir=str(paths.input_dir), groups=camera_groups(images, cfg.camera_mode),
                 cfg=cfg, shared=cfg.camera_mode != CameraMode.per_image, peak_threshold_factor=peak_threshold_factor)
    seconds["features" + what.replace(" ", "_")] = t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ctx.bar(desc=f"{cfg.matcher.value} matching{what}", total=1, unit="phase") as bar:
        run_step("match_features", log_path=log, what=f"{cfg.matcher.value} matching", database=str(building), cfg=cfg)
        bar.update(1)
    raise_if_disk_full(database)  # COLMAP does not always report a failed write
    os.replace(building, database)
    seconds["matching" + what.replace(" ", "_")] = t2 = time.perf_counter() - t0
    ctx.logger.info("features and matches%s of %d images in %.1f s", what, len(names), t1 + t2)


def map_once(ctx: StageContext, database: Path, n_images: int, *, relaxed: bool) -> pycolmap.Reconstruction | None:
    """Incremental mapping of ``database`` (with :data:`pipeline.sfm.colmap_steps.RELAXED_INCREMENTAL` when
    ``relaxed``); its largest model or None."""
    import pycolmap

    cfg: SfmConfig = ctx.settings
    paths = sfm_paths(ctx.ws)
    work = Path(tempfile.mkdtemp(prefix=".mapping.", dir=paths.stage_dir))
    try:
        if threads(cfg.mapper_threads) < available_cpus():  # (sfm.mapper_threads is 1 by default)
            ctx.spare_core()
        with ctx.bar(desc="mapping (registered images)", total=n_images, unit="img") as bar:

            def on_event(event: dict) -> None:
                if event.get("event") == "registered":
                    bar.n = min(int(event["n"]), n_images)
                    bar.refresh()

            result = run_step("map_incremental", log_path=ctx.ws.sfm_log, on_event=on_event, what="incremental mapping",
                              database=str(database), input_dir=str(paths.input_dir), work_dir=str(work / "models"),
                              out_dir=str(work / "largest"), cfg=cfg, relaxed=relaxed)
        raise_if_disk_full(paths.mapped_dir)
        return pycolmap.Reconstruction(str(work / "largest")) if result is not None else None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _map(ctx: StageContext, images: Sequence[InputImage], seconds: dict[str, float]) -> pycolmap.Reconstruction | None:
    """Phases 2-3: features, matches and incremental mapping; when fewer than ``retry_registered_fraction`` of
    the photos register, a second attempt with more SIFT features (a third of the peak threshold) and
    relaxed registration thresholds. The model that registers most is kept (the first one on a tie)."""
    cfg: SfmConfig = ctx.settings
    paths = sfm_paths(ctx.ws)
    n = len(images)
    _features_and_matches(ctx, images, paths.database, seconds)
    t0 = time.perf_counter()
    best = map_once(ctx, paths.database, n, relaxed=False)
    best_n = best.num_reg_images() if best is not None else 0
    attempts = [{"strategy": "incremental", "registered": best_n, "seconds": round(time.perf_counter() - t0, 2)}]
    ctx.summary["mapper"] = "incremental"
    if best_n < cfg.retry_registered_fraction * n:
        ctx.logger.info("%d of %d photos registered; trying again with more SIFT features and relaxed registration "
                        "thresholds", best_n, n)
        t0 = time.perf_counter()
        _features_and_matches(ctx, images, paths.retry_database, seconds,
                              peak_threshold_factor=RETRY_PEAK_THRESHOLD_FACTOR, what=" (more features)")
        retry = map_once(ctx, paths.retry_database, n, relaxed=True)
        retry_n = retry.num_reg_images() if retry is not None else 0
        attempts.append({"strategy": "more features, relaxed", "registered": retry_n,
                         "seconds": round(time.perf_counter() - t0, 2)})
        if retry_n > best_n:
            best, best_n = retry, retry_n
            ctx.summary["mapper"] = "more features, relaxed"
    seconds["mapping"] = sum(a["seconds"] for a in attempts)
    ctx.summary["mapping_attempts"] = attempts
    return best


def _run_sfm(ctx: StageContext, paths: SfmPaths, images: Sequence[InputImage],
             seconds: dict[str, float]) -> pycolmap.Reconstruction:
    """Phases 2-3 (reusing a finished database or model of an interrupted run); returns the mapped model."""
    import pycolmap

    cfg: SfmConfig = ctx.settings
    names = [im.name for im in images]
    if paths.mapped_dir.is_dir():
        rec = pycolmap.Reconstruction(str(paths.mapped_dir))
        if set(registered_names(rec)) <= set(names):
            ctx.logger.info("reusing the mapped model of an interrupted run")
            check_registration(registered_names(rec), names, cfg, ctx.ws.images_dir, source="sfm")
            return rec
    rec = _map(ctx, images, seconds)
    detail = ""
    if rec is None:
        pairs = num_verified_pairs(paths.database)
        detail = (": no image pair shares enough matching features" if pairs == 0
                  else f": no model could be started from the {pairs} matched image pair(s)")
    check_registration(registered_names(rec) if rec is not None else [], names, cfg, ctx.ws.images_dir, source="sfm",
                       detail=detail)
    assert rec is not None  # check_registration raised otherwise
    with atomic_dir(paths.mapped_dir) as tmp:
        rec.write_binary(str(tmp))
    return rec


def run(ctx: StageContext) -> None:
    """Photos (or an existing COLMAP model) → undistorted, normalized sparse model (see the module docstring)."""
    cfg: SfmConfig = ctx.settings
    ws = ctx.ws
    paths = sfm_paths(ws)
    seconds: dict[str, float] = {}
    check_section(cfg, "sfm")

    t0 = time.perf_counter()
    files, others = scene_files(ws)
    if others and files:
        ctx.logger.warning("skipping %d file(s) that are not JPEG/PNG images in %s: %s", len(others), ws.images_dir,
                           _names([p.relative_to(ws.images_dir).as_posix() for p in others], limit=5))
    with ctx.bar(desc="prepare images", total=len(files), unit="img") as bar:
        images = prepare_inputs(files, ws.images_dir, paths.input_dir, cfg, on_image=lambda: bar.update(1))
    seconds["prepare"] = time.perf_counter() - t0
    usable = len(images)
    usable_names = [im.name for im in images]

    user_model = ws.user_sparse_dir() if cfg.use_existing_model else None
    duplicates: dict[str, str] = {}
    if user_model is not None:
        t0 = time.perf_counter()
        ctx.logger.info("using the existing COLMAP model %s (no feature extraction or mapping)", user_model)
        rec = read_user_model(user_model, images, ws.images_dir, paths.input_dir)
        check_registration(registered_names(rec), [im.name for im in images], cfg, ws.images_dir, source="model")
        with atomic_dir(paths.mapped_dir) as tmp:
            rec.write_binary(str(tmp))
        seconds["import_model"] = time.perf_counter() - t0
    else:
        images, duplicates = drop_duplicates(images, ws.images_dir)
        _run_sfm(ctx, paths, images, seconds)

    t0 = time.perf_counter()
    final = undistort_and_normalize(paths, cfg)
    seconds["undistort"] = time.perf_counter() - t0

    registered = set(registered_names(final))
    ctx.summary.update({
        "images": usable,
        "unreadable": len(files) - usable,
        "duplicates": len(duplicates),
        "registered": final.num_reg_images(),
        "points3D": final.num_points3D(),
        "reproj_error_px": round(float(final.compute_mean_reprojection_error()), 4),
        "track_length": round(float(final.compute_mean_track_length()), 3),
        "source": "existing model" if user_model is not None else "sfm",
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "not_registered": sorted(im.name for im in images if im.name not in registered),
        "duplicate_of": duplicates,
        "skipped": sorted(set(p.relative_to(ws.images_dir).as_posix() for p in files) - set(usable_names)),
    })
    ctx.logger.info(
        "registered %d of %d images, %d sparse points (mean reprojection error %.2f px, track length %.2f)",
        ctx.summary["registered"], len(images), ctx.summary["points3D"], ctx.summary["reproj_error_px"],
        ctx.summary["track_length"],
    )

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
   ``x_n = s (x - c)`` of :func:`pipeline.geometry.normalizing_similarity`
   (median observation depth of the sparse points = 1).

COLMAP's own log (glog, Ceres) goes to ``OUT/sfm/colmap.log``.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.cache import atomic_dir, atomic_path, raise_if_disk_full, write_json_atomic
from pipeline.errors import OutputError, ReconError
from pipeline.geometry import normalizing_similarity, similarity_matrix
from pipeline.io import load_rgb, split_image_files
from pipeline.settings import setting
from pipeline.stage import StageContext
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    import pycolmap

logger = logging.getLogger(__name__)

WARN_REGISTRATION_RATE = 0.9
"""Below this fraction of registered input images the stage warns (it does not change any output)."""

_EXIF_IFD = 0x8769
_EXIF_ORIENTATION = 0x0112
_EXIF_KEEP_BASE = (0x010F, 0x0110)  # Make, Model
_EXIF_KEEP_IFD = (0x920A, 0xA405)  # FocalLength (mm), FocalLengthIn35mmFilm
"""EXIF tags copied into re-encoded JPEGs: what COLMAP needs for its focal-length prior.
Resolution-dependent tags (FocalPlaneXResolution, pixel dimensions) are dropped
because a downscaled image would make them wrong."""


class Matcher(str, enum.Enum):
    exhaustive = "exhaustive"
    sequential = "sequential"


class CameraMode(str, enum.Enum):
    auto = "auto"
    """One camera per group of images with the same size and EXIF camera/focal length."""
    single = "single"
    """One camera for all images (they must have the same size)."""
    per_image = "per_image"
    """A camera per image (mixed zoom, unknown sources)."""


@dataclass(kw_only=True)
class SfmConfig:
    matcher: Matcher = setting(Matcher.exhaustive, "Feature matching: exhaustive (small sets) or sequential (video frames).")
    max_image_size: int = setting(2000, "Longest image side in pixels for SIFT extraction and undistortion; larger images are downscaled.")
    max_num_features: int = setting(8192, "Maximum SIFT features per image.")
    estimate_affine_shape: bool = setting(True, "Affine-covariant SIFT: slower extraction, many more matches between views far apart (wide baselines).")
    camera_model: str = setting("SIMPLE_RADIAL", "COLMAP camera model estimated for the photos (e.g. SIMPLE_RADIAL, RADIAL, OPENCV, PINHOLE); undistorted to PINHOLE afterwards.")
    camera_mode: CameraMode = setting(CameraMode.auto, "Which images share intrinsics: auto (same size and EXIF camera/focal), single (all) or per_image.")
    sequential_overlap: int = setting(10, "Sequential matching: number of following frames each frame is matched with.")
    min_registered: int = setting(3, "Fail when fewer images than this register.")
    use_existing_model: bool = setting(True, "Use SCENE_DIR/sparse/0 (or SCENE_DIR/sparse) instead of running SfM when present.")
    seed: int = setting(0, "Random seed for COLMAP (RANSAC, mapping) so runs are repeatable (-1: not seeded).")
    jpeg_quality: int = setting(95, "JPEG quality (1-100) of JPEG images the stage re-encodes (downscaled, rotated or undistorted).")
    num_threads: int = setting(1, "CPU threads for COLMAP feature extraction, matching and undistortion. 1 makes SfM repeatable run to run (with more threads the order of features and matches, and so the model, can change slightly from one run to the next); -1: all, faster on large scenes.")
    mapper_threads: int = setting(1, "CPU threads of COLMAP's incremental mapping (bundle adjustment). 1 keeps SfM repeatable (multi-threaded bundle adjustment is not bit-reproducible); -1: all, faster on large scenes.")


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
    def database_building(self) -> Path:
        """The database while it is being written (a dot name: the engine deletes it on resume)."""
        return self.stage_dir / f".{self.ws.sfm_database.stem}.building{self.ws.sfm_database.suffix}"


def sfm_paths(ws: Workspace) -> SfmPaths:
    """The sfm stage's files for a workspace."""
    return SfmPaths(ws)


# ---- phase 1: input images -----------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    """One readable input image after preparation."""

    name: str
    """Path relative to the images folder (POSIX), also the name in the COLMAP model."""
    width: int
    height: int
    camera_key: tuple
    """Images with equal keys share intrinsics in ``camera_mode=auto``: (width, height, make, model, focal mm, focal 35 mm)."""


def _exif_subset(exif: Image.Exif) -> Image.Exif:
    """The EXIF tags COLMAP uses for its focal prior (:data:`_EXIF_KEEP_BASE`, :data:`_EXIF_KEEP_IFD`)."""
    out = Image.Exif()
    for tag in _EXIF_KEEP_BASE:
        if tag in exif:
            out[tag] = exif[tag]
    src_ifd = exif.get_ifd(_EXIF_IFD)
    kept = {tag: src_ifd[tag] for tag in _EXIF_KEEP_IFD if tag in src_ifd}
    if kept:
        dst_ifd = out.get_ifd(_EXIF_IFD)
        dst_ifd.update(kept)
    return out


def _is_jpeg_name(name: str) -> bool:
    return Path(name).suffix.lower() in (".jpg", ".jpeg")


def prepare_image(src: Path, dst: Path, *, max_image_size: int, jpeg_quality: int) -> None:
    """Write ``src`` as a clean input image at ``dst`` (atomic).

    8-bit RGB, EXIF orientation applied, longest side ≤ ``max_image_size``; the
    format follows ``dst``'s extension (PNG, else JPEG at ``jpeg_quality`` with
    the focal-length EXIF tags kept). A JPEG that needs none of this is copied
    byte for byte (PNGs are always re-encoded, losslessly: a 16-bit PNG also
    opens as mode ``RGB``).

    Raises:
        ReconError: the image cannot be decoded.
    """
    rgb = load_rgb(src, max_image_size)  # full decode: also the corruption check
    want_format = "JPEG" if _is_jpeg_name(dst.name) else "PNG"
    with Image.open(src) as im:
        exif = im.getexif()
        unchanged = (
            want_format == "JPEG"
            and im.format == "JPEG"
            and im.mode == "RGB"
            and exif.get(_EXIF_ORIENTATION, 1) == 1
            and (im.width, im.height) == (rgb.shape[1], rgb.shape[0])
        )
    with atomic_path(dst) as tmp:
        if unchanged:
            shutil.copyfile(src, tmp)
        elif want_format == "JPEG":
            Image.fromarray(rgb).save(tmp, format="JPEG", quality=jpeg_quality, exif=_exif_subset(exif).tobytes())
        else:
            Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)


def _camera_key(path: Path) -> tuple:
    with Image.open(path) as im:
        exif = im.getexif()
        ifd = exif.get_ifd(_EXIF_IFD)
        return (im.width, im.height, str(exif.get(0x010F, "")), str(exif.get(0x0110, "")), str(ifd.get(0x920A, "")), str(ifd.get(0xA405, "")))


def scene_files(ws: Workspace) -> tuple[list[Path], list[Path]]:
    """(input image files, other files) of the scene (``pipeline.io.split_image_files``), never files of recon's own folders.

    When the photos sit directly in ``SCENE_DIR``, the output folder (default
    ``SCENE_DIR/recon``), ``masks/`` and ``depth_prior/`` are left out, and
    other files there (``recon.yaml``, notes) are not reported.
    """
    images_dir = ws.images_dir
    exclude = [ws.out_dir, ws.masks_dir, ws.depth_prior_dir]
    images, others = split_image_files(images_dir)
    images = [p for p in images if not any(p == d or d in p.parents for d in exclude)]
    others = others if images_dir != ws.scene_dir else []
    return images, others


def scene_images(ws: Workspace) -> list[Path]:
    """The scene's input image files (see :func:`scene_files`)."""
    return scene_files(ws)[0]


def prepare_inputs(
    files: Sequence[Path], images_dir: Path, input_dir: Path, cfg: SfmConfig, on_image: Callable[[], None] = lambda: None
) -> list[InputImage]:
    """Phase 1: convert every readable image of ``files`` into ``input_dir`` (files already there are kept).

    Names are the paths relative to ``images_dir``. Returns the readable
    images, sorted by name; unreadable ones are skipped with a warning naming
    them (given once all images are read, and only when the stage goes on:
    otherwise the error names them).

    Raises:
        ReconError: no images, or fewer than 3 readable ones.
    """
    if not files:
        others = sorted(p.name for p in images_dir.iterdir() if p.is_file()) if images_dir.is_dir() else []
        found = f" (found only {_names(others, limit=3)})" if others else ""
        raise ReconError(f"{images_dir}: no JPEG/PNG images found{found}; put the photos in SCENE_DIR/images/")
    out: list[InputImage] = []
    unreadable: dict[str, str] = {}
    for src in files:
        name = src.relative_to(images_dir).as_posix()
        dst = input_dir / name
        if not dst.exists():
            try:
                prepare_image(src, dst, max_image_size=cfg.max_image_size, jpeg_quality=cfg.jpeg_quality)
            except OutputError:
                raise  # the output folder is full or read-only: not the image's fault
            except (ReconError, Image.DecompressionBombError, ValueError) as exc:
                unreadable[name] = str(exc) if str(src) in str(exc) else f"{src}: cannot read image ({exc})"
                on_image()
                continue
        key = _camera_key(dst)
        out.append(InputImage(name=name, width=key[0], height=key[1], camera_key=key))
        on_image()
    if len(out) < 3:
        extra = f" ({len(unreadable)} unreadable: {_names(list(unreadable))})" if unreadable else ""
        raise ReconError(
            f"{images_dir}: only {len(out)} readable image(s){extra}; SfM needs at least 3 overlapping photos; add more to this folder"
        )
    for reason in unreadable.values():
        logger.warning("skipping %s", reason)
    return sorted(out, key=lambda im: im.name)


def camera_groups(images: Sequence[InputImage], mode: CameraMode) -> list[list[str]]:
    """Names of the images that share one camera, per camera (``per_image``: one group, no sharing).

    Raises:
        ReconError: ``single`` with images of different sizes.
    """
    if mode == CameraMode.per_image:
        return [[im.name for im in images]]
    if mode == CameraMode.single:
        sizes = {(im.width, im.height) for im in images}
        if len(sizes) > 1:
            desc = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
            raise ReconError(f"sfm.camera_mode=single needs images of one size, found {desc}; use sfm.camera_mode=auto")
        return [[im.name for im in images]]
    groups: dict[tuple, list[str]] = {}
    for im in images:
        groups.setdefault(im.camera_key, []).append(im.name)
    return list(groups.values())


# ---- COLMAP output -----------------------------------------------------------------------------


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


@contextlib.contextmanager
def native_output_to(log_path: Path) -> Iterator[None]:
    """Send what C/C++ libraries print (glog, Ceres, Open3D) to ``log_path`` (appended) while the block runs.

    pycolmap logs through glog to the process's stderr, and glog's own log
    files get a timestamp and pid appended to their name, so file descriptors
    1 and 2 are pointed at the log file and restored afterwards. Python's
    ``sys.stdout``/``sys.stderr``, when they write to those descriptors, are
    swapped for streams on copies of the original ones meanwhile, so log
    messages and progress bars (created inside the block) still reach the
    console. Nested use is fine (the inner block's file wins).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no stdout/stderr to redirect (detached process): nothing to hide
        yield
        return
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    consoles = {}
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = originals[name]
        if _fd_of(stream) == fd:
            consoles[name] = io.TextIOWrapper(
                io.FileIO(os.dup(saved[fd]), "w"), encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace", line_buffering=True, write_through=True,
            )
    try:
        with open(log_path, "ab") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            for name, console in consoles.items():
                setattr(sys, name, console)
            yield
    finally:
        for name, stream in originals.items():
            setattr(sys, name, stream)
        for console in consoles.values():
            with contextlib.suppress(Exception):
                console.close()
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)


def _seed_colmap(seed: int) -> None:
    """Seed COLMAP's process-wide PRNG (used where no per-call seed exists); -1 leaves it alone."""
    import pycolmap

    if seed >= 0:
        pycolmap.set_random_seed(seed)


def _threads(num_threads: int) -> int:
    return num_threads if num_threads > 0 else (os.cpu_count() or 1)


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_config(cfg: SfmConfig) -> None:
    """Reject settings COLMAP cannot work with (one-line ReconError)."""
    if cfg.max_image_size < 64:
        raise ReconError(f"sfm.max_image_size={cfg.max_image_size} is too small; use at least 64 pixels (default 2000)")
    if cfg.max_num_features < 100:
        raise ReconError(f"sfm.max_num_features={cfg.max_num_features} is too small; use at least 100 (default 8192)")
    if cfg.sequential_overlap < 1:
        raise ReconError(f"sfm.sequential_overlap={cfg.sequential_overlap} must be at least 1")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ReconError(f"sfm.jpeg_quality={cfg.jpeg_quality} must be between 1 and 100")
    if cfg.seed < -1:
        raise ReconError(f"sfm.seed={cfg.seed} must be >= 0 (or -1 for a random seed)")
    _check_camera_model(cfg.camera_model)


def _check_camera_model(name: str) -> None:
    import pycolmap

    valid = [m for m in dir(pycolmap.CameraModelId) if m.isupper() and m != "INVALID"]
    if name not in valid:
        raise ReconError(f"sfm.camera_model={name!r} is not a COLMAP camera model; use one of: {', '.join(sorted(valid))}")


# ---- phase 2: features and matches ---------------------------------------------------------------


def extract_features(
    database: Path, input_dir: Path, groups: Sequence[Sequence[str]], cfg: SfmConfig, *, shared: bool, on_done: Callable[[int], None]
) -> None:
    """SIFT features (CPU) of every image in ``groups`` into ``database``.

    Images are processed in chunks so ``on_done(n)`` can drive a progress
    bar; with ``shared`` every group gets one camera (the first chunk creates
    it, the others reuse it), else each image gets its own.
    """
    import pycolmap

    threads = _threads(cfg.num_threads)
    options = pycolmap.FeatureExtractionOptions()
    options.num_threads = threads
    options.max_image_size = cfg.max_image_size
    options.sift.max_num_features = cfg.max_num_features
    options.sift.estimate_affine_shape = cfg.estimate_affine_shape
    chunk = max(8, 4 * threads)
    for group in groups:
        camera_id = None
        for start in range(0, len(group), chunk):
            names = list(group[start : start + chunk])
            reader = pycolmap.ImageReaderOptions()
            reader.camera_model = cfg.camera_model
            if camera_id is not None:
                reader.existing_camera_id = camera_id
            mode = pycolmap.CameraMode.SINGLE if shared else pycolmap.CameraMode.PER_IMAGE
            pycolmap.extract_features(
                database, input_dir, image_names=names, camera_mode=mode, reader_options=reader,
                extraction_options=options, device=pycolmap.Device.cpu,
            )
            if shared and camera_id is None:
                db = pycolmap.Database.open(database)
                try:
                    camera_id = db.read_image_with_name(names[0]).camera_id
                finally:
                    db.close()
            on_done(len(names))


def match_features(database: Path, cfg: SfmConfig) -> None:
    """Match and geometrically verify image pairs (exhaustive or sequential by name), seeded RANSAC."""
    import pycolmap

    threads = _threads(cfg.num_threads)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = cfg.seed
    if cfg.matcher == Matcher.sequential:
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = cfg.sequential_overlap
        pairing.num_threads = threads
        pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing, verification_options=verification, device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification, device=pycolmap.Device.cpu)


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


def map_images(
    database: Path, input_dir: Path, work_dir: Path, cfg: SfmConfig, *, on_registered: Callable[[int], None]
) -> pycolmap.Reconstruction | None:
    """Incremental mapping (seeded); returns the largest model (most registered images, then points) or None.

    ``on_registered(n)`` gets the number of images registered in the model
    being built, after every registration.
    """
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = cfg.seed
    options.num_threads = _threads(cfg.mapper_threads)
    count = [0]

    def initial_pair() -> None:
        count[0] = 2
        on_registered(count[0])

    def next_image() -> None:
        count[0] += 1
        on_registered(count[0])

    work_dir.mkdir(parents=True, exist_ok=True)
    models = pycolmap.incremental_mapping(
        database, input_dir, work_dir, options=options, initial_image_pair_callback=initial_pair, next_image_callback=next_image
    )
    if not models:
        return None
    return max(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()))


def registered_names(rec: pycolmap.Reconstruction) -> list[str]:
    """Names of the registered images of a model, sorted."""
    return sorted(rec.images[i].name for i in rec.reg_image_ids())


def check_registration(
    registered: Sequence[str], inputs: Sequence[str], cfg: SfmConfig, images_dir: Path, *, source: str, detail: str = ""
) -> None:
    """Fail when fewer than ``min_registered`` images registered; warn below :data:`WARN_REGISTRATION_RATE`.

    Raises:
        ReconError: naming the images that did not register and what to try.
    """
    reg = set(registered)
    missing = [n for n in inputs if n not in reg]
    if len(reg) < max(cfg.min_registered, 2):
        if source == "sfm":
            hints = ["take photos with more overlap (every part seen from 3+ views a few steps apart) of textured, static surfaces"]
            if not cfg.estimate_affine_shape:
                hints.append("set sfm.estimate_affine_shape=true for views far apart")
            if cfg.matcher == Matcher.sequential:
                hints.append(f"raise sfm.sequential_overlap (now {cfg.sequential_overlap}) or use sfm.matcher=exhaustive")
            hint = ", or ".join(hints)
        else:
            hint = "check the model or set sfm.use_existing_model=false to run SfM"
        raise ReconError(
            f"{images_dir}: only {len(reg)} of {len(inputs)} images registered (need {cfg.min_registered}){detail}; "
            f"not registered: {_names(missing)}; {hint}"
        )
    rate = len(reg) / max(len(inputs), 1)
    if rate < WARN_REGISTRATION_RATE:
        logger.warning(
            "registered %d of %d images (%.0f %%); left out of the reconstruction: %s",
            len(reg), len(inputs), 100 * rate, _names(missing, limit=20),
        )


# ---- existing model ---------------------------------------------------------------------------------


def read_user_model(model_dir: Path, images: Sequence[InputImage], images_dir: Path) -> pycolmap.Reconstruction:
    """The user's COLMAP model, with cameras rescaled to the prepared images' sizes.

    Raises:
        ReconError: unreadable model, registered images missing from the
            images folder, or an image whose size does not fit its camera.
    """
    import pycolmap

    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises ValueError/RuntimeError for malformed files
        raise ReconError(f"{model_dir}: cannot read the COLMAP model ({exc}); fix it or set sfm.use_existing_model=false") from exc
    by_name = {im.name: im for im in images}
    reg = [rec.images[i] for i in rec.reg_image_ids()]
    if not reg:
        raise ReconError(f"{model_dir}: the COLMAP model has no registered images; fix it or set sfm.use_existing_model=false")
    missing = sorted(im.name for im in reg if im.name not in by_name)
    if missing:
        raise ReconError(
            f"{model_dir}: {len(missing)} image(s) of the model are not readable images in {images_dir}: {_names(missing)}; "
            "add them (same names) or set sfm.use_existing_model=false"
        )
    sizes: dict[int, set[tuple[int, int]]] = {}
    for im in reg:
        sizes.setdefault(im.camera_id, set()).add((by_name[im.name].width, by_name[im.name].height))
    for camera_id, wh in sizes.items():
        cam = rec.cameras[camera_id]
        if len(wh) > 1:
            raise ReconError(f"{model_dir}: images of camera {camera_id} have different sizes ({sorted(wh)}); the model does not fit these images")
        (w, h), = wh
        if (w, h) == (cam.width, cam.height):
            continue
        sx, sy = w / cam.width, h / cam.height
        if abs(sx - sy) * max(cam.width, cam.height) > 1.5:  # more than rounding of a uniform downscale
            raise ReconError(
                f"{model_dir}: camera {camera_id} is {cam.width}x{cam.height} but its images are {w}x{h}; "
                "supply the images the model was built from (same orientation)"
            )
        cam.rescale(w, h)
        for im in reg:
            if im.camera_id == camera_id:
                for p in im.points2D:
                    p.xy = p.xy * np.array([sx, sy])
    check_pose_convention(rec, model_dir)
    return rec


MAX_USER_MODEL_REPROJECTION_PX = 10.0
"""A user model whose median reprojection error exceeds this is rejected (wrong pose convention)."""


def check_pose_convention(rec: pycolmap.Reconstruction, model_dir: Path) -> None:
    """Reject a model whose poses cannot explain its own keypoints (e.g. camera→world written as world→camera)."""
    from pipeline.diagnose import reconstruction_reprojection_error

    err = reconstruction_reprojection_error(rec)
    if not np.isnan(err) and err > MAX_USER_MODEL_REPROJECTION_PX:
        raise ReconError(
            f"{model_dir}: the poses do not reproject the model's points onto its keypoints (median error {err:.0f} px); "
            "COLMAP models store world→camera poses — if yours holds camera→world, invert them"
        )


# ---- phase 4: undistortion and the normalized frame ------------------------------------------------------


def observation_depths(rec: pycolmap.Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """Sparse points (M, 3) and the camera-frame depth (K,) of every (point, registered image) observation pair.

    A point seen twice in one image (two keypoints in its track) counts once,
    as in :class:`pipeline.io.SfmScene` (``View.point_ids`` is unique).
    """
    ids = sorted(rec.point3D_ids())
    points = np.array([rec.points3D[i].xyz for i in ids], dtype=np.float64).reshape(-1, 3)
    index = {pid: k for k, pid in enumerate(ids)}
    depths = []
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        obs = np.unique([index[p.point3D_id] for p in image.get_observation_points2D() if p.point3D_id in index]).astype(np.int64)
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

    points, depths = observation_depths(rec)
    try:
        s, c = normalizing_similarity(points, depths)
    except ValueError as exc:
        raise ReconError(f"the SfM model has no sparse points in front of its cameras ({exc}); the later stages need them as scale anchors") from exc
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
                jpeg_quality=cfg.jpeg_quality, num_threads=_threads(cfg.num_threads),
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


def _run_sfm(ctx: StageContext, paths: SfmPaths, images: Sequence[InputImage], seconds: dict[str, float]) -> pycolmap.Reconstruction:
    """Phases 2-3 (reusing a finished database or model of an interrupted run); returns the mapped model."""
    import pycolmap

    cfg: SfmConfig = ctx.settings
    names = [im.name for im in images]
    _remove_database(paths.database_building)  # never trust a half-written database
    if paths.mapped_dir.is_dir():
        rec = pycolmap.Reconstruction(str(paths.mapped_dir))
        if set(registered_names(rec)) <= set(names):
            ctx.logger.info("reusing the mapped model of an interrupted run")
            check_registration(registered_names(rec), names, cfg, ctx.ws.images_dir, source="sfm")
            return rec
    if paths.database.exists() and database_image_names(paths.database) != set(names):
        _remove_database(paths.database)
    if not paths.database.exists():
        groups = camera_groups(images, cfg.camera_mode)
        _seed_colmap(cfg.seed)
        t0 = time.perf_counter()
        with native_output_to(ctx.ws.sfm_log):
            with ctx.bar(desc="SIFT features", total=len(names), unit="img") as bar:
                extract_features(
                    paths.database_building, paths.input_dir, groups, cfg,
                    shared=cfg.camera_mode != CameraMode.per_image, on_done=bar.update,
                )
        seconds["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with native_output_to(ctx.ws.sfm_log):
            with ctx.bar(desc=f"{cfg.matcher.value} matching", total=1, unit="phase") as bar:
                match_features(paths.database_building, cfg)
                bar.update(1)
        raise_if_disk_full(paths.database)  # COLMAP does not always report a failed write
        os.replace(paths.database_building, paths.database)
        seconds["matching"] = time.perf_counter() - t0
        ctx.logger.info("features and matches of %d images in %.1f s", len(names), seconds["features"] + seconds["matching"])
    t0 = time.perf_counter()
    _seed_colmap(cfg.seed)
    work = Path(tempfile.mkdtemp(prefix=".mapping.", dir=paths.stage_dir))
    try:
        with native_output_to(ctx.ws.sfm_log):
            with ctx.bar(desc="mapping (registered images)", total=len(names), unit="img") as bar:

                def on_registered(n: int) -> None:
                    bar.n = min(n, len(names))
                    bar.refresh()

                rec = map_images(paths.database, paths.input_dir, work, cfg, on_registered=on_registered)
        raise_if_disk_full(paths.mapped_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds["mapping"] = time.perf_counter() - t0
    detail = ""
    if rec is None:
        pairs = num_verified_pairs(paths.database)
        detail = ": no image pair shares enough matching features" if pairs == 0 else f": no model could be started from the {pairs} matched image pair(s)"
    check_registration(registered_names(rec) if rec is not None else [], names, cfg, ctx.ws.images_dir, source="sfm", detail=detail)
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
    check_config(cfg)

    t0 = time.perf_counter()
    files, others = scene_files(ws)
    if others and files:
        ctx.logger.warning("skipping %d file(s) that are not JPEG/PNG images in %s: %s", len(others), ws.images_dir,
                           _names([p.relative_to(ws.images_dir).as_posix() for p in others], limit=5))
    with ctx.bar(desc="prepare images", total=len(files), unit="img") as bar:
        images = prepare_inputs(files, ws.images_dir, paths.input_dir, cfg, on_image=lambda: bar.update(1))
    seconds["prepare"] = time.perf_counter() - t0
    names = [im.name for im in images]

    user_model = ws.user_sparse_dir() if cfg.use_existing_model else None
    if user_model is not None:
        t0 = time.perf_counter()
        ctx.logger.info("using the existing COLMAP model %s (no feature extraction or mapping)", user_model)
        rec = read_user_model(user_model, images, ws.images_dir)
        check_registration(registered_names(rec), names, cfg, ws.images_dir, source="model")
        with atomic_dir(paths.mapped_dir) as tmp:
            rec.write_binary(str(tmp))
        seconds["import_model"] = time.perf_counter() - t0
    else:
        _run_sfm(ctx, paths, images, seconds)

    t0 = time.perf_counter()
    final = undistort_and_normalize(paths, cfg)
    seconds["undistort"] = time.perf_counter() - t0

    ctx.summary.update({
        "images": len(images),
        "unreadable": len(files) - len(images),
        "registered": final.num_reg_images(),
        "points3D": final.num_points3D(),
        "reproj_error_px": round(float(final.compute_mean_reprojection_error()), 4),
        "track_length": round(float(final.compute_mean_track_length()), 3),
        "source": "existing model" if user_model is not None else "sfm",
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    })
    ctx.logger.info(
        "registered %d of %d images, %d sparse points (mean reprojection error %.2f px, track length %.2f)",
        ctx.summary["registered"], len(images), ctx.summary["points3D"], ctx.summary["reproj_error_px"], ctx.summary["track_length"],
    )

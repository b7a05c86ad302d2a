"""Reading inputs and the SfM cache: image files, masks, and the scene as views.

The scene every stage after ``sfm`` works on is a :class:`SfmScene`: views
(name, ``K``, ``cam_from_world`` in the normalized frame, undistorted image
path) and the sparse points with the views that observe them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import ReconError
from pipeline.core.workspace import IMAGE_SUFFIXES, Workspace

logger = logging.getLogger(__name__)

T = TypeVar("T")

_EXIF_ORIENTATION = 0x0112


def is_image_name(name: str) -> bool:
    """True for a JPEG or PNG file name (any case: ``a.JPG``, ``b.jPeg``)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def split_image_files(folder: Path, exclude: Sequence[Path] = ()) -> tuple[list[Path], list[Path]]:
    """(image files (JPEG/PNG, any case), other files) under ``folder``, each sorted.

    Left out: hidden files and folders, the folders in ``exclude``, and every
    recon folder wherever it sits (an output folder with a recon manifest, a
    stage folder marked with its fingerprint, see :func:`pipeline.core.cache.is_recon_folder`),
    so recon never reads its own caches as photos.

    Raises:
        ReconError: ``folder`` does not exist.
    """
    from pipeline.core.cache import is_recon_folder

    if not folder.is_dir():
        raise ReconError(f"{folder}: scene folder not found; pass a folder that holds images/ or the photos themselves")
    excluded = {Path(p) for p in exclude}
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = [d for d in dirs
                   if not d.startswith(".") and here / d not in excluded and not is_recon_folder(here / d)]
        for name in files:
            if not name.startswith("."):
                (images if is_image_name(name) else others).append(here / name)
    return sorted(images), sorted(others)


@contextlib.contextmanager
def warnings_named(path: Path) -> Iterator[None]:
    """Python warnings raised while reading ``path`` (PIL: "Corrupt EXIF data", "Possibly corrupt ...")
    logged as one warning line that names the file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = (str(w.message).strip().splitlines() or [""])[0]
        logger.warning("%s: %s", path, text)


def load_rgb(path: Path, max_size: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3), EXIF orientation applied, optional downscale.

    Grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB.
    With ``max_size`` the longer side ends at most ``max_size`` pixels; a JPEG
    at least 4x larger is decoded at a reduced scale first (libjpeg DCT
    scaling to no less than twice the target), so peak memory is bounded by
    about ``(2 max_size)^2`` pixels rather than by the photo's size.

    Raises:
        ReconError: the file cannot be decoded (names the file).
    """
    try:
        with warnings_named(path), Image.open(path) as im:
            # Size as displayed (EXIF orientations 5-8 swap the axes): the output size never depends on the draft.
            full_w, full_h = im.size[::-1] if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else im.size
            if max_size and im.format == "JPEG" and max(im.size) >= 4 * max_size:
                scale = 2 * max_size / max(im.size)
                im.draft(None, (max(1, int(im.width * scale)), max(1, int(im.height * scale))))
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
                im = Image.fromarray(arr)
            im = im.convert("RGB")
            if max_size and max(full_w, full_h) > max_size:
                scale = max_size / max(full_w, full_h)
                im = im.resize((max(1, round(full_w * scale)), max(1, round(full_h * scale))), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ReconError(f"{path}: cannot read image ({exc}); replace or remove the file") from exc


MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Mask file suffixes (any case)."""


def mask_candidates(image_name: str) -> list[str]:
    """Names (relative to ``masks/``, lower-case suffixes) a mask of ``image_name`` may have, in order:
    the photo's name plus a suffix (``a.jpg.png``, COLMAP's convention), then its name without extension (``a.png``)."""
    no_ext = image_name.rsplit(".", 1)[0] if "." in Path(image_name).name else image_name
    return [f"{stem}{ext}" for stem in dict.fromkeys([image_name, no_ext]) for ext in MASK_SUFFIXES]


def claim_files(candidates: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Each name's candidate files less those another name also claims (``a.png`` for ``a.jpg`` and ``a.png``):
    a file two photos could own belongs to neither, so one photo's data is never used for another."""
    claims: dict[Path, int] = {}
    for paths in candidates.values():
        for p in paths:
            claims[p] = claims.get(p, 0) + 1
    return {name: [p for p in paths if claims[p] == 1] for name, paths in candidates.items()}


def find_masks(masks_dir: Path, image_names: Sequence[str]) -> tuple[dict[str, Path], list[Path], list[Path]]:
    """Which file of ``masks_dir`` is each photo's mask.

    Returns:
        (``{image name: mask file}`` for photos that have one, mask files no photo claims, mask files two photos
        claim). Suffixes match in any case; hidden files are left out.
    """
    if not masks_dir.is_dir():
        return {}, [], []
    files = sorted(p for p in masks_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(masks_dir).parts))
    by_key = {p.relative_to(masks_dir).as_posix().lower(): p for p in files if p.suffix.lower() in MASK_SUFFIXES}
    wanted = {name: [by_key[c.lower()] for c in mask_candidates(name) if c.lower() in by_key] for name in image_names}
    owned = claim_files(wanted)
    found = {name: paths[0] for name, paths in owned.items() if paths}
    shared = sorted({p for paths in wanted.values() for p in paths} - {p for paths in owned.values() for p in paths})
    unmatched = [p for p in files if p not in set(found.values()) and p not in shared]
    return found, unmatched, shared


def read_mask(path: Path, shape_hw: tuple[int, int]) -> np.ndarray:
    """A mask file as bool (H, W) resized to ``shape_hw`` (nearest); True (> 127) = keep.

    Raises:
        ReconError: the file cannot be decoded (names it).
    """
    try:
        with warnings_named(path), Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("L").resize((shape_hw[1], shape_hw[0]), Image.Resampling.NEAREST)
            return np.asarray(im) > 127
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ReconError(f"{path}: cannot read mask ({exc}); "
                         "replace it (8-bit image, white = keep) or remove it") from exc


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header."""
    with warnings_named(path), Image.open(path) as im:
        return im.size[::-1] if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else im.size


@dataclass(frozen=True, kw_only=True)
class View:
    """One registered, undistorted image in the normalized frame."""

    name: str
    """Image name as in the COLMAP model (relative to the images folder)."""
    K: np.ndarray
    """3x3 float64 pinhole intrinsics in pixels (COLMAP pixel convention)."""
    cam_from_world: np.ndarray
    """4x4 float64 world→camera pose in the normalized frame."""
    width: int
    height: int
    image_path: Path
    """Undistorted image file."""
    point_ids: np.ndarray = field(repr=False)
    """Indices (into :attr:`SfmScene.points`) of the sparse points this view observes."""

    @property
    def center(self) -> np.ndarray:
        R, t = self.cam_from_world[:3, :3], self.cam_from_world[:3, 3]
        return -R.T @ t


@dataclass(frozen=True, kw_only=True)
class SfmScene:
    """Views and sparse points of the sfm cache (normalized frame)."""

    views: list[View]
    points: np.ndarray
    """(M, 3) float64 sparse points (the scale anchors)."""
    point_colors: np.ndarray
    """(M, 3) uint8."""
    point_errors: np.ndarray
    """(M,) reprojection error in pixels."""
    normalized_from_sfm: np.ndarray
    """4x4 similarity from the SfM (COLMAP) frame to the normalized frame."""

    def view(self, name: str) -> View:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(name)

    def covisibility(self) -> np.ndarray:
        """(V, V) number of sparse points seen by both views."""
        n = len(self.views)
        m = len(self.points)
        incidence = np.zeros((n, m), dtype=np.float32)
        for i, v in enumerate(self.views):
            incidence[i, v.point_ids] = 1.0
        return (incidence @ incidence.T).astype(np.int64)


def load_sfm_scene(ws: Workspace) -> SfmScene:
    """Read the sfm stage's cache (``OUT/sfm/model`` + ``normalization.json``)."""
    import pycolmap

    model_dir = ws.sfm_model_dir
    if not (model_dir / "cameras.bin").exists():
        raise ReconError(f"{model_dir}: no SfM model; run `recon stage sfm {ws.scene_dir}` first")
    rec = pycolmap.Reconstruction(str(model_dir))
    point_ids = sorted(rec.point3D_ids())
    index_of = {pid: i for i, pid in enumerate(point_ids)}
    points = np.array([rec.points3D[p].xyz for p in point_ids], dtype=np.float64).reshape(-1, 3)
    colors = np.array([rec.points3D[p].color for p in point_ids], dtype=np.uint8).reshape(-1, 3)
    errors = np.array([rec.points3D[p].error for p in point_ids], dtype=np.float64)
    views = []
    for image_id in sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name):
        image = rec.images[image_id]
        cam = image.camera
        T = np.eye(4)
        T[:3, :4] = image.cam_from_world().matrix()
        obs = [index_of[p2d.point3D_id] for p2d in image.points2D if p2d.has_point3D() and p2d.point3D_id in index_of]
        views.append(
            View(
                name=image.name,
                K=np.asarray(cam.calibration_matrix(), dtype=np.float64),
                cam_from_world=T,
                width=int(cam.width),
                height=int(cam.height),
                image_path=ws.sfm_images_dir / image.name,
                point_ids=np.unique(np.asarray(obs, dtype=np.int64)),
            )
        )
    norm = np.eye(4)
    if ws.sfm_normalization.exists():
        norm = np.asarray(json.loads(ws.sfm_normalization.read_text())["normalized_from_sfm"], dtype=np.float64)
    return SfmScene(views=views, points=points, point_colors=colors, point_errors=errors, normalized_from_sfm=norm)


@dataclass(frozen=True, kw_only=True)
class DepthMap:
    """One view's depth map as cached by the depth and refine stages (``.npz``).

    Depth is camera-frame z in normalized-frame units at the map's own
    resolution (``K`` is scaled to it); 0 where ``valid`` is False.
    """

    name: str
    depth: np.ndarray
    """(H, W) float32."""
    confidence: np.ndarray
    """(H, W) float32 in [0, 1]."""
    valid: np.ndarray
    """(H, W) bool."""
    K: np.ndarray
    """3x3 float64 intrinsics at this resolution (COLMAP pixel convention)."""
    cam_from_world: np.ndarray
    """4x4 float64 world→camera pose (normalized frame)."""
    stats: dict = field(default_factory=dict)
    """JSON-able per-view numbers (anchoring residuals, timings, Δz statistics)."""
    depth_init: np.ndarray | None = None
    """(H, W) float32 initial depth (refine stage only): ``depth = depth_init + δz``."""
    restored: np.ndarray | None = None
    """(H, W) bool (refine stage only): pixels the depth stage's consistency filter had dropped and refinement keeps."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.shape  # type: ignore[return-value]


def _depth_map_arrays(dm: DepthMap) -> dict[str, np.ndarray]:
    arrays = dict(
        name=np.array(dm.name),
        depth=dm.depth.astype(np.float32),
        confidence=dm.confidence.astype(np.float32),
        valid=dm.valid.astype(bool),
        K=np.asarray(dm.K, dtype=np.float64),
        cam_from_world=np.asarray(dm.cam_from_world, dtype=np.float64),
        stats=np.array(json.dumps(dm.stats, default=float)),
    )
    if dm.depth_init is not None:
        arrays["depth_init"] = dm.depth_init.astype(np.float32)
    if dm.restored is not None:
        arrays["restored"] = dm.restored.astype(bool)
    return arrays


def save_depth_map(path: Path, dm: DepthMap) -> None:
    """Write a :class:`DepthMap` atomically."""
    from pipeline.core.cache import write_npz_atomic

    write_npz_atomic(path, **_depth_map_arrays(dm))


def save_scratch_depth_map(path: Path, dm: DepthMap) -> None:
    """Write a :class:`DepthMap` to a stage's scratch file: uncompressed, not atomic, never a cache
    (the writer reads it back itself; :func:`load_depth_map` reads it). ``path`` must end in ``.npz``."""
    np.savez(path, **_depth_map_arrays(dm))


def load_depth_map(path: Path) -> DepthMap:
    """Read a :class:`DepthMap` written by :func:`save_depth_map` (or :func:`save_scratch_depth_map`)."""
    from pipeline.core.cache import read_npz

    d = read_npz(path)
    return DepthMap(
        name=str(d["name"]),
        depth=d["depth"],
        confidence=d["confidence"],
        valid=d["valid"],
        K=d["K"],
        cam_from_world=d["cam_from_world"],
        stats=json.loads(str(d["stats"])),
        depth_init=d.get("depth_init"),
        restored=d.get("restored"),
    )


class LazySequence(Sequence[T]):
    """A read-only sequence whose items are made on access by ``load(index)`` and not kept.

    For inputs too many to hold at once (every view's depth map and image):
    a stage passes ``LazySequence(len(views), lambda i: load_depth_map(...))``
    where a function takes a ``Sequence``, and each access reads the file again.
    """

    def __init__(self, length: int, load: Callable[[int], T]):
        self._length = int(length)
        self._load = load

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        i = operator.index(index)
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for {self._length} items")
        return self._load(i % self._length)

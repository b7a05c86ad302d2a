"""Photo discovery and preparation for the sfm stage (phase 1).

Finds the scene's photos (never files of recon's own folders), writes each readable one as a clean
input image (8-bit RGB, EXIF orientation applied, longest side ≤ ``sfm.max_image_size``, focal-length
EXIF kept), skips unreadable, too small and duplicate photos with a warning naming them, and groups
the images that share one camera.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.cache import atomic_path
from pipeline.core.errors import OutputError, ReconError
from pipeline.core.io import load_rgb, split_image_files, warnings_named
from pipeline.core.workspace import Workspace
from pipeline.sfm.config import CameraMode, SfmConfig

logger = logging.getLogger(__name__)

_EXIF_IFD = 0x8769
_EXIF_ORIENTATION = 0x0112
_EXIF_KEEP_BASE = (0x010F, 0x0110)  # Make, Model
_EXIF_KEEP_IFD = (0x920A, 0xA405)  # FocalLength (mm), FocalLengthIn35mmFilm
"""EXIF tags copied into re-encoded JPEGs: what COLMAP needs for its focal-length prior.
Resolution-dependent tags (FocalPlaneXResolution, pixel dimensions) are dropped
because a downscaled image would make them wrong."""


@dataclass(frozen=True)
class InputImage:
    """One readable input image after preparation."""

    name: str
    """Path relative to the images folder (POSIX), also the name in the COLMAP model."""
    width: int
    height: int
    camera_key: tuple
    """Images with equal keys share intrinsics in ``camera_mode=auto``: (width, height, make, model, focal mm,
    focal 35 mm)."""
    digest: str = ""
    """:func:`pixel_digest` of the prepared image (equal pictures, equal digests)."""


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
    with warnings_named(src), Image.open(src) as im:
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
    with warnings_named(path), Image.open(path) as im:
        exif = im.getexif()
        ifd = exif.get_ifd(_EXIF_IFD)
        return (im.width, im.height, str(exif.get(0x010F, "")), str(exif.get(0x0110, "")), str(ifd.get(0x920A, "")),
                str(ifd.get(0xA405, "")))


def scene_files(ws: Workspace) -> tuple[list[Path], list[Path]]:
    """(input image files, other files) of the scene (``pipeline.core.io.split_image_files``), never files of recon's
    own folders.

    Recon outputs are left out wherever they sit (the output folder, other runs' outputs, stage folders);
    when the photos sit directly in ``SCENE_DIR``, ``masks/``, ``depth_prior/``, ``sparse/`` and ``gt/``
    are left out too, and other files there (``recon.yaml``, notes) are not reported.
    """
    images_dir = ws.images_dir
    exclude = [ws.out_dir, ws.masks_dir, ws.depth_prior_dir, ws.scene_dir / "sparse", ws.scene_dir / "gt"]
    images, others = split_image_files(images_dir, exclude=exclude)
    others = others if images_dir != ws.scene_dir else []
    return images, others


def scene_images(ws: Workspace) -> list[Path]:
    """The scene's input image files (see :func:`scene_files`)."""
    return scene_files(ws)[0]


MIN_IMAGE_SIDE = 32
"""Shorter side (pixels, as prepared for SfM) below which a photo is skipped. SIFT's descriptor spans a
16-pixel window at its finest scale: COLMAP's affine-shape SIFT crashes on images under 16 pixels on a side,
and an image under two windows gives SfM next to no features."""


def pixel_digest(path: Path) -> str:
    """Hash of an image's decoded RGB pixels (and size): equal for the same picture saved under two names."""
    with warnings_named(path), Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return hashlib.sha256(np.array(rgb.shape, np.int64).tobytes() + rgb.tobytes()).hexdigest()[:16]


def prepare_inputs(
    files: Sequence[Path], images_dir: Path, input_dir: Path, cfg: SfmConfig,
    on_image: Callable[[], None] = lambda: None
) -> list[InputImage]:
    """Phase 1: convert every readable image of ``files`` into ``input_dir`` (files already there are kept).

    Names are the paths relative to ``images_dir``. Returns the readable
    images, sorted by name; unreadable ones, and images under
    :data:`MIN_IMAGE_SIDE` pixels on a side, are skipped with a warning naming
    them (given once all images are read, and only when the stage goes on:
    otherwise the error names them).

    Raises:
        ReconError: no images, or fewer than 3 usable ones.
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
        if min(key[0], key[1]) < MIN_IMAGE_SIDE:
            unreadable[name] = (f"{src}: only {key[0]}x{key[1]} pixels (as prepared for SfM); photos need at least "
                                f"{MIN_IMAGE_SIDE} pixels on each side")
        else:
            out.append(InputImage(name=name, width=key[0], height=key[1], camera_key=key, digest=pixel_digest(dst)))
        on_image()
    if len(out) < 3:
        extra = f" ({len(unreadable)} unreadable or too small: {_names(list(unreadable))})" if unreadable else ""
        raise ReconError(
            f"{images_dir}: only {len(out)} readable image(s){extra}; SfM needs at least 3 overlapping photos; "
            "add more to this folder"
        )
    for reason in unreadable.values():
        logger.warning("skipping %s", reason)
    return sorted(out, key=lambda im: im.name)


def drop_duplicates(images: Sequence[InputImage], images_dir: Path) -> tuple[list[InputImage], dict[str, str]]:
    """The images with each picture once (the first name in order), and ``{duplicate name: name kept}``.

    The same pixels under two names would be two cameras at one pose: SfM
    cannot triangulate between them and later stages see a "view" without
    baseline. Each duplicate is warned about by name.
    """
    kept: dict[str, InputImage] = {}
    duplicates: dict[str, str] = {}
    for im in images:
        first = kept.setdefault(im.digest, im)
        if first is not im:
            duplicates[im.name] = first.name
            logger.warning("skipping %s: the same picture as %s (identical pixels); it is used once",
                           images_dir / im.name, first.name)
    return [im for im in images if im.name not in duplicates], duplicates


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


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

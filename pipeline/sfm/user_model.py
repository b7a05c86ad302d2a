"""A user's COLMAP model in place of SfM (``sfm.use_existing_model``): reading it and checking it fits the photos.

The model's cameras are rescaled to the prepared images; a model is rejected when its poses cannot
explain its own keypoints (:func:`check_pose_convention`) or its keypoints do not show the same
surface in the photos (:func:`check_model_fits_photos`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.core.errors import ReconError
from pipeline.core.io import warnings_named
from pipeline.sfm.inputs import InputImage, _names

if TYPE_CHECKING:
    import pycolmap


def read_user_model(model_dir: Path, images: Sequence[InputImage], images_dir: Path,
                    input_dir: Path) -> pycolmap.Reconstruction:
    """The user's COLMAP model, with cameras rescaled to the prepared images' sizes (in ``input_dir``).

    Raises:
        ReconError: unreadable model, registered images missing from the
            images folder, an image whose size does not fit its camera, poses
            that do not explain the keypoints, or keypoints that do not fit the
            photos (:func:`check_model_fits_photos`).
    """
    import pycolmap

    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises ValueError/RuntimeError for malformed files
        raise ReconError(f"{model_dir}: cannot read the COLMAP model ({exc}); "
                         "fix it or set sfm.use_existing_model=false") from exc
    by_name = {im.name: im for im in images}
    reg = [rec.images[i] for i in rec.reg_image_ids()]
    if not reg:
        raise ReconError(f"{model_dir}: the COLMAP model has no registered images; "
                         "fix it or set sfm.use_existing_model=false")
    missing = sorted(im.name for im in reg if im.name not in by_name)
    if missing:
        raise ReconError(
            f"{model_dir}: {len(missing)} image(s) of the model are not readable images in {images_dir}: "
            f"{_names(missing)}; add them (same names) or set sfm.use_existing_model=false"
        )
    sizes: dict[int, set[tuple[int, int]]] = {}
    for im in reg:
        sizes.setdefault(im.camera_id, set()).add((by_name[im.name].width, by_name[im.name].height))
    for camera_id, wh in sizes.items():
        cam = rec.cameras[camera_id]
        if len(wh) > 1:
            raise ReconError(f"{model_dir}: images of camera {camera_id} have different sizes ({sorted(wh)}); "
                             "the model does not fit these images")
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
    check_model_fits_photos(rec, input_dir, model_dir, images_dir)
    return rec


MODEL_CHECK_IMAGES = 60
"""At most this many images (the most observed) take part in :func:`check_model_fits_photos`."""
MODEL_CHECK_POINTS = 2000
MODEL_CHECK_SIDE = 1000
"""The photos are compared at this longest side (pixels) at most."""


def check_model_fits_photos(rec: pycolmap.Reconstruction, input_dir: Path, model_dir: Path, images_dir: Path) -> None:
    """Reject a model whose keypoints do not land on the same surface in the photos (a model of other photos,
    shuffled image names), see :mod:`pipeline.sfm.model_check`.

    Raises:
        ReconError: naming the images that do not fit and what to do.
    """
    from pipeline.sfm.model_check import MIN_PAIRS, mismatched_images, track_agreement

    reg = sorted((rec.images[i] for i in rec.reg_image_ids()), key=lambda im: -im.num_points3D)[:MODEL_CHECK_IMAGES]
    by_id = {im.image_id: im for im in reg}
    grays: dict[str, np.ndarray] = {}
    scale: dict[str, float] = {}
    for im in by_id.values():
        with warnings_named(input_dir / im.name), Image.open(input_dir / im.name) as pil:
            f = min(1.0, MODEL_CHECK_SIDE / max(pil.size))
            gray = pil.convert("L")
            if f < 1.0:
                gray = gray.resize((max(1, round(pil.width * f)), max(1, round(pil.height * f))),
                                   Image.Resampling.BILINEAR)
            grays[im.name] = np.asarray(gray, dtype=np.float32)
            scale[im.name] = gray.width / pil.width
    rng = np.random.default_rng(0)
    ids = sorted(rec.point3D_ids())
    picked = rng.choice(len(ids), size=min(MODEL_CHECK_POINTS, len(ids)), replace=False) if ids else []
    tracks = []
    for k in sorted(picked):
        track = []
        for el in rec.points3D[ids[k]].track.elements:
            im = by_id.get(el.image_id)
            if im is not None:
                track.append((im.name, np.asarray(im.points2D[el.point2D_idx].xy, np.float64) * scale[im.name]))
        if len(track) >= 2:
            tracks.append(track)
    agreement = track_agreement(tracks, grays.__getitem__)
    bad = mismatched_images(agreement)
    if bad:
        judged = sum(1 for a in agreement.values() if a.pairs >= MIN_PAIRS)
        detail = ", ".join(f"{n} ({agreement[n].matched:.2f} vs {agreement[n].control:.2f})" for n in bad[:5])
        raise ReconError(
            f"{model_dir}: the model does not fit the photos in {images_dir}: in {len(bad)} of {judged} images "
            "its keypoints do not show the same surface as in the other photos "
            f"(patch correlation, keypoints vs elsewhere: {detail}); "
            "the model was built from other photos or its image names are mixed up; "
            "supply the matching model or set sfm.use_existing_model=false"
        )


MAX_USER_MODEL_REPROJECTION_PX = 10.0
"""A user model whose median reprojection error exceeds this is rejected (wrong pose convention)."""


def check_pose_convention(rec: pycolmap.Reconstruction, model_dir: Path) -> None:
    """Reject a model whose poses cannot explain its own keypoints (e.g. camera→world written as world→camera)."""
    from pipeline.analysis.diagnose import reconstruction_reprojection_error

    err = reconstruction_reprojection_error(rec)
    if not np.isnan(err) and err > MAX_USER_MODEL_REPROJECTION_PX:
        raise ReconError(
            f"{model_dir}: the poses do not reproject the model's points onto its keypoints "
            f"(median error {err:.0f} px); COLMAP models store world→camera poses — "
            "if yours holds camera→world, invert them"
        )

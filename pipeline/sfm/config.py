"""Settings of the sfm stage (COLMAP structure-from-motion); light to import: checked when the config loads."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.core.settings import Check, at_least, between, setting, threads


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


def colmap_camera_models() -> list[str]:
    """Names of COLMAP's camera models (``SIMPLE_RADIAL``, ``OPENCV``, ...)."""
    import pycolmap

    return sorted(m for m in dir(pycolmap.CameraModelId) if m.isupper() and m != "INVALID")


CLASSIC_CAMERA_MODELS: frozenset[str] = frozenset({
    "SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "OPENCV_FISHEYE", "FULL_OPENCV", "FOV",
    "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "THIN_PRISM_FISHEYE",
})
"""Models every COLMAP has had: accepted without importing pycolmap (0.1 s), so the config loads fast."""


def colmap_camera_model() -> Check:
    """A camera model of the installed COLMAP (pycolmap is asked only about those not in CLASSIC_CAMERA_MODELS)."""
    return Check("a COLMAP camera model (SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, ...)",
                 lambda v: v in CLASSIC_CAMERA_MODELS or v in colmap_camera_models())


@dataclass(kw_only=True)
class SfmConfig:
    matcher: Matcher = setting(
        Matcher.exhaustive, "Feature matching: exhaustive (small sets) or sequential (video frames).")
    max_image_size: int = setting(
        2000, "Longest image side in pixels for SIFT extraction and undistortion; larger images are downscaled.",
        check=at_least(64))
    max_num_features: int = setting(8192, "Maximum SIFT features per image.", check=at_least(100))
    estimate_affine_shape: bool = setting(
        True, "Affine-covariant SIFT: slower extraction, many more matches between views far apart (wide baselines).")
    camera_model: str = setting(
        "SIMPLE_RADIAL", "COLMAP camera model estimated for the photos (e.g. SIMPLE_RADIAL, RADIAL, OPENCV, PINHOLE); "
        "undistorted to PINHOLE afterwards.", check=colmap_camera_model())
    camera_mode: CameraMode = setting(
        CameraMode.auto, "Which images share intrinsics: auto (same size and EXIF camera/focal), single (all) or "
        "per_image.")
    sequential_overlap: int = setting(
        10, "Sequential matching: number of following frames each frame is matched with.", check=at_least(1))
    retry_registered_fraction: float = setting(
        0.95, "When fewer than this share of the photos register, SfM tries again with more SIFT features and relaxed "
        "registration thresholds and keeps the model that registers most (0 = never retry).", check=between(0, 1))
    min_registered: int = setting(3, "Fail when fewer images than this register.", check=at_least(2))
    use_existing_model: bool = setting(
        True, "Use SCENE_DIR/sparse/0 (or SCENE_DIR/sparse) instead of running SfM when present.")
    seed: int = setting(
        0, "Random seed for COLMAP (RANSAC, mapping) so runs are repeatable (-1: not seeded).", check=at_least(-1))
    jpeg_quality: int = setting(
        95, "JPEG quality (1-100) of JPEG images the stage re-encodes (downscaled, rotated or undistorted).",
        check=between(1, 100))
    num_threads: int = setting(
        -1, "CPU threads for COLMAP feature extraction, matching and undistortion (-1: all cores; the result is the "
        "same for any count).", affects_output=False, check=threads())
    mapper_threads: int = setting(
        1, "CPU threads of COLMAP's incremental mapping, i.e. bundle adjustment (-1: all, faster on large scenes; 1 "
        "keeps SfM repeatable run to run).", check=threads())
    global_ba_growth: float = setting(
        1.3, "Incremental mapping re-adjusts the whole model when its registered images or points have grown by this "
        "factor since the last global bundle adjustment (COLMAP: 1.1; the finished model is always adjusted).",
        check=at_least(1.0))

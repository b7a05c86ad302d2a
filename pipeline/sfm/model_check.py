"""Does a user's COLMAP model belong to these photos? The photos around each sparse point's keypoints must agree.

A model's own numbers cannot tell: a model of other photos, or one whose image
names are shuffled, still reprojects its points onto its keypoints perfectly.
The photos can: the keypoints of one 3D point, seen in two photos, sit on the
same piece of surface, so small patches around them look alike (high zero-mean
normalized cross-correlation, ZNCC), while a patch elsewhere in the photo does
not. :func:`track_agreement` measures both for every image: the median ZNCC of
its keypoint pairs (*matched*) and of the same pairs with the partner's patch
moved away (*control*). An image whose matched patches agree no better than
the control ones (:func:`mismatched_images`) is not the photo the model was
built from.

Pixel convention: COLMAP's, a keypoint at ``(x, y)`` lies in pixel ``(floor(x), floor(y))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PATCH_RADIUS = 5
"""Patches are (2r+1)^2 pixels."""
MIN_PATCH_STD = 2.0
"""Patches flatter than this (grey levels, 0-255) carry no evidence and are left out."""
MIN_PAIRS = 12
"""An image is judged only when it has at least this many textured keypoint pairs."""
MIN_GAIN = 0.3
"""Matched minus control median ZNCC below this: the image does not show what its keypoints say. Measured
(docs/results.md): the lowest image of a true model 0.56 (rendered scenes' ground-truth models, random surface
points) and 0.89-0.90 (COLMAP models of real and rendered photos); swapped or shuffled images -0.05 to 0.02."""


@dataclass(frozen=True)
class ImageAgreement:
    """How well one image's keypoints agree with the other photos of their points."""

    pairs: int
    """Textured keypoint pairs (this image, another image of the same 3D point) that were compared."""
    matched: float
    """Median ZNCC of those pairs' patches (1 = identical up to gain and offset; NaN without pairs)."""
    control: float
    """Median ZNCC when the partner's patch is taken away from its keypoint (what unrelated patches give)."""

    @property
    def gain(self) -> float:
        return self.matched - self.control


def zncc(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalized cross-correlation of two patches of one shape, in [-1, 1] (0 when one is flat)."""
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def patch_at(gray: np.ndarray, xy: np.ndarray, radius: int = PATCH_RADIUS) -> np.ndarray | None:
    """The (2r+1)^2 patch of ``gray`` (H, W) centred on the pixel holding ``xy``; None when it leaves the image."""
    u, v = int(np.floor(xy[0])), int(np.floor(xy[1]))
    h, w = gray.shape
    if u - radius < 0 or v - radius < 0 or u + radius >= w or v + radius >= h:
        return None
    return gray[v - radius : v + radius + 1, u - radius : u + radius + 1]


def _textured(patch: np.ndarray | None) -> bool:
    return patch is not None and float(patch.std()) >= MIN_PATCH_STD


def bilinear(gray: np.ndarray, xy: np.ndarray) -> np.ndarray | None:
    """``gray`` sampled at continuous COLMAP coordinates ``xy`` (..., 2) (pixel centres at +0.5); None if any falls
    outside."""
    u, v = xy[..., 0] - 0.5, xy[..., 1] - 0.5
    h, w = gray.shape
    if u.min() < 0 or v.min() < 0 or u.max() > w - 1 or v.max() > h - 1:
        return None
    u0, v0 = np.minimum(np.floor(u).astype(int), w - 2), np.minimum(np.floor(v).astype(int), h - 2)
    fu, fv = u - u0, v - v0
    top = gray[v0, u0] * (1 - fu) + gray[v0, u0 + 1] * fu
    bottom = gray[v0 + 1, u0] * (1 - fu) + gray[v0 + 1, u0 + 1] * fu
    return top * (1 - fv) + bottom * fv


def local_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine map ``dst ≈ [src, 1] @ A`` (A: 3x2) of point pairs (N, 2) each, and its RMS residual in
    pixels."""
    X = np.hstack([src, np.ones((len(src), 1))])
    A, *_ = np.linalg.lstsq(X, dst, rcond=None)
    rms = float(np.sqrt(np.mean(np.sum((X @ A - dst) ** 2, axis=1))))
    return A, rms


def track_agreement(
    tracks: list[list[tuple[str, np.ndarray]]],
    gray_of: Callable[[str], np.ndarray],
    *,
    pairs_per_point: int = 2,
    radius: int = PATCH_RADIUS,
    neighbours: int = 8,
    max_affine_rms: float = 2.0,
    seed: int = 0,
) -> dict[str, ImageAgreement]:
    """:class:`ImageAgreement` of every image that has keypoints in ``tracks``.

    For a pair of observations (image a, image b) of one point, the patch of
    b is sampled through the affine map fitted to the keypoints of the
    ``neighbours`` points nearest to it in a that both images see, so that
    viewpoint changes (rotation, scale, foreshortening) do not hide a match;
    pairs whose neighbourhood is not affine within ``max_affine_rms`` pixels
    (depth edges) are left out.

    Args:
        tracks: per 3D point, its observations ``(image name, keypoint xy)`` (at least two).
        gray_of: an image's grey levels (H, W), 0-255, at the resolution of the keypoints.
        pairs_per_point: observation pairs compared per point (random, seeded).
        radius: patch radius in pixels (in image a).
        seed: the random choices (pairs, control offsets).
    """
    rng = np.random.default_rng(seed)
    # Per image pair: the shared points' keypoints, to fit local affine maps from.
    shared: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for track in tracks:
        for i, (na, xa) in enumerate(track):
            for nb, xb in track[i + 1 :]:
                if na != nb:
                    shared.setdefault((na, nb), []).append((xa, xb))
                    shared.setdefault((nb, na), []).append((xb, xa))
    arrays = {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in shared.items()}
    grid = np.stack(np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1)),
                    -1).reshape(-1, 2).astype(np.float64)
    matched: dict[str, list[float]] = {}
    control: dict[str, list[float]] = {}
    for track in tracks:
        if len(track) < 2:
            continue
        for _ in range(pairs_per_point):
            i, j = rng.choice(len(track), size=2, replace=False)
            (name_a, xy_a), (name_b, _) = track[i], track[j]
            if name_a == name_b:
                continue
            src, dst = arrays[(name_a, name_b)]
            if len(src) < neighbours:
                continue
            near = np.argsort(np.sum((src - xy_a) ** 2, axis=1))[:neighbours]
            A, rms = local_affine(src[near], dst[near])
            if rms > max_affine_rms:
                continue
            pts_a = xy_a + grid
            gray_a, gray_b = gray_of(name_a), gray_of(name_b)
            pa = bilinear(gray_a, pts_a)
            pb = bilinear(gray_b, np.hstack([pts_a, np.ones((len(pts_a), 1))]) @ A)
            offset = rng.choice([-1, 1], size=2) * rng.uniform(3 * radius, 6 * radius, size=2)
            pc = bilinear(gray_b, np.hstack([pts_a, np.ones((len(pts_a), 1))]) @ A + offset)
            if pa is None or pb is None or pc is None or min(pa.std(), pb.std(), pc.std()) < MIN_PATCH_STD:
                continue
            m, c = zncc(pa, pb), zncc(pa, pc)
            for name in (name_a, name_b):
                matched.setdefault(name, []).append(m)
                control.setdefault(name, []).append(c)
    return {
        name: ImageAgreement(pairs=len(values), matched=float(np.median(values)),
                             control=float(np.median(control[name])))
        for name, values in matched.items()
    }


def mismatched_images(agreement: dict[str, ImageAgreement], *, min_pairs: int = MIN_PAIRS,
                      min_gain: float = MIN_GAIN) -> list[str]:
    """Images (sorted) with enough evidence whose keypoint patches agree no better than unrelated ones."""
    return sorted(name for name, a in agreement.items() if a.pairs >= min_pairs and a.gain < min_gain)

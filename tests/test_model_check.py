"""pipeline.sfm.model_check: does a COLMAP model belong to the photos? (patches around a point's keypoints must
agree)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.sfm.model_check import ImageAgreement, bilinear, local_affine, mismatched_images, track_agreement, zncc


def _texture(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((h // 4, w // 4)) * 255
    return np.kron(small, np.ones((4, 4)))[:h, :w].astype(np.float32)


def test_zncc_ignores_gain_and_offset_and_sees_unrelated_patches():
    rng = np.random.default_rng(0)
    a = rng.random((11, 11))
    assert zncc(a, 3.0 * a + 40.0) == pytest.approx(1.0)
    assert zncc(a, -a) == pytest.approx(-1.0)
    assert abs(zncc(a, rng.random((11, 11)))) < 0.4
    assert zncc(a, np.ones((11, 11))) == 0.0


def test_bilinear_samples_at_colmap_pixel_centres():
    gray = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(bilinear(gray, np.array([[0.5, 0.5], [1.5, 0.5], [1.0, 1.5]])), [0.0, 1.0, 4.5])
    assert bilinear(gray, np.array([[0.2, 0.5]])) is None


def test_local_affine_recovers_an_exact_map():
    rng = np.random.default_rng(0)
    src = rng.random((8, 2)) * 100
    A = np.array([[0.9, 0.2], [-0.1, 1.1], [5.0, -3.0]])
    fitted, rms = local_affine(src, np.hstack([src, np.ones((8, 1))]) @ A)
    np.testing.assert_allclose(fitted, A, atol=1e-9)
    assert rms < 1e-9


def _two_views(shift: np.ndarray, wrong_second: bool):
    """Image b is image a moved by ``shift`` pixels (or an unrelated texture); points on a grid seen by both."""
    a = _texture(seed=0)
    b = np.roll(a, shift=(int(shift[1]), int(shift[0])), axis=(0, 1)) if not wrong_second else _texture(seed=1)
    xs = np.stack(np.meshgrid(np.arange(25.5, 130, 9), np.arange(25.5, 95, 9)), -1).reshape(-1, 2)
    tracks = [[("a.png", xy), ("b.png", xy + shift)] for xy in xs]
    return tracks, {"a.png": a, "b.png": b}


def test_the_right_photos_agree_and_the_wrong_ones_do_not():
    tracks, grays = _two_views(np.array([6.0, -4.0]), wrong_second=False)
    right = track_agreement(tracks, grays.__getitem__)
    assert right["a.png"].pairs >= 20 and right["a.png"].matched > 0.95 and right["a.png"].gain > 0.5
    assert mismatched_images(right) == []
    tracks, grays = _two_views(np.array([6.0, -4.0]), wrong_second=True)
    wrong = track_agreement(tracks, grays.__getitem__)
    assert wrong["b.png"].gain < 0.1
    assert mismatched_images(wrong) == ["a.png", "b.png"]


def test_images_with_too_little_evidence_are_not_judged():
    agreement = {"few.png": ImageAgreement(pairs=3, matched=0.0, control=0.0),
                 "bad.png": ImageAgreement(pairs=40, matched=0.05, control=0.02),
                 "good.png": ImageAgreement(pairs=40, matched=0.8, control=0.1)}
    assert mismatched_images(agreement) == ["bad.png"]

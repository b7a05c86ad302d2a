"""Projection maths: round trips, hand-computed values, similarity estimation."""

import numpy as np
import pytest
import torch

from pipeline.core.geometry import backproject, pixel_grid, project, sample_image, to_grid_coords, transform_points
from pipeline.core.poses import (
    camera_center,
    invert_pose,
    normalizing_similarity,
    scale_intrinsics,
    transform_pose_by_similarity,
    umeyama,
)


def random_pose(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = q, rng.normal(size=3)
    return T


def test_project_hand_computed(device):
    K = torch.tensor([[[100.0, 0, 50], [0, 100, 40], [0, 0, 1]]], device=device)
    pts = torch.tensor([[[0.1, -0.2, 2.0]]], device=device)
    uv, z = project(pts, K)
    assert torch.allclose(uv, torch.tensor([[[55.0, 30.0]]], device=device))
    assert z.item() == 2.0


def test_backproject_project_round_trip(device):
    K = torch.tensor([[[300.0, 0, 160], [0, 310, 120], [0, 0, 1]]], device=device, dtype=torch.float64)
    uv = torch.rand(1, 50, 2, device=device, dtype=torch.float64) * torch.tensor([320.0, 240.0], device=device,
                                                                                 dtype=torch.float64)
    depth = 0.5 + torch.rand(1, 50, device=device, dtype=torch.float64)
    T = torch.tensor(random_pose(np.random.default_rng(0)), device=device)[None]
    world = transform_points(torch.linalg.inv(T), backproject(uv, depth, K))
    uv2, z2 = project(transform_points(T, world), K)
    assert torch.allclose(uv2, uv, atol=1e-9) and torch.allclose(z2, depth, atol=1e-12)


def test_pixel_grid_centres_and_grid_coords():
    g = pixel_grid(2, 3)
    assert g[0, 0].tolist() == [0.5, 0.5] and g[1, 2].tolist() == [2.5, 1.5]
    gc = to_grid_coords(torch.tensor([[0.0, 0.0], [3.0, 2.0]]), 2, 3)
    assert gc.tolist() == [[-1.0, -1.0], [1.0, 1.0]]


def test_sample_image_reads_pixel_centres_exactly():
    img = torch.arange(12.0).reshape(1, 1, 3, 4)
    uv = pixel_grid(3, 4).reshape(1, -1, 2)
    assert torch.allclose(sample_image(img, uv)[0, 0], img.flatten(), atol=1e-5)


def test_scale_intrinsics_matches_pixel_convention():
    K = np.array([[200.0, 0, 160], [0, 200, 120], [0, 0, 1]])
    K2 = scale_intrinsics(K, 0.5)
    assert K2[0, 2] == 80 and K2[1, 2] == 60 and K2[0, 0] == 100


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(20, 3))
    T = random_pose(rng)
    dst = 2.5 * src @ T[:3, :3].T + T[:3, 3]
    s, R, t = umeyama(src, dst)
    assert s == pytest.approx(2.5)
    np.testing.assert_allclose(R, T[:3, :3], atol=1e-9)
    np.testing.assert_allclose(t, T[:3, 3], atol=1e-9)


def test_pose_under_similarity_moves_centre_and_scales_depth():
    rng = np.random.default_rng(2)
    T = random_pose(rng)
    s, R, t = 3.0, random_pose(rng)[:3, :3], np.array([1.0, 2, 3])
    T2 = transform_pose_by_similarity(T, s, R, t)
    np.testing.assert_allclose(camera_center(T2), s * R @ camera_center(T) + t, atol=1e-9)
    x = rng.normal(size=3)
    z1 = (T[:3, :3] @ x + T[:3, 3])[2]
    z2 = (T2[:3, :3] @ (s * R @ x + t) + T2[:3, 3])[2]
    assert z2 == pytest.approx(s * z1)
    np.testing.assert_allclose(invert_pose(T) @ T, np.eye(4), atol=1e-12)


def test_normalizing_similarity_sets_median_depth_to_one():
    s, c = normalizing_similarity(np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]]), np.array([4.0, 5.0, 6.0]))
    assert s == pytest.approx(0.2)
    np.testing.assert_allclose(c, [1, 1, 1])
    with pytest.raises(ValueError):
        normalizing_similarity(np.zeros((0, 3)), np.array([]))


@pytest.mark.parametrize("batch, transforms", [(1, 1), (3, 3), (3, 1)])
def test_transform_points_is_rotation_then_translation(batch, transforms):
    gen = torch.Generator().manual_seed(batch * 10 + transforms)
    points = torch.randn(batch, 500, 3, generator=gen, dtype=torch.float64)
    T = torch.randn(transforms, 4, 4, generator=gen, dtype=torch.float64)
    expected = torch.einsum("bij,bnj->bni", T[:, :3, :3].expand(batch, 3, 3), points) + T[:, None, :3, 3]
    assert torch.allclose(transform_points(T, points), expected, rtol=1e-12, atol=1e-12)

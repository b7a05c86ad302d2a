"""Refinement losses (pipeline/refine/losses.py): hand-computed values, the occlusion test, gradients."""

import math

import pytest
import torch

from pipeline.core.geometry import backproject, inside_image, pixel_grid, sample_image
from pipeline.refine import losses

# ---- Huber --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, expected",
    [
        (0.0, 0.0),
        (0.005, 0.5 * 0.005**2),  # quadratic inside: 1.25e-5
        (-0.005, 0.5 * 0.005**2),
        (0.0099, 0.5 * 0.0099**2),  # just inside
        (0.01, 0.01 * (0.01 - 0.005)),  # at δ: linear branch, = 0.5 δ² = 5e-5
        (0.0101, 0.01 * (0.0101 - 0.005)),  # just outside
        (-0.02, 0.01 * (0.02 - 0.005)),  # 1.5e-4
        (1.0, 0.01 * (1.0 - 0.005)),
    ],
)
def test_huber_hand_computed(x, expected, device):
    out = losses.huber(torch.tensor([x], dtype=torch.float64, device=device), 0.01)
    assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_huber_continuous_value_and_slope_at_delta(device):
    delta = 0.01
    x = torch.tensor([delta - 1e-9, delta, delta + 1e-9], dtype=torch.float64, device=device, requires_grad=True)
    y = losses.huber(x, delta)
    # |Δ| ≈ δ·1e-9
    assert y[0].item() == pytest.approx(y[1].item(), abs=2e-11) and y[2].item() == pytest.approx(y[1].item(), abs=2e-11)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.full_like(g, delta), atol=1e-8)  # slope δ on both sides


def test_huber_is_not_l2_for_outliers(device):
    x = torch.tensor([0.5], device=device)
    assert losses.huber(x, 0.01).item() < 0.01 * 0.5  # linear growth
    assert losses.huber(x, 0.01).item() < 0.5 * 0.5**2 / 10


def test_huber_rejects_bad_delta():
    with pytest.raises(ValueError):
        losses.huber(torch.zeros(1), 0.0)


def test_huber_gradcheck():
    x = torch.tensor([-0.3, -0.012, -0.004, 0.0, 0.003, 0.02, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: losses.huber(t, 0.01), (x,))


# ---- reprojection and the occlusion test ---------------------------------------------------

def _pose(tx: float) -> torch.Tensor:
    T = torch.eye(4, dtype=torch.float64)
    T[0, 3] = tx  # camera centre at x = -tx (cam_from_world)
    return T


def test_reproject_round_trip(device):
    K = torch.tensor([[[200.0, 0, 80], [0, 210, 60], [0, 0, 1]]], dtype=torch.float64, device=device)
    # a small rotation (axis-angle 0.2 rad) and a baseline: every point stays in front of both cameras
    axis = torch.tensor([0.3, -0.8, 0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    Kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.linalg.matrix_exp(0.2 * Kx)
    T[:3, 3] = torch.tensor([0.1, -0.2, 0.05])
    T = T[None].to(device)
    uv = torch.rand(1, 64, 2, dtype=torch.float64, device=device) * torch.tensor([160.0, 120.0], dtype=torch.float64,
                                                                                 device=device)
    depth = 1.0 + torch.rand(1, 64, dtype=torch.float64, device=device)
    uv_b, z_b = losses.reproject(uv, depth, K, K, T)
    uv_a, z_a = losses.reproject(uv_b, z_b, K, K, torch.linalg.inv(T))
    assert torch.allclose(uv_a, uv, atol=1e-9) and torch.allclose(z_a, depth, atol=1e-12)
    # identity: same pixel, same depth
    uv_i, z_i = losses.reproject(uv, depth, K, K, torch.eye(4, dtype=torch.float64, device=device)[None])
    assert torch.allclose(uv_i, uv) and torch.allclose(z_i, depth)


def test_reproject_equals_back_projecting_transforming_and_projecting(device):
    """The ray-homography form gives the points and the depth gradient of the three-step composition."""
    from pipeline.core.geometry import backproject, project, transform_points

    g = torch.Generator().manual_seed(0)
    K_src = torch.tensor([[[200.0, 0, 80], [0, 210, 60], [0, 0, 1]], [[150.0, 0, 70], [0, 150, 50], [0, 0, 1]]],
                         dtype=torch.float64)
    K_dst = K_src.flip(0)
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    T[:, :3, :3] = torch.linalg.matrix_exp(0.1 * (lambda a: a - a.transpose(1, 2))(torch.randn(2, 3, 3, generator=g,
                                                                                              dtype=torch.float64)))
    T[:, :3, 3] = 0.2 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    K_src, K_dst, T = K_src.to(device), K_dst.to(device), T.to(device)
    uv = (torch.rand(2, 50, 2, generator=g, dtype=torch.float64) * torch.tensor([160.0, 120.0],
                                                                               dtype=torch.float64)).to(device)
    depth = (1.0 + torch.rand(2, 50, generator=g, dtype=torch.float64)).to(device).requires_grad_(True)
    uv_dst, z = losses.reproject(uv, depth, K_src, K_dst, T)
    (grad,) = torch.autograd.grad((uv_dst.sum(-1) + z).sum(), depth)
    uv_ref, z_ref = project(transform_points(T, backproject(uv, depth, K_src)), K_dst)
    (grad_ref,) = torch.autograd.grad((uv_ref.sum(-1) + z_ref).sum(), depth)
    assert torch.allclose(uv_dst, uv_ref, atol=1e-9) and torch.allclose(z, z_ref, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=1e-9, atol=1e-9)


def _two_view_scene(occluder_z: float, device) -> dict:
    """Views A (centre x=0) and B (centre x=0.5) looking down +z at a wall z=2; a square occluder
    at z=occluder_z covers x in [0.3, 0.7], y in [-1, 1] (world). Depth maps by ray casting."""
    h, w, f = 60, 80, 40.0
    K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=torch.float64)
    maps = {}
    for name, cx in (("A", 0.0), ("B", 0.5)):
        uv = pixel_grid(h, w, dtype=torch.float64).reshape(1, -1, 2)
        rays = backproject(uv, torch.ones(1, h * w, dtype=torch.float64), K[None])[0]  # z = 1
        x_occ = cx + rays[:, 0] * occluder_z
        hit_occ = (x_occ >= 0.3) & (x_occ <= 0.7)
        maps[name] = torch.where(hit_occ, torch.tensor(occluder_z, dtype=torch.float64),
                                 torch.tensor(2.0, dtype=torch.float64)).reshape(1, 1, h, w)
    return {"K": K[None].to(device), "A": maps["A"].to(device), "B": maps["B"].to(device),
            "B_from_A": _pose(-0.5)[None].to(device), "h": h, "w": w}


def test_occlusion_mask_hand_values():
    z = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0])
    s2 = torch.tensor([2.0, 1.6, 1.0, 2.4, 0.0])
    keep = losses.occlusion_mask(z, s2, 0.25)
    assert keep.tolist() == [True, True, False, True, False]  # |Δ|/z: 0, 0.2, 0.5 (occluded), 0.2, no depth
    one_sided = losses.occlusion_mask(z, s2, 0.25, behind_tol=0.05)
    assert one_sided.tolist() == [True, False, False, True, False]  # 20 % behind → occluded; 20 % in front → kept


def test_occlusion_mask_drops_sample_hidden_behind_occluder(device):
    sc = _two_view_scene(occluder_z=1.0, device=device)
    # Pixels of A on the wall (depth 2) whose wall point is hidden by the occluder in B.
    h, w = sc["h"], sc["w"]
    uv = pixel_grid(h, w, device=device, dtype=torch.float64).reshape(1, -1, 2)
    dA = sc["A"].reshape(1, -1)
    uv_b, z_sel = losses.reproject(uv, dA, sc["K"], sc["K"], sc["B_from_A"])
    inside = (uv_b[..., 0] > 1) & (uv_b[..., 0] < w - 1) & (uv_b[..., 1] > 1) & (uv_b[..., 1] < h - 1)
    sampled2 = sample_image(sc["B"], uv_b)[:, 0]
    # World x of the wall point seen by A: x = u_norm * 2; hidden in B where B's ray hits the occluder first.
    x_wall = (uv[..., 0] - w / 2) / 40.0 * dA
    ray_b_x_at_occ = 0.5 + (x_wall - 0.5) * (1.0 / 2.0)  # B's ray through the wall point, at z = 1
    hidden = (dA == 2.0) & (ray_b_x_at_occ > 0.32) & (ray_b_x_at_occ < 0.68) & inside
    visible = (dA == 2.0) & ((ray_b_x_at_occ < 0.28) | (ray_b_x_at_occ > 0.72)) & inside
    assert hidden.sum() > 20 and visible.sum() > 200
    keep = losses.occlusion_mask(z_sel, sampled2, tol=0.25)
    assert not keep[hidden].any(), "a wall point hidden behind the occluder in B must be dropped"
    assert keep[visible].all(), "a wall point B also sees must be kept"
    # The L_mv of the consistent GT maps is ~0 once occluded samples are dropped.
    loss, kept = losses.multiview_loss(z_sel, sampled2, inside, delta=1e-2, tol=0.25)
    assert kept[visible].all() and loss.item() < 1e-6


def test_one_sided_test_drops_small_gap_occlusion(device):
    """A small depth gap (occluder at z=1.8 in front of the wall at 2: 10 %) passes the symmetric
    25 % test — the sample would be pulled onto the occluder — but not the one-sided one."""
    sc = _two_view_scene(occluder_z=1.8, device=device)
    h, w = sc["h"], sc["w"]
    uv = pixel_grid(h, w, device=device, dtype=torch.float64).reshape(1, -1, 2)
    dA = sc["A"].reshape(1, -1)
    uv_b, z_sel = losses.reproject(uv, dA, sc["K"], sc["K"], sc["B_from_A"])
    sampled2 = sample_image(sc["B"], uv_b)[:, 0]
    behind = (z_sel - sampled2) / z_sel > 0.08  # wall points hidden by the near occluder in B
    assert behind.sum() > 20
    assert losses.occlusion_mask(z_sel, sampled2, 0.25)[behind].all()
    assert not losses.occlusion_mask(z_sel, sampled2, 0.25, behind_tol=0.05)[behind].any()


def test_multiview_loss_value_and_relative_residual():
    z = torch.tensor([1.0, 2.0, 4.0, 1.0])
    s2 = torch.tensor([1.004, 2.0, 3.9, 0.5])  # residuals -0.004, 0, 0.025, (0.5: occluded)
    inside = torch.tensor([True, True, True, True])
    loss, keep = losses.multiview_loss(z, s2, inside, delta=0.01, tol=0.25)
    r = torch.tensor([(1.0 - 1.004) / (1.0 + 1e-6), 0.0, (4.0 - 3.9) / (4.0 + 1e-6)])
    expected = losses.huber(r, 0.01).mean()
    assert keep.tolist() == [True, True, True, False]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # samples outside the image or behind the neighbour never count
    loss2, keep2 = losses.multiview_loss(torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 1.0]),
                                         torch.tensor([True, False]), delta=0.01, tol=0.25)
    assert not keep2.any() and loss2.item() == 0.0


def test_multiview_loss_gradcheck():
    z = torch.tensor([1.0, 2.0, 3.0, 1.5], dtype=torch.float64, requires_grad=True)
    s2 = torch.tensor([1.003, 1.95, 3.1, 1.5], dtype=torch.float64, requires_grad=True)
    inside = torch.ones(4, dtype=torch.bool)
    w = torch.tensor([1.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: losses.multiview_loss(a, b, inside, delta=0.01, tol=0.25, weight=w)[0],
                                    (z, s2))


def test_multiview_loss_through_a_neighbour_map_has_finite_gradients(device):
    """Points behind the neighbour, outside it and on its holes: loss and gradients stay finite.

    The neighbour's full depth map is read bilinearly at the reprojections (reproject → sample_image → multiview_loss).
    """
    K = torch.tensor([[[50.0, 0, 20], [0, 50, 15], [0, 0, 1]]], device=device)
    depth_dst = torch.rand(1, 1, 30, 40, device=device) + 1.0
    depth_dst[..., :5, :] = 0.0  # a hole
    uv = torch.rand(1, 200, 2, device=device) * torch.tensor([40.0, 30.0], device=device)
    d = (torch.rand(1, 200, device=device) * 3.0 - 0.5).requires_grad_(True)  # some behind the camera
    T = torch.eye(4, device=device)[None].clone()
    T[0, 0, 3] = 0.3
    T[0, 2, 3] = -1.0
    uv_dst, z_sel = losses.reproject(uv, d, K, K, T)
    sampled2 = sample_image(depth_dst, uv_dst)[:, 0]
    loss, keep = losses.multiview_loss(z_sel, sampled2, inside_image(uv_dst, 30, 40), delta=0.01, tol=0.25)
    (g,) = torch.autograd.grad(loss, d)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and keep.any() and not keep.all()


# ---- anchoring ---------------------------------------------------------------------------

def test_anchor_loss_value_and_mask():
    d_at = torch.tensor([1.01, 2.0, 5.0, 3.0])
    z = torch.tensor([1.0, 2.1, 4.0, 3.0])
    mask = torch.tensor([True, True, True, False])
    r = torch.tensor([0.01, -0.1 / 2.1, 0.25])
    expected = losses.huber(r, 0.01).mean()
    assert losses.anchor_loss(d_at, z, mask, delta=0.01).item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.anchor_loss(d_at, z, torch.zeros(4, dtype=torch.bool), delta=0.01).item() == 0.0


def test_anchor_loss_gradcheck():
    d = torch.tensor([1.003, 2.5, 0.9], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    mask = torch.ones(3, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda t: losses.anchor_loss(t, z, mask, delta=0.01), (d,))


# ---- smoothness ----------------------------------------------------------------------------

def test_image_edge_weights():
    img = torch.zeros(1, 1, 4, 5)
    img[..., 3:] = 1.0  # vertical edge between columns 2 and 3
    w_x, w_y = losses.image_edge_weights(img, alpha=10.0)
    assert w_x.shape == (1, 1, 4, 4) and w_y.shape == (1, 1, 3, 5)
    assert torch.allclose(w_x[..., 2], torch.full((1, 1, 4), math.exp(-10.0)))
    assert torch.allclose(w_x[..., [0, 1, 3]], torch.ones(1, 1, 4, 3)) and torch.allclose(w_y, torch.ones_like(w_y))


def test_edge_smoothness_hand_computed():
    depth = torch.tensor([[[[1.0, 1.1, 1.1], [1.0, 1.0, 1.2]]]])
    valid = torch.ones_like(depth, dtype=torch.bool)
    ones_x, ones_y = torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 3)
    W_x, W_y = losses.edge_smoothness_weights(valid, torch.ones_like(depth), ones_x, ones_y)
    # pairs: x: |0.1|, 0, 0, |0.2|; y: 0, |0.1|, |0.1| → sum 0.5 over 7 pairs
    assert losses.edge_aware_smoothness(depth, W_x, W_y).item() == pytest.approx(0.5 / 7, rel=1e-5)
    # an invalid pixel removes its pairs; relative: divided by the scale
    valid[0, 0, 1, 2] = False
    W_x, W_y = losses.edge_smoothness_weights(valid, 2 * torch.ones_like(depth), ones_x, ones_y)
    assert losses.edge_aware_smoothness(depth, W_x, W_y).item() == pytest.approx((0.1 + 0.1) / 2 / 5, rel=1e-5)


def test_surface_smoothness_zero_on_linear_ramp_and_hand_value():
    v, u = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    ramp = (1.0 + 0.05 * u + 0.02 * v)[None, None]
    valid = torch.ones_like(ramp, dtype=torch.bool)
    W_x, W_y = losses.surface_smoothness_weights(valid, ramp)
    assert losses.surface_smoothness(ramp, W_x, W_y).item() == pytest.approx(0.0, abs=1e-7)
    # first-order smoothing does penalise the ramp (the reason L_surf is second order)
    E_x, E_y = losses.edge_smoothness_weights(valid, ramp, torch.ones(1, 1, 6, 6), torch.ones(1, 1, 5, 7))
    assert losses.edge_aware_smoothness(ramp, E_x, E_y).item() > 0.01
    spike = torch.ones(1, 1, 3, 3)
    spike[0, 0, 1, 1] = 1.3
    W_x, W_y = losses.surface_smoothness_weights(torch.ones_like(spike, dtype=torch.bool), torch.ones_like(spike))
    # one x-triple and one y-triple through the centre, each |1 - 2.6 + 1| = 0.6; 6 triples in all
    assert losses.surface_smoothness(spike, W_x, W_y).item() == pytest.approx(1.2 / 6, rel=1e-5)


def test_smoothness_gradcheck():
    torch.manual_seed(0)
    depth = (1.0 + 0.1 * torch.rand(1, 1, 5, 6, dtype=torch.float64)).requires_grad_(True)
    valid = torch.rand(1, 1, 5, 6) > 0.2
    img = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    w_x, w_y = losses.image_edge_weights(img, 5.0)
    E = losses.edge_smoothness_weights(valid, depth.detach(), w_x, w_y)
    S = losses.surface_smoothness_weights(valid, depth.detach(), w_x, w_y)
    assert torch.autograd.gradcheck(lambda d: losses.edge_aware_smoothness(d, *E), (depth,))
    assert torch.autograd.gradcheck(lambda d: losses.surface_smoothness(d, *S), (depth,))


# ---- magnitude -----------------------------------------------------------------------------

def test_magnitude_loss_divides_by_input_depth():
    depth_init = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])
    valid = depth_init > 0
    delta_z = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    expected = (0.5 / 1.01 + 1.0 / 2.01 + 2.0 / 4.01) / 3
    assert losses.magnitude_loss(delta_z, depth_init, valid).item() == pytest.approx(expected, rel=1e-6)
    # dividing by the prediction (depth_init + δz) would give a different number
    by_pred = (0.5 / 1.51 + 1.0 / 1.01 + 2.0 / 6.01) / 3
    assert by_pred != pytest.approx(expected, rel=1e-2)
    # the same δz on top of another depth_init changes the value only through depth_init
    assert losses.magnitude_loss(delta_z, 2 * depth_init, valid).item() == pytest.approx(
        (0.5 / 2.01 + 1.0 / 4.01 + 2.0 / 8.01) / 3, rel=1e-6)


def test_magnitude_loss_gradcheck():
    dz = torch.tensor([[[[0.3, -0.2], [0.1, -0.05]]]], dtype=torch.float64, requires_grad=True)
    d0 = torch.tensor([[[[1.0, 2.0], [0.5, 3.0]]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: losses.magnitude_loss(t, d0, d0 > 0), (dz,))


def test_depth_edge_weights_cut_pairs_across_depth_jumps():
    depth = torch.tensor([[[[1.0, 1.005, 1.5], [1.0, 1.0, 1.0]]]])
    w_x, w_y = torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 3)
    m_x, m_y = losses.depth_edge_weights(depth, w_x, w_y, 0.02)
    assert m_x[0, 0].tolist() == [[1.0, 0.0], [1.0, 1.0]]  # 0.5 % kept, 49 % jump cut
    assert m_y[0, 0].tolist() == [[1.0, 1.0, 0.0]]


# ---- L_photo -------------------------------------------------------------------------------

F_PX, BASE, Z0 = 100.0, 0.1, 1.25  # a rectified pair: disparity f·b/z = 8 px at the plane
H_IMG, W_IMG = 48, 64


def _texture(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1, H_IMG // 2, W_IMG // 2 + 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(H_IMG, W_IMG + 16), mode="bicubic",
                                           align_corners=False)[0, 0].clamp(0, 1)


def _plane_pair(gain: float = 1.0, offset: float = 0.0):
    """Reference and neighbour images of a textured fronto-parallel plane at depth Z0; the neighbour camera is BASE
    to the right, so a reference pixel u lands at u − 8 px. Returns (ref (H, W), src (H, W), K, dst_from_src)."""
    tex = _texture()
    ref = tex[:, 8 : 8 + W_IMG]
    src = tex[:, 16 : 16 + W_IMG] * gain + offset  # src(u) = tex(u + 16) = ref(u + 8)
    K = torch.tensor([[F_PX, 0, W_IMG / 2], [0, F_PX, H_IMG / 2], [0, 0, 1.0]])
    T = torch.eye(4)
    T[0, 3] = -BASE  # cam_from_world of the neighbour at x = +BASE
    return ref, src, K, T


def _photo(depth_scale: float, *, gain: float = 1.0, offset: float = 0.0, occluder: bool = False,
           requires_grad: bool = False):
    """L_photo of windows at 40 reference pixels with the plane's depth times ``depth_scale``."""
    ref, src, K, T = _plane_pair(gain, offset)
    offsets = losses.window_offsets(2)
    g = torch.Generator().manual_seed(1)
    centres = torch.stack([torch.randint(12, W_IMG - 4, (40,), generator=g),
                           torch.randint(4, H_IMG - 4, (40,), generator=g)], -1)
    taps = centres[:, None, :] + offsets.long()[None]  # (S, T, 2) integer pixels
    uv = taps.float()[None] + 0.5
    ref_taps = ref[taps[..., 1], taps[..., 0]][None]
    log_scale = torch.tensor(math.log(depth_scale), requires_grad=requires_grad)
    depth = Z0 * torch.exp(log_scale) * torch.ones(1, *taps.shape[:2])
    src_maps = src[None, :, :, None]

    def read_image(uv_dst):
        from pipeline.refine.pyramid import sample_views

        return sample_views(src_maps, torch.zeros(uv_dst.shape[:2], dtype=torch.long), uv_dst)[:, 0]

    def read_depth(uv_c):
        z = torch.full(uv_c.shape[:2], 0.5 * Z0 if occluder else Z0)
        return z, torch.ones_like(z, dtype=torch.bool)

    loss, used = losses.photometric_loss(ref_taps, depth, uv, torch.ones_like(ref_taps, dtype=torch.bool), K[None],
                                         K[None], T[None], read_image, read_depth, offsets, height=H_IMG, width=W_IMG,
                                         sigma_color=0.1, best_k=1, behind_tol=0.05, min_texture=0.01)
    return loss, used, log_scale


def test_photo_loss_is_zero_for_the_exact_warp_and_grows_with_a_depth_error():
    at_truth, used, _ = _photo(1.0)
    assert float(used) == 1.0 and float(at_truth) < 2e-3
    off = [float(_photo(s)[0]) for s in (1.02, 1.05)]
    assert off[0] > 0.01 and off[1] > off[0]


@pytest.mark.parametrize("scale", [0.98, 1.02])
def test_photo_loss_gradient_points_to_the_true_depth(scale):
    loss, _, log_scale = _photo(scale, requires_grad=True)
    (g,) = torch.autograd.grad(loss, log_scale)
    assert float(g) * math.log(scale) > 0  # descending moves the depth towards the plane


def test_photo_loss_ignores_a_gain_and_offset_of_the_neighbour_image():
    plain = float(_photo(1.02)[0])
    # up to the flat-window damping eps
    assert float(_photo(1.02, gain=0.6, offset=0.25)[0]) == pytest.approx(plain, rel=0.01)
    assert float(_photo(1.0, gain=0.6, offset=0.25)[0]) < 2e-3


def test_photo_loss_leaves_out_a_neighbour_where_the_sample_is_behind_its_surface():
    loss, used, _ = _photo(1.02, occluder=True)
    assert float(used) == 0.0 and float(loss) == 0.0


def test_bilateral_weights_favour_the_centre_surface():
    offsets = losses.window_offsets(1)
    taps = torch.tensor([[[0.2, 0.2, 0.8, 0.2, 0.2, 0.8, 0.2, 0.2, 0.8]]])  # the right column is another surface
    w = losses.bilateral_weights(taps, offsets, sigma_color=0.1, sigma_space=1.0)[0, 0]
    assert w[4] == pytest.approx(1.0) and (w[[2, 5, 8]] < 0.01 * w[[0, 3, 6]]).all()


def test_best_k_mean_over_usable_neighbours():
    cost = torch.tensor([[[0.5, 0.9], [0.1, 0.2], [0.3, 2.0]]])  # (B=1, k=3, N=2)
    usable = torch.tensor([[[True, False], [True, False], [False, True]]])
    c, ok = losses.best_k_mean(cost, usable, 2)
    assert torch.allclose(c, torch.tensor([[0.3, 2.0]])) and ok.tolist() == [[True, True]]
    c, ok = losses.best_k_mean(cost, torch.zeros_like(usable), 2)
    assert ok.tolist() == [[False, False]]


def test_dense_terms_match_the_separate_losses_and_their_gradients():
    g = torch.Generator().manual_seed(3)
    d0 = 1.0 + torch.rand(2, 1, 17, 23, generator=g)
    valid = torch.rand(2, 1, 17, 23, generator=g) > 0.2
    d0 = torch.where(valid, d0, torch.zeros_like(d0))
    image = torch.rand(2, 1, 17, 23, generator=g)
    w_x, w_y = losses.image_edge_weights(image, 10.0)
    edge_w = losses.edge_smoothness_weights(valid, d0, w_x, w_y)
    surf_w = losses.surface_smoothness_weights(valid, d0, w_x, w_y)
    weights = (0.02, 0.01, 0.005)

    def reference(pred):
        return (losses.edge_aware_smoothness(pred, *edge_w), losses.surface_smoothness(pred, *surf_w),
                losses.magnitude_loss(pred - d0, d0, valid))

    def fused(pred):
        return losses.dense_terms(pred, edge_w, surf_w, d0, losses.magnitude_weights(d0, valid))

    noise = 0.05 * torch.randn(d0.shape, generator=g)
    grads = []
    for fn in (reference, fused):
        pred = (d0 * torch.exp(noise)).requires_grad_()
        terms = fn(pred)
        sum(w * t for w, t in zip(weights, terms)).backward()
        grads.append((torch.stack([t.detach() for t in terms]), pred.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-9)
    assert grads[1][1].abs().sum() > 0


def test_window_taps_spread_out_on_larger_maps():
    base = losses.window_offsets(2)
    assert base.shape == (25, 2) and torch.equal(base[12], torch.zeros(2))  # the centre tap in the middle
    assert torch.equal(losses.window_offsets(2, 1.0), base)
    wide = losses.window_offsets(2, 1.6)  # 1024 px maps, windows chosen at 640 px
    assert wide.shape == base.shape and torch.equal(wide[12], torch.zeros(2))
    assert sorted(set(wide[:, 0].tolist())) == [-3.0, -2.0, 0.0, 2.0, 3.0]  # symmetric, integer, distinct
    assert torch.equal(losses.window_offsets(1, 2.5)[:, 1].unique(), torch.tensor([-3.0, 0.0, 3.0]))


def test_checkerboard_window_keeps_every_other_tap_over_the_same_extent():
    full = losses.window_offsets(2, 1.6)
    board = losses.window_offsets(2, 1.6, checkerboard=True)
    assert board.shape == (13, 2) and torch.equal(board[6], torch.zeros(2))  # the centre tap in the middle
    assert torch.equal(board.abs().amax(0), full.abs().amax(0))  # same extent
    assert torch.equal(board, -board.flip(0))  # symmetric about the centre
    rows = {tuple(t) for t in full.tolist()}
    assert {tuple(t) for t in board.tolist()} < rows
    steps = losses.window_offsets(2, checkerboard=True)
    assert ((steps[:, 0] + steps[:, 1]) % 2 == 0).all() and losses.window_offsets(1, checkerboard=True).shape == (5, 2)

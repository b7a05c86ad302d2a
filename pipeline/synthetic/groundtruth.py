"""Scenes straight from rendered ground truth (``recon synth`` output).

Used by tests and by the upper-bound benchmark (ground-truth depth → TSDF):
an :class:`~pipeline.core.io.SfmScene` whose cameras are the true ones and whose
sparse points are samples of the true surface, in the normalized frame the
sfm stage would produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.io import SfmScene, View
from pipeline.core.poses import invert_pose, normalizing_similarity, transform_pose_by_similarity


def load_gt_cameras(gt_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, int]:
    """``gt/cameras.json`` → ({name: (K, cam_from_world)}, width, height)."""
    data = json.loads((Path(gt_dir) / "cameras.json").read_text())
    cams = {c["name"]: (np.asarray(c["K"], dtype=np.float64), np.asarray(c["cam_from_world"], dtype=np.float64))
            for c in data["images"]}
    return cams, int(data["width"]), int(data["height"])


def gt_depth_path(gt_dir: Path, name: str) -> Path:
    """``gt/depth/<stem>.npy`` (see :func:`load_gt_depth` for the compressed form too)."""
    return Path(gt_dir) / "depth" / f"{Path(name).stem}.npy"


def load_gt_depth(gt_dir: Path, name: str) -> np.ndarray:
    """GT z-depth of image ``name`` (``gt/depth/<stem>.npy``, or ``.npz`` as in the compressed sample scenes)."""
    base = Path(gt_dir) / "depth" / Path(name).stem
    if base.with_suffix(".npy").exists():
        return np.load(base.with_suffix(".npy"))
    with np.load(base.with_suffix(".npz")) as data:
        return data[data.files[0]]


def scene_from_ground_truth(scene_dir: Path, *, n_points: int = 3000, seed: int = 0,
                            normalize: bool = True) -> SfmScene:
    """An SfmScene from ``scene_dir/gt``: true cameras, sparse points sampled from the GT depth.

    Each point is observed by every view where it projects inside the image
    and agrees with that view's GT depth within 1 %.
    """
    scene_dir = Path(scene_dir)
    gt_dir = scene_dir / "gt"
    cams, width, height = load_gt_cameras(gt_dir)
    names = sorted(cams)
    rng = np.random.default_rng(seed)
    per_view = max(1, n_points // len(names))
    pts = []
    for name in names:
        K, T = cams[name]
        depth = load_gt_depth(gt_dir, name)
        vs, us = np.nonzero(depth > 0)
        pick = rng.choice(len(vs), size=min(per_view, len(vs)), replace=False)
        u, v, z = us[pick] + 0.5, vs[pick] + 0.5, depth[vs[pick], us[pick]]
        cam_pts = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
        R, t = T[:3, :3], T[:3, 3]
        pts.append((cam_pts - t) @ R)  # R^T (x - t)
    points = np.concatenate(pts)
    observed: dict[str, np.ndarray] = {}
    obs_depths = []
    for name in names:
        K, T = cams[name]
        depth = load_gt_depth(gt_dir, name)
        pc = points @ T[:3, :3].T + T[:3, 3]
        z = pc[:, 2]
        ok = z > 1e-6
        u = np.where(ok, K[0, 0] * pc[:, 0] / np.maximum(z, 1e-6) + K[0, 2], -1)
        v = np.where(ok, K[1, 1] * pc[:, 1] / np.maximum(z, 1e-6) + K[1, 2], -1)
        ui, vi = np.floor(u).astype(int), np.floor(v).astype(int)
        ok &= (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height)
        d = np.zeros_like(z)
        d[ok] = depth[vi[ok], ui[ok]]
        ok &= np.abs(d - z) < 0.01 * z
        observed[name] = np.nonzero(ok)[0]
        obs_depths.append(z[ok])
    T_norm = np.eye(4)
    if normalize:
        s, c = normalizing_similarity(points, np.concatenate(obs_depths))
        T_norm[:3, :3] *= s
        T_norm[:3, 3] = -s * c
    s_n, R_n, t_n = T_norm[0, 0], np.eye(3), T_norm[:3, 3]
    views = []
    for name in names:
        K, T = cams[name]
        views.append(
            View(
                name=name,
                K=K,
                cam_from_world=transform_pose_by_similarity(T, s_n, R_n, t_n),
                width=width,
                height=height,
                image_path=scene_dir / "images" / name,
                point_ids=observed[name],
            )
        )
    return SfmScene(
        views=views,
        points=points * s_n + t_n,
        point_colors=np.full((len(points), 3), 128, dtype=np.uint8),
        point_errors=np.zeros(len(points)),
        normalized_from_sfm=T_norm,
    )


def write_gt_model(scene_dir: Path, model_dir: Path, *, n_points: int = 300, seed: int = 0,
                   extra_name: str | None = None, invert_poses: bool = False) -> Path:
    """Write the true cameras of a rendered scene as a COLMAP model (``model_dir``, binary).

    One PINHOLE camera at the image size, every view registered with its true
    ``cam_from_world`` (scene frame, not normalized), and the sparse points of
    :func:`scene_from_ground_truth` seen by at least two views, with their
    keypoints at the exact projections. Placed in ``SCENE_DIR/sparse/0`` it
    stands in for SfM (``sfm.use_existing_model``): fast and deterministic,
    for tests and benchmarks of the later stages. Returns ``model_dir``.

    Broken models, for tests of the model checks: ``extra_name`` adds an image
    of that name (the first view's pose and keypoints); ``invert_poses`` writes
    camera→world where COLMAP expects world→camera (keypoints stay the true ones).
    """
    import pycolmap

    gt = scene_from_ground_truth(scene_dir, n_points=n_points, seed=seed, normalize=False)
    K = gt.views[0].K
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(
        model="PINHOLE", width=gt.views[0].width, height=gt.views[0].height,
        params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=1,
    ))
    tracks: dict[int, list[tuple[int, int]]] = {}
    views = [(v.name, v.cam_from_world, v.point_ids) for v in gt.views]
    if extra_name:
        views.append((extra_name, gt.views[0].cam_from_world, gt.views[0].point_ids))
    for image_id, (name, T, point_ids) in enumerate(views, start=1):
        pc = gt.points[point_ids] @ T[:3, :3].T + T[:3, 3]
        uv = pc[:, :2] / pc[:, 2:] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
        pose = invert_pose(T) if invert_poses else T
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=name, keypoints=uv.reshape(-1, 2), camera_id=1, image_id=image_id),
            pycolmap.Rigid3d(pose[:3, :4])
        )
        for idx, pid in enumerate(point_ids):
            tracks.setdefault(int(pid), []).append((image_id, idx))
    for pid, elements in tracks.items():
        if len(elements) >= 2:
            track = pycolmap.Track()
            for image_id, idx in elements:
                track.add_element(image_id, idx)
            rec.add_point3D(gt.points[pid], track)
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(model_dir))
    return Path(model_dir)

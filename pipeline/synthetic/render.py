"""Synthetic test scenes with known ground truth (cameras, depth, meshes): cameras, ray casting, output, loading.

A textured object stands on a textured floor inside a textured room, so every
pixel of every view sees matte, richly textured geometry. Appearance is a
procedural 3D texture (multi-octave value noise, evaluated at the hit point)
times Lambertian shading from fixed lights: view-independent by construction.
The meshes, objects and textures are in :mod:`pipeline.synthetic.shapes`.

Conventions
-----------
- World frame: right-handed, +z up, floor at z = 0, object centred on the z axis.
- Object size: bounding-box diagonal = ``scale`` world units; everything written
  (meshes, camera centres, depth) is multiplied by ``scale``; the images do not
  depend on ``scale``.
- Cameras: pinhole, ``cam_from_world`` (x right, y down, z forward; OpenCV/COLMAP),
  ``X_cam = R @ X_world + t``. Pixel (col u, row v) covers [u, u+1) x [v, v+1);
  its centre is at image coordinate (u + 0.5, v + 0.5) (COLMAP); ``cx = width / 2``.
- Depth: camera-frame z (not ray length) of the ray through each pixel centre,
  float32, 0 where the ray hits nothing.

Output layout under ``out_dir``::

    images/view_000.png ...        RGB uint8, 2x2 supersampled
    gt/mesh.ply, gt/object.ply     scene (object + room) and object only, world frame
    gt/cameras.json                width, height, per image K and cam_from_world
    gt/depth/view_000.npy ...      float32 (H, W) z-depth (.npz, key "depth", with compress_depth)
    gt/scene.json                  shape, seed, scale, object bbox and diagonal
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open3d as o3d
from PIL import Image

from pipeline.synthetic.shapes import (
    _MATERIALS,
    TriMesh,
    _make_texture,
    _room,
    _Texture,
    corner_normals,
    make_object,
    merge_meshes,
    shade,
)

logger = logging.getLogger(__name__)

FOCAL_FACTOR = 0.9
"""fx = fy = FOCAL_FACTOR * width (about 58 deg horizontal field of view)."""
CAMERA_DISTANCE = 1.2
"""Camera distance from the object centre, in object diagonals (object fills ~50-70 % of the image)."""
ROOM_HALF_WIDTH = 2.5
"""Room (floor and walls) half-width, in object diagonals."""
ROOM_HEIGHT = 3.0
"""Room height, in object diagonals."""
SUPERSAMPLE = 2
"""Colour samples per pixel along each axis (2 -> 2x2 box-filtered)."""


# --------------------------------------------------------------------------- cameras


def intrinsics(width: int, height: int) -> np.ndarray:
    """K (3, 3) in COLMAP's pixel convention: fx = fy = FOCAL_FACTOR * width, principal point at the centre."""
    f = FOCAL_FACTOR * width
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def look_at(center: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """cam_from_world (4, 4) of a camera at ``center`` looking at ``target`` (x right, y down, z forward),
    with world ``up`` pointing up in the image."""
    z = np.asarray(target, float) - np.asarray(center, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, float))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rot = np.stack([x, y, z])
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = -rot @ np.asarray(center, float)
    return pose


def ring_elevations(rings: int) -> np.ndarray:
    """Camera elevations (deg) of the rings: 20..45 deg, or 30 deg for a single ring."""
    return np.array([30.0]) if rings == 1 else np.linspace(20.0, 45.0, rings)


def camera_poses(n_views: int, rings: int, target: np.ndarray, distance: float, seed: int) -> list[np.ndarray]:
    """cam_from_world (4, 4) per view: ``rings`` rings around ``target`` at ``distance``, azimuths evenly
    spaced (offset between rings), small deterministic jitter from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    rings = max(1, min(rings, n_views))
    per_ring = [n_views // rings + (1 if r < n_views % rings else 0) for r in range(rings)]
    poses = []
    for r, (n, elev) in enumerate(zip(per_ring, ring_elevations(rings))):
        step = 360.0 / n
        for k in range(n):
            az = math.radians(k * step + r * step / rings + rng.uniform(-0.1, 0.1) * step)
            el = math.radians(elev + rng.uniform(-3.0, 3.0))
            d = distance * (1.0 + rng.uniform(-0.05, 0.05))
            aim = target + np.array([*rng.uniform(-0.02, 0.02, 2) * distance, 0.0])
            center = target + d * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
            poses.append(look_at(center, aim))
    return poses


def pixel_rays(K: np.ndarray, cam_from_world: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World rays through image coordinates ``uv`` (..., 2) (COLMAP convention: pixel centres at +0.5).

    Returns (origin (3,), directions (..., 3)); directions are scaled so that their camera-frame z is 1,
    hence the ray parameter of a hit is its z-depth.
    """
    rot, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    x = (uv[..., 0] - K[0, 2]) / K[0, 0]
    y = (uv[..., 1] - K[1, 2]) / K[1, 1]
    d_cam = np.stack([x, y, np.ones_like(x)], -1)
    return -rot.T @ t, d_cam @ rot  # (R^T d)^T = d^T R


def subpixel_grid(width: int, height: int, samples: int = 1) -> np.ndarray:
    """Image coordinates (height*samples, width*samples, 2) of a samples x samples grid inside each pixel
    (samples = 1: pixel centres u + 0.5, v + 0.5). NumPy, (width, height) order: not
    :func:`pipeline.core.geometry.pixel_grid` (torch, (height, width))."""
    sub = (np.arange(samples) + 0.5) / samples
    u = (np.arange(width)[:, None] + sub[None, :]).ravel()
    v = (np.arange(height)[:, None] + sub[None, :]).ravel()
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu, vv], -1)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Scene:
    raycaster: o3d.t.geometry.RaycastingScene
    normals: list[np.ndarray]  # per geometry id: corner normals (3 corners, 3 xyz, T) float32
    textures: list[_Texture]  # per geometry id


def _build_scene(parts: list[TriMesh], textures: list[_Texture]) -> _Scene:
    raycaster = o3d.t.geometry.RaycastingScene()
    for i, part in enumerate(parts):
        gid = raycaster.add_triangles(o3d.core.Tensor(part.vertices.astype(np.float32)),
                                      o3d.core.Tensor(part.triangles.astype(np.uint32)))
        assert gid == i
    normals = [np.ascontiguousarray(corner_normals(p).transpose(1, 2, 0)) for p in parts]
    return _Scene(raycaster, normals, textures)


def _cast(scene: _Scene, origin: np.ndarray, dirs: np.ndarray) -> dict[str, np.ndarray]:
    """Open3D hits of rays origin (3,) + t * dirs (N, 3)."""
    rays = np.empty((len(dirs), 6), np.float32)
    rays[:, :3], rays[:, 3:] = origin, dirs
    return {k: v.numpy() for k, v in scene.raycaster.cast_rays(o3d.core.Tensor(rays)).items()}


def _shade_hits(scene: _Scene, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Linear RGB (3, N) float32 for rays origin (3,) + t * dirs (N, 3); black where nothing is hit."""
    hit = _cast(scene, origin, dirs)
    t = hit["t_hit"]
    gids = hit["geometry_ids"]
    ok = np.isfinite(t)
    rgb = np.zeros((3, len(t)), np.float32)
    for gid, (normals, texture) in enumerate(zip(scene.normals, scene.textures)):
        sel = np.flatnonzero(ok & (gids == gid))
        if sel.size == 0:
            continue
        d = np.ascontiguousarray(dirs[sel].T, dtype=np.float32)  # (3, n)
        xyz = origin.astype(np.float32)[:, None] + t[sel] * d
        bary_u, bary_v = np.ascontiguousarray(hit["primitive_uvs"][sel].T)
        corners = np.take(normals, hit["primitive_ids"][sel], axis=2)  # (3, 3, n)
        n = corners[0] + bary_u * (corners[1] - corners[0]) + bary_v * (corners[2] - corners[0])
        facing = n[0] * d[0] + n[1] * d[1] + n[2] * d[2]
        n *= np.where(facing > 0, -1.0, 1.0).astype(np.float32) / np.maximum(np.sqrt(np.sum(n * n, 0)), 1e-12)
        rgb[:, sel] = texture.albedo(xyz) * shade(n)
    return rgb


def _render_view(scene: _Scene, K: np.ndarray, cam_from_world: np.ndarray, width: int, height: int,
                 samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, z-depth (H, W) float32, unit-scale scene) of one view."""
    origin, dirs = pixel_rays(K, cam_from_world, subpixel_grid(width, height, samples))
    rgb = _shade_hits(scene, origin, dirs.reshape(-1, 3))
    rgb = rgb.reshape(3, height, samples, width, samples).mean(axis=(2, 4)).transpose(1, 2, 0)
    image = np.round(255.0 * np.clip(rgb, 0.0, 1.0) ** (1.0 / 2.2)).astype(np.uint8)
    origin, dirs = pixel_rays(K, cam_from_world, subpixel_grid(width, height, 1))
    t = _cast(scene, origin, dirs.reshape(-1, 3))["t_hit"].reshape(height, width)
    depth = np.where(np.isfinite(t), t, 0.0).astype(np.float32)
    return image, depth


def _save_depth(stem: Path, depth: np.ndarray, compress: bool) -> None:
    if compress:
        np.savez_compressed(f"{stem}.npz", depth=depth)
    else:
        np.save(f"{stem}.npy", depth)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def render_scene(out_dir: Path, *, shape: str = "blob", n_views: int = 12, width: int = 320, height: int = 240,
                 seed: int = 0, object_mesh: Path | None = None, scale: float = 1.0, rings: int = 2,
                 compress_depth: bool = False) -> Path:
    """Render a synthetic scene with ground truth into ``out_dir`` (layout in the module docstring).

    ``shape`` is one of :data:`pipeline.synthetic.shapes.SHAPES` (ignored when ``object_mesh``,
    an OBJ/PLY assumed +y up, is given);
    ``seed`` sets textures and camera jitter; ``scale`` multiplies all world coordinates (object
    diagonal = ``scale``); ``rings`` rings of cameras share the ``n_views`` views; ``compress_depth``
    writes ``gt/depth/NAME.npz`` (key ``depth``, ~4x smaller) instead of ``NAME.npy``. Returns ``out_dir``.
    """
    if n_views < 1 or width < 8 or height < 8 or rings < 1 or not scale > 0:
        raise ValueError("need n_views >= 1, width and height >= 8, rings >= 1 and scale > 0")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "gt" / "depth").mkdir(parents=True, exist_ok=True)
    for stale in [*(out_dir / "images").glob("view_*.png"), *(out_dir / "gt" / "depth").glob("view_*.np[yz]")]:
        stale.unlink()  # from an earlier render into the same folder

    obj = make_object(shape, object_mesh)
    floor, walls = _room(ROOM_HALF_WIDTH, ROOM_HEIGHT)
    textures = [_make_texture(_MATERIALS[name], seed, i) for i, name in enumerate(("object", "floor", "walls"))]
    scene = _build_scene([obj, floor, walls], textures)

    lo, hi = obj.vertices.min(0), obj.vertices.max(0)
    target = 0.5 * (lo + hi)
    poses = camera_poses(n_views, rings, target, CAMERA_DISTANCE, seed)
    K = intrinsics(width, height)

    images = []
    for i, pose in enumerate(poses):
        name = f"view_{i:03d}"
        image, depth = _render_view(scene, K, pose, width, height, SUPERSAMPLE)
        Image.fromarray(image).save(out_dir / "images" / f"{name}.png")
        _save_depth(out_dir / "gt" / "depth" / name, depth * np.float32(scale), compress_depth)
        scaled = pose.copy()
        scaled[:3, 3] *= scale
        images.append({"name": f"{name}.png", "K": K.tolist(), "cam_from_world": scaled.tolist()})

    for mesh, filename in ((obj, "object.ply"), (merge_meshes([obj, floor, walls]), "mesh.ply")):
        scaled_mesh = TriMesh(mesh.vertices * scale, mesh.triangles)
        o3d.io.write_triangle_mesh(str(out_dir / "gt" / filename), scaled_mesh.to_open3d())
    _write_json(out_dir / "gt" / "cameras.json", {
        "width": width, "height": height, "pixel_convention": "colmap (pixel centre at +0.5)", "images": images})
    _write_json(out_dir / "gt" / "scene.json", {
        "shape": "mesh" if object_mesh is not None else shape,
        "object_mesh": str(object_mesh) if object_mesh is not None else None,
        "seed": seed, "scale": scale, "n_views": n_views, "rings": rings, "up": [0.0, 0.0, 1.0],
        "object_bbox_min": (lo * scale).tolist(), "object_bbox_max": (hi * scale).tolist(),
        "object_diagonal": float(np.linalg.norm(hi - lo) * scale),
        "camera_distance": CAMERA_DISTANCE * scale,
        "room_half_width": ROOM_HALF_WIDTH * scale, "room_height": ROOM_HEIGHT * scale,
    })
    logger.info("rendered %d views (%dx%d) of %s into %s in %.1f s", n_views, width, height,
                shape if object_mesh is None else object_mesh, out_dir, time.perf_counter() - started)
    return out_dir


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, kw_only=True)
class GroundTruth:
    """Ground truth of a rendered scene (see :func:`render_scene`), all in world units."""

    cameras: dict[str, tuple[np.ndarray, np.ndarray]]
    """image name -> (K (3, 3), COLMAP pixel convention; cam_from_world (4, 4))."""
    width: int
    height: int
    object_bbox_min: np.ndarray
    object_bbox_max: np.ndarray
    scale: float
    root: Path
    """The ``gt`` folder."""

    @property
    def names(self) -> list[str]:
        """Image names, sorted."""
        return sorted(self.cameras)

    @property
    def object_diagonal(self) -> float:
        return float(np.linalg.norm(self.object_bbox_max - self.object_bbox_min))

    def depth(self, name: str) -> np.ndarray:
        """z-depth (H, W) float32 of image ``name`` (0 = no hit), from ``depth/STEM.npy`` or ``.npz``."""
        stem = self.root / "depth" / Path(name).stem
        if Path(f"{stem}.npy").exists():
            return np.load(f"{stem}.npy")
        with np.load(f"{stem}.npz") as data:
            return data["depth"]

    def mesh_path(self) -> Path:
        """Full scene mesh (object + room)."""
        return self.root / "mesh.ply"

    def object_mesh_path(self) -> Path:
        """Object-only mesh."""
        return self.root / "object.ply"


def load_ground_truth(gt_dir: Path) -> GroundTruth:
    """Read ``gt_dir`` (the ``gt`` folder written by :func:`render_scene`, or the scene folder above it)."""
    gt_dir = Path(gt_dir)
    if not (gt_dir / "cameras.json").exists() and (gt_dir / "gt" / "cameras.json").exists():
        gt_dir = gt_dir / "gt"
    cams = json.loads((gt_dir / "cameras.json").read_text())
    info = json.loads((gt_dir / "scene.json").read_text())
    cameras = {im["name"]: (np.asarray(im["K"], np.float64), np.asarray(im["cam_from_world"], np.float64))
               for im in cams["images"]}
    return GroundTruth(cameras=cameras, width=int(cams["width"]), height=int(cams["height"]),
                       object_bbox_min=np.asarray(info["object_bbox_min"], np.float64),
                       object_bbox_max=np.asarray(info["object_bbox_max"], np.float64),
                       scale=float(info["scale"]), root=gt_dir)


def render_or_reuse(scenes_dir: Path, shape: str, *, n_views: int, width: int, height: int,
                    seed: int = 0) -> tuple[Path, bool]:
    """``scenes_dir/<shape>_<views>v_<W>x<H>_s<seed>``, rendered unless a scene with these parameters is there.

    Returns (scene folder, whether it was rendered now). Used by the benchmarks.
    """
    scene = Path(scenes_dir) / f"{shape}_{n_views}v_{width}x{height}_s{seed}"
    info = scene / "gt" / "scene.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        cams = json.loads((scene / "gt" / "cameras.json").read_text())
        if (meta.get("n_views") == n_views and (cams.get("width"), cams.get("height")) == (width, height)
                and meta.get("seed") == seed):
            return scene, False
    render_scene(scene, shape=shape, n_views=n_views, width=width, height=height, seed=seed, rings=2)
    return scene, True

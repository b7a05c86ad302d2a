"""Synthetic test scenes with known ground truth (cameras, depth, meshes).

A textured object stands on a textured floor inside a textured room, so every
pixel of every view sees matte, richly textured geometry. Appearance is a
procedural 3D texture (multi-octave value noise, evaluated at the hit point)
times Lambertian shading from fixed lights: view-independent by construction.

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

from pipeline.core.native_output import quiet_native

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("blob", "thin", "knot")
"""Names accepted by ``render_scene(shape=...)``: ``blob`` (box, spheres, torus, cone:
compact rounded parts), ``thin`` (table and chair, legs ~2 % of the diagonal),
``knot`` (a trefoil-knot tube lying on the floor: concavities, self-occlusion)."""

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
CREASE_DEG = 40.0
"""Dihedral angle above which shading normals are not smoothed across an edge."""

_LIGHTS = ((np.array([0.45, 0.30, 1.0]), 0.60), (np.array([-0.6, -0.8, 0.35]), 0.25))
"""(direction towards the light, weight) of the two fixed directional lights."""
_AMBIENT = 0.30


# --------------------------------------------------------------------------- meshes


@dataclass(frozen=True)
class TriMesh:
    """Triangle mesh as arrays: ``vertices`` (V, 3) float64, ``triangles`` (T, 3) int64."""

    vertices: np.ndarray
    triangles: np.ndarray

    def transformed(self, *, scale: float | np.ndarray = 1.0, rotation: np.ndarray | None = None,
                    translation: np.ndarray | tuple[float, float, float] = (0.0, 0.0, 0.0)) -> TriMesh:
        """x -> R @ (scale * x) + translation (scale may be per axis)."""
        v = self.vertices * np.asarray(scale, dtype=np.float64)
        if rotation is not None:
            v = v @ np.asarray(rotation, dtype=np.float64).T
        return TriMesh(v + np.asarray(translation, dtype=np.float64), self.triangles)

    def to_open3d(self) -> o3d.geometry.TriangleMesh:
        """Legacy Open3D mesh (for writing PLY)."""
        mesh = o3d.geometry.TriangleMesh()
        mesh.vertices = o3d.utility.Vector3dVector(self.vertices)
        mesh.triangles = o3d.utility.Vector3iVector(self.triangles.astype(np.int32))
        return mesh


def _from_open3d(mesh: o3d.geometry.TriangleMesh) -> TriMesh:
    return TriMesh(np.asarray(mesh.vertices, dtype=np.float64).copy(),
                   np.asarray(mesh.triangles, dtype=np.int64).copy())


def merge_meshes(meshes: list[TriMesh]) -> TriMesh:
    """Concatenate meshes (no vertex welding)."""
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return TriMesh(np.concatenate([m.vertices for m in meshes]),
                   np.concatenate([m.triangles + o for m, o in zip(meshes, offsets)]))


def _box(extent: tuple[float, float, float], min_corner: tuple[float, float, float]) -> TriMesh:
    """Axis-aligned box of size ``extent`` with its minimum corner at ``min_corner``."""
    box = _from_open3d(o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0))
    return box.transformed(scale=np.array(extent), translation=min_corner)


def _sphere(radius: float, center: tuple[float, float, float], resolution: int = 24) -> TriMesh:
    return _from_open3d(o3d.geometry.TriangleMesh.create_sphere(radius, resolution)).transformed(translation=center)


def _cylinder(radius: float, z0: float, z1: float, xy: tuple[float, float], resolution: int = 16) -> TriMesh:
    """Vertical cylinder from z0 to z1 at (x, y)."""
    cyl = o3d.geometry.TriangleMesh.create_cylinder(radius, z1 - z0, resolution, 1)
    return _from_open3d(cyl).transformed(translation=(xy[0], xy[1], 0.5 * (z0 + z1)))


def _rod(radius: float, p0: np.ndarray, p1: np.ndarray, resolution: int = 12) -> TriMesh:
    """Cylinder between two points."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    cyl = _from_open3d(o3d.geometry.TriangleMesh.create_cylinder(radius, length, resolution, 1))
    return cyl.transformed(rotation=_rotation_from_z(axis / length), translation=0.5 * (p0 + p1))


def _rotation_from_z(direction: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) taking +z to the unit vector ``direction``."""
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, direction)
    c = float(np.dot(z, direction))
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _tube(curve: np.ndarray, radius: float, sides: int = 20) -> TriMesh:
    """Closed tube of ``radius`` around a closed polyline ``curve`` (N, 3) whose tangent is never vertical."""
    tangent = np.roll(curve, -1, axis=0) - np.roll(curve, 1, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    binormal = np.cross(tangent, [0.0, 0.0, 1.0])
    binormal /= np.linalg.norm(binormal, axis=1, keepdims=True)
    normal = np.cross(binormal, tangent)
    phi = np.linspace(0.0, 2.0 * np.pi, sides, endpoint=False)
    ring = np.cos(phi)[None, :, None] * normal[:, None] + np.sin(phi)[None, :, None] * binormal[:, None]
    vertices = (curve[:, None] + radius * ring).reshape(-1, 3)
    n = len(curve)
    i, j = np.meshgrid(np.arange(n), np.arange(sides), indexing="ij")
    a, b = i * sides + j, ((i + 1) % n) * sides + j
    c, d = ((i + 1) % n) * sides + (j + 1) % sides, i * sides + (j + 1) % sides
    tris = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])  # outward
    return TriMesh(vertices, tris)


def _grid_quad(origin: np.ndarray, du: np.ndarray, dv: np.ndarray, n: int) -> TriMesh:
    """Rectangle origin + s*du + t*dv, s,t in [0, 1], split into n x n quads; normal along du x dv."""
    s = np.linspace(0.0, 1.0, n + 1)
    su, sv = np.meshgrid(s, s, indexing="ij")
    vertices = origin + su.reshape(-1, 1) * du + sv.reshape(-1, 1) * dv
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a = (i * (n + 1) + j).ravel()
    b, c, d = a + (n + 1), a + (n + 1) + 1, a + 1
    return TriMesh(vertices, np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]))


def _room(half_width: float, height: float, n: int = 16) -> tuple[TriMesh, TriMesh]:
    """(floor at z = 0, walls + ceiling) of a closed box room, normals pointing inwards."""
    h, z = half_width, height
    floor = _grid_quad(np.array([-h, -h, 0.0]), np.array([2 * h, 0, 0]), np.array([0, 2 * h, 0]), n)
    faces = [
        _grid_quad(np.array([-h, -h, z]), np.array([0, 2 * h, 0]), np.array([2 * h, 0, 0]), n),  # ceiling
        _grid_quad(np.array([-h, -h, 0]), np.array([0, 0, z]), np.array([2 * h, 0, 0]), n),  # y = -h
        _grid_quad(np.array([-h, h, 0]), np.array([2 * h, 0, 0]), np.array([0, 0, z]), n),  # y = +h
        _grid_quad(np.array([-h, -h, 0]), np.array([0, 2 * h, 0]), np.array([0, 0, z]), n),  # x = -h
        _grid_quad(np.array([h, -h, 0]), np.array([0, 0, z]), np.array([0, 2 * h, 0]), n),  # x = +h
    ]
    return floor, merge_meshes(faces)


# --------------------------------------------------------------------------- objects


def _blob_parts() -> list[TriMesh]:
    """Box with a sphere on top, a flat torus around a cone, a small sphere: parts touch, barely overlap."""
    return [
        _box((0.5, 0.4, 0.3), (-0.6, -0.2, 0.0)),
        _sphere(0.2, (-0.35, 0.0, 0.49), 28),
        _torus(0.2, 0.08, (0.3, 0.0, 0.08)),
        _cone(0.1, 0.32, (0.3, 0.0, 0.0)),
        _sphere(0.12, (0.0, 0.3, 0.12), 20),
    ]


def _torus(torus_radius: float, tube_radius: float, center: tuple[float, float, float]) -> TriMesh:
    """Torus lying flat (axis +z) at ``center``."""
    torus = o3d.geometry.TriangleMesh.create_torus(torus_radius, tube_radius, 48, 20)
    return _from_open3d(torus).transformed(translation=center)


def _cone(radius: float, height: float, base_center: tuple[float, float, float]) -> TriMesh:
    cone = o3d.geometry.TriangleMesh.create_cone(radius, height, 32, 4)
    return _from_open3d(cone).transformed(translation=base_center)


def _thin_parts() -> list[TriMesh]:
    """A table (legs of diameter 0.03) and a chair with thin legs, back posts and a rail, a ball on the table."""
    eps = 0.002  # legs reach this far into what they support
    parts = [_box((0.7, 0.45, 0.03), (-0.25, -0.225, 0.47))]  # table top, x in [-0.25, 0.45]
    for x in (-0.21, 0.41):
        for y in (-0.185, 0.185):
            parts.append(_cylinder(0.015, 0.0, 0.47 + eps, (x, y)))
    seat_x0, seat_w, seat_z = -0.65, 0.3, 0.28  # chair seat x in [-0.65, -0.35]
    parts.append(_box((seat_w, seat_w, 0.025), (seat_x0, -0.15, seat_z)))
    for x in (seat_x0 + 0.03, seat_x0 + seat_w - 0.03):
        for y in (-0.12, 0.12):
            parts.append(_cylinder(0.014, 0.0, seat_z + eps, (x, y)))
    back_x = seat_x0 + 0.03
    for y in (-0.12, 0.12):
        parts.append(_cylinder(0.014, seat_z + 0.025 - eps, 0.6, (back_x, y)))
    parts.append(_box((0.03, 0.3, 0.06), (back_x - 0.015, -0.15, 0.6 - eps)))  # top rail
    parts.append(_rod(0.012, np.array([back_x, -0.12, 0.42]), np.array([back_x, 0.12, 0.42])))  # middle rail
    parts.append(_sphere(0.07, (0.2, 0.05, 0.5 + 0.07 - eps), 20))
    parts.append(_cone(0.06, 0.16, (0.0, -0.08, 0.5 - eps)))
    return parts


def _knot_parts() -> list[TriMesh]:
    """Trefoil-knot tube lying on the floor."""
    t = np.linspace(0.0, 2.0 * np.pi, 360, endpoint=False)
    curve = np.stack([np.sin(t) + 2 * np.sin(2 * t), np.cos(t) - 2 * np.cos(2 * t), -1.2 * np.sin(3 * t)], -1)
    return [_tube(curve, 0.45, 24)]


_SHAPE_PARTS = {"blob": _blob_parts, "thin": _thin_parts, "knot": _knot_parts}


def normalise_object(mesh: TriMesh) -> TriMesh:
    """Scale to bounding-box diagonal 1, centre on the z axis, rest on z = 0."""
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    diag = float(np.linalg.norm(hi - lo))
    shift = -np.array([0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), lo[2]])
    return TriMesh((mesh.vertices + shift) / diag, mesh.triangles)


def load_object_mesh(path: Path) -> TriMesh:
    """Read a mesh file Open3D understands (OBJ, PLY, STL, OFF, glTF), assumed +y up (OBJ habit), as +z up."""
    with quiet_native():
        mesh = o3d.io.read_triangle_mesh(str(path))
    if len(mesh.triangles) == 0:
        raise ValueError(f"no triangles in {path}")
    y_up_to_z_up = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    return _from_open3d(mesh).transformed(rotation=y_up_to_z_up)


def make_object(shape: str, object_mesh: Path | None = None) -> TriMesh:
    """The normalised object (diagonal 1, on z = 0) for ``shape`` or from ``object_mesh``."""
    if object_mesh is not None:
        return normalise_object(load_object_mesh(Path(object_mesh)))
    if shape not in _SHAPE_PARTS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return normalise_object(merge_meshes(_SHAPE_PARTS[shape]()))


# --------------------------------------------------------------------------- shading normals


def corner_normals(mesh: TriMesh, crease_deg: float = CREASE_DEG) -> np.ndarray:
    """Per-corner shading normals (T, 3, 3), float32: area-weighted face normals around each
    vertex, averaged only over faces within ``crease_deg`` of the corner's own face."""
    v, f = mesh.vertices, mesh.triangles
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    area2 = np.linalg.norm(cross, axis=1, keepdims=True)
    face_n = cross / np.maximum(area2, 1e-20)
    corner_v = f.ravel()
    corner_f = np.repeat(np.arange(len(f)), 3)
    order = np.argsort(corner_v, kind="stable")
    counts = np.bincount(corner_v, minlength=len(v))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    degree = int(counts.max())
    # faces around each vertex, padded with -1: (V, degree)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    around = np.full((len(v), degree), -1, dtype=np.int64)
    around[corner_v[order], rank] = corner_f[order]
    out = np.zeros((len(corner_v), 3))
    cos_crease = math.cos(math.radians(crease_deg))
    chunk = max(1, 2_000_000 // degree)
    for s in range(0, len(corner_v), chunk):
        nb = around[corner_v[s:s + chunk]]  # (C, degree)
        valid = nb >= 0
        nb_n = face_n[np.where(valid, nb, 0)]  # (C, degree, 3)
        own = face_n[corner_f[s:s + chunk]]
        keep = valid & (np.einsum("cdk,ck->cd", nb_n, own) >= cos_crease)
        w = keep * area2[np.where(valid, nb, 0), 0]
        out[s:s + chunk] = np.einsum("cd,cdk->ck", w, nb_n)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(norm > 1e-20, out / np.maximum(norm, 1e-20), face_n[corner_f])
    return out.reshape(-1, 3, 3).astype(np.float32)


# --------------------------------------------------------------------------- texture


@dataclass(frozen=True)
class Material:
    """Procedural albedo from 3D value-noise fields (frequencies in lattice cells per unit of a
    unit-diagonal scene): a palette mix, multi-octave luminance and dark spots (blob features)."""

    color_a: tuple[float, float, float]  # linear RGB palette ends
    color_b: tuple[float, float, float]
    mix_freqs: tuple[float, ...]  # octaves of the palette-mixing field
    lum_freqs: tuple[float, ...]  # octaves of the luminance field
    lum_contrast: float  # albedo *= 2 ** (lum_contrast * tanh(field))
    lum_persistence: float  # amplitude ratio between successive luminance octaves (> 1: finer is stronger)
    spot_freqs: tuple[float, ...]  # octaves of the spot field
    spot_strength: float  # albedo *= 1 - spot_strength where the spot field is high


_MATERIALS = {
    "object": Material((0.62, 0.32, 0.20), (0.70, 0.62, 0.36), (3.0, 7.0), (8.0, 16.0, 32.0, 64.0), 1.6, 1.3,
                       (24.0, 48.0), 0.7),
    "floor": Material((0.30, 0.28, 0.25), (0.50, 0.47, 0.40), (1.5, 4.0), (6.0, 12.0, 24.0, 48.0), 1.6, 1.3,
                      (20.0, 40.0), 0.7),
    "walls": Material((0.26, 0.34, 0.50), (0.52, 0.54, 0.56), (1.0, 2.5), (3.0, 6.0, 12.0, 24.0), 1.6, 1.3,
                      (8.0, 16.0), 0.7),
}


def _lattice_values(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, key: np.uint32) -> np.ndarray:
    """Pseudo-random value in [-1, 1) per integer lattice point (hash of the coordinates: no periodicity)."""
    h = (ix.view(np.uint32) * np.uint32(0x8DA6B343) + iy.view(np.uint32) * np.uint32(0xD8163841)
         + iz.view(np.uint32) * np.uint32(0xCB1AB31F) + key)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 / (1 << 24)) - np.float32(1.0)


@dataclass(frozen=True)
class _NoiseField:
    """Sum of value-noise octaves (hashed lattice, smoothstep interpolation); each octave has its own
    hash key, random rotation and offset, so lattice axes and values are decorrelated between octaves."""

    keys: np.ndarray  # (octaves,) uint32 hash keys
    rotations: np.ndarray  # (octaves, 3, 3) float32, already multiplied by the octave frequency
    offsets: np.ndarray  # (octaves, 3) float32
    amplitudes: np.ndarray  # (octaves,) float32, normalised so the field has std ~ 0.5

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        """Field value at points ``xyz`` (3, N) float32 (coordinate rows, contiguous) -> (N,) float32."""
        total = np.zeros(xyz.shape[1], np.float32)
        for key, rot, off, amp in zip(self.keys, self.rotations, self.offsets, self.amplitudes):
            weights, cells = [], []
            for k in range(3):
                q = rot[k, 0] * xyz[0] + rot[k, 1] * xyz[1] + rot[k, 2] * xyz[2] + off[k]
                cell = np.floor(q)
                frac = q - cell
                weights.append(frac * frac * (3.0 - 2.0 * frac))  # smoothstep
                cells.append(cell.astype(np.int32))
            (x0, y0, z0), (wx, wy, wz) = cells, weights
            x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1

            def edge(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # lerp along z between two lattice values
                v0 = _lattice_values(x, y, z0, key)
                return v0 + wz * (_lattice_values(x, y, z1, key) - v0)

            e00, e10 = edge(x0, y0), edge(x1, y0)
            near = e00 + wy * (edge(x0, y1) - e00)
            far = e10 + wy * (edge(x1, y1) - e10)
            total += amp * (near + wx * (far - near))
        return total


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _noise_field(rng: np.random.Generator, freqs: tuple[float, ...], persistence: float) -> _NoiseField:
    n = len(freqs)
    keys = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    rotations = np.stack([_random_rotation(rng) * f for f in freqs]).astype(np.float32)
    offsets = rng.uniform(0.0, 100.0, size=(n, 3)).astype(np.float32)
    amp = persistence ** np.arange(n)
    amp = amp / np.sqrt(np.sum(amp**2)) * 1.6  # one smoothstep value-noise octave has std ~ 0.3
    return _NoiseField(keys, rotations, offsets, amp.astype(np.float32))


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class _Texture:
    material: Material
    mix: _NoiseField
    lum: _NoiseField
    spots: _NoiseField

    def albedo(self, xyz: np.ndarray) -> np.ndarray:
        """Linear RGB albedo (3, N) float32 in [0.01, 0.95] at world points ``xyz`` (3, N) (unit-scale scene)."""
        m = self.material
        mix = _smoothstep(-0.6, 0.6, self.mix(xyz))
        color_a = np.asarray(m.color_a, np.float32)[:, None]
        color = color_a + mix * (np.asarray(m.color_b, np.float32)[:, None] - color_a)
        gain = np.exp2(m.lum_contrast * np.tanh(self.lum(xyz)))
        gain *= 1.0 - m.spot_strength * _smoothstep(0.35, 0.6, self.spots(xyz))
        return 0.01 + 0.94 * np.tanh(color * gain / 0.94)  # soft roll-off: no flat, clipped patches


def _make_texture(material: Material, seed: int, stream: int) -> _Texture:
    rng = np.random.default_rng([seed, stream])
    return _Texture(material,
                    _noise_field(rng, material.mix_freqs, 0.6),
                    _noise_field(rng, material.lum_freqs, material.lum_persistence),
                    _noise_field(rng, material.spot_freqs, 0.7))


def shade(normals: np.ndarray) -> np.ndarray:
    """Lambertian shading factor (N,) for unit ``normals`` (3, N): ambient + fixed directional lights."""
    s = np.full(normals.shape[1], _AMBIENT, np.float32)
    for direction, weight in _LIGHTS:
        d = (direction / np.linalg.norm(direction)).astype(np.float32)
        s += weight * np.maximum(d[0] * normals[0] + d[1] * normals[1] + d[2] * normals[2], 0.0)
    return s


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


def pixel_grid(width: int, height: int, samples: int = 1) -> np.ndarray:
    """Image coordinates (height*samples, width*samples, 2) of a samples x samples grid inside each pixel
    (samples = 1: pixel centres u + 0.5, v + 0.5)."""
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
    origin, dirs = pixel_rays(K, cam_from_world, pixel_grid(width, height, samples))
    rgb = _shade_hits(scene, origin, dirs.reshape(-1, 3))
    rgb = rgb.reshape(3, height, samples, width, samples).mean(axis=(2, 4)).transpose(1, 2, 0)
    image = np.round(255.0 * np.clip(rgb, 0.0, 1.0) ** (1.0 / 2.2)).astype(np.uint8)
    origin, dirs = pixel_rays(K, cam_from_world, pixel_grid(width, height, 1))
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

    ``shape`` is one of :data:`SHAPES` (ignored when ``object_mesh``, an OBJ/PLY assumed +y up, is given);
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


def render_or_reuse(scenes_dir: Path, shape: str, *, n_views: int, width: int, height: int, seed: int = 0) -> tuple[Path, bool]:
    """``scenes_dir/<shape>_<views>v_<W>x<H>_s<seed>``, rendered unless a scene with these parameters is there.

    Returns (scene folder, whether it was rendered now). Used by the benchmarks.
    """
    scene = Path(scenes_dir) / f"{shape}_{n_views}v_{width}x{height}_s{seed}"
    info = scene / "gt" / "scene.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        cams = json.loads((scene / "gt" / "cameras.json").read_text())
        if meta.get("n_views") == n_views and (cams.get("width"), cams.get("height")) == (width, height) and meta.get("seed") == seed:
            return scene, False
    render_scene(scene, shape=shape, n_views=n_views, width=width, height=height, seed=seed, rings=2)
    return scene, True

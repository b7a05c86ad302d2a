"""Geometry and appearance of the synthetic scenes rendered by :mod:`pipeline.synthetic.render`.

Triangle meshes as arrays (:class:`TriMesh`), the room and the procedural objects of :data:`SHAPES`
(or a user's mesh), normalised to a bounding-box diagonal of 1 standing on z = 0 (+z up); per-corner
shading normals; procedural 3D albedo (multi-octave value noise, seeded) and Lambertian shading from
fixed lights, so appearance is view-independent by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open3d as o3d

from pipeline.core.native_output import quiet_native

SHAPES: tuple[str, ...] = ("blob", "thin", "knot")
"""Names accepted by ``render_scene(shape=...)``: ``blob`` (box, spheres, torus, cone:
compact rounded parts), ``thin`` (table and chair, legs ~2 % of the diagonal),
``knot`` (a trefoil-knot tube lying on the floor: concavities, self-occlusion)."""

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

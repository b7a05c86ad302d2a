"""Surface metrics of the evaluation protocol (:mod:`pipeline.analysis.evaluate`): meshes as arrays, area-uniform
sampling, point-to-mesh distances, the GT views of the visibility filter, accuracy/completeness/F-score.

Every length is in GT units; thresholds are labelled as in :func:`threshold_table`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ReconError
from pipeline.core.native_output import quiet_native
from pipeline.synthetic.groundtruth import load_gt_cameras, load_gt_depth

DEFAULT_THRESHOLDS_REL: tuple[float, ...] = (0.005, 0.01)
"""F-score thresholds as fractions of the GT object's bounding-box diagonal."""
DEFAULT_MARGIN = 0.05
"""Crop box = GT object box grown by this fraction of its diagonal on every side."""
DEFAULT_MAX_DIST_REL = 0.1
"""Distances are capped at this fraction of the diagonal."""
DEFAULT_MAX_POINTS = 400_000
"""Most samples drawn per surface."""
VISIBILITY_TOL_REL = 0.01
"""A GT sample is seen by a GT camera when its z agrees with the GT depth there within this share."""
DEPTH_EDGE_TOL_REL = 0.02
"""GT depth is read bilinearly unless its 4 neighbours differ by more than this share (then nearest)."""


# ---- meshes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mesh:
    """A triangle mesh as arrays: ``vertices`` (V, 3) float64, ``triangles`` (T, 3) int64."""

    vertices: np.ndarray
    triangles: np.ndarray

    def transformed(self, T_44: np.ndarray) -> "Mesh":
        """Vertices mapped by a 4x4 (similarity) transform."""
        T_44 = np.asarray(T_44, dtype=np.float64)
        return Mesh(self.vertices @ T_44[:3, :3].T + T_44[:3, 3], self.triangles)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.vertices[np.unique(self.triangles)] if len(self.triangles) else self.vertices
        return used.min(0), used.max(0)


def as_mesh(mesh: Any) -> Mesh:
    """A :class:`Mesh` from a path, an object with ``vertices``/``triangles`` (or ``faces``), or an Open3D mesh."""
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, (str, Path)):
        return load_mesh(Path(mesh))
    faces = getattr(mesh, "triangles", None)
    if faces is None:
        faces = getattr(mesh, "faces")
    return Mesh(np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3),
                np.asarray(faces, dtype=np.int64).reshape(-1, 3))


def load_mesh(path: Path) -> Mesh:
    """Read a triangle mesh (PLY, OBJ, ...) with Open3D; an empty or unreadable file raises ReconError."""
    import open3d as o3d

    path = Path(path)
    if not path.is_file():
        raise ReconError(f"{path}: mesh file not found")
    with quiet_native():
        mesh = o3d.io.read_triangle_mesh(str(path))
    out = Mesh(np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3),
               np.asarray(mesh.triangles, dtype=np.int64).reshape(-1, 3))
    if len(out.triangles) == 0:
        raise ReconError(f"{path}: no triangles (empty or unreadable mesh); check the file or re-run the fuse stage")
    return out


def crop_triangles(mesh: Mesh, lo: np.ndarray, hi: np.ndarray) -> Mesh:
    """Triangles whose bounding box overlaps the axis-aligned box ``[lo, hi]`` (vertices unchanged)."""
    tri = mesh.vertices[mesh.triangles]  # (T, 3, 3)
    keep = np.all(tri.max(1) >= lo, axis=1) & np.all(tri.min(1) <= hi, axis=1)
    return Mesh(mesh.vertices, mesh.triangles[keep])


def inside_box(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N,) bool: points inside ``[lo, hi]``."""
    return np.all((points >= lo) & (points <= hi), axis=1)


def triangle_areas(mesh: Mesh) -> np.ndarray:
    v = mesh.vertices[mesh.triangles]
    return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)


def sample_surface(mesh: Mesh, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly distributed by area: (points (n, 3), unit face normals (n, 3))."""
    areas = triangle_areas(mesh)
    total = areas.sum()
    if n <= 0 or total <= 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    face = rng.choice(len(areas), size=n, p=areas / total)
    r1, r2 = rng.random(n), rng.random(n)
    flip = r1 + r2 > 1.0
    r1, r2 = np.where(flip, 1.0 - r1, r1), np.where(flip, 1.0 - r2, r2)
    v = mesh.vertices[mesh.triangles[face]]
    points = v[:, 0] + r1[:, None] * (v[:, 1] - v[:, 0]) + r2[:, None] * (v[:, 2] - v[:, 0])
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    return points, normals


@dataclass
class _Surface:
    """One surface prepared for distance queries: the triangles near the box and their samples."""

    mesh: Mesh
    points: np.ndarray
    normals: np.ndarray
    spacing: float
    _tree: Any = None
    _scene: Any = None

    @classmethod
    def build(cls, mesh: Mesh, lo: np.ndarray, hi: np.ndarray, spacing: float, max_points: int,
              rng: np.random.Generator) -> "_Surface":
        near = crop_triangles(mesh, lo, hi)
        area = float(triangle_areas(near).sum())
        n = int(min(max_points, math.ceil(area / spacing**2))) if area > 0 else 0
        points, normals = sample_surface(near, n, rng)
        return cls(near, points, normals, math.sqrt(area / n) if n else float("inf"))

    def distance(self, query: np.ndarray, exact_radius: float, cap: float) -> np.ndarray:
        """Distance (N,) of ``query`` points to this surface, exact within ``exact_radius``, capped at ``cap``."""
        from scipy.spatial import cKDTree

        if len(query) == 0:
            return np.zeros(0)
        if self._tree is None:
            self._tree = cKDTree(self.points)
        d, _ = self._tree.query(query, workers=-1, distance_upper_bound=cap)
        d = np.minimum(d, cap)
        near = d < exact_radius
        if near.any():
            d[near] = np.minimum(d[near], self._exact(query[near]))
        return d

    def _exact(self, query: np.ndarray) -> np.ndarray:
        import open3d as o3d

        if self._scene is None:
            self._scene = o3d.t.geometry.RaycastingScene()
            self._scene.add_triangles(o3d.core.Tensor(self.mesh.vertices.astype(np.float32)),
                                      o3d.core.Tensor(self.mesh.triangles.astype(np.uint32)))
        return self._scene.compute_distance(o3d.core.Tensor(query.astype(np.float32))).numpy().astype(np.float64)


# ---- ground-truth views ------------------------------------------------------------------

@dataclass(frozen=True)
class GtViews:
    """GT cameras with their depth maps (``GT_DIR/cameras.json`` + ``depth/``)."""

    cameras: dict[str, tuple[np.ndarray, np.ndarray]]
    """image name → (K (3, 3), cam_from_world (4, 4)), GT frame."""
    width: int
    height: int
    gt_dir: Path

    @classmethod
    def load(cls, gt_dir: Path) -> "GtViews":
        try:
            cams, w, h = load_gt_cameras(gt_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReconError(f"{Path(gt_dir) / 'cameras.json'}: unreadable GT cameras ({exc})") from exc
        return cls(cams, w, h, Path(gt_dir))

    def depth(self, name: str) -> np.ndarray | None:
        """GT z-depth (H, W) of an image (``depth/<stem>.npy`` or ``.npz``), or None when missing."""
        stem = self.gt_dir / "depth" / Path(name).stem
        if not (stem.with_suffix(".npy").is_file() or stem.with_suffix(".npz").is_file()):
            return None
        return np.asarray(load_gt_depth(self.gt_dir, name), dtype=np.float64)


def sample_depth(depth_hw: np.ndarray, uv_n2: np.ndarray, edge_tol_rel: float = DEPTH_EDGE_TOL_REL) -> np.ndarray:
    """Read a depth map at pixel coordinates (COLMAP convention), 0 outside or where invalid.

    Bilinear where the 4 neighbouring pixels are valid (> 0) and within
    ``edge_tol_rel`` of each other, else the nearest pixel (no blending across
    depth edges).
    """
    h, w = depth_hw.shape
    u, v = uv_n2[:, 0], uv_n2[:, 1]
    out = np.zeros(len(uv_n2))
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h) & np.isfinite(u) & np.isfinite(v)
    u, v = u[ok], v[ok]
    nearest = depth_hw[np.clip(v.astype(np.int64), 0, h - 1), np.clip(u.astype(np.int64), 0, w - 1)]
    x, y = u - 0.5, v - 0.5
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = np.clip(x - x0, 0.0, 1.0), np.clip(y - y0, 0.0, 1.0)
    d00, d01, d10, d11 = depth_hw[y0, x0], depth_hw[y0, x1], depth_hw[y1, x0], depth_hw[y1, x1]
    lo = np.minimum(np.minimum(d00, d01), np.minimum(d10, d11))
    hi = np.maximum(np.maximum(d00, d01), np.maximum(d10, d11))
    smooth = (lo > 0) & (hi <= lo * (1.0 + edge_tol_rel))
    bilinear = (1 - fy) * ((1 - fx) * d00 + fx * d01) + fy * ((1 - fx) * d10 + fx * d11)
    out[ok] = np.where(smooth, bilinear, nearest)
    return np.where(out > 0, out, 0.0)


def visible_count(points: np.ndarray, views: GtViews, tol_rel: float = VISIBILITY_TOL_REL) -> np.ndarray:
    """(N,) number of GT views that see each GT-frame point (projects inside, GT depth agrees within ``tol_rel``)."""
    count = np.zeros(len(points), dtype=np.int64)
    for name, (K, T) in views.cameras.items():
        depth = views.depth(name)
        if depth is None:
            continue
        pc = points @ T[:3, :3].T + T[:3, 3]
        z = pc[:, 2]
        front = z > 1e-9
        uv = np.full((len(points), 2), -1.0)
        uv[front] = (pc[front, :2] / z[front, None]) @ K[:2, :2].T + K[:2, 2]
        d = sample_depth(depth, uv)
        count += (front & (d > 0) & (np.abs(d - z) <= tol_rel * np.maximum(z, 1e-12))).astype(np.int64)
    return count


# ---- metrics -----------------------------------------------------------------------------

def surface_metrics(d_acc: np.ndarray, d_comp: np.ndarray, thresholds: dict[str, float],
                    diagonal: float) -> dict[str, Any]:
    """Accuracy, completeness, Chamfer and precision/recall/F at each threshold (lengths in GT units).

    Args:
        d_acc: (N,) distances reconstructed → GT; d_comp: (M,) GT → reconstructed.
        thresholds: label → absolute threshold.
        diagonal: GT object diagonal, for the ``*_rel`` values.
    """
    acc_mean, comp_mean = float(np.mean(d_acc)), float(np.mean(d_comp))
    out: dict[str, Any] = {
        "accuracy": {"mean": acc_mean, "median": float(np.median(d_acc))},
        "completeness": {"mean": comp_mean, "median": float(np.median(d_comp))},
        "chamfer": 0.5 * (acc_mean + comp_mean),
    }
    for key in ("accuracy", "completeness"):
        out[key]["mean_rel"] = out[key]["mean"] / diagonal
        out[key]["median_rel"] = out[key]["median"] / diagonal
    out["chamfer_rel"] = out["chamfer"] / diagonal
    out["thresholds"] = {}
    for label, tau in thresholds.items():
        p, r = float(np.mean(d_acc < tau)), float(np.mean(d_comp < tau))
        f = 2 * p * r / (p + r) if p + r > 0 else 0.0
        out["thresholds"][label] = {"threshold": float(tau), "precision": p, "recall": r, "fscore": f}
    return out


def threshold_table(diagonal: float, thresholds_rel: Sequence[float] | None,
                    threshold_abs: float | Sequence[float] | None) -> dict[str, float]:
    """label → absolute threshold: ``"0.5%"`` for relative ones, ``"abs:0.002"`` for absolute ones (GT units)."""
    out: dict[str, float] = {}
    for r in thresholds_rel or ():
        if not r > 0:
            raise ReconError(f"threshold {r}: relative thresholds must be positive fractions of the diagonal "
                             "(e.g. 0.005)")
        out[f"{100 * r:g}%"] = float(r) * diagonal
    if threshold_abs is not None:
        for a in np.atleast_1d(np.asarray(threshold_abs, dtype=np.float64)):
            if not a > 0:
                raise ReconError(f"threshold {a}: absolute thresholds must be positive (GT units)")
            out[f"abs:{a:g}"] = float(a)
    if not out:
        raise ReconError("no F-score threshold given")
    return out


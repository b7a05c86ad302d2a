"""Ray-casting a triangle mesh from a pinhole camera (Open3D ``RaycastingScene``, CPU, headless).

Shared by the export stage (which faces a photo sees, for texturing) and by
analysis (rendering a mesh from a camera to compare with the photo). One
:class:`MeshRaycaster` holds the mesh's BVH; :meth:`MeshRaycaster.cast_view`
casts one ray per pixel centre of a view and returns, per pixel, the face hit,
its barycentric coordinates and the camera-frame depth.

Conventions are those of :mod:`pipeline.core.geometry`: ``cam_from_world``
poses, COLMAP pixel centres (pixel ``(u, v)`` is centred at ``(u + 0.5, v + 0.5)``),
depth = camera ``z``. Barycentrics ``(w0, w1, w2)`` weight the face's corners
in the order of ``faces``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NO_FACE = -1
"""Face id of a pixel whose ray hits nothing."""


@dataclass(frozen=True)
class RayHits:
    """Per-pixel result of casting a view: arrays of shape (H, W) or (H, W, 3)."""

    face_id: np.ndarray
    """(H, W) int64 index into the mesh's faces, :data:`NO_FACE` where nothing is hit."""
    barycentric: np.ndarray
    """(H, W, 3) float32 weights of the face's three corners (zeros where nothing is hit)."""
    depth: np.ndarray
    """(H, W) float32 camera-frame z of the hit, ``inf`` where nothing is hit."""

    @property
    def hit(self) -> np.ndarray:
        """(H, W) bool: a face was hit."""
        return self.face_id != NO_FACE


def pixel_rays(K: np.ndarray, cam_from_world: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """World-frame rays through the pixel centres of a pinhole view.

    Returns:
        (origin (3,), directions (H*W, 3)) with directions scaled so that a ray
        parameter ``t`` equals the camera-frame depth ``z`` (the camera-frame
        direction is ``K^-1 [u+0.5, v+0.5, 1]``, whose z is 1).
    """
    us, vs = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d_cam = np.stack([(us - K[0, 2]) / K[0, 0], (vs - K[1, 2]) / K[1, 1], np.ones_like(us)], -1).reshape(-1, 3)
    R, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    return -R.T @ t, d_cam @ R  # R^T d per row


class MeshRaycaster:
    """A triangle mesh ready for ray casting (builds Open3D's BVH once)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        import open3d as o3d

        self._o3d = o3d
        self.n_faces = len(faces)
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
                                  o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)))

    def cast(self, origin: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cast rays ``origin + t * directions``.

        Returns:
            (face id (N,) int64 with :data:`NO_FACE` for misses, barycentric (N, 3) float32, t (N,) float32).
        """
        rays = np.empty((len(directions), 6), np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = directions
        ans = self._scene.cast_rays(self._o3d.core.Tensor(rays))
        t_hit = ans["t_hit"].numpy()
        hit = np.isfinite(t_hit)
        face_id = np.where(hit, ans["primitive_ids"].numpy().astype(np.int64), NO_FACE)
        uv = ans["primitive_uvs"].numpy()
        bary = np.stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], 1).astype(np.float32)
        bary[~hit] = 0.0
        return face_id, bary, t_hit.astype(np.float32)

    def cast_view(self, K: np.ndarray, cam_from_world: np.ndarray, width: int, height: int) -> RayHits:
        """Cast one ray per pixel centre of a ``width`` x ``height`` pinhole view."""
        origin, dirs = pixel_rays(K, cam_from_world, width, height)
        face_id, bary, t_hit = self.cast(origin, dirs)
        return RayHits(face_id=face_id.reshape(height, width), barycentric=bary.reshape(height, width, 3),
                       depth=t_hit.reshape(height, width))


@dataclass(frozen=True)
class LoadedMesh:
    """A mesh file read once for ray casting (the report's diagnostics and renders share it)."""

    vertices: np.ndarray
    """(V, 3) float64."""
    faces: np.ndarray
    """(F, 3) int64."""
    vertex_colors: np.ndarray | None
    """(V, 3) float64 in [0, 1], or None."""
    raycaster: MeshRaycaster


def load_mesh(path: Path) -> LoadedMesh | None:
    """Read a triangle mesh file (PLY, OBJ, ...) and build its ray-casting BVH; None when it has no triangles."""
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(str(path))
    if len(mesh.triangles) == 0:
        return None
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.triangles).astype(np.int64)
    colors = np.asarray(mesh.vertex_colors) if mesh.has_vertex_colors() else None
    return LoadedMesh(vertices=vertices, faces=faces, vertex_colors=colors, raycaster=MeshRaycaster(vertices, faces))

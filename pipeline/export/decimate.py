"""Decimation that keeps the geometry: quadric edge collapse, boundaries kept, no flipped faces.

Two well-kept libraries, chosen by measurement (``bench/bench_decimate.py``,
docs/results.md):

* ``fast`` (default): fast-simplification (Fast-Quadric-Mesh-Simplification),
  with ``preserve_border``; it refuses collapses that flip a face. About 1 s for
  1 M → 200 k faces on 2 cores.
* ``open3d``: Open3D's ``simplify_quadric_decimation`` (Garland-Heckbert) with
  a high boundary weight; tens of seconds for the same mesh.

Vertex colours of the result are those of the nearest input vertex.
"""

from __future__ import annotations

import numpy as np

from pipeline.export.config import DecimationMethod

BOUNDARY_WEIGHT = 1000.0
"""Open3D's boundary weight: collapses that move a boundary vertex cost this much more."""


def target_face_count(n_faces: int, target_faces: int | None, target_ratio: float | None) -> int | None:
    """The face count to decimate to: the smaller of ``target_faces`` and ``target_ratio * n_faces``.

    Returns None when neither is set or the mesh is already small enough.
    """
    targets = []
    if target_faces is not None:
        targets.append(int(target_faces))
    if target_ratio is not None:
        targets.append(max(1, int(round(target_ratio * n_faces))))
    if not targets or min(targets) >= n_faces:
        return None
    return min(targets)


def transfer_vertex_colors(source_vertices: np.ndarray, source_colors: np.ndarray,
                           target_vertices: np.ndarray) -> np.ndarray:
    """(N, C) colours of the nearest source vertex for each target vertex."""
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(np.asarray(source_vertices, dtype=np.float64)).query(target_vertices, workers=-1)
    return np.asarray(source_colors)[nearest]


def decimate_arrays(vertices: np.ndarray, faces: np.ndarray, target: int,
                    method: DecimationMethod | str = DecimationMethod.fast) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (N, 3) float64, faces (M, 3) int64) of the mesh decimated to about ``target`` faces.

    Unreferenced vertices are dropped. A mesh at or below the target is returned as it is.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if target >= len(faces):
        return vertices, faces
    if DecimationMethod(method) is DecimationMethod.fast:
        import fast_simplification

        new_vertices, new_faces = fast_simplification.simplify(vertices, faces.astype(np.int32), target_count=target,
                                                               preserve_border=True)
    else:
        import open3d as o3d

        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces))
        out = mesh.simplify_quadric_decimation(int(target), boundary_weight=BOUNDARY_WEIGHT)
        new_vertices, new_faces = np.asarray(out.vertices), np.asarray(out.triangles)
    return _drop_unreferenced(np.asarray(new_vertices, dtype=np.float64), np.asarray(new_faces, dtype=np.int64))


def _drop_unreferenced(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used, inverse = np.unique(faces.ravel(), return_inverse=True)
    return vertices[used], inverse.reshape(-1, 3).astype(np.int64)

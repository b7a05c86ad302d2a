"""Cleaning of the fused mesh (region of interest, small components, visibility) and helpers on legacy Open3D meshes.

Cleaning: the surface is extracted where at least ``min_views`` depth maps
observed a voxel (Open3D keeps ``weight > threshold``, so ``min_views - 0.5``
is passed), cropped to the region, and connected components with fewer than
``min_component_fraction`` of the largest one's triangles are removed. The
fraction is small (0.1 %) because the largest component usually includes the
floor or table around the object: a real part that touches it at a single
point (a sphere resting on the floor) is a separate component of ~2 % of it,
while fusion debris is 10-100 triangles. Then **visibility cleaning**
(``visibility_margin``): every vertex is projected into every fused depth
map; a map *sees through* the vertex when its depth there is more than
``visibility_margin`` (relative) behind it, and *agrees* when it is within
``visibility_agree``. A vertex that at least one map sees through, and that
more maps see through than agree with, lies in space the views found empty
(a floater, or a surface fused from depth that was too near) and is removed
with its triangles. Measured on five rendered scenes (24 views 480x360,
refined depth): precision at 1 % rose to 0.989-0.999 (knot 0.977 -> 0.992)
at a recall cost of 0.001-0.01.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.cache import atomic_path
from pipeline.core.errors import ReconError


def visibility_votes(vertices_n3: np.ndarray, depth_hw: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray, *,
                     margin: float, agree: float) -> tuple[np.ndarray, np.ndarray]:
    """What one depth map says about each mesh vertex: (sees through it, agrees with it), (N,) bool each.

    The vertex is projected into the map and the depth of the pixel it falls in
    is read (``(int(u), int(v))``, Open3D's TSDF convention; 0 = no depth).
    With ``rel = (depth − z) / z`` (``z`` the vertex's depth in that camera), the
    map *sees through* the vertex when ``rel > margin`` (it saw a surface farther
    along the same ray, so the vertex lies in space that map found empty) and
    *agrees* when ``|rel| < agree``. Vertices behind the camera, outside the
    image or on pixels without depth get neither vote.
    """
    import torch

    from pipeline.core.geometry import project, transform_points

    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))[None]  # noqa: E731
    uv, z = project(transform_points(t(cam_from_world), t(vertices_n3)), t(K), eps=1e-9)
    u, v, z = uv[0, :, 0].numpy(), uv[0, :, 1].numpy(), z[0].numpy()
    h, w = depth_hw.shape
    inside = (z > 1e-9) & (u >= 0) & (u < w) & (v >= 0) & (v < h)  # int(u) < w: Open3D's pixel
    d = np.asarray(depth_hw, dtype=np.float64)[np.clip(v, 0, h - 1).astype(np.int64),
                                               np.clip(u, 0, w - 1).astype(np.int64)]
    seen = inside & (d > 0)
    rel = (d - z) / np.maximum(z, 1e-9)
    return seen & (rel > margin), seen & (np.abs(rel) < agree)


def visibility_outliers(sees_through: np.ndarray, agrees: np.ndarray) -> np.ndarray:
    """Vertices to drop: at least one depth map sees through them, and more maps do than agree with them."""
    return (sees_through >= 1) & (sees_through > agrees)


def remove_vertices(mesh, drop: np.ndarray):
    """A copy of a legacy mesh without the vertices ``drop`` (N,) bool and every triangle that uses one."""
    triangles = np.asarray(mesh.triangles).astype(np.int64)
    return keep_triangles(mesh, ~drop[triangles].any(axis=1))


def keep_triangles(mesh, keep: np.ndarray):
    """A copy of a legacy mesh with only the triangles ``keep`` (T,) bool and the vertices they use."""
    vertices = np.asarray(mesh.vertices)
    kept_tris = np.asarray(mesh.triangles).astype(np.int64)[keep]
    used = np.zeros(len(vertices), dtype=bool)
    used[kept_tris.ravel()] = True
    new_index = np.cumsum(used) - 1
    colors = np.asarray(mesh.vertex_colors)[used] if mesh.has_vertex_colors() else None
    normals = np.asarray(mesh.vertex_normals)[used] if mesh.has_vertex_normals() else None
    return mesh_from_arrays(vertices[used], new_index[kept_tris], colors, normals)


def triangle_components(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """(T,) connected-component label of each triangle (triangles sharing a vertex are connected).

    Same components as Open3D's ``cluster_connected_triangles`` (edge-connected) except for
    triangles that touch at a single vertex only; ~50x faster on meshes of 10^5-10^6 triangles.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(triangles) == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.concatenate([triangles[:, 0], triangles[:, 1]])
    cols = np.concatenate([triangles[:, 1], triangles[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices, n_vertices))
    _, vertex_label = connected_components(graph, directed=False)
    return vertex_label[triangles[:, 0]].astype(np.int64)


def mesh_from_arrays(vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None,
                     normals: np.ndarray | None = None):
    """Legacy Open3D mesh from (V, 3) vertices, (T, 3) triangles and optional (V, 3) colours in [0, 1] / normals."""
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh()
    mesh.vertices = o3d.utility.Vector3dVector(np.asarray(vertices, dtype=np.float64))
    mesh.triangles = o3d.utility.Vector3iVector(np.asarray(triangles, dtype=np.int32))
    if colors is not None and len(colors) == len(vertices):
        mesh.vertex_colors = o3d.utility.Vector3dVector(np.asarray(colors, dtype=np.float64))
    if normals is not None and len(normals) == len(vertices):
        mesh.vertex_normals = o3d.utility.Vector3dVector(np.asarray(normals, dtype=np.float64))
    return mesh


def clean_mesh(mesh, roi: tuple[np.ndarray, np.ndarray] | None, min_component_fraction: float):
    """Crop a legacy mesh to ``roi`` (triangles with every vertex inside) and drop small components.

    A component survives if it has at least ``min_component_fraction`` x the largest one's triangles
    (counted after the crop). Unreferenced vertices are removed.
    """
    vertices = np.asarray(mesh.vertices)
    triangles = np.asarray(mesh.triangles).astype(np.int64)
    keep = np.ones(len(triangles), dtype=bool)
    if roi is not None:
        inside = np.all((vertices >= roi[0]) & (vertices <= roi[1]), axis=1)
        keep &= inside[triangles].all(axis=1)
    if min_component_fraction > 0 and keep.any():
        label = triangle_components(triangles[keep], len(vertices))
        counts = np.bincount(label)
        kept = np.flatnonzero(keep)
        keep[kept[counts[label] < min_component_fraction * counts.max()]] = False
    return keep_triangles(mesh, keep)


def write_mesh_ply(mesh, path: Path) -> None:
    """Write a legacy Open3D mesh as binary PLY (vertex colours, normals) atomically."""
    import open3d as o3d

    with atomic_path(path, suffix=".ply") as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh, write_ascii=False,
                                          write_vertex_normals=mesh.has_vertex_normals(), write_vertex_colors=True):
            raise ReconError(f"{path}: Open3D could not write the mesh; check the output folder")

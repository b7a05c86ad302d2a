"""Cutting a mesh into UV charts and packing them into one atlas (xatlas).

* :func:`view_charts`: each connected patch of faces textured from one photo is
  a chart whose UVs are that photo's pixel coordinates (the photo's own
  resolution, as OpenMVS and mvs-texturing do); faces that reach outside their
  photo and faces no photo sees are loose flattened triangles.
* :func:`xatlas_charts`: xatlas cuts and parameterizes the mesh itself (slower:
  about 86 s for a 200 k-face fused mesh on 2 cores, against about 1 s to pack).
* :func:`pack_charts`: xatlas packs the charts into one atlas of a given side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import ReconError
from pipeline.core.io import View
from pipeline.export.views import NO_VIEW, inside_image, project_points

logger = logging.getLogger(__name__)

MIN_CHART_AREA = 1e-3
"""UV triangles smaller than this (texels^2) are laid out loose: xatlas drops faces of no area."""


@dataclass
class Charts:
    """The mesh cut into charts, before packing: UV vertices in texel units."""

    source_vertex: np.ndarray
    """(N,) int64 input vertex of each chart vertex."""
    uv: np.ndarray
    """(N, 2) float32 chart coordinates in texels."""
    faces: np.ndarray
    """(F, 3) int64 chart-vertex indices, in the order of the input faces."""
    dropped_faces: int = 0
    """Faces xatlas left out when packing (no UV area): they sample one texel."""


def _flattened_triangles(tri: np.ndarray, scale: float) -> np.ndarray:
    """(F, 3, 2) an isometric 2-D layout of each 3-D triangle (F, 3, 3), lengths times ``scale``."""
    e1 = tri[:, 1] - tri[:, 0]
    e2 = tri[:, 2] - tri[:, 0]
    l1 = np.maximum(np.linalg.norm(e1, axis=1), 1e-12)
    x2 = (e1 * e2).sum(1) / l1
    y2 = np.sqrt(np.maximum((e2 * e2).sum(1) - x2**2, 0.0))
    out = np.zeros((len(tri), 3, 2))
    out[:, 1, 0] = l1
    out[:, 2, 0] = x2
    out[:, 2, 1] = y2
    return out * scale


def chart_components(n_vertices: int, faces: np.ndarray) -> tuple[int, np.ndarray]:
    """(count, (N,) component of each vertex): connected components of the chart mesh."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, n_vertices))
    return connected_components(graph, directed=False)


def component_boxes(uv: np.ndarray, count: int, component: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo (C, 2), hi (C, 2)): the UV bounding box of each component."""
    lo = np.full((count, 2), np.inf)
    hi = np.full((count, 2), -np.inf)
    np.minimum.at(lo, component, uv)
    np.maximum.at(hi, component, uv)
    return lo, hi


def separate_components(uv: np.ndarray, faces: np.ndarray, margin: float = 8.0) -> np.ndarray:
    """UVs with every connected component of the chart mesh moved to a cell of its own (shapes unchanged).

    xatlas groups UV-mesh faces into charts by UV position, so two patches that
    touch in the photo (an occluder and the surface behind it) would become one
    chart and overlap; on a grid of cells they cannot.
    """
    count, component = chart_components(len(uv), faces)
    lo, hi = component_boxes(uv, count, component)
    cell = float((hi - lo).max()) + margin
    per_row = int(np.ceil(np.sqrt(count)))
    slot = np.stack([np.arange(count) % per_row, np.arange(count) // per_row], 1) * cell
    return uv - lo[component] + slot[component]


def view_charts(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, views: Sequence[View],
                texels_per_pixel: float, label_area: np.ndarray, unseen_texels: float = 4.0) -> Charts:
    """Charts whose UVs are the label view's pixel coordinates (times ``texels_per_pixel``).

    A vertex is split once per view that labels faces around it, so each
    connected patch of one view is one chart. Some faces are loose flattened
    triangles instead: faces that reach outside their label's photo (a large
    face seen in part), at the density of their visible area ``label_area``
    (pixels^2); faces seen edge-on (no area in the photo; xatlas drops
    zero-area faces); and faces no view sees (``labels == NO_VIEW``; they take
    the mesh's vertex colours), ``unseen_texels`` texels long. A face that has
    no area in 3-D either gets a small right triangle. Where a surface hides
    another in the photo, their faces overlap in the chart: the bake gives
    such texels to the front face (:func:`pipeline.export.texture.bake_views`).
    """
    n_views = len(views)
    labelled = labels != NO_VIEW
    uv_label = np.zeros((len(faces), 3, 2))
    outside = np.zeros(len(faces), dtype=bool)
    for k, view in enumerate(views):
        sel = np.flatnonzero(labels == k)
        if len(sel):
            uv, _ = project_points(vertices[faces[sel]].reshape(-1, 3), view.K, view.cam_from_world)
            uv_label[sel] = uv.reshape(-1, 3, 2)
            outside[sel] = ~inside_image(uv, view.width, view.height, margin=0.0).reshape(-1, 3).all(1)
    e1, e2 = uv_label[:, 1] - uv_label[:, 0], uv_label[:, 2] - uv_label[:, 0]
    flat_in_photo = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) * texels_per_pixel**2 < MIN_CHART_AREA
    loose = ~labelled | outside | flat_in_photo
    keys = faces.astype(np.int64) * n_views + np.where(loose, 0, labels)[:, None]
    keys[loose] = -1 - (np.flatnonzero(loose)[:, None] * 3 + np.arange(3))  # every loose corner its own vertex
    unique, inverse = np.unique(keys.ravel(), return_inverse=True)
    chart_faces = inverse.reshape(-1, 3).astype(np.int64)
    source = np.empty(len(unique), np.int64)
    source[chart_faces.ravel()] = faces.ravel()
    uv = np.zeros((len(unique), 2))
    uv[chart_faces[~loose].ravel()] = uv_label[~loose].reshape(-1, 2) * texels_per_pixel
    if loose.any():
        flat = _flattened_triangles(vertices[faces[loose]], 1.0)
        area_3d = 0.5 * flat[:, 1, 0] * flat[:, 2, 1]
        longest = np.maximum(np.abs(flat).max(axis=(1, 2)), 1e-12)
        density = np.sqrt(np.asarray(label_area, dtype=np.float64)[loose] / np.maximum(area_3d, 1e-30))
        density = np.maximum(density * texels_per_pixel, unseen_texels / longest)  # texels per scene unit
        flat = flat * density[:, None, None]
        degenerate = 0.5 * flat[:, 1, 0] * flat[:, 2, 1] < MIN_CHART_AREA  # a sliver or a point in 3-D too
        flat[degenerate] = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) * unseen_texels
        uv[chart_faces[loose].ravel()] = flat.reshape(-1, 2)
    uv = separate_components(uv, chart_faces)
    return Charts(source_vertex=source, uv=uv.astype(np.float32), faces=chart_faces)


def xatlas_charts(vertices: np.ndarray, faces: np.ndarray) -> Charts:
    """Charts cut and parameterized by xatlas (UVs in xatlas's texel units)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    atlas.generate()
    vmapping, indices, uv = atlas[0]
    return Charts(source_vertex=vmapping.astype(np.int64), uv=(uv * [atlas.width, atlas.height]).astype(np.float32),
                  faces=indices.astype(np.int64))


def chart_side(charts: Charts) -> float:
    """Side (texels) of a square holding the charts' total area: a lower bound of the atlas side."""
    tri = charts.uv[charts.faces].astype(np.float64)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    return float(np.sqrt(0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()))


def _generate(charts: Charts, side: int, texels_per_unit: float, padding: int):
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_uv_mesh(charts.uv, charts.faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(side)
    pack.texels_per_unit = float(texels_per_unit)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    return atlas


def pack_charts(charts: Charts, side: int | None, padding: int, *, max_side: int = 8192,
                max_tries: int = 12) -> tuple[Charts, int, int]:
    """Pack the charts (UVs in texels) into one atlas with xatlas.

    With ``side=None`` the charts keep their size (1 texel per UV unit) and
    xatlas sizes the atlas to them; an atlas larger than ``max_side`` (or a
    given ``side``) is packed again at that side, the charts shrunk until they fit.

    Returns:
        (charts with UVs in [0, 1] (v up), atlas width, atlas height).
    Raises:
        ReconError: the charts do not fit (their padding alone fills the atlas).
    """
    if side is None:
        atlas = _generate(charts, 0, 1.0, padding)
        side = max_side
        scale = min(1.0, 0.97 * side / max(atlas.width, atlas.height))
    else:
        atlas = _generate(charts, side, 0.0, padding)
        scale = float(atlas.texels_per_unit) * min(1.0, 0.97 * side / max(atlas.width, atlas.height))
    tries = 0
    while atlas.atlas_count != 1 or max(atlas.width, atlas.height) > side:
        if tries >= max_tries or not scale > 0:
            raise ReconError(f"texture: the charts of {len(charts.faces)} faces do not fit a {side}x{side} atlas; "
                             "set export.texture_size larger")
        atlas = _generate(charts, side, scale, padding)
        scale *= 0.95 / np.sqrt(max(atlas.atlas_count, 1))
        tries += 1
    vmapping, indices, uv = atlas.get_mesh(0)
    atlas_index, _ = atlas.get_mesh_vertex_assignment(0)
    dropped = np.asarray(atlas_index).astype(np.int64) != 0  # vertices of faces xatlas left out (no UV area)
    dropped_faces = int(dropped[indices].any(1).sum())
    if dropped.any() and not dropped.all():
        logger.info("texture: xatlas left out %d faces of no UV area; they take one texel's colour", dropped_faces)
        uv[dropped] = uv[np.flatnonzero(~dropped)[0]]
    if not (np.isfinite(uv).all() and uv.min() >= 0.0 and uv.max() <= 1.0):
        raise ReconError(f"texture: xatlas returned UVs outside [0, 1] for a {side}x{side} atlas; "
                         "set export.texture_size larger")
    packed = Charts(source_vertex=charts.source_vertex[vmapping.astype(np.int64)],
                    uv=uv.astype(np.float32), faces=indices.astype(np.int64), dropped_faces=dropped_faces)
    return packed, int(atlas.width), int(atlas.height)

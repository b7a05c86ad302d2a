"""Texturing a mesh from the undistorted photos: view selection, UV atlas (xatlas), baking.

:func:`texture_mesh` is the core function. In two passes over the photos (one
photo in memory at a time):

1. **Scores.** Each view is ray-cast against the mesh (:class:`~pipeline.core.raycast.MeshRaycaster`);
   a face's score in a view is its projected area times the viewing cosine where
   the view sees its centroid (:mod:`pipeline.export.views`). Colours at the
   centroids of a sample of faces feed the per-view exposure gains.
2. **Labels and charts.** One source view per face, smoothed over neighbouring
   faces (Potts energy, ICM). With ``charts="views"`` (default) every connected
   patch of one view is a chart whose UVs are the photo's pixel coordinates
   (the photo's own resolution, as OpenMVS and mvs-texturing do); xatlas packs
   the charts into one atlas. With ``charts="xatlas"`` xatlas also cuts and
   parameterizes the mesh (slower: about 86 s for 200 k faces on 2 cores).
3. **Bake.** Every texel of every chart is a surface point; it takes the
   gain-levelled colour of the views of its face's corners, weighted by the
   corner weights (seams feathered over one ring of faces), each view tested
   for occlusion at that point. Texels no view sees take the mesh's vertex colours;
   the gutters between charts are filled with the nearest chart colour.

Texture convention: :mod:`pipeline.export.bake` (trimesh/OpenGL UVs, v up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pipeline.core.errors import ReconError
from pipeline.core.io import View, load_rgb
from pipeline.core.raycast import MeshRaycaster
from pipeline.core.sampling import sample_bilinear
from pipeline.export.bake import fill_gutters, rasterize_uv
from pipeline.export.charts import pack_charts, view_charts, xatlas_charts
from pipeline.export.views import (
    NO_VIEW,
    face_adjacency,
    face_candidate_views,
    face_view_score,
    project_points,
    smooth_labels,
    solve_view_gains,
    vertex_view_weights,
    viewing_cosine,
    visible_points,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[Iterable[T], str, int], Iterable[T]]
"""``progress(iterable, description, total)``: wraps a loop in a progress bar."""

GAIN_SAMPLE_FACES = 20_000
"""Faces whose centroid colours (in every view that sees them) feed the exposure gains."""


@dataclass(frozen=True, kw_only=True)
class TextureSettings:
    """How to texture (the export stage's ``texture_*`` settings)."""

    size: int | None = None
    """Atlas side in texels; None: from the photos' resolution (``texels_per_pixel``) up to ``max_size``."""
    max_size: int = 8192
    texels_per_pixel: float = 1.5
    """Texel density of the automatic size: texels per photo pixel (linear)."""
    smoothness: float = 1.0
    """Potts weight of a neighbouring face with another source view (data cost in [0, 1])."""
    charts: str = "views"
    """``views`` (charts are photo patches, packed by xatlas) or ``xatlas`` (xatlas cuts and parameterizes)."""
    padding: int = 2
    """Texels between charts."""
    level_exposure: bool = True
    """Solve per-view colour gains so that seams between photos of different exposure vanish."""


@dataclass
class TexturedMesh:
    """A mesh with one UV per vertex and a texture (vertices are split where charts meet)."""

    vertices: np.ndarray
    """(N, 3) float64."""
    faces: np.ndarray
    """(F, 3) int64, in the order of the input faces."""
    uv: np.ndarray
    """(N, 2) float32 in [0, 1], v up (trimesh/OpenGL)."""
    texture: np.ndarray
    """(H, W, 3) uint8."""
    source_vertex: np.ndarray
    """(N,) int64: the input vertex each vertex copies."""
    stats: dict[str, Any] = field(default_factory=dict)


def _no_progress(iterable: Iterable[T], desc: str, total: int) -> Iterable[T]:  # noqa: ARG001 - Progress signature
    return iterable


def _face_geometry(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (F, 3), unit normals (F, 3)) of the faces (normal by the right-hand rule)."""
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    return tri.mean(1), normals


def _read_photo(view: View) -> np.ndarray | None:
    """The view's undistorted photo as float32 RGB in [0, 1], or None (with a warning) when it cannot be used."""
    try:
        image = load_rgb(view.image_path)
    except ReconError as exc:
        logger.warning("texture: %s; that photo paints nothing", exc)
        return None
    if image.shape[:2] != (view.height, view.width):
        logger.warning("texture: %s is %dx%d but its camera is %dx%d; that photo paints nothing", view.image_path,
                       image.shape[1], image.shape[0], view.width, view.height)
        return None
    return image.astype(np.float32) / 255.0


@dataclass
class ViewScores:
    scores: np.ndarray
    """(F, L) float32 visible area (pixels^2) x viewing cosine, 0 where the view does not see the face."""
    areas: np.ndarray
    """(F, L) float32 visible area (pixels^2)."""
    gain_faces: np.ndarray
    """(P,) int64 faces sampled for the exposure gains."""
    gain_colours: np.ndarray
    """(P, L, 3) float32 centroid colour of those faces in each view."""
    readable: np.ndarray
    """(L,) bool: the photo could be read."""


def score_views(raycaster: MeshRaycaster, vertices: np.ndarray, faces: np.ndarray, views: Sequence[View],
                progress: Progress) -> ViewScores:
    """Pass 1: every face's score in every view, and the colours for the exposure gains."""
    n_faces, n_views = len(faces), len(views)
    centroids, normals = _face_geometry(vertices, faces)
    rng = np.random.default_rng(0)
    gain_faces = np.sort(rng.choice(n_faces, size=min(GAIN_SAMPLE_FACES, n_faces), replace=False))
    scores = np.zeros((n_faces, n_views), np.float32)
    areas = np.zeros((n_faces, n_views), np.float32)
    gain_colours = np.zeros((len(gain_faces), n_views, 3), np.float32)
    readable = np.zeros(n_views, dtype=bool)
    for k, view in enumerate(progress(views, "scoring views", n_views)):
        photo = _read_photo(view)
        if photo is None:
            continue
        readable[k] = True
        hits = raycaster.cast_view(view.K, view.cam_from_world, view.width, view.height)
        uv_c, z_c = project_points(centroids, view.K, view.cam_from_world)
        seen_c = visible_points(uv_c, z_c, hits.depth, view.K)
        uv_corners, z_corners = project_points(vertices[faces].reshape(-1, 3), view.K, view.cam_from_world)
        pixel_hits = np.bincount(hits.face_id[hits.hit], minlength=n_faces).astype(np.float32)
        area = face_view_score(uv_corners.reshape(-1, 3, 2), z_corners.reshape(-1, 3), seen_c, pixel_hits,
                               view.width, view.height)
        cosine = np.abs(viewing_cosine(normals, centroids, view.center))
        areas[:, k] = area
        scores[:, k] = area * cosine
        gain_colours[:, k] = sample_bilinear(photo, uv_c[gain_faces])
    return ViewScores(scores=scores, areas=areas, gain_faces=gain_faces, gain_colours=gain_colours, readable=readable)



def bake_views(vertices: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None, views: Sequence[View],
               raycaster: MeshRaycaster, labels: np.ndarray, scores: np.ndarray, gains: np.ndarray,
               face_uv: np.ndarray,
               width: int, height: int, progress: Progress) -> tuple[np.ndarray, dict[str, Any]]:
    """Pass 2: the texture (H, W, 3) uint8 of faces with UVs ``face_uv`` (F, 3, 2) in [0, 1].

    Every covered texel takes the gain-levelled, occlusion-tested colours of the
    views of its face (:func:`~pipeline.export.views.face_candidate_views`);
    texels that no view paints take the interpolated vertex colours (grey
    without them); gutters take the nearest chart texel.
    """
    samples = rasterize_uv(face_uv, width, height)
    tri = vertices[faces[samples.face]]
    points = (tri * samples.barycentric[..., None]).sum(1)
    weights = vertex_view_weights(faces, labels, len(vertices), len(views))
    cand_views, cand_corner = face_candidate_views(faces, labels, weights, scores)
    n_slots = cand_views.shape[1]
    slot_view = cand_views[samples.face]  # (T, K)
    slot_weight = (cand_corner[samples.face] * samples.barycentric[:, None, :]).sum(-1)  # (T, K)
    accum = np.zeros((len(samples.texel), 3), np.float32)
    total = np.zeros(len(samples.texel), np.float32)
    order = np.argsort(slot_view, axis=0, kind="stable")
    sorted_views = np.take_along_axis(slot_view, order, 0)
    occluded = 0
    for k, view in enumerate(progress(views, "baking the texture", len(views))):
        spans = [(np.searchsorted(sorted_views[:, j], k), np.searchsorted(sorted_views[:, j], k, side="right"))
                 for j in range(n_slots)]
        if all(a == b for a, b in spans):
            continue
        photo = _read_photo(view)
        if photo is None:
            continue
        hits = raycaster.cast_view(view.K, view.cam_from_world, view.width, view.height)
        for j, (a, b) in enumerate(spans):
            idx = order[a:b, j]
            idx = idx[slot_weight[idx, j] > 0]
            if len(idx) == 0:
                continue
            uv, z = project_points(points[idx], view.K, view.cam_from_world)
            seen = visible_points(uv, z, hits.depth, view.K)
            occluded += int((~seen).sum())
            idx, uv = idx[seen], uv[seen]
            w = slot_weight[idx, j]
            accum[idx] += w[:, None] * sample_bilinear(photo, uv) * gains[k]
            total[idx] += w
    painted = total > 0
    colours = np.full((len(samples.texel), 3), 0.5, np.float32)
    colours[painted] = accum[painted] / total[painted, None]
    if vertex_colors is not None and (~painted).any():
        corner = vertex_colors[faces[samples.face[~painted]]].astype(np.float32) / 255.0
        colours[~painted] = (corner * samples.barycentric[~painted, :, None]).sum(1)
    texture = np.zeros((height * width, 3), np.float32)
    covered = np.zeros(height * width, dtype=bool)
    texture[samples.texel] = colours
    covered[samples.texel] = True
    texture = fill_gutters(texture.reshape(height, width, 3), covered.reshape(height, width))
    stats = {"texels": int(len(samples.texel)), "texels_from_photos": int(painted.sum()),
             "occluded_samples": occluded}
    return np.clip(np.round(texture * 255.0), 0, 255).astype(np.uint8), stats


def texture_mesh(vertices: np.ndarray, faces: np.ndarray, views: Sequence[View], settings: TextureSettings,
                 vertex_colors: np.ndarray | None = None, progress: Progress | None = None) -> TexturedMesh:
    """Texture a mesh (normalized frame, like the cameras) from its undistorted photos.

    Args:
        vertices: (V, 3), faces: (F, 3) the mesh; ``vertex_colors`` (V, 3) uint8 paints what no photo sees.
        views: the registered views (cameras, photo paths) in the mesh's frame.
    Raises:
        ReconError: a mesh without faces, no views, or no photo that could be read.
    """
    progress = progress or _no_progress
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        raise ReconError("texture: the mesh has no faces; re-run `recon stage fuse`")
    if len(views) == 0:
        raise ReconError("texture: no registered photos to texture from; re-run `recon stage sfm`")
    t0 = time.perf_counter()
    raycaster = MeshRaycaster(vertices, faces)
    scores = score_views(raycaster, vertices, faces, views, progress)
    if not scores.readable.any():
        raise ReconError(f"texture: none of the {len(views)} photos could be read (e.g. {views[0].image_path}); "
                         "re-run `recon stage sfm`")
    labels = smooth_labels(scores.scores, face_adjacency(faces), settings.smoothness)
    seen_by = (scores.scores > 0).sum(0)
    for k in np.flatnonzero(scores.readable & (seen_by == 0)):
        logger.info("texture: %s sees none of the mesh", views[k].name)
    gains = np.ones((len(views), 3), np.float32)
    if settings.level_exposure:
        gains = solve_view_gains(scores.gain_colours, scores.scores[scores.gain_faces])
    t1 = time.perf_counter()
    if settings.charts == "xatlas":
        charts = xatlas_charts(vertices, faces)
    else:
        label_area = np.where(labels != NO_VIEW, scores.areas[np.arange(len(faces)), np.maximum(labels, 0)], 0.0)
        charts = view_charts(vertices, faces, labels, views, settings.texels_per_pixel, label_area)
    packed, width, height = pack_charts(charts, settings.size, settings.padding, max_side=settings.max_size)
    t2 = time.perf_counter()
    texture, bake_stats = bake_views(vertices, faces, vertex_colors, views, raycaster, labels, scores.scores, gains,
                                     packed.uv[packed.faces], width, height, progress)
    t3 = time.perf_counter()
    stats = {
        "faces": int(len(faces)),
        "faces_unseen": int((labels == NO_VIEW).sum()),
        "views_used": int(len(np.unique(labels[labels != NO_VIEW]))),
        "texture_size": [int(width), int(height)],
        "gain_range": [float(gains.min()), float(gains.max())],
        "seconds": {"scores": round(t1 - t0, 2), "charts": round(t2 - t1, 2), "bake": round(t3 - t2, 2)},
        **bake_stats,
    }
    return TexturedMesh(vertices=vertices[packed.source_vertex], faces=packed.faces, uv=packed.uv, texture=texture,
                        source_vertex=packed.source_vertex, stats=stats)

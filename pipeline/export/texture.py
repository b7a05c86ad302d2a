"""Texturing a mesh from the undistorted photos: view selection, UV atlas (xatlas), baking.

:func:`texture_mesh` is the core function. In two passes over the photos (one
photo per thread in memory at a time):

1. **Scores.** Each view is ray-cast against the mesh (:class:`~pipeline.core.raycast.MeshRaycaster`);
   a face's score in a view is its visible area in pixels (the rays that hit it,
   or its projected area where the view sees its centroid) times the viewing
   cosine, either side of the face (:mod:`pipeline.export.views`). Colours at the
   centroids of a sample of faces, where seen, feed the per-view exposure gains.
2. **Labels and charts.** One source view per face, smoothed over neighbouring
   faces (Potts energy, ICM). With ``charts="views"`` (default) every connected
   patch of one view is a chart whose UVs are the photo's pixel coordinates
   (the photo's own resolution, as OpenMVS and mvs-texturing do); xatlas packs
   the charts into one atlas. With ``charts="xatlas"`` xatlas also cuts and
   parameterizes the mesh (slower: about 86 s for 200 k faces on 2 cores).
3. **Bake.** Every texel of every chart is a surface point; it takes the
   gain-levelled colour of the views of its face's corners, weighted by the
   corner weights (seams feathered over one ring of faces), each view tested
   for occlusion at that point (against pass 1's ray-cast depth maps, kept when they fit in
   :data:`HIT_DEPTH_BUDGET_BYTES`). Texels no view sees take the mesh's vertex colours;
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
from scipy import ndimage

from pipeline.core.errors import ReconError
from pipeline.core.io import View, load_rgb
from pipeline.core.raycast import MeshRaycaster
from pipeline.core.sampling import sample_bilinear
from pipeline.core.workers import cpu_workers, map_in_threads
from pipeline.export.bake import TexelSamples, fill_gutters, rasterize_uv
from pipeline.export.charts import chart_side, pack_charts, view_charts, xatlas_charts
from pipeline.export.views import (
    NO_VIEW,
    face_adjacency,
    face_candidate_views,
    face_view_score,
    project_points,
    smooth_labels,
    solve_view_gains,
    triangle_areas_2d,
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
CONSISTENCY_WINDOW = 5
"""Pixels (square) averaged for a face's colour in a photo, for the photo-consistency check."""
CONSISTENCY_TOLERANCE = 0.2
"""A photo whose colour of a face (after the exposure gains) differs from the median of the photos that see it by
more than this (largest channel, colours in [0, 1]) shows something else there: a tree, a person, the sky."""
CONSISTENCY_MIN_VIEWS = 3
"""The check needs at least this many photos of a face (a median of two is no majority)."""
BAKE_CHUNK_TEXELS = 8_000_000
"""Texels baked per pass over the photos (bounds the bake's memory at about 1.2 GB)."""
HIT_DEPTH_BUDGET_BYTES = 512 * 2**20
"""Pass 1 keeps every view's ray-cast depth map for the bake when they fit in this many bytes together (24 views of
1600x1200 take 184 MB); otherwise the bake casts each view again."""
TEXELS_FROM_PHOTOS_WARN = 0.5
"""Warn when fewer of the texture's texels than this come from the photos (the rest: vertex colours)."""


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
    padding: int | None = None
    """Texels between charts (None: 2 up to a 2048 atlas, 4 up to 4096, 8 above, so mip levels bleed less)."""
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


def padding_for(side: float) -> int:
    """Gutter width (texels) for an atlas of ``side`` texels: 2 up to 2048, 4 up to 4096, else 8."""
    return 2 if side <= 2048 else 4 if side <= 4096 else 8


def _no_progress(iterable: Iterable[T], desc: str, total: int) -> Iterable[T]:  # noqa: ARG001 - Progress signature
    return iterable


def _face_geometry(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (F, 3), unit normals (F, 3)) of the faces (normal by the right-hand rule)."""
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    return tri.mean(1), normals


def median_of_seen(values: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """(F, C) median over axis 1 of ``values`` (F, L, C) where ``seen`` (F, L), NaN where nothing is seen.

    The values of ``np.nanmedian`` with the unseen entries as NaN (the mean
    of the two middle values for an even count) for NaN-free seen values,
    from one sort along the short axis instead of its partition per row,
    which is several times slower.
    """
    if values.shape[1] == 0:
        return np.full((values.shape[0], values.shape[2]), np.nan, values.dtype)
    ordered = np.sort(np.where(seen[..., None], values, np.nan), axis=1)  # NaN last
    count = seen.sum(1)[:, None, None]  # (F, 1, 1)
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0), axis=1)[:, 0]
    high = np.take_along_axis(ordered, np.maximum(count // 2, 0).clip(max=values.shape[1] - 1), axis=1)[:, 0]
    middle = np.where(count[:, 0] % 2 == 1, low, (low + high) / values.dtype.type(2))
    return np.where(count[:, 0] > 0, middle, np.nan).astype(values.dtype)


def inconsistent_views(scores: np.ndarray, face_colours: np.ndarray, gains: np.ndarray,
                       tolerance: float = CONSISTENCY_TOLERANCE, min_views: int = CONSISTENCY_MIN_VIEWS,
                       chunk_faces: int = 50_000) -> np.ndarray:
    """(F, L) bool: the photos that see a face but show another colour there than most photos of it.

    Something the mesh does not hold (a tree, a passer-by, the sky at a
    silhouette) hides the surface in those photos, so the ray-cast visibility
    test cannot catch it: they must not paint the face. Compares each photo's
    gain-levelled local colour with the per-channel median over the photos that
    see the face, where at least ``min_views`` do.
    """
    out = np.zeros(scores.shape, dtype=bool)
    for start in range(0, len(scores), chunk_faces):
        seen = scores[start:start + chunk_faces] > 0
        colours = face_colours[start:start + chunk_faces].astype(np.float32) / 255.0 * gains[None]
        with np.errstate(invalid="ignore"):  # NaN medians: faces no photo sees
            median = median_of_seen(colours, seen)  # (F, 3)
            deviation = np.abs(colours - median[:, None]).max(-1)
        enough = seen.sum(1) >= min_views
        out[start:start + chunk_faces] = seen & enough[:, None] & (deviation > tolerance)
    return out


def _label_depths(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, views: Sequence[View]) -> np.ndarray:
    """(F,) float32 camera depth of each face's centroid in its label view (inf where unlabelled)."""
    centroids = vertices[faces].mean(1)
    out = np.full(len(faces), np.inf, np.float32)
    for k, view in enumerate(views):
        sel = labels == k
        if sel.any():
            out[sel] = project_points(centroids[sel], view.K, view.cam_from_world)[1]
    return out


def _label_cosines(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, views: Sequence[View]) -> np.ndarray:
    """(F,) viewing cosine of each face in its label view (0 where unlabelled)."""
    centroids, normals = _face_geometry(vertices, faces)
    out = np.zeros(len(faces))
    for k, view in enumerate(views):
        sel = labels == k
        if sel.any():
            out[sel] = viewing_cosine(normals[sel], centroids[sel], view.center)
    return out


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
    gain_faces: np.ndarray
    """(P,) int64 faces sampled for the exposure gains."""
    gain_colours: np.ndarray
    """(P, L, 3) float32 centroid colour of those faces in each view."""
    gain_weights: np.ndarray
    """(P, L) bool: the view sees that centroid (so its colour is the face's)."""
    readable: np.ndarray
    """(L,) bool: the photo could be read."""
    face_colours: np.ndarray
    """(F, L, 3) uint8 local mean colour (:data:`CONSISTENCY_WINDOW` pixels square) at each face's centroid."""
    hit_depths: list[np.ndarray | None] = field(default_factory=list)
    """Per view, the (H, W) float32 ray-cast depth of the mesh, kept for the bake (empty: over the budget)."""


def score_views(raycaster: MeshRaycaster, vertices: np.ndarray, faces: np.ndarray, views: Sequence[View],
                progress: Progress, keep_depth_bytes: int | None = None) -> ViewScores:
    """Pass 1: every face's score in every view, the colours for the exposure gains and, when they fit in
    ``keep_depth_bytes`` (None: :data:`HIT_DEPTH_BUDGET_BYTES`), the views' ray-cast depth maps."""
    n_faces, n_views = len(faces), len(views)
    budget = HIT_DEPTH_BUDGET_BYTES if keep_depth_bytes is None else keep_depth_bytes
    keep_depth = sum(4 * v.width * v.height for v in views) <= budget
    hit_depths: list[np.ndarray | None] = [None] * n_views if keep_depth else []
    centroids, normals = _face_geometry(vertices, faces)
    rng = np.random.default_rng(0)
    gain_faces = np.sort(rng.choice(n_faces, size=min(GAIN_SAMPLE_FACES, n_faces), replace=False))
    scores = np.zeros((n_faces, n_views), np.float32)
    gain_colours = np.zeros((len(gain_faces), n_views, 3), np.float32)
    gain_weights = np.zeros((len(gain_faces), n_views), dtype=bool)
    face_colours = np.zeros((n_faces, n_views, 3), np.uint8)
    readable = np.zeros(n_views, dtype=bool)

    def score_view(k: int) -> None:
        """Fill column k (disjoint per view, so views can run in parallel threads)."""
        view = views[k]
        photo = _read_photo(view)
        if photo is None:
            return
        readable[k] = True
        hits = raycaster.cast_view(view.K, view.cam_from_world, view.width, view.height)
        if keep_depth:
            hit_depths[k] = hits.depth
        uv_c, z_c = project_points(centroids, view.K, view.cam_from_world)
        seen_c = visible_points(uv_c, z_c, hits.depth, view.K)
        uv_vertices, z_vertices = project_points(vertices, view.K, view.cam_from_world)  # each vertex once
        pixel_hits = np.bincount(hits.face_id[hits.hit], minlength=n_faces).astype(np.float32)
        area = face_view_score(uv_vertices[faces], z_vertices[faces], seen_c, pixel_hits, view.width, view.height)
        scores[:, k] = area * np.abs(viewing_cosine(normals, centroids, view.center))
        gain_colours[:, k] = sample_bilinear(photo, uv_c[gain_faces])
        gain_weights[:, k] = seen_c[gain_faces]
        local = ndimage.uniform_filter(photo, size=(CONSISTENCY_WINDOW, CONSISTENCY_WINDOW, 1), mode="nearest")
        face_colours[:, k] = np.round(sample_bilinear(local, uv_c) * 255.0).astype(np.uint8)

    done = map_in_threads(score_view, range(n_views), cpu_workers(None, "cpu"))
    for _ in progress(done, "scoring views", n_views):
        pass
    return ViewScores(scores=scores, gain_faces=gain_faces, gain_colours=gain_colours,
                      gain_weights=gain_weights, readable=readable, face_colours=face_colours,
                      hit_depths=hit_depths)



def _bake_view(view: View, points: np.ndarray, slot_t: np.ndarray, slot_j: np.ndarray, slot_weight: np.ndarray,
               gain: np.ndarray, hit_depth: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One view's share of a chunk's colours: (texel index, weight, weighted colour (N, 3), occluded samples) of the
    slots ``(slot_t, slot_j)`` that this view paints and sees; nothing when its photo cannot be read."""
    photo = _read_photo(view)
    if photo is None:
        return slot_t[:0], np.zeros(0, np.float32), np.zeros((0, 3), np.float32), 0
    uv, z = project_points(points[slot_t], view.K, view.cam_from_world)
    seen = visible_points(uv, z, hit_depth(), view.K)
    slot_t, slot_j, uv = slot_t[seen], slot_j[seen], uv[seen]
    w = slot_weight[slot_t, slot_j]
    colour = sample_bilinear(photo, uv) * gain
    return slot_t, w, w[:, None] * colour, int((~seen).sum())


def _bake_chunk(vertices: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None,
                views: Sequence[View], hit_depth: Callable[[int], np.ndarray], cand_views: np.ndarray,
                cand_corner: np.ndarray, gains: np.ndarray, samples, progress: Progress,
                desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Colours (T, 3) uint8 of the texels ``samples`` (faces indexed in ``faces``), texels painted from photos
    (T,) bool, occluded samples: one pass over the photos.

    The views are read in threads; their shares are summed in view order, so
    the colours do not depend on the number of threads.
    """
    face = samples.face
    bary = samples.barycentric
    points = np.einsum("tc,tcd->td", bary, vertices[faces[face]].astype(np.float32))
    slot_view = cand_views[face]  # (T, K)
    slot_weight = np.einsum("tkc,tc->tk", cand_corner[face], bary)  # (T, K)
    painting = [k for k in range(len(views)) if ((slot_view == k) & (slot_weight > 0)).any()]

    def share(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        slot_t, slot_j = np.nonzero((slot_view == k) & (slot_weight > 0))
        return _bake_view(views[k], points, slot_t, slot_j, slot_weight, gains[k], lambda: hit_depth(k))

    shares = dict(progress(map_in_threads(share, painting, cpu_workers(None, "cpu")), desc, len(painting)))
    accum = np.zeros((len(face), 3), np.float32)
    total = np.zeros(len(face), np.float32)
    occluded = 0
    for k in painting:  # in view order: the same sums whatever the threads
        slot_t, w, weighted, hidden = shares.pop(k)
        occluded += hidden
        for channel in range(3):
            accum[:, channel] += np.bincount(slot_t, weights=weighted[:, channel], minlength=len(face))
        total += np.bincount(slot_t, weights=w, minlength=len(face)).astype(np.float32)
    painted = total > 0
    colours = np.full((len(face), 3), 0.5, np.float32)
    colours[painted] = accum[painted] / total[painted, None]
    if vertex_colors is not None and (~painted).any():
        corner = vertex_colors[faces[face[~painted]]].astype(np.float32) / 255.0
        colours[~painted] = (corner * bary[~painted, :, None]).sum(1)
    return np.clip(np.round(colours * 255.0), 0, 255).astype(np.uint8), painted, occluded


def bake_views(vertices: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None, views: Sequence[View],
               hit_depth: Callable[[int], np.ndarray], labels: np.ndarray, scores: np.ndarray, gains: np.ndarray,
               face_uv: np.ndarray, width: int, height: int, progress: Progress, face_priority: np.ndarray,
               chunk_texels: int = BAKE_CHUNK_TEXELS) -> tuple[np.ndarray, dict[str, Any]]:
    """Pass 2: the texture (H, W, 3) uint8 of faces with UVs ``face_uv`` (F, 3, 2) in [0, 1].

    Every covered texel takes the gain-levelled, occlusion-tested colours of the
    views of its face (:func:`~pipeline.export.views.face_candidate_views`);
    texels that no view paints take the interpolated vertex colours (grey
    without them); gutters take the nearest chart texel. Faces are baked in
    chunks of about ``chunk_texels`` texels (one pass over the photos each), so
    memory stays bounded for large atlases (about 150 bytes per texel of a chunk).
    Where charts overlap (a surface hidden behind another in the photo of
    their chart), the face of lower ``face_priority`` (its depth in that
    photo) keeps the texel. ``hit_depth(k)``: view k's ray-cast depth map of the mesh (H, W).
    """
    weights = vertex_view_weights(faces, labels, len(vertices), len(views))
    cand_views, cand_corner = face_candidate_views(faces, labels, weights, scores)
    texel_area = triangle_areas_2d(face_uv.astype(np.float64) * [width, height])
    cum = np.cumsum(texel_area + 1.0)
    cuts = np.searchsorted(cum, np.arange(chunk_texels, cum[-1], chunk_texels))
    bounds = np.unique(np.concatenate([[0], cuts, [len(faces)]]))
    texture = np.zeros((height * width, 3), np.uint8)
    covered = np.zeros(height * width, dtype=bool)
    owner_priority = np.full(height * width, np.inf, np.float32)
    texels = from_photos = occluded = 0
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        samples = rasterize_uv(face_uv[start:stop], width, height, priority=face_priority[start:stop])
        front = face_priority[samples.face + start] <= owner_priority[samples.texel]  # across chunks too
        samples = TexelSamples(texel=samples.texel[front], face=samples.face[front] + start,
                               barycentric=samples.barycentric[front])
        owner_priority[samples.texel] = face_priority[samples.face]
        desc = "baking the texture" + (f" ({i + 1}/{len(bounds) - 1})" if len(bounds) > 2 else "")
        colours, painted, hidden = _bake_chunk(vertices, faces, vertex_colors, views, hit_depth, cand_views,
                                               cand_corner, gains, samples, progress, desc)
        texture[samples.texel] = colours
        covered[samples.texel] = True
        texels += len(samples.texel)
        from_photos += int(painted.sum())
        occluded += hidden
    texture = fill_gutters(texture.reshape(height, width, 3), covered.reshape(height, width))
    stats = {"texels": int(texels), "texels_from_photos": int(from_photos), "occluded_samples": int(occluded)}
    return texture, stats


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
    gains = np.ones((len(views), 3), np.float32)
    if settings.level_exposure:
        gains = solve_view_gains(scores.gain_colours, scores.scores[scores.gain_faces] * scores.gain_weights)
    rejected = inconsistent_views(scores.scores, scores.face_colours, gains)
    scores.scores[rejected] = 0.0
    labels = smooth_labels(scores.scores, face_adjacency(faces), settings.smoothness)
    labelled = labels != NO_VIEW
    if not labelled.any():
        raise ReconError(f"texture: none of the {len(views)} photos sees the mesh; are the mesh and the cameras in "
                         "the same frame (re-run `recon stage fuse`)? `--no-textured` exports vertex colours")
    seen_by = (scores.scores > 0).sum(0)
    for k in np.flatnonzero(scores.readable & (seen_by == 0)):
        logger.warning("texture: %s sees none of the mesh; it paints nothing", views[k].name)
    t1 = time.perf_counter()
    rows = np.flatnonzero(labelled)
    if settings.charts == "xatlas":
        charts = xatlas_charts(vertices, faces)
    else:
        label_area = np.zeros(len(faces))
        label_area[rows] = scores.scores[rows, labels[rows]] / np.maximum(
            np.abs(_label_cosines(vertices, faces, labels, views)[rows]), 1e-3)
        charts = view_charts(vertices, faces, labels, views, settings.texels_per_pixel, label_area)
    padding = settings.padding or padding_for(settings.size or chart_side(charts))
    packed, width, height = pack_charts(charts, settings.size, padding, max_side=settings.max_size)
    t2 = time.perf_counter()

    def hit_depth(k: int) -> np.ndarray:
        if scores.hit_depths and scores.hit_depths[k] is not None:
            return scores.hit_depths[k]
        view = views[k]  # over the budget, or a photo pass 1 could not read
        return raycaster.cast_view(view.K, view.cam_from_world, view.width, view.height).depth

    texture, bake_stats = bake_views(vertices, faces, vertex_colors, views, hit_depth, labels, scores.scores, gains,
                                     packed.uv[packed.faces], width, height, progress,
                                     face_priority=_label_depths(vertices, faces, labels, views))
    scores.hit_depths.clear()
    share = bake_stats["texels_from_photos"] / max(bake_stats["texels"], 1)
    if share < TEXELS_FROM_PHOTOS_WARN:
        logger.warning("texture: only %.0f %% of the texture comes from the photos (the rest from the vertex "
                       "colours); check that the mesh and the cameras belong together", 100 * share)
    t3 = time.perf_counter()
    stats = {
        "faces": int(len(faces)),
        "faces_unseen": int((~labelled).sum()),
        "face_views_rejected": int(rejected.sum()),
        "faces_dropped_by_xatlas": int(packed.dropped_faces),
        "views_used": int(len(np.unique(labels[labels != NO_VIEW]))),
        "texture_size": [int(width), int(height)],
        "gain_range": [float(gains.min()), float(gains.max())],
        "seconds": {"scores": round(t1 - t0, 2), "charts": round(t2 - t1, 2), "bake": round(t3 - t2, 2)},
        **bake_stats,
    }
    return TexturedMesh(vertices=vertices[packed.source_vertex], faces=packed.faces, uv=packed.uv, texture=texture,
                        source_vertex=packed.source_vertex, stats=stats)

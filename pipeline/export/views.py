"""Which photo paints which face: per-face view scores, smooth labels, per-view colour gains.

The texture of a face comes from the photos that see it best. This module
holds the mathematics of that choice, as small functions on arrays:

* :func:`project_points` / :func:`face_view_score`: a face's score in a view is
  its visible area in pixels (rays of the view that hit it first, or its
  projected area where its centroid passes the depth test of
  :func:`visible_points`) times the cosine of the viewing angle; 0 where the
  view does not see it.
* :func:`smooth_labels`: one source view per face, minimizing the Potts energy
  ``sum_f (1 - score_f(l_f) / max_l score_f(l)) + smoothness * #(neighbours with another label)``
  by iterated conditional modes, so that charts of one view are large and seams few.
* :func:`solve_view_gains`: per-view, per-channel multiplicative gains that level
  the exposure differences between photos (least squares in log colour over
  surface points that several views see; geometric mean of the gains = 1).
* :func:`vertex_view_weights`: per-vertex blend weights of the labels of the faces
  around it, which :mod:`pipeline.export.bake` interpolates to feather seams.

Conventions: :mod:`pipeline.core.geometry` (``cam_from_world``, COLMAP pixel
centres, depth = camera z). Colours are float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NO_VIEW = -1
"""Label of a face that no view sees."""


def project_points(points: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) (COLMAP convention: pixel centres at +0.5) and camera z (N,) of world points (N, 3)."""
    cam = points @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    z = cam[:, 2]
    safe = np.where(np.abs(z) > 1e-12, z, 1e-12)
    uv = np.stack([K[0, 0] * cam[:, 0] / safe + K[0, 2], K[1, 1] * cam[:, 1] / safe + K[1, 2]], 1)
    return uv, z


def inside_image(uv: np.ndarray, width: int, height: int, margin: float = 0.5) -> np.ndarray:
    """(N,) bool: ``uv`` lies at least ``margin`` pixels inside the image."""
    return (uv[:, 0] >= margin) & (uv[:, 0] <= width - margin) & (uv[:, 1] >= margin) & (uv[:, 1] <= height - margin)


def visible_points(uv: np.ndarray, z: np.ndarray, depth_map: np.ndarray, K: np.ndarray,
                   relative_tolerance: float = 0.01, pixel_tolerance: float = 2.0) -> np.ndarray:
    """(N,) bool: points at pixel ``uv`` and depth ``z`` are not hidden behind the surface of ``depth_map``.

    ``depth_map`` (H, W) is the ray-cast depth of the mesh itself (``inf`` where
    nothing is hit). A point is visible when it is inside the image, in front of
    the camera and no deeper than the map at its nearest pixel plus a tolerance
    of ``relative_tolerance * z`` and ``pixel_tolerance`` pixels' worth of depth
    (``pixel_tolerance * z / f``), which absorbs the depth change across a pixel
    on slanted surfaces.
    """
    height, width = depth_map.shape
    ok = inside_image(uv, width, height) & (z > 0)
    col = np.clip(uv[:, 0].astype(np.int64), 0, width - 1)
    row = np.clip(uv[:, 1].astype(np.int64), 0, height - 1)
    surface = depth_map[row, col]
    tolerance = relative_tolerance * z + pixel_tolerance * z / max(float(K[0, 0]), 1e-12)
    return ok & (z <= surface + tolerance)


def triangle_areas_2d(corners: np.ndarray) -> np.ndarray:
    """(F,) unsigned areas of 2-D triangles (F, 3, 2)."""
    e1 = corners[:, 1] - corners[:, 0]
    e2 = corners[:, 2] - corners[:, 0]
    return 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def face_view_score(corners_uv: np.ndarray, corners_z: np.ndarray, centroid_visible: np.ndarray,
                    pixel_hits: np.ndarray, width: int, height: int) -> np.ndarray:
    """(F,) visible area (pixels^2) of each face in one view, 0 where the view does not see it.

    Args:
        corners_uv: (F, 3, 2) pixel coordinates of the face corners.
        corners_z: (F, 3) camera z of the corners.
        centroid_visible: (F,) bool, the face's centroid passes :func:`visible_points`.
        pixel_hits: (F,) pixels whose ray first hits the face (ray-cast of the mesh itself).
    The area is the larger of ``pixel_hits`` (exact for faces larger than a
    pixel, clipped to the image and to what occluders leave) and the projected
    area of faces that lie wholly inside the image with a visible centroid
    (faces smaller than a pixel that no ray hits). Faces with a corner behind
    the camera score 0: their projection is not a triangle. Either side of a
    face counts (the mesh's winding is not trusted).
    """
    area = triangle_areas_2d(corners_uv)
    inside = np.ones(len(corners_uv), dtype=bool)
    for c in range(3):
        inside &= inside_image(corners_uv[:, c], width, height, margin=0.0)
    projected = np.where(centroid_visible & inside, area, 0.0)
    in_front = (corners_z > 0).all(1)
    return np.where(in_front, np.maximum(projected, pixel_hits), 0.0).astype(np.float32)


def viewing_cosine(face_normals: np.ndarray, centroids: np.ndarray, camera_centre: np.ndarray) -> np.ndarray:
    """(F,) cosine between each face's unit normal and the direction to the camera (negative: back-facing)."""
    to_cam = camera_centre[None, :] - centroids
    to_cam /= np.maximum(np.linalg.norm(to_cam, axis=1, keepdims=True), 1e-12)
    return (face_normals * to_cam).sum(1)


def face_adjacency(faces: np.ndarray) -> sp.csr_matrix:
    """(F, F) symmetric 0/1 matrix: faces that share an edge."""
    n = len(faces)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    owner = np.tile(np.arange(n), 3)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    edges, owner = edges[order], owner[order]
    same = (edges[1:] == edges[:-1]).all(1)
    a, b = owner[:-1][same], owner[1:][same]
    keep = a != b
    a, b = a[keep], b[keep]
    adjacency = sp.coo_matrix((np.ones(2 * len(a), np.float32), (np.concatenate([a, b]), np.concatenate([b, a]))),
                              shape=(n, n)).tocsr()
    adjacency.data[:] = 1.0
    return adjacency


def smooth_labels(scores: np.ndarray, adjacency: sp.csr_matrix, smoothness: float, iterations: int = 40,
                  seed: int = 0) -> np.ndarray:
    """One view per face (:data:`NO_VIEW` where every score is 0) by iterated conditional modes on a Potts energy.

    Each round every face finds its best label given its neighbours'; of the faces
    that would change, those whose random priority beats every changing
    neighbour's move (an independent set), so each move lowers the energy and
    the energy never rises. Memory: two (F, L) float32 arrays besides ``scores``.

    Args:
        scores: (F, L) non-negative scores (:func:`face_view_score`), 0 = the view does not see the face.
        adjacency: (F, F) :func:`face_adjacency`.
        smoothness: cost of one neighbour with another label, in units of the data cost
            ``1 - score / best score`` (0: every face takes its best view).
    Returns:
        (F,) int64 labels; a face only ever gets a view that sees it.
    """
    n_faces, n_views = scores.shape
    best = scores.max(1)
    seen = best > 0
    labels = np.where(seen, scores.argmax(1), NO_VIEW)
    if smoothness <= 0 or n_views < 2 or not seen.any():
        return labels
    data = np.where(scores > 0, 1.0 - scores / np.maximum(best, 1e-30)[:, None], np.inf).astype(np.float32)
    priority = np.random.default_rng(seed).random(n_faces)
    rows = np.flatnonzero(seen)
    for _ in range(iterations):
        onehot = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, labels[rows])), shape=(n_faces, n_views))
        energy = np.asarray((adjacency @ onehot).todense(), dtype=np.float32)  # neighbours that agree
        energy *= -smoothness
        energy += data
        new = np.where(seen, energy.argmin(1), NO_VIEW)
        own = energy[rows, labels[rows]]
        better = np.zeros(n_faces, dtype=bool)
        better[rows] = energy[rows, new[rows]] < own - 1e-6
        if not better.any():
            break
        mover_priority = sp.diags(np.where(better, priority, 0.0)).dot(adjacency.T).T  # row f: priorities of movers
        neighbour_best = np.asarray(mover_priority.max(axis=1).todense()).ravel()
        move = better & (priority > neighbour_best)
        labels = np.where(move, new, labels)
    return labels


def solve_view_gains(samples: np.ndarray, weights: np.ndarray, iterations: int = 50,
                     limits: tuple[float, float] = (0.5, 2.0)) -> np.ndarray:
    """Per-view, per-channel colour gains that make the views agree where they see the same surface.

    Args:
        samples: (P, L, 3) colour in [0, 1] of P surface points in L views (any value where not seen).
        weights: (P, L) >= 0, 0 where the view does not see the point (e.g. the face's score).
    Returns:
        (L, 3) gains ``g`` with ``g * colour`` levelled across views: least squares on
        ``log(colour) + log(g_l) = m_p`` (``m_p`` the point's levelled colour), geometric
        mean of the gains of the views that took part = 1, clipped to ``limits``.
        Views with no shared point keep gain 1.
    """
    n_points, n_views, _ = samples.shape
    w = np.where(weights > 0, weights, 0.0).astype(np.float64)
    shared = (w > 0).sum(1) >= 2
    w = w[shared]
    log_c = np.log(np.clip(samples[shared].astype(np.float64), 1.0 / 255.0, None))
    log_g = np.zeros((n_views, 3))
    active = w.sum(0) > 0
    if not active.any():
        return np.ones((n_views, 3), np.float32)
    # Alternating weighted means; the colour terms do not change between rounds, so they are summed once and a
    # round is two (P, L) x (L, 3) products.
    point_weight = np.maximum(w.sum(1), 1e-30)[:, None]  # (P, 1)
    view_weight = np.maximum(w.sum(0), 1e-30)[:, None]  # (L, 1)
    point_colour = np.einsum("pl,plc->pc", w, log_c) / point_weight  # (P, 3)
    view_colour = np.einsum("pl,plc->lc", w, log_c) / view_weight  # (L, 3)
    for _ in range(iterations):
        m = point_colour + (w @ log_g) / point_weight
        log_g = np.where(active[:, None], (w.T @ m) / view_weight - view_colour, 0.0)
        log_g[active] -= log_g[active].mean(0)
    return np.clip(np.exp(log_g), *limits).astype(np.float32)


def vertex_view_weights(faces: np.ndarray, labels: np.ndarray, n_vertices: int, n_views: int) -> sp.csr_matrix:
    """(V, L) sparse: for each vertex, the fraction of its labelled faces that carry each view."""
    labelled = labels != NO_VIEW
    rows = faces[labelled].reshape(-1)
    cols = np.repeat(labels[labelled], 3)
    counts = sp.coo_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_vertices, n_views)).tocsr()
    counts.sum_duplicates()
    totals = np.asarray(counts.sum(1)).ravel()
    return sp.diags(1.0 / np.maximum(totals, 1.0)).dot(counts).tocsr()


BACKUP_WEIGHT = 1e-3
"""Weight of a face's backup views: they paint a texel only where its labelled views cannot (occluded, outside)."""


def face_candidate_views(faces: np.ndarray, labels: np.ndarray, vertex_weights: sp.csr_matrix, scores: np.ndarray,
                         max_views: int = 3, chunk_faces: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_face_candidate_views` in chunks of ``chunk_faces`` faces (memory: chunk x views, not faces x views)."""
    parts = [_face_candidate_views(faces[i:i + chunk_faces], labels[i:i + chunk_faces], vertex_weights,
                                   scores[i:i + chunk_faces], max_views)
             for i in range(0, max(len(faces), 1), chunk_faces)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _face_candidate_views(faces: np.ndarray, labels: np.ndarray, vertex_weights: sp.csr_matrix, scores: np.ndarray,
                          max_views: int) -> tuple[np.ndarray, np.ndarray]:
    """The views that paint each face and their weight at each corner.

    Returns:
        (views (F, K) int64 with :data:`NO_VIEW` padding, corner weights (F, K, 3) float32),
        ``K = max_views``: the face's own label first, then the other labels of its
        corners by total weight, then the face's best-scoring other views with
        :data:`BACKUP_WEIGHT` (for texels that the labelled views do not see: parts
        of large faces outside their photo or behind an occluder). Texel weights are
        the barycentric interpolation of the corner weights (seams feathered across
        one ring of faces).
    """
    dense_rows = [np.asarray(vertex_weights[faces[:, c]].todense(), dtype=np.float32) for c in range(3)]
    total = dense_rows[0] + dense_rows[1] + dense_rows[2]  # (F, L)
    labelled = labels != NO_VIEW
    rows = np.flatnonzero(labelled)
    total[rows, labels[labelled]] += 10.0  # own label first
    backup = (total == 0) & (scores > 0)
    total = np.where(backup, BACKUP_WEIGHT * scores / np.maximum(scores.max(1, keepdims=True), 1e-30), total)
    order = np.argsort(-total, axis=1, kind="stable")[:, :max_views]
    top = np.take_along_axis(total, order, 1)
    views = np.where(top > 0, order, NO_VIEW).astype(np.int64)
    corner = np.stack([np.take_along_axis(d, order, 1) for d in dense_rows], -1)  # (F, K, 3)
    is_backup = np.take_along_axis(backup, order, 1)
    corner[is_backup] = BACKUP_WEIGHT
    corner[rows, 0] = np.maximum(corner[rows, 0], 1e-6)  # a label always paints its own face
    corner = np.where((views != NO_VIEW)[..., None], corner, 0.0).astype(np.float32)
    views[~labelled] = NO_VIEW
    corner[~labelled] = 0.0
    return views, corner

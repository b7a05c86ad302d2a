"""How much a coloured or textured mesh looks like the photos: render from a camera, PSNR and SSIM.

:func:`render_mesh_colors` ray-casts a mesh from a pinhole camera (one ray per
pixel centre, no lighting: the colour stored on the mesh, as a viewer shows it
unlit) with vertex colours or a texture. :func:`photometric_scores` compares a
render with the photo on a mask (e.g. where the object is): PSNR in dB and the
mean SSIM (kornia, 11-pixel Gaussian window) over the mask.
:func:`render_mesh_views` and :func:`render_textured_views` make the report's
thumbnails (photo, mesh.glb with its texture, mesh.ply with its colours, shaded).

Texture convention: :mod:`pipeline.core.sampling` (UV v up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.io import SfmScene, load_rgb
from pipeline.core.poses import scale_intrinsics
from pipeline.core.raycast import LoadedMesh, MeshRaycaster, load_mesh, pixel_rays
from pipeline.core.sampling import sample_texture

SSIM_WINDOW = 11
RENDER_WIDTH = 320
"""Width (px) of the report's mesh renders and the photos beside them."""


def render_mesh_colors(raycaster: MeshRaycaster, faces: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray,
                       width: int, height: int, *, vertex_colors: np.ndarray | None = None,
                       uv: np.ndarray | None = None, texture: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Unlit render of the mesh in ``raycaster`` (faces ``faces``) from a ``width`` x ``height`` camera.

    Args:
        vertex_colors: (V, 3) uint8 or float in [0, 1], interpolated over faces; or
        uv, texture: (V, 2) UVs and an (H, W, 3) uint8 texture, bilinear.
    Returns:
        (RGB (H, W, 3) float32 in [0, 1], black where nothing is hit; (H, W) bool hit mask).
    """
    hits = raycaster.cast_view(K, cam_from_world, width, height)
    image = np.zeros((height, width, 3), np.float32)
    hit = hits.hit
    face = hits.face_id[hit]
    bary = hits.barycentric[hit]
    corners = np.asarray(faces)[face]
    if texture is not None and uv is not None:
        point_uv = (np.asarray(uv, dtype=np.float64)[corners] * bary[..., None]).sum(1)
        image[hit] = sample_texture(np.asarray(texture, dtype=np.float32) / 255.0, point_uv)
    elif vertex_colors is not None:
        colors = np.asarray(vertex_colors)
        colors = colors.astype(np.float32) / 255.0 if colors.dtype == np.uint8 else colors.astype(np.float32)
        image[hit] = (colors[corners][..., :3] * bary[..., None]).sum(1)
    else:
        raise ValueError("render_mesh_colors needs vertex_colors, or uv and texture")
    return image, hit


def psnr(render: np.ndarray, photo: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 1) of ``render`` vs ``photo`` (H, W, 3) in [0, 1] over ``mask`` (H, W)."""
    diff = (render[mask] - photo[mask]).astype(np.float64)
    mse = float((diff**2).mean()) if diff.size else float("nan")
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def ssim(render: np.ndarray, photo: np.ndarray, mask: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM (kornia, Gaussian ``window``) of ``render`` vs ``photo`` over ``mask``."""
    import kornia
    import torch

    def to_tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]

    ssim_map = kornia.metrics.ssim(to_tensor(render), to_tensor(photo), window)[0].mean(0).numpy()
    return float(ssim_map[mask].mean()) if mask.any() else float("nan")


def photometric_scores(render: np.ndarray, photo: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``{"psnr": dB, "ssim": mean SSIM, "pixels": count}`` of a render vs the photo (float [0, 1]) on ``mask``."""
    return {"psnr": psnr(render, photo, mask), "ssim": ssim(render, photo, mask), "pixels": int(mask.sum())}


# ---- renders for the report ----------------------------------------------------------------------------

BACKGROUND = 40.0
"""Grey level of render pixels where the mesh is not hit."""


def _thumbnail_camera(view, width: int) -> tuple[np.ndarray, int]:
    """(K scaled to a ``width``-pixel-wide render, its height)."""
    scale = width / view.width
    return scale_intrinsics(view.K, scale), max(1, round(view.height * scale))


def _shaded(raycaster: MeshRaycaster, vertices: np.ndarray, faces: np.ndarray, view, K: np.ndarray, width: int,
            height: int) -> tuple[np.ndarray, np.ndarray]:
    """(geometry-only render |n·d| (H, W, 3) uint8, hit mask) of the mesh from ``view``'s camera."""
    hits = raycaster.cast_view(K, view.cam_from_world, width, height)
    tri = vertices[faces[hits.face_id[hits.hit]]]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    _, dirs = pixel_rays(K, view.cam_from_world, width, height)
    dirs = dirs.reshape(height, width, 3)[hits.hit]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    image = np.full((height, width, 3), BACKGROUND)
    image[hits.hit] = np.clip(np.abs((normals * dirs).sum(1)), 0.15, 1.0)[:, None] * np.array([210.0, 210.0, 220.0])
    return image.astype(np.uint8), hits.hit


def _as_uint8(render: np.ndarray, hit: np.ndarray) -> np.ndarray:
    out = np.where(hit[..., None], render * 255.0, BACKGROUND)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _picked_views(scene: SfmScene, count: int) -> list:
    picks = np.unique(np.linspace(0, len(scene.views) - 1, min(count, len(scene.views))).round().astype(int))
    return [scene.views[i] for i in picks]


def render_mesh_views(mesh: str | Path | LoadedMesh | None, scene: SfmScene, count: int = 3,
                      width: int = RENDER_WIDTH) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Ray-cast the mesh from ``count`` input cameras spread over the views (headless, CPU).

    Returns (image name, photo, coloured render, shaded render) RGB uint8
    images, each ``width`` pixels wide; background pixels are dark grey.
    The coloured render uses the vertex colours, unlit (shaded when there are none);
    the shaded one shows the geometry alone (|n·d| Lambertian-like shading).
    ``mesh``: a mesh file, or one already read (:func:`pipeline.core.raycast.load_mesh`; None: no triangles).
    """
    if isinstance(mesh, (str, Path)):
        mesh = load_mesh(Path(mesh))
    if mesh is None:
        return []
    vertices, faces, colors, raycaster = mesh.vertices, mesh.faces, mesh.vertex_colors, mesh.raycaster
    out = []
    for view in _picked_views(scene, count):
        K, height = _thumbnail_camera(view, width)
        shaded, _ = _shaded(raycaster, vertices, faces, view, K, width, height)
        coloured = shaded
        if colors is not None and len(colors):
            render, hit = render_mesh_colors(raycaster, faces, K, view.cam_from_world, width, height,
                                             vertex_colors=colors)
            coloured = _as_uint8(render, hit)
        photo = np.asarray(Image.fromarray(load_rgb(view.image_path)).resize((width, height),
                                                                             Image.Resampling.BILINEAR))
        out.append((view.name, photo, coloured, shaded))
    return out


def render_textured_views(glb_path: Path, scene: SfmScene, count: int = 3, width: int = RENDER_WIDTH,
                          normalized_from_mesh: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """Unlit renders of a textured GLB from the cameras of :func:`render_mesh_views` (normalized frame).

    Args:
        normalized_from_mesh: 4x4 similarity from the GLB's frame to the normalized frame
            (the export's ``normalized_from_sfm`` for ``export.frame: sfm``; None: already normalized).
    Returns (image name, render) pairs, or none when the GLB has no texture.
    """
    import trimesh

    mesh = trimesh.load(str(glb_path), force="mesh", process=False)
    material = getattr(mesh.visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if getattr(mesh.visual, "uv", None) is None or image is None or len(mesh.faces) == 0:
        return []
    texture = np.asarray(image.convert("RGB"))
    faces = np.asarray(mesh.faces)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if normalized_from_mesh is not None:
        vertices = vertices @ normalized_from_mesh[:3, :3].T + normalized_from_mesh[:3, 3]
    raycaster = MeshRaycaster(vertices, faces)
    out = []
    for view in _picked_views(scene, count):
        K, height = _thumbnail_camera(view, width)
        render, hit = render_mesh_colors(raycaster, faces, K, view.cam_from_world, width, height,
                                         uv=np.asarray(mesh.visual.uv), texture=texture)
        out.append((view.name, _as_uint8(render, hit)))
    return out

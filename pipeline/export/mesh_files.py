"""Writing meshes for downstream tools through trimesh: vertex-coloured and textured, every file atomic.

* Vertex-coloured (:func:`write_colored_mesh`): PLY (binary, per-vertex RGB),
  GLB (glTF 2.0, ``COLOR_0``), OBJ (``v x y z r g b``), STL (geometry only).
* Textured (:func:`write_textured_mesh`): GLB with the texture embedded
  (glTF 2.0 ``baseColorTexture``, unlit-friendly PBR: metallic 0, roughness 1)
  and OBJ + ``mesh.mtl`` + ``mesh_texture.<png|jpeg>`` (``map_Kd``, ``Kd 1 1 1``).
  PLY and STL have no texture: they stay vertex-coloured / geometry only.

UVs follow trimesh's convention (v up, :mod:`pipeline.core.sampling`); trimesh
flips them into glTF's (v down) when it writes a GLB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.core.cache import atomic_path, write_bytes_atomic
from pipeline.export.config import MeshFormat, TextureFormat

TEXTURE_STEM = "mesh_texture"
"""The OBJ's texture image is ``<folder>/mesh_texture.<png|jpeg>`` (also the material's name)."""
JPEG_QUALITY = 92


def _encoded(data) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


def write_colored_mesh(mesh, path: Path, fmt: MeshFormat | str) -> None:
    """Write a vertex-coloured ``trimesh.Trimesh`` as ``fmt`` to ``path`` atomically."""
    fmt = MeshFormat(fmt)
    with atomic_path(Path(path), suffix=f".{fmt.value}") as tmp:
        if fmt is MeshFormat.obj:
            data = mesh.export(file_type="obj", include_color=True, include_texture=False)
        else:
            data = mesh.export(file_type=fmt.value)
        Path(tmp).write_bytes(_encoded(data))


def encoded_texture(texture: np.ndarray, fmt: TextureFormat | str) -> bytes:
    """The texture as PNG (fast compression) or JPEG (quality :data:`JPEG_QUALITY`) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.asarray(texture, dtype=np.uint8))
    if TextureFormat(fmt) is TextureFormat.jpeg:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def texture_image(texture: np.ndarray, fmt: TextureFormat | str):
    """The texture as a PIL image whose format (PNG or JPEG) trimesh keeps when it writes a GLB
    (trimesh encodes it again with PIL's default options)."""
    from PIL import Image

    image = Image.fromarray(np.asarray(texture, dtype=np.uint8))
    image.format = "JPEG" if TextureFormat(fmt) is TextureFormat.jpeg else "PNG"
    return image


def textured_trimesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray,
                     fmt: TextureFormat | str = TextureFormat.png, *, for_obj: bool = False):
    """A ``trimesh.Trimesh`` with UVs and the texture as its material (PBR for GLB, a plain MTL material for OBJ)."""
    import trimesh

    image = texture_image(texture, fmt)
    if for_obj:
        material = trimesh.visual.material.SimpleMaterial(image=image, diffuse=(255, 255, 255, 255),
                                                          ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255),
                                                          name=TEXTURE_STEM)
    else:
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, metallicFactor=0.0,
                                                       roughnessFactor=1.0, name=TEXTURE_STEM)
    return trimesh.Trimesh(vertices=np.asarray(vertices, dtype=np.float64), faces=np.asarray(faces, dtype=np.int64),
                           visual=trimesh.visual.TextureVisuals(uv=np.asarray(uv, dtype=np.float64), material=material),
                           process=False)


def write_textured_mesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray, path: Path,
                        fmt: MeshFormat | str, texture_format: TextureFormat | str = TextureFormat.png) -> list[Path]:
    """Write a textured mesh as GLB (texture embedded) or OBJ (+ MTL + image beside it); returns the files written.

    Raises:
        ValueError: ``fmt`` is not glb or obj.
    """
    from trimesh.exchange.obj import export_obj

    fmt = MeshFormat(fmt)
    path = Path(path)
    if fmt is MeshFormat.glb:
        mesh = textured_trimesh(vertices, faces, uv, texture, texture_format)
        write_bytes_atomic(path, _encoded(mesh.export(file_type="glb")))
        return [path]
    if fmt is not MeshFormat.obj:
        raise ValueError(f"a textured mesh is written as glb or obj, not {fmt.value}")
    mesh = textured_trimesh(vertices, faces, uv, texture, texture_format, for_obj=True)
    mtl_name = path.with_suffix(".mtl").name
    text, extra = export_obj(mesh, include_texture=True, include_color=False, include_normals=False,
                             mtl_name=mtl_name, return_texture=True)
    image_name = next(name for name in extra if name.startswith(TEXTURE_STEM + "."))
    extra[image_name] = encoded_texture(texture, texture_format)  # trimesh re-encodes with PIL's defaults
    for stale in path.parent.glob(TEXTURE_STEM + ".*"):  # a texture of another format from an earlier export
        if stale.name != image_name and stale.suffix.lower() in (".png", ".jpeg", ".jpg"):
            stale.unlink()
    written = []
    # The image and the MTL first, the OBJ that names them last: a reader never finds an OBJ without its texture.
    for name in sorted(extra, key=lambda n: n == mtl_name):
        write_bytes_atomic(path.parent / name, _encoded(extra[name]))
        written.append(path.parent / name)
    write_bytes_atomic(path, _encoded(text))
    return [*written, path]

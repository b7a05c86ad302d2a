"""Every path recon reads or writes, declared in one place.

Stages never assemble path strings themselves: they ask the :class:`Workspace`.
Layout of the output folder (default ``SCENE_DIR/recon``)::

    OUT/
      mesh.ply  mesh.glb  sparse/     stable contract (final mesh, cameras in the mesh frame)
      manifest.json  config.yaml  log.txt  report.html
      sfm/        database.db  colmap.log  model/ (undistorted, normalized)  images/  normalization.json
      depth/      views/<key>.npz   (key: the image's relative path, encoded: see view_key)
      refine/     views/<key>.npz  log.json  (.scratch/ while running)
      fuse/       mesh.ply
      export/     mesh.glb ...
      .building/  <stage>/ while a stage is computed; it replaces OUT/<stage> only once complete
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Photo file suffixes, lower case (matched case-insensitively)."""


def view_stem(image_name: str) -> str:
    """The image name without its extension, folders joined by ``__`` (``a/b c.jpg`` → ``a__b c``).

    Not unique (``a.jpg`` and ``a.png`` share it): only for looking up files a
    user names this way (depth priors); caches use :func:`view_key`.
    """
    stem = image_name.rsplit(".", 1)[0] if "." in image_name else image_name
    return re.sub(r"[\\/]", "__", stem)


MAX_KEY_BYTES = 200
"""Longest cache key (UTF-8 bytes): with ``.npz`` and a temporary's prefix and suffix it stays under the 255 bytes of a
file name."""


def view_key(image_name: str) -> str:
    """The unique, stable file name of an image's per-view caches: its relative path, percent-encoded.

    ``%`` → ``%25``, ``/`` → ``%2F``, ``\\`` → ``%5C`` and a leading ``.`` →
    ``%2E`` (cache files are never hidden), so different names always give
    different keys (``a.jpg`` / ``a.png``, ``x/b.jpg`` / ``x__b.jpg``). A key
    longer than :data:`MAX_KEY_BYTES` keeps its first part and ends in a hash
    of the whole name.
    """
    key = image_name.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    if key.startswith("."):
        key = "%2E" + key[1:]
    if len(key.encode()) <= MAX_KEY_BYTES:
        return key
    digest = hashlib.sha256(image_name.encode()).hexdigest()[:16]
    head = key
    while len(head.encode()) > MAX_KEY_BYTES - len(digest) - 1:
        head = head[:-1]
    return f"{head}~{digest}"


@dataclass(frozen=True)
class Workspace:
    """Paths of one scene (inputs) and its output folder."""

    scene_dir: Path
    out_dir: Path
    building: frozenset[str] = frozenset()
    """Stages this workspace computes: their :meth:`stage_dir` is their :meth:`building_dir`."""

    @classmethod
    def create(cls, scene_dir: Path | str, out_dir: Path | str | None = None) -> "Workspace":
        scene = Path(scene_dir).expanduser().resolve()
        out = Path(out_dir).expanduser().resolve() if out_dir is not None else scene / "recon"
        return cls(scene_dir=scene, out_dir=out)

    # ---- inputs -------------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        """``SCENE_DIR/images`` if present, else the scene folder itself."""
        sub = self.scene_dir / "images"
        return sub if sub.is_dir() else self.scene_dir

    @property
    def masks_dir(self) -> Path:
        return self.scene_dir / "masks"

    @property
    def depth_prior_dir(self) -> Path:
        return self.scene_dir / "depth_prior"

    @property
    def scene_config_path(self) -> Path:
        return self.scene_dir / "recon.yaml"

    def user_sparse_dir(self) -> Path | None:
        """An existing COLMAP model supplied with the scene (``sparse/0`` or ``sparse``), if any."""
        for cand in (self.scene_dir / "sparse" / "0", self.scene_dir / "sparse"):
            if any((cand / f"cameras{ext}").exists() for ext in (".bin", ".txt")):
                return cand
        return None

    # ---- run bookkeeping ----------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.json"

    @property
    def config_path(self) -> Path:
        return self.out_dir / "config.yaml"

    @property
    def lock_path(self) -> Path:
        return self.out_dir / ".lock"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.txt"

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.html"

    def stage_dir(self, stage: str) -> Path:
        """``OUT/<stage>``, the finished stage the others read (its building folder for a stage in :attr:`building`)."""
        return self.building_dir(stage) if stage in self.building else self.out_dir / stage

    def building_dir(self, stage: str) -> Path:
        """``OUT/.building/<stage>``: where a stage is computed (and resumed after a crash) until it is complete
        and replaces ``OUT/<stage>`` in one rename, so the previous result is never lost half-way."""
        return self.out_dir / ".building" / stage

    def building_stage(self, stage: str) -> Workspace:
        """This workspace as the stage ``stage`` sees it while it is computed (its files go to its building folder)."""
        return dataclasses.replace(self, building=self.building | {stage})

    # ---- stable contract ----------------------------------------------------
    @property
    def sparse_dir(self) -> Path:
        """``OUT/sparse``: COLMAP binary model of the cameras, in the frame of the mesh."""
        return self.out_dir / "sparse"

    @property
    def mesh_path(self) -> Path:
        return self.out_dir / "mesh.ply"

    @property
    def mesh_glb_path(self) -> Path:
        return self.out_dir / "mesh.glb"

    # ---- sfm ----------------------------------------------------------------
    @property
    def sfm_database(self) -> Path:
        return self.stage_dir("sfm") / "database.db"

    @property
    def sfm_log(self) -> Path:
        return self.stage_dir("sfm") / "colmap.log"

    @property
    def sfm_model_dir(self) -> Path:
        """Undistorted PINHOLE model in the normalized frame (read by every later stage)."""
        return self.stage_dir("sfm") / "model"

    @property
    def sfm_images_dir(self) -> Path:
        """Undistorted images, named as in the model."""
        return self.stage_dir("sfm") / "images"

    @property
    def sfm_normalization(self) -> Path:
        """JSON: the similarity ``normalized_from_sfm`` (scale, rotation, translation)."""
        return self.stage_dir("sfm") / "normalization.json"

    # ---- per-view caches ----------------------------------------------------
    def depth_view(self, image_name: str) -> Path:
        return self.stage_dir("depth") / "views" / f"{view_key(image_name)}.npz"

    def refine_view(self, image_name: str) -> Path:
        return self.stage_dir("refine") / "views" / f"{view_key(image_name)}.npz"

    @property
    def refine_log(self) -> Path:
        return self.stage_dir("refine") / "log.json"

    @property
    def refine_scratch(self) -> Path:
        """Temporary files of a running refine stage (offloaded optimizer state, maps before the
        consistency gate); removed when the stage ends. Dot-named: never checksummed, and removed
        with the other temporaries when an interrupted stage resumes."""
        return self.stage_dir("refine") / ".scratch"

    @property
    def fuse_mesh(self) -> Path:
        return self.stage_dir("fuse") / "mesh.ply"

    @property
    def export_dir(self) -> Path:
        return self.stage_dir("export")

"""The stage graph: order, dependencies, versions, and what each stage publishes.

A stage's fingerprint hashes the output-affecting settings of its config sections, its version
and the *output digests* of the stages it reads, so any change upstream (new
settings, a forced re-run that produced different files) flows downstream.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ReconConfig
from pipeline.core.cache import fingerprint
from pipeline.core.context import StageContext
from pipeline.core.settings import fingerprint_fields
from pipeline.core.workspace import Workspace


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def sfm_inputs(ws: Workspace, cfg: ReconConfig) -> list[Path]:
    """The photos and, when used, the user's COLMAP model."""
    from pipeline.sfm.inputs import scene_images

    files = scene_images(ws) if ws.images_dir.is_dir() else []
    user = ws.user_sparse_dir() if cfg.sfm.use_existing_model else None
    return files + (_files_under(user) if user is not None else [])


def depth_inputs(ws: Workspace, cfg: ReconConfig) -> list[Path]:
    """User depth priors (estimator ``prior``)."""
    return _files_under(ws.depth_prior_dir) if cfg.depth.estimator.value == "prior" else []


def fuse_inputs(ws: Workspace, cfg: ReconConfig) -> list[Path]:
    """Optional masks."""
    return _files_under(ws.masks_dir)


def check_fuse_inputs(ws: Workspace, cfg: ReconConfig) -> None:
    """The masks, before SfM (:func:`pipeline.fuse.stage.check_masks`)."""
    from pipeline.fuse.stage import check_masks

    check_masks(ws, cfg.fuse)


def inputs_digest(files: list[Path], root: Path) -> str:
    """Hash of the input files' names, sizes and modification times (cheap; content changes change mtime)."""
    rows = []
    for p in files:
        st = p.stat()
        rel = p.relative_to(root).as_posix() if root in p.parents else str(p)
        rows.append((rel, st.st_size, st.st_mtime_ns))
    return fingerprint(rows)


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int
    """Bump when the stage's code changes what it writes: invalidates old caches."""
    deps: tuple[str, ...]
    run: Callable[[StageContext], None]
    skippable: bool = False
    """``--skip`` allowed: the stages after it read its own upstream instead."""
    publish: tuple[tuple[str, str], ...] = ()
    """(path in the stage folder, path in OUT): copied atomically after the stage ran."""
    inputs: Callable[[Workspace, ReconConfig], list[Path]] | None = None
    """Scene files the stage reads (photos, priors, masks): their digest is part of the fingerprint."""
    checked_outputs: tuple[str, ...] = ()
    """Paths in the stage folder whose checksums are recorded and verified (empty: everything)."""
    precheck: Callable[[Workspace, ReconConfig], None] | None = None
    """Checks of the stage's scene inputs run before any stage of a run that includes it (masks before SfM)."""
    sections: tuple[str, ...] = ()
    """Config sections whose settings the stage reads, all in its fingerprint (default: its own, ``(name,)``)."""
    preload: tuple[str, ...] = ()
    """Libraries the stage imports that take long to load (torch, Open3D, trimesh): a run imports them in the
    background when an earlier stage says it leaves a core idle (:meth:`StageContext.spare_core`). Third-party
    only, so the thread that loads them never waits for a ``pipeline`` module the stage is importing."""

    def __post_init__(self) -> None:
        if not self.sections:
            object.__setattr__(self, "sections", (self.name,))


def _run_of(module: str) -> Callable[[StageContext], None]:
    """The ``run`` of ``pipeline.<module>``, imported when the stage first runs (torch, Open3D and pycolmap
    load only then, so a command that fails on its settings fails at once)."""

    def run(ctx: StageContext) -> None:
        importlib.import_module(f"pipeline.{module}").run(ctx)

    run.__qualname__ = f"pipeline.{module}.run"
    return run


STAGES: tuple[StageSpec, ...] = (
    StageSpec("sfm", 1, (), _run_of("sfm"), publish=(("model", "sparse"),), inputs=sfm_inputs,
              checked_outputs=("model", "images", "normalization.json")),
    StageSpec("depth", 3, ("sfm",), _run_of("depth"), inputs=depth_inputs, sections=("depth", "mvs"),
              preload=("torch",)),
    StageSpec("refine", 4, ("depth", "sfm"), _run_of("refine"), skippable=True),
    StageSpec("fuse", 1, ("refine", "sfm"), _run_of("fuse"), publish=(("mesh.ply", "mesh.ply"),), inputs=fuse_inputs,
              precheck=check_fuse_inputs, preload=("open3d",)),
    StageSpec("export", 2, ("fuse", "sfm"), _run_of("export"), skippable=True, publish=(("mesh.glb", "mesh.glb"),),
              preload=("open3d", "trimesh", "xatlas", "fast_simplification", "scipy.spatial", "scipy.ndimage")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def effective_deps(name: str, skipped: frozenset[str]) -> tuple[str, ...]:
    """Stages ``name`` reads from, with skipped stages replaced by what they would have read."""
    out: list[str] = []
    for dep in BY_NAME[name].deps:
        for d in (effective_deps(dep, skipped) if dep in skipped else (dep,)):
            if d not in out:
                out.append(d)
    return tuple(out)


def stage_settings(cfg: ReconConfig, name: str) -> dict[str, Any]:
    """The output-affecting settings of stage ``name``: those of its own section under their names, those of
    its other sections (:attr:`StageSpec.sections`) as ``section.name`` (a one-section stage: exactly
    :func:`~pipeline.core.settings.fingerprint_fields` of its section)."""
    out = {}
    for sec in BY_NAME[name].sections:
        fields = fingerprint_fields(getattr(cfg, sec))
        out.update(fields if sec == name else {f"{sec}.{key}": value for key, value in fields.items()})
    return out


def stage_fingerprint(name: str, cfg: ReconConfig, upstream_digests: dict[str, str]) -> str:
    """Hash of (stage, version, output-affecting settings, upstream output digests)."""
    spec = BY_NAME[name]
    return fingerprint({"stage": name, "version": spec.version, "settings": stage_settings(cfg, name),
                        "upstream": upstream_digests})

"""The stage graph: order, dependencies, versions, and what each stage publishes.

A stage's fingerprint hashes its own output-affecting settings, its version
and the *output digests* of the stages it reads, so any change upstream (new
settings, a forced re-run that produced different files) flows downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import depth, export, fuse, refine, sfm
from pipeline.cache import fingerprint
from pipeline.config import ReconConfig
from pipeline.settings import fingerprint_fields
from pipeline.stage import StageContext


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


STAGES: tuple[StageSpec, ...] = (
    StageSpec("sfm", 1, (), sfm.run, publish=(("model", "sparse"),)),
    StageSpec("depth", 1, ("sfm",), depth.run),
    StageSpec("refine", 1, ("depth", "sfm"), refine.run, skippable=True),
    StageSpec("fuse", 1, ("refine", "sfm"), fuse.run, publish=(("mesh.ply", "mesh.ply"),)),
    StageSpec("export", 1, ("fuse", "sfm"), export.run, skippable=True),
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
    return fingerprint_fields(getattr(cfg, name))


def stage_fingerprint(name: str, cfg: ReconConfig, upstream_digests: dict[str, str]) -> str:
    """Hash of (stage, version, output-affecting settings, upstream output digests)."""
    spec = BY_NAME[name]
    return fingerprint({"stage": name, "version": spec.version, "settings": stage_settings(cfg, name), "upstream": upstream_digests})

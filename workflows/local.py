"""Run the stage graph for one scene on this machine, resuming from the caches.

``run_pipeline`` decides per stage: *cached* (fingerprint matches and every
output file still has its recorded checksum), or *run* (then every stage
after it sees a new upstream digest and runs too). A stage that runs is
computed in its building folder (``OUT/.building/<stage>``) and replaces
``OUT/<stage>`` only once it is complete, in one rename, so a crash never
loses the previous result; per-view stages resume from the views already in
the building folder when the fingerprint is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config import ReconConfig, config_to_yaml
from pipeline.core.cache import (
    FINGERPRINT_FILE,
    Manifest,
    checksum_tree,
    copy_atomic,
    fault_point,
    fingerprint,
    remove_changed_outputs,
    remove_stale_temp_files,
    run_lock,
    write_bytes_atomic,
    write_error,
)
from pipeline.core.context import StageContext
from pipeline.core.errors import ReconError
from pipeline.core.lazy import import_in_background
from pipeline.core.output_folder import adopt_output_dir
from pipeline.core.workspace import Workspace
from pipeline.graph import (
    BY_NAME,
    STAGE_NAMES,
    STAGES,
    effective_deps,
    inputs_digest,
    stage_fingerprint,
    stage_settings,
)

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    status: str
    """``ran``, ``cached`` or ``skipped``."""
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    ws: Workspace
    stages: list[StageResult]

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages if s.status == "ran")


@dataclass
class StageStatus:
    name: str
    state: str
    """``done``, ``stale``, ``missing`` or ``skipped``."""
    why: str


def _validate_names(names: tuple[str, ...] | list[str], what: str) -> None:
    for n in names:
        if n not in BY_NAME:
            raise ReconError(f"{what}: unknown stage {n!r}; stages: {', '.join(STAGE_NAMES)}")


def _selected(until: str | None, skip: frozenset[str]) -> list[str]:
    names = []
    for s in STAGES:
        if s.name not in skip:
            names.append(s.name)
        if s.name == until:
            break
    return names


def _upstream_digests(ws: Workspace, cfg: ReconConfig, name: str, manifest: Manifest,
                      skipped: frozenset[str]) -> dict[str, str] | None:
    """Output digests of the stages ``name`` reads (and of its scene inputs); None if one of them is not done."""
    digests = {}
    spec = BY_NAME[name]
    if spec.inputs is not None:
        digests["_inputs"] = inputs_digest(spec.inputs(ws, cfg), ws.scene_dir)
    for dep in effective_deps(name, skipped):
        entry = manifest.get(dep)
        if entry is None:
            return None
        digests[dep] = entry["output_digest"]
    if skipped & {d for d in BY_NAME[name].deps}:
        digests["_skipped"] = ",".join(sorted(skipped & set(BY_NAME[name].deps)))
    return digests


def stage_checksums(ws: Workspace, name: str) -> dict[str, str]:
    """Checksums of the outputs a stage's manifest entry records (see ``StageSpec.checked_outputs``)."""
    root = ws.stage_dir(name)
    paths = BY_NAME[name].checked_outputs
    if not paths:
        return checksum_tree(root)
    out: dict[str, str] = {}
    for rel in paths:
        p = root / rel
        if p.is_dir():
            out.update({f"{rel}/{k}": v for k, v in checksum_tree(p).items()})
        elif p.is_file():
            out[rel] = checksum_tree(p)[p.name]
    return out


def _outputs_intact(ws: Workspace, name: str, entry: dict[str, Any]) -> str | None:
    """None when every recorded output exists with its checksum, else why not."""
    current = stage_checksums(ws, name)
    recorded: dict[str, str] = entry.get("outputs", {})
    for rel, digest in recorded.items():
        if rel not in current:
            return f"output {name}/{rel} is missing"
        if current[rel] != digest:
            return f"output {name}/{rel} changed or is corrupt (checksum mismatch)"
    for _, dst in BY_NAME[name].publish:
        if not (ws.out_dir / dst).exists():
            return f"{ws.out_dir / dst} is missing"
    return None


def stage_state(ws: Workspace, cfg: ReconConfig, manifest: Manifest, name: str, skipped: frozenset[str]) -> StageStatus:
    """Is stage ``name`` done (and reusable) under this config?"""
    if name in skipped:
        return StageStatus(name, "skipped", "skipped in this run")
    entry = manifest.get(name)
    if entry is None:
        started = ws.building_dir(name).exists() or ws.stage_dir(name).exists()
        return StageStatus(name, "missing", "interrupted before it finished" if started else "never ran")
    upstream = _upstream_digests(ws, cfg, name, manifest, skipped)
    if upstream is None:
        return StageStatus(name, "stale", "an upstream stage is not done")
    if entry.get("version") != BY_NAME[name].version:
        return StageStatus(name, "stale", f"stage version changed ({entry.get('version')} → {BY_NAME[name].version})")
    if entry.get("upstream") != upstream:
        if entry.get("upstream", {}).get("_inputs") != upstream.get("_inputs"):
            return StageStatus(name, "stale", "input files changed")
        return StageStatus(name, "stale", "upstream results changed")
    settings = stage_settings(cfg, name)
    if entry.get("settings") != settings:
        changed = sorted(k for k in settings if entry.get("settings", {}).get(k) != settings[k])
        return StageStatus(name, "stale",
                           "settings changed: " + ", ".join(k if "." in k else f"{name}.{k}" for k in changed))
    broken = _outputs_intact(ws, name, entry)
    if broken:
        return StageStatus(name, "stale", broken)
    return StageStatus(name, "done", f"fingerprint {entry['fingerprint']}")


def pipeline_status(ws: Workspace, cfg: ReconConfig, skip: tuple[str, ...] = ()) -> list[StageStatus]:
    """Each stage: done / stale / missing, with why (``recon status``)."""
    manifest = Manifest(ws.manifest_path)
    skipped = frozenset(skip)
    out = []
    for s in STAGES:
        st = stage_state(ws, cfg, manifest, s.name, skipped)
        # A stage is only as good as the stages it reads.
        if st.state == "done" and any(o.state in ("stale", "missing")
                                      for o in out if o.name in effective_deps(s.name, skipped)):
            st = StageStatus(s.name, "stale", "an upstream stage must re-run")
        out.append(st)
    return out


def _holds(folder: Path, fp: str) -> bool:
    marker = folder / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text().strip() == fp


def _prepare_building_dir(ws: Workspace, name: str, fp: str, fresh: bool) -> bool:
    """Ready ``OUT/.building/<name>`` for a run of fingerprint ``fp``; True if it resumes earlier work of ``fp``.

    Work of ``fp`` is resumed from the building folder (a run that crashed), or from ``OUT/<name>`` itself
    when that holds ``fp`` but the manifest does not record it (a crash right after the folder was swapped
    in, a damaged output, or a folder written before building folders existed): it is moved back to be
    completed. Anything else in the building folder is recon's own stale work and is removed;
    ``OUT/<name>`` stays until the new folder replaces it (:func:`_swap_in`).
    """
    building, final = ws.building_dir(name), ws.stage_dir(name)
    try:
        if not fresh and _holds(building, fp):
            remove_stale_temp_files(building)
            return True
        if building.exists():
            shutil.rmtree(building)
        building.parent.mkdir(parents=True, exist_ok=True)
        if not fresh and _holds(final, fp):
            os.replace(final, building)
            remove_stale_temp_files(building)
            return True
        building.mkdir()
    except OSError as exc:
        raise write_error(building, exc) from exc
    write_bytes_atomic(building / FINGERPRINT_FILE, fp.encode())
    return False


def _swap_in(ws: Workspace, name: str) -> None:
    """Replace ``OUT/<name>`` by the complete building folder (two renames; the old folder is removed last)."""
    building, final = ws.building_dir(name), ws.stage_dir(name)
    old = building.with_name(f"{name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        fault_point(final, "staged")  # crash tests: the old folder is aside, the new one not yet in place
        os.replace(building, final)
        fault_point(final, "replaced")
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            building.parent.rmdir()  # only when no other stage is being built
    except OSError as exc:
        raise write_error(final, exc) from exc


def prepare_stage(ws: Workspace, cfg: ReconConfig, name: str, *, skip: tuple[str, ...] = ()) -> str | None:
    """Ready stage ``name``'s folder for parts of it computed outside :func:`run_pipeline` (e.g. per-view Ray tasks).

    Returns the fingerprint the next ``run_pipeline`` gives the stage — its
    building folder (``ws.building_stage(name).stage_dir(name)``) then carries
    it, so files written there now are resumed from, not wiped — or None when
    the stage is already done (cached) under ``cfg``.

    Raises:
        ReconError: a stage that ``name`` reads is not done yet.
    """
    _validate_names([name, *skip], "stage")
    skipped = frozenset(skip)
    with run_lock(ws.lock_path):
        manifest = Manifest(ws.manifest_path)
        if stage_state(ws, cfg, manifest, name, skipped).state == "done":
            return None
        upstream = _upstream_digests(ws, cfg, name, manifest, skipped)
        if upstream is None:
            raise ReconError(f"{ws.out_dir}: stage {name} cannot start, "
                             f"a stage it reads ({', '.join(effective_deps(name, skipped))}) is not done")
        fp = stage_fingerprint(name, cfg, upstream)
        _prepare_building_dir(ws, name, fp, fresh=False)
        return fp


def run_pipeline(
    ws: Workspace,
    cfg: ReconConfig,
    *,
    until: str | None = None,
    start_from: str | None = None,
    force: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    require_upstream: bool = False,
    show_progress: bool = True,
    before_stage: Callable[[str], None] | None = None,
) -> RunResult:
    """Run every stage (up to ``until``) that is not cached and up to date.

    Args:
        start_from: re-run this stage and everything after it.
        force: re-run these stages (and, through their new outputs, what follows).
        skip: skippable stages to leave out (``refine``: fuse reads the initial depth).
        require_upstream: fail instead of computing stages before ``until`` that are not done.
        before_stage: called with a stage's name just before it runs (not when it is cached).
    """
    _validate_names(list(force) + list(skip) + [n for n in (until, start_from) if n], "stage")
    for n in skip:
        if not BY_NAME[n].skippable:
            skippable = ", ".join(s.name for s in STAGES if s.skippable)
            raise ReconError(f"--skip {n}: this stage cannot be skipped (skippable: {skippable})")
    if until in skip:
        raise ReconError(f"cannot both run up to and skip stage {until!r}")
    skipped = frozenset(skip)
    names = _selected(until, skipped)
    forced = set(force)
    if start_from:
        forced |= set(STAGE_NAMES[STAGE_NAMES.index(start_from):])

    adopt_output_dir(ws)
    results: list[StageResult] = []
    preloader = _Preloader(list(names))
    with run_lock(ws.lock_path), contextlib.closing(preloader):
        for name in names:
            if BY_NAME[name].precheck is not None:
                BY_NAME[name].precheck(ws, cfg)
        write_bytes_atomic(ws.config_path, config_to_yaml(cfg).encode())
        manifest = Manifest(ws.manifest_path)
        for name in STAGE_NAMES:
            if name in skipped:
                results.append(StageResult(name, "skipped"))
        for name in names:
            state = stage_state(ws, cfg, manifest, name, skipped)
            if state.state == "done" and name not in forced:
                logger.info("%s: up to date (%s), not re-run", name, state.why)
                entry = manifest.get(name) or {}
                results.append(StageResult(name, "cached", entry.get("seconds", 0.0), entry.get("summary", {})))
                continue
            if require_upstream and name != until:
                raise ReconError(f"stage {name} is {state.state} ({state.why}); "
                                 f"run `recon run {ws.scene_dir} --until {until}` first or drop --no-upstream")
            upstream = _upstream_digests(ws, cfg, name, manifest, skipped)
            assert upstream is not None, f"{name}: upstream not done"
            fp = stage_fingerprint(name, cfg, upstream)
            why = "forced" if name in forced else state.why
            logger.info("%s: running (%s)", name, why)
            resuming = _prepare_building_dir(ws, name, fp, fresh=name in forced)
            if resuming:
                logger.info("%s: resuming from partial results of an interrupted run", name)
                previous = manifest.get(name)
                if previous is not None and previous.get("fingerprint") == fp:
                    damaged = remove_changed_outputs(ws.building_dir(name), previous.get("outputs", {}))
                    if damaged:
                        logger.info("%s: recomputing damaged output(s): %s", name, ", ".join(damaged[:5]))
            ctx = StageContext(ws=ws.building_stage(name), config=cfg, name=name, fingerprint=fp, skipped=skipped,
                               show_progress=show_progress, on_spare_core=partial(preloader.after, name))
            if before_stage is not None:
                before_stage(name)
            preloader.join()  # the stage imports its own modules: never while the preload thread imports
            t0 = time.perf_counter()
            BY_NAME[name].run(ctx)
            manifest.forget(name)  # the recorded outputs are about to be replaced
            _swap_in(ws, name)
            for src, dst in BY_NAME[name].publish:
                copy_atomic(ws.stage_dir(name) / src, ws.out_dir / dst)
            seconds = time.perf_counter() - t0
            outputs = stage_checksums(ws, name)
            manifest.record(
                name,
                {
                    "fingerprint": fp,
                    "version": BY_NAME[name].version,
                    "settings": stage_settings(cfg, name),
                    "upstream": upstream,
                    "outputs": outputs,
                    "output_digest": fingerprint(outputs),
                    "seconds": round(seconds, 3),
                    "finished": time.time(),
                    "summary": ctx.summary,
                },
            )
            logger.info("%s: done in %.1f s", name, seconds)
            results.append(StageResult(name, "ran", seconds, ctx.summary))
    order = {n: i for i, n in enumerate(STAGE_NAMES)}
    results.sort(key=lambda r: order[r.name])
    return RunResult(ws=ws, stages=results)


class _Preloader:
    """Loads the libraries of a run's later stages (:attr:`StageSpec.preload`) in the background when a stage says
    it leaves a core idle (:meth:`StageContext.spare_core`), so that they are not loaded on the critical path."""

    def __init__(self, names: list[str]):
        self.names = names
        self.started: set[str] = set()
        self.threads: list[threading.Thread] = []

    def after(self, name: str) -> None:
        """Start loading the modules of the stages after ``name`` that no earlier call started."""
        later = [n for n in self.names[self.names.index(name) + 1:] if n not in self.started]
        self.started.update(later)
        thread = import_in_background(m for n in later for m in BY_NAME[n].preload)
        if thread is not None:
            self.threads.append(thread)

    def join(self) -> None:
        """Wait for the loads started so far (normally long done)."""
        for thread in self.threads:
            thread.join()
        self.threads.clear()

    def close(self) -> None:
        """At the end of the run, also after an error: the interpreter never exits in the middle of an import."""
        self.join()


def published_outputs(ws: Workspace) -> list[Path]:
    """The stable-contract files of a finished run that exist."""
    return [p for p in (ws.mesh_path, ws.mesh_glb_path, ws.sparse_dir, ws.report_path) if p.exists()]

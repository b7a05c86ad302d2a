"""One scene's pipeline as Ray tasks over a shared workspace (used by ``recon batch``).

A scene is driven by a coordinator task (:func:`run_scene`, no CPU of its own)
that submits, one after the other:

1. ``sfm`` as one task;
2. per-view depth: the registered views split into chunks of
   ``views_per_task``, each chunk one task running pass 1 of the depth stage
   (:func:`pipeline.depth.stage.estimate_views`) into the depth stage's building
   folder (``OUT/.building/depth``), which :func:`workflows.local.prepare_stage`
   first marks with the stage fingerprint;
3. the rest (depth's consistency filter and manifest entry, refine, fuse,
   export, then the report and the ground-truth score) as one task.

Every stage still runs through :func:`workflows.local.run_pipeline`, so the
per-view files, fingerprints and manifest are exactly those of ``recon run``:
a scene started by one resumes under the other, on any node that sees the
workspace at the same path (a shared file system). A task that uses an
accelerator asks Ray for ``num_gpus`` when the cluster has GPUs
(:func:`task_options`); its torch and Open3D code then picks the GPU Ray gave it.

Ray is imported only inside the functions that need it (``pip install -e .[ray]``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ReconConfig, load_config
from pipeline.core.errors import ReconError
from pipeline.core.output_folder import adopt_output_dir
from pipeline.core.workspace import Workspace
from workflows.local import StageResult

logger = logging.getLogger(__name__)

GPU_STAGES = frozenset({"depth", "refine", "fuse"})
"""Stages whose torch / Open3D work runs on a CUDA device when there is one."""
REST_STAGES = ("depth", "refine", "fuse", "export")
"""Stages of the task that follows sfm and the per-view depth tasks."""


@dataclass(frozen=True)
class SceneJob:
    """What to run on one scene; plain data, sent to Ray tasks (paths as every node sees them)."""

    scene_dir: str
    out_dir: str | None = None
    """Output folder; None: ``SCENE_DIR/recon`` as for ``recon run``."""
    config_files: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    """``section.key=value`` as given to ``--set``."""
    presets: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    """Skippable stages left out (e.g. ``refine``)."""
    force_out: bool = False
    """Write into an output folder that holds files recon did not write (``--force-out``)."""

    def workspace(self) -> Workspace:
        """The scene's workspace; raises ReconError when the scene folder does not exist."""
        ws = Workspace.create(self.scene_dir, self.out_dir)
        if not ws.scene_dir.is_dir():
            raise ReconError(f"{ws.scene_dir}: scene folder not found; pass a folder that holds images/ (on a cluster: "
                             "at the same path on every node)")
        return ws

    def config(self, ws: Workspace) -> ReconConfig:
        """Settings as ``recon run`` builds them: defaults ← ``SCENE_DIR/recon.yaml`` ← files ← presets ← overrides."""
        files = [ws.scene_config_path] if ws.scene_config_path.is_file() else []
        return load_config(files + [Path(p) for p in self.config_files], self.overrides, self.presets)


@dataclass(frozen=True)
class Resources:
    """How scene tasks ask Ray for resources."""

    cluster_gpus: float = 0.0
    """GPUs in the cluster (``ray.cluster_resources()``); 0: no task asks for one."""
    cpus_per_task: float = 1.0
    """``num_cpus`` of each task (Ray also sets the task's ``OMP_NUM_THREADS`` from it)."""
    gpus_per_task: float = 1.0
    """``num_gpus`` of a task that runs an accelerated stage (a fraction shares a GPU)."""
    views_per_task: int = 8
    """Views per depth task; 0: the depth stage runs whole, in the task after sfm."""


def task_options(stages: Iterable[str], res: Resources) -> dict[str, float]:
    """Ray resource request of a task that runs ``stages``.

    ``num_cpus`` always; ``num_gpus`` only when one of the stages is in
    :data:`GPU_STAGES` and the cluster has GPUs (on a CPU-only cluster a GPU
    request would never be scheduled).
    """
    opts: dict[str, float] = {"num_cpus": float(res.cpus_per_task)}
    if res.cluster_gpus > 0 and res.gpus_per_task > 0 and GPU_STAGES.intersection(stages):
        opts["num_gpus"] = float(res.gpus_per_task)
    return opts


def view_chunks(n_views: int, views_per_task: int) -> list[list[int]]:
    """View indices ``0..n_views-1`` in consecutive chunks of at most ``views_per_task`` (none when it is 0)."""
    if views_per_task <= 0 or n_views <= 0:
        return []
    return [list(range(i, min(i + views_per_task, n_views))) for i in range(0, n_views, views_per_task)]


def merge_stage_results(*runs: list[StageResult]) -> dict[str, StageResult]:
    """Per stage, the result of the task that ran it (else the last one seen): the scene's view of one batch run."""
    out: dict[str, StageResult] = {}
    for run in runs:
        for st in run:
            if st.name not in out or out[st.name].status != "ran":
                out[st.name] = st
    return out


# ---- task bodies (run in Ray workers) ------------------------------------------------------

@dataclass
class TaskOutcome:
    """What a task reports back: its stage results, or the one-line error that stopped it."""

    stages: list[StageResult] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


NOISY_LOGGERS = ("PIL", "matplotlib", "trimesh", "urllib3", "ray", "filelock")
"""Libraries whose records below WARNING stay out of the scene log (as in ``recon run``'s log)."""


def _not_noisy(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in NOISY_LOGGERS


@contextlib.contextmanager
def scene_log(path: Path) -> Iterator[None]:
    """Send this task's log records to the scene's log file (a Ray worker has no console of its own)."""
    root = logging.getLogger()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_not_noisy)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)


def one_line_error(exc: BaseException, log_path: Path | None) -> str:
    """The table's message for an exception: a ReconError as it is; anything else named, its traceback in the log."""
    if isinstance(exc, ReconError):
        return str(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    where = ""
    if log_path is not None:
        with contextlib.suppress(OSError):
            with open(log_path, "a") as fh:
                fh.write("".join(traceback.format_exception(exc)))
            where = f"; full traceback in {log_path}"
    return f"unexpected {type(exc).__name__}: {first}{where}"


def _guarded(job: SceneJob, body: Callable[[Workspace, ReconConfig, TaskOutcome], None]) -> TaskOutcome:
    """Run ``body`` with the scene's workspace, settings and log file; failures become ``outcome.error``."""
    outcome = TaskOutcome()
    log_path = None
    try:
        ws = job.workspace()
        cfg = job.config(ws)
        adopt_output_dir(ws, force=job.force_out)
        log_path = ws.log_path
        with scene_log(log_path):
            body(ws, cfg, outcome)
    except Exception as exc:  # noqa: BLE001 - a task reports every failure as one line
        outcome.error = one_line_error(exc, log_path)
    return outcome


def run_stages_task(job: SceneJob, until: str | None) -> TaskOutcome:
    """Every stage up to ``until`` (all when None) that is not cached, as ``recon run`` does."""
    from workflows.local import run_pipeline

    def body(ws: Workspace, cfg: ReconConfig, outcome: TaskOutcome) -> None:
        outcome.stages = run_pipeline(ws, cfg, until=until, skip=job.skip, show_progress=False).stages
        if until is None:  # the score first: the report shows OUT/eval.json
            outcome.extra["eval"] = evaluate_scene(ws)
            outcome.extra["report"] = write_report(ws, ran=any(st.status == "ran" for st in outcome.stages))

    return _guarded(job, body)


def estimate_chunk_task(job: SceneJob, indices: list[int]) -> TaskOutcome:
    """Pass 1 of the depth stage for the views ``indices`` into its prepared building folder
    (``OUT/.building/depth``)."""
    from pipeline.core.io import load_sfm_scene
    from pipeline.depth.stage import estimate_views

    def body(ws: Workspace, cfg: ReconConfig, outcome: TaskOutcome) -> None:
        log = logging.getLogger("pipeline.depth.stage")
        res = estimate_views(load_sfm_scene(ws), ws.building_stage("depth"), cfg.depth, cfg.mvs, indices, log=log)
        log.info("depth: pass 1 of views %d..%d in a Ray task: %d estimated, %d already there, %d left out",
                 indices[0], indices[-1], len(res.seconds), len(indices) - len(res.seconds) - len(res.failed),
                 len(res.failed))
        outcome.extra = {"views": len(indices), "estimated": len(res.seconds), "failed": dict(res.failed),
                         "seconds": list(res.seconds)}

    return _guarded(job, body)


def prepare_depth_task(job: SceneJob, views_per_task: int) -> TaskOutcome:
    """Mark the depth stage's building folder with its fingerprint and return its view chunks (none when the stage is
    cached)."""
    from pipeline.core.io import load_sfm_scene
    from workflows.local import prepare_stage

    def body(ws: Workspace, cfg: ReconConfig, outcome: TaskOutcome) -> None:
        fp = prepare_stage(ws, cfg, "depth", skip=job.skip)
        outcome.extra["chunks"] = [] if fp is None else view_chunks(len(load_sfm_scene(ws).views), views_per_task)
        if fp is not None:
            logger.info("depth: folder ready for fingerprint %s; pass 1 of the views goes to %d Ray task(s)", fp,
                        len(outcome.extra["chunks"]))

    return _guarded(job, body)


def write_report(ws: Workspace, *, ran: bool) -> str | None:
    """Write ``OUT/report.html`` as ``recon run`` does (when a stage ran or it is missing); None, or why it failed.

    A report failure never fails the scene: it is logged and returned.
    """
    from pipeline.analysis.report import build_report

    if not ran and ws.report_path.exists():
        return None
    try:
        build_report(ws)
    except Exception as exc:  # noqa: BLE001 - the report is a by-product
        logger.warning("could not write %s: %s", ws.report_path, exc)
        return f"report: {exc}"
    return None


def evaluate_scene(ws: Workspace) -> dict[str, Any] | None:
    """F-scores etc. of ``OUT/mesh.ply`` against ``SCENE_DIR/gt`` (None without ground truth).

    Reuses ``OUT/eval.json`` when it is newer than the mesh and holds the
    default thresholds (a cached run scores nothing again). An evaluation error is returned as ``{"error": ...}``,
    never raised: the reconstruction itself succeeded.
    """
    import json

    from pipeline.analysis.evaluate import evaluate_reconstruction
    from pipeline.analysis.metrics import DEFAULT_THRESHOLDS_REL, threshold_table

    gt = ws.scene_dir / "gt"
    if not gt.is_dir() or not ws.mesh_path.is_file():
        return None
    cached = ws.out_dir / "eval.json"
    result = None
    if cached.is_file() and cached.stat().st_mtime_ns >= ws.mesh_path.stat().st_mtime_ns:
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(cached.read_text())
        if (result is not None
                and not set(threshold_table(1.0, DEFAULT_THRESHOLDS_REL, None)) <= set(result.get("thresholds", {}))):
            result = None  # scored by `recon eval` with other thresholds
    try:
        if result is None:
            result = evaluate_reconstruction(ws.out_dir, gt)
        return {"fscore": {k: v["fscore"] for k, v in result["thresholds"].items()},
                "chamfer_rel": result["chamfer_rel"]}
    except Exception as exc:  # noqa: BLE001 - a score that cannot be computed is reported, not fatal
        logger.warning("%s: evaluation against %s failed: %s", ws.out_dir, gt, exc)
        return {"error": one_line_error(exc, None)}


# ---- the coordinator ---------------------------------------------------------------------------

@dataclass
class SceneOutcome:
    """One scene of a batch: what each stage did, the final numbers, or why it failed."""

    job: SceneJob
    out_dir: str
    stages: dict[str, StageResult] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    """Wall seconds of the whole scene in this batch run."""
    depth_tasks: int = 0
    """Per-view depth tasks submitted (0: cached, or the stage ran whole)."""
    evaluation: dict[str, Any] | None = None
    report_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _ray_call(fn: Callable[..., TaskOutcome], options: dict[str, float], *args: Any) -> Any:
    """Submit ``fn(*args)`` as a Ray task with ``options``; returns its object ref."""
    import ray

    return ray.remote(fn).options(**options).remote(*args)


def _get(refs: list[Any]) -> list[TaskOutcome]:
    """Results of task refs; a task Ray itself lost (worker crash, node gone) becomes an error outcome."""
    import ray

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[-1]
            out.append(TaskOutcome(error=f"Ray task failed ({type(exc).__name__}): {first}"))
    return out


def run_scene(job: SceneJob, res: Resources) -> SceneOutcome:
    """Coordinator task: sfm, per-view depth tasks, then the rest (see the module docstring)."""
    t0 = time.perf_counter()
    out_dir = str(Workspace.create(job.scene_dir, job.out_dir).out_dir)
    outcome = SceneOutcome(job=job, out_dir=out_dir)
    runs: list[list[StageResult]] = []
    try:
        (sfm,) = _get([_ray_call(run_stages_task, task_options(("sfm",), res), job, "sfm")])
        runs.append(sfm.stages)
        if sfm.error:
            outcome.error = sfm.error
            return outcome
        fanout_seconds = 0.0
        if res.views_per_task > 0:
            t1 = time.perf_counter()
            (prep,) = _get([_ray_call(prepare_depth_task, {"num_cpus": 0.0}, job, res.views_per_task)])
            if prep.error:
                outcome.error = prep.error
                return outcome
            chunks = prep.extra["chunks"]
            outcome.depth_tasks = len(chunks)
            opts = task_options(("depth",), res)
            for chunk in _get([_ray_call(estimate_chunk_task, opts, job, c) for c in chunks]):
                if chunk.error:  # the rest task computes the views this chunk left, and fails as clearly if it must
                    logger.warning("%s: a per-view depth task failed (%s); its views are done by the next task",
                                   job.scene_dir, chunk.error)
            fanout_seconds = time.perf_counter() - t1 if chunks else 0.0
        rest_stages = tuple(s for s in REST_STAGES if s not in job.skip)
        (rest,) = _get([_ray_call(run_stages_task, task_options(rest_stages, res), job, None)])
        runs.append(rest.stages)
        outcome.error = rest.error
        outcome.evaluation = rest.extra.get("eval")
        outcome.report_error = rest.extra.get("report")
        merged = merge_stage_results(*runs)
        if fanout_seconds and "depth" in merged and merged["depth"].status == "ran":
            merged["depth"].seconds += fanout_seconds  # wall time of the per-view tasks + the filter pass
        outcome.stages = merged
    except Exception as exc:  # noqa: BLE001 - a coordinator reports, never raises
        outcome.error = one_line_error(exc, None)
    finally:
        if not outcome.stages and runs:
            outcome.stages = merge_stage_results(*runs)
        outcome.seconds = time.perf_counter() - t0
    return outcome

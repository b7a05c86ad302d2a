"""``recon batch``: many scenes on Ray — this machine by default, or an existing cluster.

Without an address, Ray is started here for the duration of the batch, bound
to the loopback interface only (the embedded default); with one
(``HOST:PORT`` of a running head, or ``auto``), the batch joins that cluster.
Each scene runs as in :mod:`workflows.distributed` (sfm, per-view depth tasks,
the rest), at most ``parallel`` scenes at once; a failing scene becomes a
``failed`` row with its one-line error and the others go on. The end is one
table (:func:`format_table`), also written as CSV and JSON (:func:`write_reports`).

The scenes' output folders must be on a file system every node sees at the
same path; the driver itself only writes the batch report.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.allocator import worker_env
from pipeline.core.cache import write_bytes_atomic, write_json_atomic
from pipeline.core.errors import ReconError
from pipeline.graph import STAGE_NAMES
from workflows.distributed import Resources, SceneJob, SceneOutcome, run_scene

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 before Ray is imported, Ray puts every process of a local instance on 127.0.0.1 (no other interface)."""
REPORT_NAME = "recon_batch"
"""The batch report is ``REPORT_DIR/recon_batch.csv`` and ``.json``."""
FSCORE_KEY = "1%"
"""The F-score shown in the table: threshold 1 % of the ground-truth object diagonal."""


# ---- rows and the report ----------------------------------------------------------------------

@dataclass
class SceneRow:
    """One line of the batch table."""

    scene: str
    """Scene folder name (its full path is ``scene_dir``)."""
    scene_dir: str
    out_dir: str
    status: str
    """``ok`` or ``failed``."""
    registered: int | None = None
    """Images registered by sfm."""
    images: int | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stage name → ``{"status": ran|cached|skipped, "seconds": ...}`` (seconds of this batch run for ``ran``)."""
    vertices: int | None = None
    faces: int | None = None
    fscore: dict[str, float] | None = None
    """F-score per threshold label (``"0.5%"``, ``"1%"``) when the scene has ``gt/``."""
    chamfer_rel: float | None = None
    seconds: float = 0.0
    """Wall seconds of the scene in this batch run."""
    depth_tasks: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def all_cached(self) -> bool:
        """Every stage was reused from the caches (nothing recomputed)."""
        return bool(self.stages) and all(s["status"] in ("cached", "skipped") for s in self.stages.values())


def scene_row(outcome: SceneOutcome) -> SceneRow:
    """The table row of one scene's outcome."""
    job = outcome.job
    row = SceneRow(scene=Path(job.scene_dir).name, scene_dir=job.scene_dir, out_dir=outcome.out_dir,
                   status="ok" if outcome.ok else "failed", seconds=round(outcome.seconds, 3),
                   depth_tasks=outcome.depth_tasks, error=outcome.error)
    for name in STAGE_NAMES:
        st = outcome.stages.get(name)
        if st is not None:
            row.stages[name] = {"status": st.status, "seconds": round(st.seconds, 3)}
    sfm = outcome.stages.get("sfm")
    if sfm is not None:
        row.registered = sfm.summary.get("registered")
        row.images = sfm.summary.get("images")
    fuse = outcome.stages.get("fuse")
    if fuse is not None and outcome.ok:
        row.vertices, row.faces = fuse.summary.get("vertices"), fuse.summary.get("faces")
    ev = outcome.evaluation
    if ev:
        if "error" in ev:
            row.notes.append(f"eval: {ev['error']}")
        else:
            row.fscore = {k: round(float(v), 4) for k, v in ev["fscore"].items()}
            row.chamfer_rel = round(float(ev["chamfer_rel"]), 6)
    if outcome.report_error:
        row.notes.append(outcome.report_error)
    return row


def _stage_cell(row: SceneRow, name: str) -> str:
    st = row.stages.get(name)
    if st is None:
        return "-"
    if st["status"] == "ran":
        return f"{st['seconds']:.1f}"
    return st["status"]


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table_cells(row: SceneRow) -> list[str]:
    """The printed cells of a row, in :data:`TABLE_HEADER` order."""
    f = row.fscore.get(FSCORE_KEY) if row.fscore else None
    return [row.scene, row.status, _fmt(row.registered), *(_stage_cell(row, n) for n in STAGE_NAMES),
            _fmt(row.vertices), _fmt(row.faces), _fmt(f, ".4f"), f"{row.seconds:.1f}"]


TABLE_HEADER = ["scene", "status", "registered", *(f"{n} s" for n in STAGE_NAMES), "vertices", "faces",
                f"F@{FSCORE_KEY}", "total s"]


def format_table(rows: Sequence[SceneRow]) -> str:
    """The batch table: one line per scene (stage cells: seconds of this run, ``cached`` or ``skipped``), then each
    failure's message."""
    cells = [TABLE_HEADER] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    for r in rows:
        if r.error:
            lines.append(f"{r.scene}: failed: {r.error}")
        for note in r.notes:
            lines.append(f"{r.scene}: note: {note}")
    n_ok = sum(r.status == "ok" for r in rows)
    lines.append(f"{n_ok} of {len(rows)} scene(s) ok, {len(rows) - n_ok} failed")
    return "\n".join(lines)


CSV_COLUMNS = ["scene", "status", "registered", "images",
               *(f"{n}_{k}" for n in STAGE_NAMES for k in ("status", "seconds")),
               "vertices", "faces", "fscore_0.5%", "fscore_1%", "chamfer_rel", "seconds", "depth_tasks", "out_dir",
               "scene_dir", "error"]


def csv_record(row: SceneRow) -> dict[str, Any]:
    """A row as a flat CSV record (:data:`CSV_COLUMNS`)."""
    rec: dict[str, Any] = {"scene": row.scene, "status": row.status, "registered": row.registered, "images": row.images,
                           "vertices": row.vertices, "faces": row.faces, "chamfer_rel": row.chamfer_rel,
                           "seconds": row.seconds, "depth_tasks": row.depth_tasks, "out_dir": row.out_dir,
                           "scene_dir": row.scene_dir,
                           "error": "; ".join([*([row.error] if row.error else []), *row.notes]) or None}
    for n in STAGE_NAMES:
        st = row.stages.get(n, {})
        rec[f"{n}_status"], rec[f"{n}_seconds"] = st.get("status"), st.get("seconds")
    for label in ("0.5%", "1%"):
        rec[f"fscore_{label}"] = row.fscore.get(label) if row.fscore else None
    return {k: ("" if rec[k] is None else rec[k]) for k in CSV_COLUMNS}


def write_reports(rows: Sequence[SceneRow], report_dir: Path, info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``recon_batch.csv`` (one flat line per scene) and ``recon_batch.json`` (rows + ``info``) atomically."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow(csv_record(r))
    csv_path, json_path = report_dir / f"{REPORT_NAME}.csv", report_dir / f"{REPORT_NAME}.json"
    write_bytes_atomic(csv_path, buf.getvalue().encode())
    write_json_atomic(json_path, {**info, "scenes": [vars(r) for r in rows]})
    return csv_path, json_path


# ---- jobs ------------------------------------------------------------------------------------------

def make_jobs(scene_dirs: Sequence[str | Path], *, out_root: str | Path | None = None, config_files: Sequence[str] = (),
              overrides: Sequence[str] = (), presets: Sequence[str] = (), skip: Sequence[str] = (),
              force_out: bool = False) -> list[SceneJob]:
    """One job per scene folder (absolute paths); with ``out_root`` each output goes to ``OUT_ROOT/<scene name>``.

    Raises:
        ReconError: a scene given twice, or two scenes whose outputs would share a folder.
    """
    if not scene_dirs:
        raise ReconError("no scene folder given; pass one or more SCENE_DIRs")
    jobs, seen_scene, seen_out = [], set(), {}
    for s in scene_dirs:
        scene = Path(s).expanduser().resolve()
        if scene in seen_scene:
            raise ReconError(f"{scene}: scene given twice")
        seen_scene.add(scene)
        out = Path(out_root).expanduser().resolve() / scene.name if out_root is not None else None
        if out is not None:
            if out in seen_out:
                raise ReconError(f"{seen_out[out]} and {scene} would both write to {out}; rename one scene folder or "
                                 "leave out --out")
            seen_out[out] = scene
        jobs.append(SceneJob(scene_dir=str(scene), out_dir=str(out) if out else None,
                             config_files=tuple(str(Path(p).resolve()) for p in config_files),
                             overrides=tuple(overrides), presets=tuple(presets), skip=tuple(skip), force_out=force_out))
    return jobs


# ---- Ray ----------------------------------------------------------------------------------------------

def _import_ray(loopback: bool) -> Any:
    """Import Ray (the ``ray`` extra); ``loopback``: a local instance binds to 127.0.0.1 only (when Ray is not imported
    yet)."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise ReconError("recon batch needs Ray: pip install -e '.[ray]' (on every node of a cluster)") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` address (Ray itself retries for minutes); other forms pass.

    Raises:
        ReconError: the address is malformed or refuses a TCP connection.
    """
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ReconError(f"--address {address}: expected HOST:PORT of a Ray head (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ReconError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                         "`ray start --head` and pass the address it prints, "
                         "or leave out --address to run on this machine") from None


def start_ray(address: str | None, *, num_cpus: int | None = None) -> Any:
    """Start Ray on this machine (``address`` None: loopback only, gone when the batch ends) or join the cluster at
    ``address``.

    Raises:
        ReconError: Ray is not installed, or no cluster answers at ``address``.
    """
    if address is not None:
        check_reachable(address)
    ray = _import_ray(loopback=address is None)
    # the workers' OpenMP threads sleep when idle and their malloc reuses freed blocks, as in `recon run` (cli.py)
    env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                        **worker_env()}}
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", runtime_env=env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"at {address}" if address else "on this machine"
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = ("start a cluster with `ray start --head` and pass its address (with token authentication, also set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN), or leave out --address to run on this machine"
                if address else "see Ray's message above")
        raise ReconError(f"cannot start or reach Ray {where}: {first}; {hint}") from exc
    return ray


def cluster_resources(ray: Any) -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


@dataclass
class BatchResult:
    rows: list[SceneRow]
    info: dict[str, Any]

    @property
    def failed(self) -> list[SceneRow]:
        return [r for r in self.rows if r.status != "ok"]


def run_batch(
    jobs: Sequence[SceneJob],
    *,
    address: str | None = None,
    parallel: int | None = None,
    num_cpus: int | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 1.0,
    views_per_task: int = 8,
    on_scene_done: Callable[[SceneRow], None] | None = None,
) -> BatchResult:
    """Run every job's pipeline on Ray; returns one row per job, in the order given.

    Args:
        address: Ray cluster to join (None: start Ray here, loopback only).
        parallel: most scenes at once (default: the cluster's CPU count).
        num_cpus: CPUs of a Ray started here (default: all).
        cpus_per_task, gpus_per_task, views_per_task: see :class:`~workflows.distributed.Resources`.
        on_scene_done: called with each scene's row as it finishes (progress).
    """
    if parallel is not None and parallel < 1:
        raise ReconError(f"--parallel {parallel}: must be at least 1")
    if cpus_per_task <= 0 or gpus_per_task < 0 or views_per_task < 0:
        raise ReconError("--cpus-per-task must be > 0, --gpus-per-task >= 0 and --views-per-task >= 0")
    ray = start_ray(address, num_cpus=num_cpus)
    try:
        cpus, gpus = cluster_resources(ray)
        res = Resources(cluster_gpus=gpus, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task,
                        views_per_task=views_per_task)
        if cpus < cpus_per_task:
            raise ReconError(f"--cpus-per-task {cpus_per_task:g}: the Ray cluster has only {cpus:g} CPU(s)")
        limit = parallel or max(1, int(cpus))
        logger.info("Ray %s: %g CPU(s), %g GPU(s); %d scene(s), at most %d at once",
                    address or "on this machine", cpus, gpus, len(jobs), limit)
        coordinator = ray.remote(run_scene).options(num_cpus=0)
        rows: dict[int, SceneRow] = {}
        pending: dict[Any, int] = {}
        queue = list(range(len(jobs)))
        while queue or pending:
            while queue and len(pending) < limit:
                i = queue.pop(0)
                pending[coordinator.remote(jobs[i], res)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    first = (str(exc).strip().splitlines() or [""])[-1]
                    outcome = SceneOutcome(job=jobs[i],
                                           out_dir=jobs[i].out_dir or str(Path(jobs[i].scene_dir) / "recon"),
                                           error=f"Ray task failed ({type(exc).__name__}): {first}")
                rows[i] = scene_row(outcome)
                logger.info("%s: %s in %.1f s%s", rows[i].scene, rows[i].status, rows[i].seconds,
                            f" ({rows[i].error})" if rows[i].error else "")
                if on_scene_done is not None:
                    on_scene_done(rows[i])
        info = {"address": address or "local", "cluster_cpus": cpus, "cluster_gpus": gpus, "parallel": limit,
                "cpus_per_task": cpus_per_task, "gpus_per_task": gpus_per_task, "views_per_task": views_per_task}
        return BatchResult(rows=[rows[i] for i in range(len(jobs))], info=info)
    finally:
        ray.shutdown()

"""COLMAP's native steps (SIFT extraction, matching, mapping), each run in a child process.

Run inside recon's own process, a crash in COLMAP (a segmentation fault on an
odd photo) would end recon with no message, and Ctrl-C would wait until
COLMAP's current loop returned to Python (a whole matching block). Each step
therefore runs in a fresh child (``python -m pipeline.sfm.colmap_steps``):

- a native crash ends only the child, and :func:`run_step` raises one line
  naming the step and, for feature extraction, the photo being read;
- Ctrl-C or SIGTERM in recon kills the child at once;
- the child exits by itself when recon dies (its stdin closes), so no COLMAP
  work outlives the run that started it;
- its output (glog, Ceres) is appended to the sfm stage's ``colmap.log``, and
  its progress comes back as JSON lines on a pipe.

The step functions are plain: the same seeds and options give the same
database and model as in-process calls.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import ReconError
from pipeline.sfm.config import SfmConfig

Emit = Callable[[dict[str, Any]], None]
"""A step's progress callback: one JSON-able event (``{"event": "images", "names": [...]}``)."""


class ColmapCrashed(ReconError):
    """A COLMAP step ended its process with a signal (a native crash)."""


class ColmapStepError(RuntimeError):
    """A COLMAP step raised a Python exception in its child process (its type and message)."""


# ---- the steps (they run in the child) -------------------------------------------------------------


def threads(num_threads: int) -> int:
    """COLMAP thread count for a ``sfm.*_threads`` setting (-1: every core)."""
    return num_threads if num_threads > 0 else (os.cpu_count() or 1)


def seed_colmap(seed: int) -> None:
    """Seed COLMAP's process-wide PRNG (used where no per-call seed exists); -1 leaves it alone."""
    import pycolmap

    if seed >= 0:
        pycolmap.set_random_seed(seed)


RETRY_PEAK_THRESHOLD_FACTOR = 1 / 3
"""The second attempt extracts SIFT with COLMAP's peak threshold times this: more keypoints in dark and
weakly textured photos (see :data:`RELAXED_INCREMENTAL`)."""


def extract_features(*, database: str, input_dir: str, groups: Sequence[Sequence[str]], cfg: SfmConfig, shared: bool,
                     emit: Emit, peak_threshold_factor: float = 1.0) -> None:
    """SIFT features (CPU) of every image in ``groups`` into ``database``, the same whatever the thread count.

    First every image is entered into the database in the order of
    ``groups`` (``pycolmap.import_images``, one thread), so image and camera
    ids never depend on which thread finishes first; then SIFT runs on them,
    in parallel with several threads (COLMAP keeps the ids of images already
    in the database). Single-threaded, one image per COLMAP call (a crash
    names its photo); with more threads, chunks of images that COLMAP reads
    in parallel. With ``shared`` every group gets one camera, else each image
    gets its own. Emits ``images`` (before a call: the photos a crash is
    blamed on) and ``done`` (``n`` images) events. ``peak_threshold_factor``
    scales SIFT's peak (contrast) threshold.
    """
    import pycolmap

    n_threads = threads(cfg.num_threads)
    options = pycolmap.FeatureExtractionOptions()
    options.num_threads = n_threads
    options.max_image_size = cfg.max_image_size
    options.sift.max_num_features = cfg.max_num_features
    options.sift.estimate_affine_shape = cfg.estimate_affine_shape
    options.sift.peak_threshold *= peak_threshold_factor
    mode = pycolmap.CameraMode.SINGLE if shared else pycolmap.CameraMode.PER_IMAGE
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = cfg.camera_model
    pycolmap.Database.open(database).close()  # import_images needs the file
    for group in groups:
        emit({"event": "images", "names": list(group)})
        pycolmap.import_images(database, input_dir, camera_mode=mode, image_names=list(group), options=reader)
    chunk = 1 if n_threads == 1 else max(8, 4 * n_threads)
    for group in groups:  # a call never mixes groups: with one camera per call, COLMAP skips photos of another size
        for start in range(0, len(group), chunk):
            part = list(group[start : start + chunk])
            emit({"event": "images", "names": part})
            pycolmap.extract_features(database, input_dir, image_names=part, camera_mode=mode, reader_options=reader,
                                      extraction_options=options, device=pycolmap.Device.cpu)
            emit({"event": "done", "n": len(part)})


def match_features(*, database: str, cfg: SfmConfig, emit: Emit) -> None:
    """Match and geometrically verify image pairs (exhaustive or sequential by name), seeded RANSAC."""
    import pycolmap

    n = threads(cfg.num_threads)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = n
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = cfg.seed
    if cfg.matcher.value == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = cfg.sequential_overlap
        pairing.num_threads = n
        pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing,
                                  verification_options=verification, device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification,
                                  device=pycolmap.Device.cpu)
    emit({"event": "done"})


def _write_largest(models: dict, out_dir: str) -> dict[str, Any] | None:
    """Write the model with the most registered images (then points) to ``out_dir``; its size, or None."""
    if not models:
        return None
    best = max(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    best.write_binary(out_dir)
    return {"registered": best.num_reg_images(), "points": best.num_points3D(), "models": len(models)}


def map_incremental(*, database: str, input_dir: str, work_dir: str, out_dir: str, cfg: SfmConfig, relaxed: bool,
                    emit: Emit) -> dict | None:
    """Incremental mapping (seeded); the largest model goes to ``out_dir``. Emits ``registered`` counts.

    ``relaxed``: the options of the second attempt when too few images
    registered (:data:`RELAXED_INCREMENTAL`).
    """
    import pycolmap

    seed_colmap(cfg.seed)
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = cfg.seed
    options.num_threads = threads(cfg.mapper_threads)
    set_global_ba_growth(options, cfg.global_ba_growth)
    if relaxed:
        relax_incremental(options)
    count = [0]

    def initial_pair() -> None:
        count[0] = 2
        emit({"event": "registered", "n": count[0]})

    def next_image() -> None:
        count[0] += 1
        emit({"event": "registered", "n": count[0]})

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    models = pycolmap.incremental_mapping(database, input_dir, work_dir, options=options,
                                          initial_image_pair_callback=initial_pair, next_image_callback=next_image)
    return _write_largest(models, out_dir)


def set_global_ba_growth(options: Any, growth: float) -> None:
    """Global bundle adjustment of a ``pycolmap.IncrementalPipelineOptions`` whenever the registered images (frames
    since pycolmap 3.12) or the points grew by ``growth`` since the last one."""
    for name in ("ba_global_frames_ratio", "ba_global_images_ratio", "ba_global_points_ratio"):
        if hasattr(options, name):
            setattr(options, name, growth)


RELAXED_INCREMENTAL: dict[str, Any] = {
    "abs_pose_min_num_inliers": 15,
    "abs_pose_min_inlier_ratio": 0.1,
    "init_min_num_inliers": 50,
    "init_min_tri_angle": 8.0,
}
"""Incremental-mapping options of the second attempt (COLMAP's defaults: 30, 0.25, 100, 16°): an image
registers with half the inliers, a model starts from half the inliers and half the angle. Used only with
the features of :data:`RETRY_PEAK_THRESHOLD_FACTOR`: on the first attempt's features these options alone
gave a confidently wrong model (docs/results.md)."""


def relax_incremental(options: Any) -> None:
    """Apply :data:`RELAXED_INCREMENTAL` to a ``pycolmap.IncrementalPipelineOptions``."""
    for key, value in RELAXED_INCREMENTAL.items():
        setattr(options.mapper, key, value)


STEPS: dict[str, Callable[..., Any]] = {
    "extract_features": extract_features, "match_features": match_features,
    "map_incremental": map_incremental,
}
"""The steps :func:`run_step` can run, by name."""


# ---- the parent side -----------------------------------------------------------------------------------


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_step(function: str, *, log_path: Path, on_event: Callable[[dict[str, Any]], None] = lambda event: None,
             what: str, **kwargs: Any) -> Any:
    """Run step ``function`` (a name in :data:`STEPS`, called with ``kwargs`` and ``emit``) in a child process.

    Args:
        log_path: the child's stdout and stderr are appended here (``colmap.log``).
        on_event: called in this process with every event the step emits.
        what: the step in words, for errors ("feature extraction").

    Returns:
        What the step returned (JSON-able).

    Raises:
        ColmapCrashed: the child ended by a signal; the message names the step, the photo it was reading
            (feature extraction) and the log.
        ColmapStepError: the step raised (type and message).
        KeyboardInterrupt: Ctrl-C or SIGTERM here; the child is killed first.
    """
    job = pickle.dumps((function, kwargs))
    read_fd, write_fd = os.pipe()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.sfm.colmap_steps", str(write_fd)], stdin=subprocess.PIPE, stdout=log,
                stderr=log, pass_fds=(write_fd,), close_fds=True,
            )
        finally:
            os.close(write_fd)
    last: dict[str, Any] = {}
    outcome: dict[str, Any] = {}
    try:
        assert proc.stdin is not None
        proc.stdin.write(struct.pack("<Q", len(job)) + job)
        proc.stdin.flush()  # stdin stays open: the child exits when it closes (this process died)
        buffer = b""
        with os.fdopen(read_fd, "rb", buffering=0) as events:
            while True:
                ready, _, _ = select.select([events], [], [], 0.2)
                if not ready:
                    if proc.poll() is not None and not select.select([events], [], [], 0)[0]:
                        break
                    continue
                chunk = events.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    if "result" in event or "error" in event:
                        outcome = event
                    else:
                        last = event
                        on_event(event)
        returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
    if returncode < 0:
        names = last.get("names", []) if last.get("event") == "images" else []
        photo = f" on {names[0]}" if len(names) == 1 else f" on one of {', '.join(names)}" if names else ""
        advice = (("remove or replace that photo" if len(names) == 1 else "set sfm.num_threads=1 to find the photo")
                  if names else "see the log")
        raise ColmapCrashed(f"COLMAP's {what} crashed ({_signal_name(returncode)}){photo}; "
                            f"{advice} (details in {log_path})")
    if "error" in outcome:
        raise ColmapStepError(f"COLMAP's {what} failed: {outcome['error']} (details in {log_path})")
    if returncode != 0 or "result" not in outcome:
        raise ColmapStepError(f"COLMAP's {what} ended with exit status {returncode} (details in {log_path})")
    return outcome["result"]


# ---- the child --------------------------------------------------------------------------------------------


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the parent closed the job pipe")
        data += chunk
    return data


def _exit_when_parent_goes() -> None:
    """Block on stdin (the parent never writes again); EOF means the parent died: stop at once."""
    while os.read(0, 4096):
        pass
    os._exit(1)


def _child_main(event_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills this process
    (size,) = struct.unpack("<Q", _read_exactly(0, 8))
    function, kwargs = pickle.loads(_read_exactly(0, size))
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    events = os.fdopen(event_fd, "wb", buffering=0)

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event).encode() + b"\n")

    step = STEPS[function]
    try:
        result = step(emit=emit, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        emit({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"})
        sys.stderr.flush()
        os._exit(1)
    emit({"result": result})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))

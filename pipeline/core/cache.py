"""Crash-safe caches: atomic writes, fingerprints, the manifest and the run lock.

Every file a stage produces is written to a temporary name in the same folder
and moved into place with :func:`os.replace`, so a reader sees either the old
file, the new one, or none — never half of one. The manifest (written last,
also atomically) is what marks a stage as done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import LockedError, OutputError, ReconError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
"""``OUT/manifest.json``: what marks a folder as a recon output (see :func:`is_recon_output`)."""
MANIFEST_TOOL = "recon"
FINGERPRINT_FILE = "_fingerprint.txt"
"""In a stage folder: the fingerprint of the configuration it holds (complete or partial) work of."""


# ---- atomic writes ------------------------------------------------------------------

def write_error(path: Path | str, exc: OSError) -> OutputError:
    """The one-line error for an OSError raised while writing ``path`` (disk full, read-only, no permission)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the device while writing {path}; "
                           "free some space or choose another --out folder")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OutputError(f"{path}: cannot write here ({exc.strerror}); choose a writable --out folder")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc}); check the output folder")


def raise_if_disk_full(path: Path, min_free_bytes: int = 1 << 14) -> None:
    """Raise :class:`OutputError` when the file system holding ``path`` has (almost) no free space left.

    Native writers (COLMAP, Open3D) can report success on a full disk after
    writing a truncated file; checking the free space right after them keeps
    such a file from ever being moved into place or trusted.
    """
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < min_free_bytes:
        raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))


def ensure_output_dir(path: Path) -> None:
    """Create the output folder and check that a file can be written in it.

    Raises:
        ReconError: the folder cannot be created or written (read-only, no
            permission, disk full), naming it and what to do.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        try:
            os.write(fd, b"recon")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise write_error(path, exc) from exc


# ---- fault injection (crash tests) ----------------------------------------------------

FAULT_KILL_ENV = "RECON_FAULT_KILL_AT"
"""Crash tests: ``N`` kills this process with SIGKILL at the N-th (1-based) write event."""
FAULT_TRACE_ENV = "RECON_FAULT_TRACE"
"""Crash tests: a file to which every write event is appended as one JSON line."""
_fault_events = [0]


def fault_point(path: Path, event: str) -> None:
    """A write event for crash tests (``tests/test_faults.py``); does nothing unless the env vars are set.

    Events: ``staged`` (the temporary file or folder is complete but not yet
    moved into place: a kill leaves a stale temporary behind) and ``replaced``
    (``path`` is in place). With :data:`FAULT_TRACE_ENV` each event is appended
    to that file; with :data:`FAULT_KILL_ENV` = N the process SIGKILLs itself
    at the N-th event, so a test can crash a real run at every write of every stage.
    """
    trace, kill_at = os.environ.get(FAULT_TRACE_ENV), os.environ.get(FAULT_KILL_ENV)
    if not trace and not kill_at:
        return
    _fault_events[0] += 1
    n = _fault_events[0]
    if trace:
        with open(trace, "a") as fh:
            fh.write(json.dumps({"n": n, "event": event, "path": str(path), "pid": os.getpid()}) + "\n")
    if kill_at and n == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    """``.<stem>.`` for a temporary next to ``path``, the stem cut so that the temporary's name stays under
    the 255 bytes a file name may have (``mkstemp`` adds 8 characters and the suffix)."""
    stem = path.stem
    while len(f".{stem}.".encode()) + 8 + len(path.suffix.encode()) > 250:
        stem = stem[:-1]
    return f".{stem}."


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps the suffix (``suffix`` or the target's), so
    libraries that pick a format from the extension still work. The file ends
    with the permissions a plain ``open`` would give it (the umask applies).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix or path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        raise_if_disk_full(path)
        fault_point(path, "staged")
        os.replace(tmp, path)
        fault_point(path, "replaced")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:
        pass


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def write_npz_atomic(path: Path, **arrays: Any) -> None:
    """Write an ``.npz`` atomically (no pickles: plain arrays only).

    Stored, not compressed: compressing a 480x360 depth map took 45 ms against
    1 ms for about 1.4 times the bytes, on every write and read of a cache.
    """
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Load a cache ``.npz`` fully (no pickles); a corrupt file raises ReconError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ReconError(f"{path}: cache file is unreadable ({exc}); delete it or re-run with --force") from exc


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (old one removed). The umask applies to it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        raise_if_disk_full(path)
        fault_point(path, "staged")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fault_point(path, "replaced")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or folder to ``dst`` atomically."""
    if src.is_dir():
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    else:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def remove_stale_temp_files(folder: Path) -> None:
    """Delete leftovers of writes interrupted by a crash (``.name.XXXX`` files)."""
    if not folder.exists():
        return
    for p in folder.rglob(".*"):
        if p.name in (".lock",) or not p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


_TEMP_NAME = re.compile(r"^\.[^/]+\.(?:[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?|old\.\d+)$")
"""Names :func:`atomic_path` / :func:`atomic_dir` give their temporaries (``.mesh.k2j4x9_a.ply``, ``.sparse.ab12cd34``,
``.sparse.old.123``)."""


def remove_stale_output_temps(folder: Path) -> list[str]:
    """Delete leftovers of atomic writes interrupted by a crash directly in ``folder`` (the output folder).

    Unlike :func:`remove_stale_temp_files` (a stage folder, recon's own) only
    names of the exact temporary pattern are touched and only at the top
    level, since ``--out`` may be a folder with other files. Call it while
    holding the folder's :func:`run_lock`. Returns the removed names.
    """
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.name == ".lock" or not is_recon_temporary(p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


# ---- fingerprints and checksums -----------------------------------------------------

def fingerprint(payload: Any) -> str:
    """Stable short hash of a JSON-able payload (settings, upstream fingerprints, version)."""
    text = json.dumps(payload, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def checksum_tree(root: Path) -> dict[str, str]:
    """``relative path → checksum`` for every regular file under ``root`` (temp files excluded)."""
    out: dict[str, str] = {}
    if root.is_file():
        return {root.name: file_checksum(root)}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = file_checksum(p)
    return out


def remove_changed_outputs(root: Path, recorded: dict[str, str]) -> list[str]:
    """Delete the files under ``root`` whose checksum differs from ``recorded`` (``relative path → checksum``).

    For resuming a stage whose finished outputs were later corrupted: a
    per-view stage skips the views whose file exists, so a damaged file must
    go before the stage runs again. Files not in ``recorded`` are kept.
    Returns the removed relative paths.
    """
    removed = []
    for rel, digest in recorded.items():
        p = root / rel
        if p.is_file() and file_checksum(p) != digest:
            p.unlink()
            removed.append(rel)
    return removed


# ---- manifest ---------------------------------------------------------------------------

class Manifest:
    """``OUT/manifest.json``: per stage its fingerprint, version, timing and output checksums."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.stages = dict(data.get("stages", {}))
            except (OSError, ValueError, AttributeError, TypeError):
                # A manifest we cannot read trusts nothing: every stage re-runs.
                self.stages = {}

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def record(self, stage: str, entry: dict[str, Any]) -> None:
        self.stages[stage] = entry
        self.save()

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"tool": MANIFEST_TOOL, "version": MANIFEST_VERSION, "updated": time.time(),
                                      "stages": self.stages})


def is_recon_output(folder: Path) -> bool:
    """True when ``folder`` holds a recon manifest (``manifest.json`` that names recon, or one of the
    unmarked ones recon wrote before the marker: ``version``, ``updated`` and ``stages``)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return False
    return data.get("tool") == MANIFEST_TOOL or ("tool" not in data and {"version", "updated"} <= set(data))


def is_recon_folder(folder: Path) -> bool:
    """True for a recon output folder or a stage folder of one (it holds a :data:`FINGERPRINT_FILE`)."""
    return (Path(folder) / FINGERPRINT_FILE).is_file() or is_recon_output(folder)


def is_recon_temporary(name: str) -> bool:
    """True for the name of a temporary that :func:`atomic_path` / :func:`atomic_dir` leave when a write is
    interrupted."""
    return _TEMP_NAME.match(name) is not None


# ---- lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def run_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder; a second run fails at once, clearly.

    Once the lock is held, temporaries that a crashed run left in the folder are removed.
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError as exc:
        raise write_error(lock_path, exc) from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise LockedError(
                f"{lock_path.parent}: another recon run ({holder}) is using this output folder; "
                "wait for it to finish or pass a different --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        remove_stale_output_temps(lock_path.parent)  # a crashed run's half-written manifest, mesh, report
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()

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
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import LockedError, ReconError

MANIFEST_VERSION = 1


# ---- atomic writes ------------------------------------------------------------------

def _check_writable(path: Path, exc: OSError) -> ReconError:
    if exc.errno == errno.ENOSPC:
        return ReconError(f"{path}: no space left on the device; free some space or choose another --out folder")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return ReconError(f"{path}: cannot write here ({exc.strerror}); choose a writable --out folder")
    return ReconError(f"{path}: cannot write ({exc.strerror or exc}); check the output folder")


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps the suffix (``suffix`` or the target's), so
    libraries that pick a format from the extension still work.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _check_writable(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _check_writable(path, exc) from exc
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
    """Write a compressed ``.npz`` atomically (no pickles: plain arrays only)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Load a cache ``.npz`` fully (no pickles); a corrupt file raises ReconError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ReconError(f"{path}: cache file is unreadable ({exc}); delete it or re-run with --force") from exc


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
            except (OSError, ValueError):
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
        write_json_atomic(self.path, {"version": MANIFEST_VERSION, "updated": time.time(), "stages": self.stages})


# ---- lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def run_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder; a second run fails at once, clearly."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError as exc:
        raise _check_writable(lock_path, exc) from exc
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
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()

"""Output of native libraries (glog in COLMAP, Ceres, Open3D) sent to a log file instead of the console."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


@contextlib.contextmanager
def native_output_to(log_path: Path) -> Iterator[None]:
    """Send what C/C++ libraries print (glog, Ceres, Open3D) to ``log_path`` (appended) while the block runs.

    pycolmap logs through glog to the process's stderr, and glog's own log
    files get a timestamp and pid appended to their name, so file descriptors
    1 and 2 are pointed at the log file and restored afterwards. Python's
    ``sys.stdout``/``sys.stderr``, when they write to those descriptors, are
    swapped for streams on copies of the original ones meanwhile, so log
    messages and progress bars (created inside the block) still reach the
    console. Nested use is fine (the inner block's file wins).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no stdout/stderr to redirect (detached process): nothing to hide
        yield
        return
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    consoles = {}
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = originals[name]
        if _fd_of(stream) == fd:
            consoles[name] = io.TextIOWrapper(
                io.FileIO(os.dup(saved[fd]), "w"), encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace", line_buffering=True, write_through=True,
            )
    try:
        with open(log_path, "ab") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            for name, console in consoles.items():
                setattr(sys, name, console)
            yield
    finally:
        for name, stream in originals.items():
            setattr(sys, name, stream)
        for console in consoles.values():
            with contextlib.suppress(Exception):
                console.close()
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Drop what native libraries print while the block runs (Open3D's and RPly's complaints about a file
    whose problem recon reports itself, in one line): file descriptors 1 and 2, and ``sys.stdout`` /
    ``sys.stderr``, through which Open3D's Python bindings print."""
    with native_output_to(Path(os.devnull)), open(os.devnull, "w") as sink:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield

"""The console of a ``recon`` command: where log records go, how a failure is reported, SIGTERM.

* :func:`_setup_logging`: progress on stdout, warnings and errors on stderr (one line each), everything
  in the run's log file.
* :func:`_fail`: any exception → one ``error:`` line and an exit code (1 a :class:`ReconError`, 2 unexpected,
  with the traceback in the log file; 130 Ctrl-C, 143 SIGTERM).
* :func:`_stop_on_sigterm`: SIGTERM raises :class:`Terminated`, handled like Ctrl-C.

Used by ``cli.py``; imports no stage.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import traceback
from pathlib import Path

import click

from pipeline.core.cache import write_error
from pipeline.core.errors import ReconError


class _QuietFileHandler(logging.FileHandler):
    """The run's log file; if it cannot be written (disk full) it stops, instead of printing a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.setLevel(logging.CRITICAL + 1)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is when a record comes.

    They are swapped while native output is redirected.
    """

    def __init__(self, stream_name: str):
        self._stream_name = stream_name
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass


def _one_line_warning(record: logging.LogRecord) -> bool:
    """A captured Python warning (``file:line: Category: text`` + a source line) → its first line."""
    if record.name == "py.warnings":
        record.msg, record.args = (record.getMessage().strip().splitlines() or [""])[0], ()
    return True


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    """Progress messages (debug, info) on stdout, warnings and errors on stderr, everything in ``log_file``."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s")
    console = _ConsoleHandler("stdout")
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = _ConsoleHandler("stderr")
    problems.setLevel(logging.WARNING)
    problems.addFilter(_one_line_warning)
    for h in (console, problems):
        h.setFormatter(fmt)
        root.addHandler(h)
    logging.captureWarnings(True)  # library warnings: one line on stderr, not warnings' two-line format
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = _QuietFileHandler(log_file)
        except OSError:
            return  # the run itself reports an unwritable output folder clearly
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "trimesh", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _os_error(exc: OSError, out_dir: Path | None) -> BaseException:
    """An OSError that escaped the stages: disk full, read-only or no permission → a one-line ReconError.

    Others are returned unchanged.
    """
    where = exc.filename or out_dir or "the output folder"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return write_error(where, exc)
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
        inside_out = out_dir is not None and (Path(exc.filename) == out_dir or out_dir in Path(exc.filename).parents)
        if inside_out:
            return write_error(where, exc)
        return ReconError(f"{exc.filename}: {exc.strerror}; check the file's permissions")
    return exc


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C (finished work is kept, child processes are stopped)."""


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _stop_on_sigterm() -> None:
    """From now on SIGTERM stops the command like Ctrl-C. pycolmap is imported first: its import installs
    glog's crash handler for SIGTERM (a stack trace, then death), which this one must replace."""
    import pycolmap  # noqa: F401

    signal.signal(signal.SIGTERM, _raise_terminated)


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``exc`` (itself, or in its chain of causes and contexts), or None.

    A signal that lands inside a library's own code can come out as that library's error: an interrupt during
    ``import open3d`` surfaces as ``ImportError: initialization failed`` caused by it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(exc: BaseException, log_file: Path | None) -> None:
    """Print one line, keep the traceback in the log file, exit non-zero."""
    cause = exc
    interrupt = interrupt_behind(exc)
    if interrupt is not None:
        logging.getLogger("recon").debug("interrupted", exc_info=exc)
        what, code = ("terminated (SIGTERM)", 143) if isinstance(interrupt, Terminated) else ("interrupted", 130)
        click.echo(f"error: {what}; finished work is kept, run the same command again to resume", err=True)
        sys.exit(code)
    if isinstance(exc, OSError):
        exc = _os_error(exc, log_file.parent if log_file else None)
    if isinstance(exc, ReconError):
        logging.getLogger("recon").debug("error", exc_info=cause)
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    tb = "".join(traceback.format_exception(exc))
    where = ""
    if log_file is not None:
        try:
            with open(log_file, "a") as fh:
                fh.write(tb)
            where = f"; full traceback in {log_file}"
        except OSError:
            pass
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(f"error: unexpected {type(exc).__name__}: {first_line}{where}", err=True)
    sys.exit(2)

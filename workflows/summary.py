"""What a finished ``recon run`` / ``recon stage`` tells the user: OUT/report.html and the summary on the console.

Used by ``cli.py``; the stage results come from :func:`workflows.local.run_pipeline`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import click

from pipeline.core.errors import ReconError
from pipeline.core.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.analysis.report import ReportParts

logger = logging.getLogger("recon")


def _write_report(ws: Workspace, early: EarlyReport | None = None) -> None:
    """Write OUT/report.html (with the parts ``early`` computed, when it could); a report failure never fails the run
    (it is logged)."""
    from pipeline.analysis.report import build_report

    parts = None
    if early is not None:
        try:
            parts = early.result()
        except Exception as exc:  # noqa: BLE001 - computed again below, where a failure is reported
            logger.debug("the report's parts computed during the export failed: %s", exc)
    try:
        build_report(ws, parts=parts)
    except Exception as exc:  # noqa: BLE001 - the report is a by-product
        logger.warning("could not write %s: %s", ws.report_path, exc)
        logger.debug("report failure", exc_info=exc)


class EarlyReport:
    """The bulk of the report (:func:`pipeline.analysis.report.report_parts`), computed in a daemon thread while the
    export runs: what it reads is final once the mesh is fused."""

    def __init__(self, ws: Workspace):
        self._parts: ReportParts | None = None
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._compute, args=(ws,), name="recon-report", daemon=True)
        self._thread.start()

    def _compute(self, ws: Workspace) -> None:
        from pipeline.analysis.report import report_parts

        try:
            self._parts = report_parts(ws, stop=self._stop.is_set)
        except Exception as exc:  # noqa: BLE001 - raised again by result()
            self._error = exc

    def result(self) -> ReportParts:
        """The parts, once computed; raises what computing them raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._parts is not None
        return self._parts

    def cancel(self) -> None:
        """Stop at the next step and let the thread end (the run failed or was interrupted): the process never exits
        in the middle of a ray cast."""
        self._stop.set()
        self._thread.join()


def _print_summary(result, *, strict: bool = False) -> None:
    """Per stage: status, time, numbers; the files written; then, on stderr, every photo the mesh does not use.

    Raises:
        ReconError: with ``strict``, when a photo is left out.
    """
    from pipeline.analysis.report import left_out_lines
    from workflows.local import published_outputs

    click.echo("\nsummary")
    for st in result.stages:
        info = ", ".join(f"{k}={v}" for k, v in st.summary.items() if not isinstance(v, (dict, list)))
        secs = f"{st.seconds:7.1f} s" if st.status != "skipped" else "      -  "
        click.echo(f"  {st.name:<7} {st.status:<7} {secs}  {info}")
    click.echo(f"  time this run: {result.total_seconds:.1f} s")
    for p in published_outputs(result.ws):
        click.echo(f"  wrote {p}")
    sfm = next((st.summary for st in result.stages if st.name == "sfm"), {})
    # skipped files and duplicates were named as they were found
    for line in left_out_lines(sfm, kinds=("not_registered",)):
        logger.warning("warning: %s", line)
    left_out = left_out_lines(sfm)
    if strict and left_out:
        raise ReconError(f"--strict: {'; '.join(left_out)}; the outputs are written, but not every photo is in them")

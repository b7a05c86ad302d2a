"""What a finished ``recon run`` / ``recon stage`` tells the user: OUT/report.html and the summary on the console.

Used by ``cli.py``; the stage results come from :func:`workflows.local.run_pipeline`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import click

from pipeline.core.errors import ReconError
from pipeline.core.workspace import Workspace

logger = logging.getLogger("recon")


def _write_report(ws: Workspace, early: "EarlyReport | None" = None) -> None:
    """Write OUT/report.html (with the parts ``early`` computed, when it did); a report failure never fails the run
    (it is logged)."""
    from pipeline.analysis.report import build_report

    try:
        build_report(ws, parts=early.result() if early is not None else None)
    except Exception as exc:  # noqa: BLE001 - the report is a by-product
        logger.warning("could not write %s: %s", ws.report_path, exc)
        logger.debug("report failure", exc_info=exc)


class EarlyReport:
    """The bulk of the report (:func:`pipeline.analysis.report.report_parts`), computed in a daemon thread while the
    export runs: what it reads is final once the mesh is fused."""

    def __init__(self, ws: Workspace):
        self._parts: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compute, args=(ws,), name="recon-report", daemon=True)
        self._thread.start()

    def _compute(self, ws: Workspace) -> None:
        from pipeline.analysis.report import report_parts

        try:
            self._parts = report_parts(ws)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._error = exc

    def result(self) -> Any:
        """The :class:`pipeline.analysis.report.ReportParts`, once computed; raises what computing them raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._parts

    def wait(self) -> None:
        """Let the thread finish (before the process exits, also after an error)."""
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

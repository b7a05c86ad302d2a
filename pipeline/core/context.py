"""What a stage receives when it runs: :class:`StageContext`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from pipeline.core.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import ReconConfig

T = TypeVar("T")


@dataclass
class StageContext:
    """Everything a stage's ``run`` gets: paths, settings, what ran before it.

    A stage writes only inside ``stage_dir`` (atomically, see
    :mod:`pipeline.core.cache`); per-view stages skip views whose file already
    exists — the engine empties ``stage_dir`` whenever the fingerprint changes,
    so an existing per-view file is always one of this configuration.
    """

    ws: Workspace
    config: "ReconConfig"
    name: str
    fingerprint: str
    skipped: frozenset[str] = frozenset()
    """Stages skipped in this run (e.g. ``{"refine"}``: fuse reads the depth stage)."""
    show_progress: bool = True
    summary: dict[str, Any] = field(default_factory=dict)
    """Numbers the stage reports for the run summary and manifest (e.g. registered images)."""
    on_spare_core: Callable[[], None] | None = None
    """What :meth:`spare_core` calls (the run: load the later stages' libraries in the background)."""

    @property
    def stage_dir(self) -> Path:
        return self.ws.stage_dir(self.name)

    @property
    def settings(self) -> Any:
        """This stage's own config section."""
        return getattr(self.config, self.name)

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"pipeline.{self.name}")

    def spare_core(self) -> None:
        """Say that the stage leaves a CPU core idle for a while from now (e.g. while COLMAP maps on one thread).

        The later stages' libraries then load in a background thread: call it once the stage has imported what it
        still needs (two threads importing one library can see it half-loaded)."""
        if self.on_spare_core is not None:
            self.on_spare_core()

    def progress(self, iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
        """A tqdm bar on stderr (silent when progress is off)."""
        return iter(tqdm(iterable, desc=f"{self.name}: {desc}", total=total, unit=unit, disable=not self.show_progress,
                         leave=False, dynamic_ncols=True))

    def bar(self, *, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
        """A manually updated tqdm bar (``bar.update()``, ``bar.set_postfix()``)."""
        return tqdm(desc=f"{self.name}: {desc}", total=total, unit=unit, disable=not self.show_progress, leave=False,
                    dynamic_ncols=True)

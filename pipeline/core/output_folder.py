"""Which folder a run may write into, and adopting it: recon never deletes or overwrites what it did not write.

An output folder is *adopted* (written into) only when it is empty, or when it
is already a recon output (its ``manifest.json`` says so, see
:func:`pipeline.core.cache.is_recon_output`); the first thing written into an
adopted folder is that manifest, so a run that crashes right after is still
recognised as recon's. A folder holding anything else is refused with one
line, unless the user passes ``--force-out``. An output folder may not be the
scene folder, contain it, or sit inside one of its input folders (the photos,
masks, depth priors, the user's COLMAP model), where recon's files would be
read back as inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.cache import FINGERPRINT_FILE, Manifest, ensure_output_dir, is_recon_output, is_recon_temporary
from pipeline.core.errors import ReconError
from pipeline.core.workspace import Workspace

logger = logging.getLogger(__name__)

FORCE_FLAG = "--force-out"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(ws: Workspace) -> None:
    """Refuse an output folder that would mix recon's files with the scene's inputs.

    The default ``SCENE_DIR/recon`` is always fine: when the photos sit
    directly in ``SCENE_DIR``, photo discovery leaves recon's outputs out.

    Raises:
        ReconError: ``--out`` is the scene folder, contains it, or lies inside its images/, masks/,
            depth_prior/ or sparse/ folder.
    """
    out, scene = ws.out_dir, ws.scene_dir
    suggestion = f"pass a folder of its own, e.g. --out {scene / 'recon'}"
    if out == scene:
        raise ReconError(f"--out {out} is the scene folder itself, where recon's files would mix with the photos; "
                         f"{suggestion}")
    if out in scene.parents:
        raise ReconError(f"--out {out} contains the scene folder {scene}; {suggestion}")
    inputs = [(ws.masks_dir, "mask folder"), (ws.depth_prior_dir, "depth-prior folder"),
              (scene / "sparse", "COLMAP model folder")]
    if ws.images_dir != scene:
        inputs.insert(0, (ws.images_dir, "photo folder"))
    for folder, what in inputs:
        if _inside(out, folder):
            raise ReconError(f"--out {out} is inside the scene's {what} {folder}, where its files would be read as "
                             f"inputs; {suggestion}")


RECON_NAMES = frozenset({
    "manifest.json", "config.yaml", "log.txt", "report.html", "eval.json", "error_budget.json", "mesh.ply", "mesh.glb",
    "sparse", "exports", "ablations", ".lock", ".building",
})
"""What recon writes at the top of an output folder, besides the stage folders."""


def foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that recon did not write, sorted (empty for a recon output, even one whose manifest is lost).

    Without a readable manifest, ``out`` counts as recon's when it holds a stage
    folder marked with its fingerprint and nothing but names recon writes
    (:data:`RECON_NAMES`, other marked stage folders, interrupted temporaries):
    a run whose manifest was damaged, or that crashed before it wrote one.
    """
    if not out.is_dir() or is_recon_output(out):
        return []
    entries = [p for p in out.iterdir() if not is_recon_temporary(p.name) and not p.name.startswith(".write-test.")]
    stage_folders = {p.name for p in entries if p.is_dir() and (p / FINGERPRINT_FILE).is_file()}
    if stage_folders and all(p.name in RECON_NAMES or p.name in stage_folders for p in entries):
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in (".lock",))


def adopt_output_dir(ws: Workspace, *, force: bool = False) -> None:
    """Make ``ws.out_dir`` this run's output folder: create it, check it can be written, mark it as recon's.

    Args:
        force: adopt a folder that holds other files too (``--force-out``): recon then replaces its own
            files there (``mesh.ply``, ``sparse/``, the stage folders) and leaves the others alone.

    Raises:
        ReconError: the location is refused (:func:`check_output_location`), ``--out`` is a file, or the
            folder holds files recon did not write and ``force`` is False; OutputError when it cannot be written.
    """
    check_output_location(ws)
    out = ws.out_dir
    if out.exists() and not out.is_dir():
        raise ReconError(f"--out {out} is a file; pass a folder (new or empty, or an earlier recon output)")
    if is_recon_output(out):
        ensure_output_dir(out)
        return
    foreign = foreign_entries(out)
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ReconError(
            f"{out}: this folder holds files recon did not write ({shown}); recon writes only into a new or empty "
            f"folder or one of its own outputs; pass another --out, or {FORCE_FLAG} to use this one anyway"
        )
    if foreign:
        logger.warning("%s: using a folder that holds other files (%s); recon replaces only its own (mesh.ply, "
                       "mesh.glb, sparse/, config.yaml, log.txt, report.html, the stage folders)", out,
                       ", ".join(foreign[:5]))
    ensure_output_dir(out)
    Manifest(ws.manifest_path).save()

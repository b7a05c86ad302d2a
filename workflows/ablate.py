"""Ablations: refine/fuse variants over one shared set of upstream caches.

``sfm`` and ``depth`` run once in ``OUT``; each variant gets
``OUT/ablations/<name>/`` whose sfm and depth caches are hard links to the
shared ones (files are only ever replaced, never modified in place, so links
are safe), then runs refine → fuse → export with its own settings.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ReconConfig, load_config
from pipeline.core.cache import Manifest
from pipeline.core.errors import ReconError
from pipeline.core.io import load_depth_map, load_sfm_scene
from pipeline.core.workspace import Workspace
from workflows.local import run_pipeline

logger = logging.getLogger(__name__)

SHARED_STAGES = ("sfm", "depth")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()


BUILTIN_VARIANTS: dict[str, Variant] = {
    "default": Variant("default"),
    "mv-only": Variant("mv-only", presets=("mv-only",)),
    "no-refine": Variant("no-refine", skip=("refine",)),
}


def parse_variant(text: str) -> Variant:
    """``NAME`` (built in) or ``NAME=--set k=v --preset p --skip refine``."""
    if "=" not in text.split(" ", 1)[0]:
        if text in BUILTIN_VARIANTS:
            return BUILTIN_VARIANTS[text]
        raise ReconError(f"unknown variant {text!r}; built in: {', '.join(BUILTIN_VARIANTS)}; "
                         "or write NAME='--set section.key=value ...'")
    name, spec = text.split("=", 1)
    tokens = shlex.split(spec)
    overrides, presets, skip = [], [], []
    it = iter(tokens)
    for tok in it:
        try:
            if tok == "--set":
                overrides.append(next(it))
            elif tok == "--preset":
                presets.append(next(it))
            elif tok == "--skip":
                skip.append(next(it))
            elif "=" in tok and "." in tok.split("=", 1)[0]:
                overrides.append(tok)
            else:
                raise ReconError(f"variant {name!r}: cannot read {tok!r}; use --set section.key=value, "
                                 "--preset NAME or --skip STAGE")
        except StopIteration:
            raise ReconError(f"variant {name!r}: {tok} needs a value") from None
    return Variant(name.strip(), tuple(overrides), tuple(presets), tuple(skip))


def _link_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)


def prepare_variant_workspace(base: Workspace, name: str) -> Workspace:
    """A workspace for one variant whose shared stages point at the base run's caches."""
    vws = Workspace(scene_dir=base.scene_dir, out_dir=base.out_dir / "ablations" / name)
    vws.out_dir.mkdir(parents=True, exist_ok=True)
    base_manifest = Manifest(base.manifest_path)
    vman = Manifest(vws.manifest_path)
    for stage in SHARED_STAGES:
        entry = base_manifest.get(stage)
        if entry is None:
            raise ReconError(f"{base.out_dir}: stage {stage} is not done; the base run must finish it first")
        if vman.get(stage) != entry:
            _link_tree(base.stage_dir(stage), vws.stage_dir(stage))
            if stage == "sfm":
                _link_tree(base.sparse_dir, vws.sparse_dir)
            vman.stages[stage] = entry
    vman.save()
    return vws


def delta_stats(ws: Workspace) -> dict[str, float]:
    """Mean and std of Δz over all refined views (NaN when refine did not run)."""
    deltas = []
    scene = load_sfm_scene(ws)
    for v in scene.views:
        p = ws.refine_view(v.name)
        if p.exists():
            dm = load_depth_map(p)
            if dm.depth_init is not None:
                deltas.append((dm.depth - dm.depth_init)[dm.valid])
    if not deltas:
        return {"dz_mean": float("nan"), "dz_std": float("nan")}
    d = np.concatenate(deltas)
    return {"dz_mean": float(d.mean()), "dz_std": float(d.std())}


@dataclass
class VariantResult:
    name: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)


def run_ablation(
    ws: Workspace,
    base_cfg: ReconConfig,
    variants: list[Variant],
    *,
    gt: Path | None = None,
    show_progress: bool = True,
) -> list[VariantResult]:
    """Run the shared stages once, then every variant; evaluate against ``gt`` when given."""
    run_pipeline(ws, base_cfg, until=SHARED_STAGES[-1], show_progress=show_progress)
    results = []
    for var in variants:
        logger.info("ablation: variant %s", var.name)
        cfg = load_config(presets=var.presets, overrides=var.overrides, base=base_cfg)
        vws = prepare_variant_workspace(ws, var.name)
        try:
            run_pipeline(vws, cfg, skip=var.skip, until="fuse", show_progress=show_progress)
        except ReconError as exc:
            results.append(VariantResult(var.name, f"failed: {exc}"))
            continue
        metrics: dict[str, Any] = dict(delta_stats(vws))
        log = vws.refine_log
        if log.exists():
            import json

            steps = json.loads(log.read_text()).get("steps", [])
            if steps:
                metrics.update({f"final_{k}": v for k, v in steps[-1].items() if k.startswith("L_") or k == "loss"})
        if gt is not None:
            from pipeline.analysis.evaluate import evaluate_reconstruction

            ev = evaluate_reconstruction(vws.out_dir, gt)
            for label, t in ev["thresholds"].items():
                metrics[f"F@{label}"] = t["fscore"]
            metrics["chamfer_rel"] = ev["chamfer_rel"]
        results.append(VariantResult(var.name, "ok", metrics))
    return results


def format_table(results: list[VariantResult]) -> str:
    """Markdown table of the variants' metrics."""
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.metrics if k not in keys]
    lines = ["| variant | status | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for r in results:
        cells = [f"{r.metrics[k]:.4g}" if isinstance(r.metrics.get(k), float) else str(r.metrics.get(k, ""))
                 for k in keys]
        lines.append(f"| {r.name} | {r.status} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""``OUT/report.html``: one self-contained page (every image embedded as a data URI, no network).

Sections (ids in :data:`SECTIONS`): stage timings; SfM statistics (registered
images, sparse points, reprojection error, track length); per-view thumbnails
(image, initial depth, refined depth, Δz, confidence); refinement loss and Δz
curves; renders of the mesh from three input cameras next to their photos
(headless Open3D ray casting); diagnose verdicts and per-view depth
statistics; evaluation metrics when ``OUT/eval.json`` exists.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.analysis.appearance import render_mesh_views, render_textured_views
from pipeline.core.cache import write_bytes_atomic
from pipeline.core.io import SfmScene, load_depth_map, load_rgb
from pipeline.core.raycast import load_mesh
from pipeline.core.workspace import Workspace

logger = logging.getLogger(__name__)

THUMB_WIDTH = 200
"""Width (px) of the per-view thumbnails."""
SECTIONS = ("timings", "sfm", "views", "curves", "renders", "diagnose", "eval")
"""Section element ids, in page order."""
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_CSS = (
    "body{font-family:sans-serif;margin:20px;max-width:1400px;color:#222} table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left} th{background:#f4f4f4}"
    "img{margin:2px;border:1px solid #ddd;display:block} figure{display:inline-block;margin:4px;vertical-align:top}"
    "figcaption{font-size:11px;color:#444} .ok{color:#2a2;font-weight:bold} .warn{color:#c80;font-weight:bold}"
    ".fail{color:#d22;font-weight:bold} .legend span{margin-right:14px;font-size:12px} .view{margin-bottom:6px}"
    "section{margin-bottom:28px} .note{color:#666;font-size:13px}"
)


# ---- images ------------------------------------------------------------------------------

def _data_uri(rgb: np.ndarray, fmt: str = "PNG") -> str:
    """``data:`` URI of an RGB uint8 (H, W, 3) image as PNG (lossless, for maps) or JPEG (photos, renders)."""
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=88)
    else:
        im.save(buf, format="PNG")
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _png_data_uri(rgb: np.ndarray) -> str:
    return _data_uri(rgb, "PNG")


def _thumb(rgb: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    """Resize an RGB image to ``width`` pixels wide (aspect kept)."""
    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb).resize((width, max(1, round(h * width / w))), Image.Resampling.BILINEAR)
    return np.asarray(im)


def depth_range(values: np.ndarray, valid: np.ndarray | None = None,
                percentiles: tuple[float, float] = (2, 98)) -> tuple[float, float] | None:
    """Robust (lo, hi) of the valid finite values (None when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) if valid is None else (valid & np.isfinite(v))
    if not ok.any():
        return None
    lo, hi = np.percentile(v[ok], percentiles)
    return float(lo), float(hi)


def colorize(values: np.ndarray, valid: np.ndarray | None = None, *, symmetric: bool = False,
             vrange: tuple[float, float] | None = None) -> np.ndarray:
    """Map a scalar image (H, W) to RGB uint8 (H, W, 3); invalid or non-finite pixels are black.

    Default: a turbo-like ramp over ``vrange`` (default: the 2nd–98th
    percentile of the valid values). ``symmetric``: blue (−) – white (0) – red
    (+), saturated at ``vrange[1]`` (default: the 98th percentile of |values|).
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) if valid is None else (valid & np.isfinite(v))
    out = np.zeros(v.shape + (3,), dtype=np.uint8)
    if not ok.any():
        return out
    if symmetric:
        m = vrange[1] if vrange is not None else float(np.percentile(np.abs(v[ok]), 98))
        m = m if m > 0 else 1.0
        t = np.clip(np.where(ok, v, 0.0) / m, -1, 1)
        rgb = np.stack([np.where(t > 0, 1.0, 1.0 + t), 1.0 - np.abs(t), np.where(t < 0, 1.0, 1.0 - t)], -1)
    else:
        lo, hi = vrange if vrange is not None else depth_range(v, ok)
        t = np.clip((np.where(ok, v, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
        rgb = np.stack([np.clip(1.5 - np.abs(4 * t - 3), 0, 1), np.clip(1.5 - np.abs(4 * t - 2), 0, 1),
                        np.clip(1.5 - np.abs(4 * t - 1), 0, 1)], -1)
    out[ok] = (rgb[ok] * 255).astype(np.uint8)
    return out


# ---- charts ------------------------------------------------------------------------------

def svg_curves(series: dict[str, list[float]], width: int = 560, height: int = 220, *, log: bool | None = None) -> str:
    """A small inline SVG line chart of ``series`` (name → value per logged step) with an HTML legend.

    ``log``: log10 y axis (default: when every finite value is positive; with
    ``log=True`` non-positive values are left out of the lines).
    """
    series = {k: np.asarray([float(x) for x in v], dtype=np.float64) for k, v in series.items() if len(v)}
    if not series:
        return "<p class='note'>no data</p>"
    allv = np.concatenate(list(series.values()))
    allv = allv[np.isfinite(allv)]
    if log is None:
        log = bool(allv.size) and bool((allv > 0).all())
    if log:
        allv = allv[allv > 0]
    tf = (lambda x: np.log10(np.where(x > 0, x, np.nan))) if log else (lambda x: x)
    lo, hi = (float(np.nanmin(tf(allv))), float(np.nanmax(tf(allv)))) if allv.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    n_steps = max(len(v) for v in series.values())
    left, right, top, bottom = 48, 8, 8, 22
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'xmlns="http://www.w3.org/2000/svg" '
             f'style="background:#fff;border:1px solid #ccc">']
    for frac in (0.0, 0.5, 1.0):  # y ticks
        y = top + ph * (1 - frac)
        val = lo + frac * (hi - lo)
        label = f"{10 ** val:.2g}" if log else f"{val:.3g}"
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end" fill="#666">'
                     f'{label}</text>')
    parts.append(f'<text x="{left}" y="{height - 6}" font-size="10" fill="#666">step 0</text>'
                 f'<text x="{width - right}" y="{height - 6}" font-size="10" text-anchor="end" fill="#666">'
                 f'logged step {n_steps - 1}</text>')
    legend = []
    for i, (name, y) in enumerate(series.items()):
        x = left + (np.arange(len(y)) / max(n_steps - 1, 1)) * pw
        yy = top + ph * (1 - (tf(y) - lo) / (hi - lo))
        color = PALETTE[i % len(PALETTE)]
        # a gap (NaN, or a non-positive value on a log axis) breaks the line
        runs, cur = [], []
        for a, b in zip(x, yy):
            if np.isfinite(b):
                cur.append(f"{a:.1f},{b:.1f}")
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        for pts in runs:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(pts)}"/>')
        last = y[np.isfinite(y)]
        legend.append(f"<span style='color:{color}'>&#9632; {html.escape(name)}"
                      f"{' (last ' + format(float(last[-1]), '.3g') + ')' if last.size else ''}</span>")
    parts.append("</svg>")
    return ("<div>" + "".join(parts)
            + f"<div class='legend'>{''.join(legend)}{' · log scale' if log else ''}</div></div>")


# ---- mesh renders --------------------------------------------------------------------------

# ---- HTML helpers ------------------------------------------------------------------------

def _fmt(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.4g}"
    return str(x)


def _table(rows: list[list[Any]], header: list[str] | None = None, *, raw_cols: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are escaped except in ``raw_cols`` (already HTML)."""
    th = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c if j in raw_cols else html.escape(_fmt(c))}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table>{th}{body}</table>"


def _figure(uri: str, caption: str) -> str:
    return (f"<figure><img src='{uri}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{sid}'><h2>{html.escape(title)}</h2>{body}</section>"


# ---- sections ----------------------------------------------------------------------------

def _timings_section(stages: dict[str, Any]) -> str:
    if not stages:
        return "<p class='note'>no stage has finished yet (no manifest.json)</p>"
    rows = [[name, e.get("seconds", ""),
             ", ".join(f"{k}={_fmt(v)}" for k, v in e.get("summary", {}).items() if not isinstance(v, (dict, list)))]
            for name, e in stages.items()]
    total = sum(float(e.get("seconds", 0.0) or 0.0) for e in stages.values())
    rows.append(["total", round(total, 3), ""])
    return _table(rows, ["stage", "seconds", "summary"])


def sfm_statistics(scene: SfmScene) -> dict[str, float]:
    """Registered images, sparse points, reprojection error (px, mean/median over points),
    mean track length (observations per point) and mean observations per image."""
    obs_per_image = np.array([len(v.point_ids) for v in scene.views], dtype=np.float64)
    n_points = len(scene.points)
    err = np.asarray(scene.point_errors, dtype=np.float64)
    return {
        "registered_images": len(scene.views),
        "sparse_points": n_points,
        "reproj_error_mean_px": float(err.mean()) if err.size else float("nan"),
        "reproj_error_median_px": float(np.median(err)) if err.size else float("nan"),
        "track_length_mean": float(obs_per_image.sum() / n_points) if n_points else float("nan"),
        "observations_per_image_mean": float(obs_per_image.mean()) if obs_per_image.size else 0.0,
    }


def _sfm_section(scene: SfmScene | None, summary: dict[str, Any]) -> str:
    if scene is None:
        return "<p class='note'>no SfM model yet</p>"
    st = sfm_statistics(scene)
    images_in = summary.get("images")
    rows = [["registered images", f"{st['registered_images']}" + (f" of {images_in}" if images_in is not None else "")],
            ["sparse points", st["sparse_points"]],
            ["reprojection error, mean (px)", st["reproj_error_mean_px"]],
            ["reprojection error, median (px)", st["reproj_error_median_px"]],
            ["track length, mean (observations per point)", st["track_length_mean"]],
            ["observations per image, mean", st["observations_per_image_mean"]]]
    rows += [[k, v] for k, v in summary.items()
             if k in ("source", "unreadable", "duplicates", "mapper") and not isinstance(v, (dict, list))]
    return ("".join(f"<p class='warn'>{html.escape(line)}</p>" for line in left_out_lines(summary))
            + _table(rows, ["SfM", "value"]))


def left_out_lines(sfm_summary: dict[str, Any], limit: int = 20,
                   kinds: tuple[str, ...] = ("not_registered", "skipped", "duplicate_of")) -> list[str]:
    """One line per kind of photo the reconstruction does not use, naming them; none when every photo is used.

    Kinds (keys of the sfm stage's summary): ``not_registered`` (SfM could not place them), ``skipped``
    (unreadable or too small), ``duplicate_of`` (the same picture as another photo, used once).
    """
    def names(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    lines = []
    for kind in kinds:
        found = sfm_summary.get(kind) or {}
        if not found:
            continue
        if kind == "not_registered":
            lines.append(f"{len(found)} photo(s) did not register and are left out of the mesh: {names(list(found))}")
        elif kind == "skipped":
            lines.append(f"{len(found)} file(s) could not be used as photos (unreadable or too small, see the log): "
                         f"{names(list(found))}")
        elif kind == "duplicate_of":
            lines.append(f"{len(found)} photo(s) are duplicates of others and used once: "
                         f"{names([f'{a} (= {b})' for a, b in found.items()])}")
    return lines


def refine_caption(stats: dict) -> str:
    """One line of a view's refine-gate evidence (matching cost 1 − NCC and neighbour agreement, before → after), or
    ''."""
    def pair(a: str, b: str, fmt: str) -> str | None:
        x, y = stats.get(a), stats.get(b)
        if (not isinstance(x, (int, float)) or not isinstance(y, (int, float))
                or not (np.isfinite(x) and np.isfinite(y))):
            return None
        return f"{x:{fmt}} → {y:{fmt}}"
    bits = []
    if (p := pair("photo_cost_init", "photo_cost_refined", ".3f")) is not None:
        bits.append(f"photometric residual {p}")
    if (c := pair("consistent_init", "consistent_refined", ".1%")) is not None:
        bits.append(f"pixels a neighbour agrees with {c}")
    for key, label in (("refined_fraction", "refined"), ("restored_fraction", "restored"),
                       ("dropped_fraction", "dropped")):
        if isinstance(stats.get(key), (int, float)):
            bits.append(f"{label} {stats[key]:.1%}")
    return f" <small>{html.escape(' · '.join(bits))}</small>" if bits else ""


def _views_section(ws: Workspace, scene: SfmScene | None, max_views: int) -> str:
    if scene is None:
        return "<p class='note'>no views yet</p>"
    picks = (np.unique(np.linspace(0, len(scene.views) - 1, min(max_views, len(scene.views))).round().astype(int))
             if scene.views else [])
    parts = ["<p>image · initial depth · refined depth (same colour range as the initial one) · Δz = refined − initial "
             "(blue −, white 0, red +) · confidence of the initial depth [0, 1]; black = no depth."
             + (f" Showing {len(picks)} of {len(scene.views)} views." if len(picks) < len(scene.views) else "")
             + "</p>"]
    for i in picks:
        v = scene.views[i]
        figs = []
        try:
            figs.append(_figure(_data_uri(_thumb(load_rgb(v.image_path)), "JPEG"), "image"))
        except Exception as exc:  # noqa: BLE001 - a report shows what exists
            logger.debug("no image for %s: %s", v.name, exc)
        init = load_depth_map(ws.depth_view(v.name)) if ws.depth_view(v.name).exists() else None
        ref = load_depth_map(ws.refine_view(v.name)) if ws.refine_view(v.name).exists() else None
        rng = (depth_range(init.depth, init.valid) if init is not None
               else (depth_range(ref.depth, ref.valid) if ref is not None else None))
        rtxt = f" [{rng[0]:.3g}, {rng[1]:.3g}]" if rng else ""
        if init is not None:
            figs.append(_figure(_png_data_uri(_thumb(colorize(init.depth, init.valid, vrange=rng))),
                                f"initial depth{rtxt}"))
        if ref is not None:
            figs.append(_figure(_png_data_uri(_thumb(colorize(ref.depth, ref.valid, vrange=rng))),
                                f"refined depth{rtxt}"))
            if ref.depth_init is not None:
                dz = np.where(ref.valid, ref.depth - ref.depth_init, np.nan)
                m = depth_range(np.abs(dz), None, (98, 98))
                figs.append(_figure(_png_data_uri(_thumb(colorize(dz, ref.valid, symmetric=True, vrange=m))),
                                    f"Δz (±{m[1]:.2g})" if m else "Δz"))
            if ref.restored is not None and ref.restored.any():
                figs.append(_figure(_png_data_uri(_thumb(colorize(ref.restored.astype(np.float32), ref.valid,
                                                                  vrange=(0.0, 1.0)))),
                                    f"restored pixels (bright, {ref.restored.sum() / max(1, ref.valid.sum()):.1%})"))
        if init is not None:
            figs.append(_figure(_png_data_uri(_thumb(colorize(init.confidence, init.valid, vrange=(0.0, 1.0)))),
                                "confidence"))
        caption = refine_caption(ref.stats) if ref is not None else ""
        parts.append(f"<div class='view'><b>{html.escape(v.name)}</b>{caption}<br>{''.join(figs)}</div>")
    return "".join(parts)


def _curves_section(ws: Workspace) -> str:
    if not ws.refine_log.exists():
        return "<p class='note'>refine did not run (no refine/log.json): the fused depth is the initial one</p>"
    log = json.loads(ws.refine_log.read_text())
    steps = log.get("steps", []) if isinstance(log, dict) else log
    if not steps:
        return "<p class='note'>the refine log holds no steps</p>"
    keys = [k for k in steps[0] if k not in ("step",)]
    col = lambda k: [s.get(k, float("nan")) for s in steps]  # noqa: E731
    losses = {k: col(k) for k in keys if k == "loss" or k.startswith("L_")}
    dz = {k: col(k) for k in keys if k.lower().startswith(("dz", "δz", "Δz", "delta"))}
    first, last = steps[0].get("step", 0), steps[-1].get("step", len(steps) - 1)
    return (f"<p>{len(steps)} logged steps (optimizer steps {first}…{last}).</p>"
            "<h3>losses: weighted total <code>loss</code> and each term before its weight</h3>"
            + svg_curves(losses, log=True)
            + "<h3>Δz mean and std (normalized units)</h3>" + svg_curves(dz, log=False))


def _glb_frame(ws: Workspace) -> np.ndarray | None:
    """``normalized_from_sfm`` when the export stage wrote its meshes in the SfM frame, else None."""
    try:
        info = json.loads((ws.export_dir / "transform.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("frame") != "sfm" or "normalized_from_sfm" not in info:
        return None
    return np.asarray(info["normalized_from_sfm"], dtype=np.float64)


def _renders_section(ws: Workspace, scene: SfmScene | None,
                     mesh_views: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None) -> str:
    """``mesh_views``: :func:`render_mesh_views` of mesh.ply (None: no mesh); the GLB is rendered here."""
    if scene is None or mesh_views is None:
        return "<p class='note'>no mesh yet</p>"
    glb = ws.out_dir / "mesh.glb"
    textured = dict(render_textured_views(glb, scene, normalized_from_mesh=_glb_frame(ws))) if glb.is_file() else {}
    parts = ["<p>The final mesh ray-cast from input cameras: photo · "
             + ("the exported GLB with its texture (unlit) · " if textured else "")
             + "mesh.ply with its vertex colours (unlit) · mesh shaded (geometry only).</p>"]
    for name, photo, coloured, shaded in mesh_views:
        texture_figure = _figure(_data_uri(textured[name], "JPEG"), "mesh.glb (texture)") if name in textured else ""
        parts.append(f"<div class='view'><b>{html.escape(name)}</b><br>" + _figure(_data_uri(photo, "JPEG"), "photo")
                     + texture_figure + _figure(_data_uri(coloured, "JPEG"), "mesh.ply (colour)")
                     + _figure(_data_uri(shaded, "JPEG"), "mesh (shaded)") + "</div>")
    if len(parts) == 1:
        return "<p class='note'>the mesh has no triangles</p>"
    return "".join(parts)


def _diagnose_section(report: dict[str, Any] | None) -> str:
    if not report:
        return "<p class='note'>not available</p>"
    rows = [[f"<span class='{html.escape(c['verdict'])}'>{html.escape(c['verdict'].upper())}</span>", c["name"],
             c["detail"]] for c in report["checks"]]
    parts = [_table(rows, ["verdict", "check", "detail"], raw_cols=(0,))]
    views = report.get("views", {})
    vrows = []
    for name, row in views.items():
        for kind in ("INIT", "PRED", "DELTA"):
            if kind in row:
                s = row[kind]
                vrows.append([name, kind, s["mean"], s["std"], s["min"], s["max"]])
    if vrows:
        parts.append("<h3>per-view depth statistics (normalized units)</h3>"
                     + _table(vrows, ["view", "map", "mean", "std", "min", "max"]))
    return "".join(parts)


def _eval_section(ev: dict[str, Any] | None) -> str:
    if ev is None:
        return ("<p class='note'>no OUT/eval.json: run <code>recon eval OUT --gt GT</code> to score the mesh against "
                "ground truth</p>")
    diag = ev.get("diagonal")
    rows = [[f"F@{label}", t["threshold"], t["precision"], t["recall"], t["fscore"]]
            for label, t in ev.get("thresholds", {}).items()]
    parts = [f"<p>against <code>{html.escape(str(ev.get('gt_mesh', '?')))}</code>; "
             f"GT object diagonal {_fmt(diag)} (GT units).</p>",
             _table(rows, ["score", "τ (GT units)", "precision", "recall", "F-score"])]
    lengths = []
    for key, label in (("accuracy", "accuracy (est → GT)"), ("completeness", "completeness (GT → est)")):
        if key in ev:
            lengths.append([f"{label}, mean", ev[key]["mean"], 100 * ev[key].get("mean_rel", float("nan"))])
            lengths.append([f"{label}, median", ev[key]["median"], 100 * ev[key].get("median_rel", float("nan"))])
    if "chamfer" in ev:
        lengths.append(["Chamfer", ev["chamfer"], 100 * ev.get("chamfer_rel", float("nan"))])
    parts.append(_table(lengths, ["distance", "GT units", "% of diagonal"]))
    al = ev.get("alignment", {})
    if al:
        arows = [[k, v] for k, v in al.items() if not isinstance(v, (dict, list)) and v is not None]
        if al.get("outlier_cameras"):
            arows.append(["outlier cameras", ", ".join(al["outlier_cameras"])])
        parts.append("<h3>alignment</h3>" + _table(arows, ["", ""]))
    depth = ev.get("depth") or {}
    drows = [[stage, d.get("views"), d.get("abs_rel"), d.get("rmse"), d.get("delta_1.01"), d.get("delta_1.05"),
              d.get("delta_1.25")]
             for stage, d in depth.items() if d.get("pixels")]
    if drows:
        parts.append("<h3>depth maps vs GT depth</h3>"
                     + _table(drows, ["stage", "views", "AbsRel", "RMSE (GT units)", "δ<1.01", "δ<1.05", "δ<1.25"]))
    return "".join(parts)


# ---- entry point ---------------------------------------------------------------------------

@dataclass
class ReportParts:
    """What the report reads from the caches up to the fused mesh, the bulk of its work (it reads the mesh, casts
    rays at it, draws the thumbnails): a run computes it while the export runs (:func:`build_report` with
    ``parts``), and only the GLB's renders and the timings wait for the export."""

    sections: dict[str, tuple[str, str]]
    """Section id → (title, HTML), every section but the timings and the renders."""
    scene: SfmScene | None
    mesh_views: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None
    """:func:`pipeline.analysis.appearance.render_mesh_views` of mesh.ply (None: no mesh)."""


class ReportStopped(Exception):
    """:func:`report_parts` was asked to stop (the run failed or was interrupted)."""


def report_parts(ws: Workspace, *, max_views: int = 12, diagnose_report: dict | None = None,
                 stop: Callable[[], bool] | None = None) -> ReportParts:
    """:class:`ReportParts` from whatever caches exist.

    Args:
        max_views: most views shown as thumbnails (spread over the run).
        diagnose_report: a :func:`pipeline.analysis.diagnose.diagnose` result (computed here when None).
        stop: checked between the steps; True raises :class:`ReportStopped`.
    """
    from pipeline.core.io import load_sfm_scene

    def check() -> None:
        if stop is not None and stop():
            raise ReportStopped

    stages = _manifest_stages(ws)
    scene = None
    try:
        scene = load_sfm_scene(ws)
    except Exception as exc:  # noqa: BLE001 - a report shows what exists
        logger.debug("no sfm scene for the report: %s", exc)
    mesh = None
    if scene is not None and ws.mesh_path.exists():  # read once: the diagnostics and the renders cast rays at it
        try:
            mesh = load_mesh(ws.mesh_path)
        except Exception as exc:  # noqa: BLE001 - a report shows what exists
            logger.debug("mesh unreadable for the report: %s", exc)
    check()
    if diagnose_report is None and scene is not None:
        try:
            from pipeline.analysis.diagnose import diagnose

            diagnose_report = diagnose(ws, mesh)
        except Exception as exc:  # noqa: BLE001
            logger.debug("diagnose failed in the report: %s", exc)
    check()
    eval_path = ws.out_dir / "eval.json"
    ev = None
    if eval_path.exists():
        try:
            ev = json.loads(eval_path.read_text())
        except ValueError as exc:
            logger.warning("%s: unreadable (%s); the report leaves the metrics out", eval_path, exc)
    sections = {
        "sfm": ("SfM", _sfm_section(scene, stages.get("sfm", {}).get("summary", {}))),
        "views": ("Views", _views_section(ws, scene, max_views)),
        "curves": ("Refinement curves", _curves_section(ws)),
        "diagnose": ("Diagnostics", _diagnose_section(diagnose_report)),
        "eval": ("Evaluation against ground truth", _eval_section(ev)),
    }
    mesh_views = None
    if scene is not None and ws.mesh_path.exists():
        mesh_views = []
        for rendered in render_mesh_views(mesh, scene):
            check()
            mesh_views.append(rendered)
    return ReportParts(sections=sections, scene=scene, mesh_views=mesh_views)


def _manifest_stages(ws: Workspace) -> dict[str, Any]:
    manifest = json.loads(ws.manifest_path.read_text()) if ws.manifest_path.exists() else {"stages": {}}
    return manifest.get("stages", {})


def build_report(ws: Workspace, *, max_views: int = 12, diagnose_report: dict | None = None,
                 parts: ReportParts | None = None) -> Path:
    """Write ``OUT/report.html`` from whatever caches exist; returns its path.

    Args:
        ws: the run's workspace.
        max_views, diagnose_report: see :func:`report_parts`.
        parts: :func:`report_parts` computed earlier (None: computed here); the timings and the GLB's renders are
            read now.
    """
    if parts is None:
        parts = report_parts(ws, max_views=max_views, diagnose_report=diagnose_report)
    body = {"timings": ("Stage timings", _timings_section(_manifest_stages(ws))), **parts.sections,
            "renders": ("Mesh renders vs photos", _renders_section(ws, parts.scene, parts.mesh_views))}
    nav = " · ".join(f"<a href='#{sid}'>{html.escape(body[sid][0])}</a>" for sid in SECTIONS)
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>recon report</title>"
            f"<style>{_CSS}</style></head><body>",
            f"<h1>recon report</h1><p>scene <code>{html.escape(str(ws.scene_dir))}</code> → "
            f"<code>{html.escape(str(ws.out_dir))}</code></p>",
            f"<nav>{nav}</nav>"]
    page += [_section(sid, *body[sid]) for sid in SECTIONS]
    page.append("</body></html>")
    write_bytes_atomic(ws.report_path, "\n".join(page).encode())
    return ws.report_path

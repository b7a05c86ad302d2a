"""``OUT/report.html``: one self-contained page (images embedded) a person can look at.

Sections: stage timings, SfM statistics, per-view thumbnails (image, initial
depth, refined depth, Δz, confidence), refinement loss and Δz curves, mesh
renders next to the photos, diagnose verdicts, eval metrics when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.cache import write_bytes_atomic
from pipeline.io import SfmScene, load_depth_map, load_rgb
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)

THUMB_WIDTH = 200
SECTIONS = ("timings", "sfm", "views", "curves", "renders", "diagnose", "eval")


def _png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(rgb: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb).resize((width, max(1, round(h * width / w))), Image.Resampling.BILINEAR)
    return np.asarray(im)


def colorize(values: np.ndarray, valid: np.ndarray | None = None, *, symmetric: bool = False) -> np.ndarray:
    """Map a scalar image to RGB uint8 (turbo-like ramp; symmetric: blue–white–red around 0). Invalid → black."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) if valid is None else (valid & np.isfinite(v))
    out = np.zeros(v.shape + (3,), dtype=np.uint8)
    if not ok.any():
        return out
    if symmetric:
        m = np.percentile(np.abs(v[ok]), 98) or 1.0
        t = np.clip(v / m, -1, 1)
        r = np.where(t > 0, 1.0, 1.0 + t)
        b = np.where(t < 0, 1.0, 1.0 - t)
        g = 1.0 - np.abs(t)
        rgb = np.stack([r, g, b], -1)
    else:
        lo, hi = np.percentile(v[ok], [2, 98])
        t = np.clip((v - lo) / max(hi - lo, 1e-12), 0, 1)
        rgb = np.stack([np.clip(1.5 - np.abs(4 * t - 3), 0, 1), np.clip(1.5 - np.abs(4 * t - 2), 0, 1), np.clip(1.5 - np.abs(4 * t - 1), 0, 1)], -1)
    out[ok] = (rgb[ok] * 255).astype(np.uint8)
    return out


def svg_curves(series: dict[str, list[float]], width: int = 520, height: int = 220) -> str:
    """A small inline SVG line chart (log-y when every value is positive)."""
    series = {k: [float(x) for x in v] for k, v in series.items() if v}
    if not series:
        return "<p>no data</p>"
    allv = np.concatenate([np.asarray(v) for v in series.values()])
    allv = allv[np.isfinite(allv)]
    log = bool(allv.size) and bool((allv > 0).all())
    tf = (lambda x: np.log10(np.maximum(x, 1e-12))) if log else (lambda x: x)
    lo, hi = (float(tf(allv).min()), float(tf(allv).max())) if allv.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    parts = [f'<svg width="{width}" height="{height + 20}" xmlns="http://www.w3.org/2000/svg" style="background:#fff;border:1px solid #ccc">']
    for i, (name, vals) in enumerate(series.items()):
        y = np.asarray(vals, dtype=np.float64)
        x = np.linspace(5, width - 5, len(y)) if len(y) > 1 else np.array([width / 2])
        yy = height - 5 - (tf(y) - lo) / (hi - lo) * (height - 10)
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, yy) if np.isfinite(b))
        c = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{8 + 95 * (i % 5)}" y="{height + 15 - 0}" font-size="11" fill="{c}">{html.escape(name)}</text>')
    parts.append(f'<text x="{width - 90}" y="14" font-size="10" fill="#666">{"log10 " if log else ""}[{lo:.2g}, {hi:.2g}]</text></svg>')
    return "".join(parts)


def render_mesh_views(mesh_path: Path, scene: SfmScene, count: int = 3, width: int = 320) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Ray-cast the mesh from ``count`` input cameras: (name, photo, render) RGB pairs (headless, CPU)."""
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(str(mesh_path))
    if len(mesh.triangles) == 0:
        return []
    mesh.compute_vertex_normals()
    tmesh = o3d.t.geometry.TriangleMesh.from_legacy(mesh)
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(tmesh)
    tris = np.asarray(mesh.triangles)
    vcol = np.asarray(mesh.vertex_colors) if mesh.has_vertex_colors() else None
    picks = np.linspace(0, len(scene.views) - 1, min(count, len(scene.views))).round().astype(int)
    out = []
    for i in picks:
        v = scene.views[i]
        s = width / v.width
        h = max(1, round(v.height * s))
        us, vs = np.meshgrid((np.arange(width) + 0.5) / s, (np.arange(h) + 0.5) / s)
        d_cam = np.stack([(us - v.K[0, 2]) / v.K[0, 0], (vs - v.K[1, 2]) / v.K[1, 1], np.ones_like(us)], -1).reshape(-1, 3)
        d_world = d_cam @ v.cam_from_world[:3, :3]
        rays = np.concatenate([np.broadcast_to(v.center, d_world.shape), d_world], 1).astype(np.float32)
        ans = rc.cast_rays(o3d.core.Tensor(rays))
        hit = np.isfinite(ans["t_hit"].numpy())
        prim = ans["primitive_ids"].numpy()
        normals = ans["primitive_normals"].numpy()
        shade = np.clip(np.abs((normals * d_world / np.linalg.norm(d_world, axis=1, keepdims=True)).sum(1)), 0.15, 1.0)
        rgb = np.full((len(rays), 3), 40.0)
        if vcol is not None and len(vcol):
            uvw = ans["primitive_uvs"].numpy()
            t = tris[np.where(hit, prim, 0)]
            w = np.stack([1 - uvw[:, 0] - uvw[:, 1], uvw[:, 0], uvw[:, 1]], 1)
            col = (vcol[t] * w[..., None]).sum(1) * 255
            rgb[hit] = col[hit]
        else:
            rgb[hit] = (shade[hit, None] * np.array([200.0, 200.0, 210.0]))
        render = rgb.reshape(h, width, 3).clip(0, 255).astype(np.uint8)
        photo = np.asarray(Image.fromarray(load_rgb(v.image_path)).resize((width, h)))
        out.append((v.name, photo, render))
    return out


def _table(rows: list[list[Any]], header: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def build_report(ws: Workspace, *, max_views: int = 12, diagnose_report: dict | None = None) -> Path:
    """Write ``OUT/report.html`` from whatever caches exist; returns its path."""
    from pipeline.io import load_sfm_scene

    manifest = json.loads(ws.manifest_path.read_text()) if ws.manifest_path.exists() else {"stages": {}}
    stages = manifest.get("stages", {})
    parts: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'><title>recon report</title><style>"
        "body{font-family:sans-serif;margin:20px;max-width:1400px} table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left} img{margin:2px;border:1px solid #ddd}"
        ".ok{color:#2a2}.warn{color:#c80}.fail{color:#d22} figure{display:inline-block;margin:4px} figcaption{font-size:11px}"
        "</style></head><body>",
        f"<h1>recon report</h1><p>scene <code>{html.escape(str(ws.scene_dir))}</code> → <code>{html.escape(str(ws.out_dir))}</code></p>",
    ]

    rows = [[name, e.get("seconds", ""), ", ".join(f"{k}={_fmt(v)}" for k, v in e.get("summary", {}).items() if not isinstance(v, (dict, list)))] for name, e in stages.items()]
    parts.append("<section id='timings'><h2>Stage timings</h2>" + _table(rows, ["stage", "seconds", "summary"]) + "</section>")

    scene = None
    try:
        scene = load_sfm_scene(ws)
    except Exception as exc:  # noqa: BLE001 - a report shows what exists
        logger.debug("no sfm scene for the report: %s", exc)
    if scene is not None:
        track = [len(v.point_ids) for v in scene.views]
        sfm_summary = stages.get("sfm", {}).get("summary", {})
        rows = [["registered images", len(scene.views)], ["sparse points", len(scene.points)],
                ["mean reprojection error (px)", float(np.mean(scene.point_errors)) if len(scene.point_errors) else float("nan")],
                ["observations per image (mean)", float(np.mean(track)) if track else 0]]
        rows += [[k, v] for k, v in sfm_summary.items() if not isinstance(v, (dict, list))]
        parts.append("<section id='sfm'><h2>SfM</h2>" + _table(rows, ["", ""]) + "</section>")

        parts.append("<section id='views'><h2>Views</h2><p>image · initial depth · refined depth · Δz (blue −, red +) · confidence</p>")
        for v in scene.views[:max_views]:
            figs = []
            try:
                figs.append(("image", _thumb(load_rgb(v.image_path))))
            except Exception:  # noqa: BLE001
                pass
            if ws.depth_view(v.name).exists():
                dm = load_depth_map(ws.depth_view(v.name))
                figs.append(("initial depth", _thumb(colorize(dm.depth, dm.valid))))
                figs.append(("confidence", _thumb(colorize(dm.confidence, dm.valid))))
            if ws.refine_view(v.name).exists():
                rm = load_depth_map(ws.refine_view(v.name))
                figs.insert(2, ("refined depth", _thumb(colorize(rm.depth, rm.valid))))
                if rm.depth_init is not None:
                    figs.insert(3, ("Δz", _thumb(colorize(rm.depth - rm.depth_init, rm.valid, symmetric=True))))
            parts.append(f"<div><b>{html.escape(v.name)}</b><br>" + "".join(
                f"<figure><img src='{_png_data_uri(img)}'><figcaption>{cap}</figcaption></figure>" for cap, img in figs) + "</div>")
        parts.append("</section>")

    parts.append("<section id='curves'><h2>Refinement curves</h2>")
    if ws.refine_log.exists():
        log = json.loads(ws.refine_log.read_text())
        steps = log.get("steps", log if isinstance(log, list) else [])
        keys = sorted({k for s in steps for k in s if k not in ("step", "lr")})
        losses = {k: [s.get(k, float("nan")) for s in steps] for k in keys if not k.lower().startswith(("dz", "δz", "Δz", "delta"))}
        dz = {k: [s.get(k, float("nan")) for s in steps] for k in keys if k.lower().startswith(("dz", "δz", "Δz", "delta"))}
        parts.append("<h3>losses</h3>" + svg_curves(losses) + "<h3>Δz</h3>" + svg_curves(dz))
    else:
        parts.append("<p>refine did not run (no log)</p>")
    parts.append("</section>")

    parts.append("<section id='renders'><h2>Mesh renders vs photos</h2>")
    if scene is not None and ws.mesh_path.exists():
        for name, photo, render in render_mesh_views(ws.mesh_path, scene):
            parts.append(f"<div><b>{html.escape(name)}</b><br><figure><img src='{_png_data_uri(photo)}'><figcaption>photo</figcaption></figure>"
                         f"<figure><img src='{_png_data_uri(render)}'><figcaption>mesh</figcaption></figure></div>")
    else:
        parts.append("<p>no mesh yet</p>")
    parts.append("</section>")

    parts.append("<section id='diagnose'><h2>Diagnostics</h2>")
    if diagnose_report is None and scene is not None:
        try:
            from pipeline.diagnose import diagnose

            diagnose_report = diagnose(ws)
        except Exception as exc:  # noqa: BLE001
            logger.debug("diagnose failed in report: %s", exc)
    if diagnose_report:
        parts.append(_table([[c["name"], c["verdict"], c["detail"]] for c in diagnose_report["checks"]], ["check", "verdict", "detail"]))
    else:
        parts.append("<p>not available</p>")
    parts.append("</section>")

    parts.append("<section id='eval'><h2>Evaluation against ground truth</h2>")
    eval_path = ws.out_dir / "eval.json"
    if eval_path.exists():
        ev = json.loads(eval_path.read_text())
        flat = [[k, v] for k, v in ev.items() if not isinstance(v, (dict, list))]
        for k, v in ev.items():
            if isinstance(v, dict):
                flat += [[f"{k}.{k2}", v2] for k2, v2 in v.items() if not isinstance(v2, (dict, list))]
        parts.append(_table(flat, ["metric", "value"]))
    else:
        parts.append("<p>no ground truth evaluated (run <code>recon eval OUT --gt GT</code>)</p>")
    parts.append("</section></body></html>")

    write_bytes_atomic(ws.report_path, "\n".join(parts).encode())
    return ws.report_path

"""OUT/report.html: built from a real (small, fast) run, opened in headless Chromium.

The browser test loads an instrumented copy of the report (a script that
records JS errors and failed resource loads, then writes what it found into
the page) and reads it back with ``--dump-dom``; it checks that every section
of ``report.SECTIONS`` is laid out with real content, that every image
decoded, and that nothing was fetched from the network.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.analysis.appearance import render_mesh_views
from pipeline.analysis.report import SECTIONS, build_report, colorize, refine_caption, report_parts, svg_curves
from pipeline.core.workspace import Workspace

FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=30", "--no-progress"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Workspace:
    """A finished ``recon run`` on a rendered 10-view 240x180 scene (about 10 s), then ``recon eval`` on it."""
    from pipeline.synthetic.render import render_scene

    scene = render_scene(tmp_path_factory.mktemp("report") / "blob", shape="blob", n_views=10, width=240, height=180,
                         seed=0)
    result = CliRunner().invoke(cli.main, ["run", str(scene), *FAST])
    assert result.exit_code == 0, result.output
    return Workspace.create(scene)


@pytest.fixture(scope="module")
def evaluated_report(finished_run) -> Path:
    """The report rebuilt after the run was scored against its ground truth (OUT/eval.json)."""
    result = CliRunner().invoke(cli.main,
                                ["eval", str(finished_run.out_dir), "--gt", str(finished_run.scene_dir / "gt")])
    assert result.exit_code == 0, result.output
    assert (finished_run.out_dir / "eval.json").is_file()
    return build_report(finished_run)


def sections_of(page: str) -> dict[str, str]:
    """Section id → its inner HTML (the report's own single-quoted ids)."""
    return dict(re.findall(r"<section id='([a-z]+)'>(.*?)</section>", page, flags=re.S))


def test_the_run_writes_a_report_with_every_section(finished_run):
    page = finished_run.report_path.read_text()
    secs = sections_of(page)
    assert list(secs) == list(SECTIONS)
    assert "sfm" in secs["timings"] and "refine" in secs["timings"] and "export" in secs["timings"]
    for text in ("registered images", "10 of 10", "reprojection error, mean (px)", "track length"):
        assert text in secs["sfm"]
    # 10 views x (image, initial depth, refined depth, Δz, confidence)
    for caption in ("image", "initial depth", "refined depth", "Δz", "confidence"):
        assert secs["views"].count(f"<figcaption>{caption}") == 10, caption
    assert secs["curves"].count("<svg") == 2 and "L_mv" in secs["curves"] and "dz_std" in secs["curves"]
    assert secs["renders"].count("<figcaption>photo</figcaption>") == 3
    assert secs["renders"].count("<figcaption>mesh.ply (colour)</figcaption>") == 3
    assert secs["renders"].count("<figcaption>mesh.glb (texture)</figcaption>") == 3
    assert "extrinsic convention" in secs["diagnose"] and "<span class='ok'>OK</span>" in secs["diagnose"]
    assert "no OUT/eval.json" in secs["eval"]  # not evaluated yet


def test_report_is_self_contained(evaluated_report):
    page = evaluated_report.read_text()
    srcs = re.findall(r"\bsrc=['\"]([^'\"]*)", page)
    assert len(srcs) >= 10 * 5 + 3 * 3
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    hrefs = re.findall(r"\bhref=['\"]([^'\"]*)", page)
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page


def test_eval_metrics_appear_after_recon_eval(finished_run, evaluated_report):
    ev = json.loads((finished_run.out_dir / "eval.json").read_text())
    secs = sections_of(evaluated_report.read_text())
    assert "F@0.5%" in secs["eval"] and "F@1%" in secs["eval"] and "Chamfer" in secs["eval"]
    f1 = ev["thresholds"]["1%"]["fscore"]
    assert f"<td>{f1:.4g}</td>" in secs["eval"]
    assert "AbsRel" in secs["eval"] and "<td>refine</td>" in secs["eval"] and "<td>depth</td>" in secs["eval"]


def instrumented_copy(report: Path, dest: Path) -> Path:
    """``report`` with a first script that records errors and, on load, writes a JSON summary into
    ``<pre id=__check>``."""
    probe = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  if (t && t !== window && (t.src || t.href)) { window.__errors.push('failed to load ' + (t.tagName || '?') + ' ' \
+ String(t.src || t.href).slice(0, 80)); }
  else { window.__errors.push('js error: ' + e.message); }
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); })
                .map(function (i) { return (i.alt || '?') + ' ' + i.src.slice(0, 60); });
  var sections = {};
  document.querySelectorAll('section').forEach(function (s) {
    var r = s.getBoundingClientRect();
    sections[s.id] = {height: r.height, width: r.width, text: s.innerText.length,
                      images: s.querySelectorAll('img').length, lines: s.querySelectorAll('svg polyline').length,
                      heading: (s.querySelector('h2') || {}).innerText || ''};
  });
  var out = document.createElement('pre');
  out.id = '__check';
  out.textContent = JSON.stringify({errors: window.__errors, images: imgs.length, bad_images: bad, sections: sections});
  document.body.appendChild(out);
});
</script>"""
    page = report.read_text()
    assert page.count("<head>") == 1
    dest.write_text(page.replace("<head>", "<head>" + probe, 1))
    return dest


def run_chromium(binary: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--enable-logging=stderr", "--v=0", f"--user-data-dir={cwd / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_report_renders_in_headless_chromium(finished_run, evaluated_report, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/install.sh installs it)")
    page = instrumented_copy(evaluated_report, tmp_path / "report_checked.html")
    res = run_chromium(binary, ["--virtual-time-budget=10000", "--window-size=1400,900", "--dump-dom", page.as_uri()],
                       tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="__check">(.*?)</pre>', res.stdout, flags=re.S)
    assert found, "the page's load handler did not run: " + res.stdout[-500:]
    check = json.loads(html.unescape(found.group(1)))
    assert check["errors"] == []
    assert check["bad_images"] == [] and check["images"] >= 10 * 5 + 3 * 3
    console_errors = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "rror" in ln)]
    assert console_errors == []
    secs = check["sections"]
    assert list(secs) == list(SECTIONS)
    for sid, s in secs.items():
        assert s["heading"] and s["height"] > 40 and s["width"] > 300 and s["text"] > 60, (sid, s)
    from pipeline.core.io import load_depth_map

    restored = sum(bool(load_depth_map(f).restored.any())
                   for f in sorted(finished_run.stage_dir("refine").joinpath("views").glob("*.npz")))
    # 5 per view, + restored pixels where any
    # renders: photo, textured mesh.glb, coloured mesh.ply, shaded, for 3 views
    assert secs["views"]["images"] == 50 + restored and secs["renders"]["images"] == 12
    assert secs["curves"]["lines"] >= 6  # loss, L_mv, L_anchor, L_edge, L_surf (+ L_mag), dz_mean, dz_std
    # the page draws: a screenshot is not blank
    shot = tmp_path / "shot.png"
    res = run_chromium(binary, ["--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}",
                                evaluated_report.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 1000  # photos and depth maps, not an empty page


def test_mesh_renders_are_seen_from_the_photos_cameras(finished_run):
    """Each render matches its own photo better than the photos of the other two cameras (right pose convention)."""
    from pipeline.core.io import load_sfm_scene

    renders = render_mesh_views(finished_run.mesh_path, load_sfm_scene(finished_run))
    assert len(renders) == 3

    def diff(photo, render):
        hit = np.any(render != 40, axis=2)  # background is (40, 40, 40)
        assert hit.mean() > 0.3
        return np.abs(photo.astype(float) - render.astype(float))[hit].mean()

    for i, (_, photo, coloured, shaded) in enumerate(renders):
        assert coloured.shape == photo.shape == shaded.shape
        own = diff(photo, coloured)
        others = [diff(renders[j][1], coloured) for j in range(3) if j != i]
        assert own < 0.5 * min(others), (own, others)  # measured: ~8 vs ~35 grey levels


def test_report_without_refine_and_without_anything(finished_run, tmp_path):
    """A --skip refine run (no refine caches) and an empty output folder still give every section, with a note."""
    out = tmp_path / "norefine"
    shutil.copytree(finished_run.out_dir, out, ignore=shutil.ignore_patterns("refine", "eval.json", "report.html"))
    ws = Workspace(scene_dir=finished_run.scene_dir, out_dir=out)
    secs = sections_of(build_report(ws).read_text())
    assert list(secs) == list(SECTIONS)
    assert "refine did not run" in secs["curves"]
    assert (secs["views"].count("<figcaption>initial depth") == 10
            and "refined depth" not in secs["views"].split("</p>", 1)[1])
    empty = Workspace(scene_dir=tmp_path, out_dir=tmp_path / "empty")
    empty.out_dir.mkdir()
    secs = sections_of(build_report(empty).read_text())
    assert list(secs) == list(SECTIONS)
    assert "no stage has finished" in secs["timings"] and "no mesh yet" in secs["renders"]


def test_colorize_and_curves():
    v = np.array([[-1.0, 0.0, 1.0, np.nan]])
    rgb = colorize(v, symmetric=True)
    assert (rgb[0, 0].tolist() == [0, 0, 255] and rgb[0, 1].tolist() == [255, 255, 255]
            and rgb[0, 2].tolist() == [255, 0, 0])
    assert rgb[0, 3].tolist() == [0, 0, 0]  # invalid → black
    ramp = colorize(np.array([[0.0, 10.0]]), vrange=(0.0, 10.0))
    assert ramp[0, 0, 2] > ramp[0, 0, 0] and ramp[0, 1, 0] > ramp[0, 1, 2]  # low blue, high red
    svg = svg_curves({"loss": [1.0, 0.1, 0.01], "L_mag": [0.0, 0.5, 0.2]}, log=True)
    assert svg.count("<polyline") == 2 and "log scale" in svg  # the 0 of L_mag is left out, not drawn at -inf
    assert "nan" not in svg.lower().replace("class='legend'", "")


def test_refine_caption_shows_the_gate_evidence_before_and_after():
    text = refine_caption({"photo_cost_init": 0.25, "photo_cost_refined": 0.2, "consistent_init": 0.8,
                           "consistent_refined": 0.9, "refined_fraction": 0.3, "restored_fraction": 0.02,
                           "dropped_fraction": 0.01})
    assert "photometric residual 0.250 → 0.200" in html.unescape(text)
    assert "80.0% → 90.0%" in html.unescape(text) and "restored 2.0%" in text
    assert refine_caption({"photo_cost_init": float("nan"), "photo_cost_refined": 0.2}) == ""


def test_the_report_work_done_before_the_export_gives_the_same_report(finished_run):
    """A run computes the report's parts while the export runs; the GLB's renders and the timings come after."""
    glb = finished_run.out_dir / "mesh.glb"
    kept = glb.with_suffix(".kept")
    glb.rename(kept)  # as before the export
    try:
        parts = report_parts(finished_run)
    finally:
        kept.rename(glb)
    early = build_report(finished_run, parts=parts).read_text()
    assert "mesh.glb (texture)" in sections_of(early)["renders"]
    assert early == build_report(finished_run).read_text()


def test_a_failed_early_report_is_computed_again(finished_run, monkeypatch):
    from pipeline.analysis import report as report_mod
    from workflows.summary import EarlyReport, _write_report

    def broken(ws, **kw):
        raise RuntimeError("simulated failure in the report thread")

    monkeypatch.setattr(report_mod, "report_parts", broken)
    early = EarlyReport(finished_run)
    with pytest.raises(RuntimeError):
        early.result()
    monkeypatch.undo()
    finished_run.report_path.unlink()
    _write_report(finished_run, early)
    assert list(sections_of(finished_run.report_path.read_text())) == list(SECTIONS)


def test_an_early_report_stops_when_cancelled(finished_run):
    from pipeline.analysis.report import ReportStopped

    with pytest.raises(ReportStopped):
        report_parts(finished_run, stop=lambda: True)

"""Bad inputs through the real CLI (``python -m cli`` in a subprocess): one clear line, never a traceback.

Every bad file is generated here. A case either fails with a non-zero exit and
*exactly one* non-empty line on stderr (``error: ...`` naming the file and
what to do; the traceback goes to ``OUT/log.txt``), or — where skipping is the
right answer (a non-image file, a truncated JPEG among good photos, one bad
depth prior) — succeeds with one warning line per skipped file.

Scenes that must get through SfM use a rendered 8-view 160x120 scene whose
true cameras are supplied as a COLMAP model (``SCENE_DIR/sparse/0``, see
:func:`pipeline.groundtruth.write_gt_model`), so no feature matching runs;
the image-format zoo (grayscale, RGBA, 16-bit, EXIF rotation, a huge JPEG,
mixed sizes, names with spaces and non-ASCII) runs the real SfM on 12 views.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.groundtruth import load_gt_cameras, load_gt_depth, write_gt_model
from pipeline.synth import render_scene

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=30"]


# ---- running the CLI ---------------------------------------------------------------------------


def recon(*args: str, prefix: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """``recon ARGS`` as a user runs it (a fresh process, stderr not a terminal)."""
    return subprocess.run([*prefix, sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def stderr_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a clean failure: non-zero exit, no traceback, stderr = one ``error:`` line holding every needle."""
    assert res.returncode != 0, f"expected a failure\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = stderr_lines(res)
    assert len(lines) == 1, f"stderr must be exactly one line, got:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def clean_success(res: subprocess.CompletedProcess) -> list[str]:
    """Assert exit 0 and no traceback; returns the stderr lines (warnings only)."""
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return stderr_lines(res)


# ---- scenes ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_scene(tmp_path_factory) -> Path:
    """8 views 160x120 of the blob with the true cameras as ``sparse/0`` (SfM reads the model, no matching)."""
    scene = render_scene(tmp_path_factory.mktemp("bad") / "blob8", shape="blob", n_views=8, width=160, height=120, seed=0)
    write_gt_model(scene, scene / "sparse" / "0")
    return scene


@pytest.fixture
def scene(model_scene, tmp_path) -> Path:
    """A private copy of :func:`model_scene` (without outputs) to break."""
    dst = tmp_path / "scene"
    shutil.copytree(model_scene, dst, ignore=shutil.ignore_patterns("recon"))
    return dst


def _noise_images(folder: Path, n: int, seed: int = 100, size: tuple[int, int] = (160, 120)) -> list[Path]:
    """``n`` unrelated smooth-noise photos: textured, but nothing in common."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        noise = (rng.random((15, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC).save(folder / f"img_{i}.png")
        out.append(folder / f"img_{i}.png")
    return out


def _truncated_jpeg(path: Path, like: Path) -> Path:
    """A JPEG cut in half (what an interrupted copy leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(like) as im:
        im.convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---- inputs that must fail before or in SfM --------------------------------------------------------


@dataclass
class Case:
    make: object
    """(tmp_path) -> (args, needles): builds the bad input, returns the CLI args and what the line must name."""


def _missing(tmp: Path):
    return ["run", str(tmp / "no such scene")], [str(tmp / "no such scene"), "not found"]


def _empty(tmp: Path):
    (tmp / "scene").mkdir()
    return ["run", str(tmp / "scene")], [str(tmp / "scene"), "no JPEG/PNG images", "images/"]


def _only_text(tmp: Path):
    (tmp / "scene" / "images").mkdir(parents=True)
    (tmp / "scene" / "images" / "notes.txt").write_text("holiday photos")
    (tmp / "scene" / "images" / "list.csv").write_text("a,b\n")
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "images"), "no JPEG/PNG images", "notes.txt"]


def _one_image(tmp: Path):
    _noise_images(tmp / "scene" / "images", 1)
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "images"), "only 1 readable", "at least 3"]


def _all_truncated(tmp: Path):
    good = _noise_images(tmp / "src", 3)
    for i, g in enumerate(good):
        _truncated_jpeg(tmp / "scene" / "images" / f"photo {i}.jpg", g)
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "images"), "only 0 readable", "photo 0.jpg"]


def _no_overlap(tmp: Path):
    _noise_images(tmp / "scene" / "images", 4)
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "images"), "registered", "img_0.png", "overlap"]


def _config_typo(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "my config.yaml").write_text("refine:\n  wieght_mv: 1.0\n")
    return ["run", str(tmp / "scene"), "--config", str(tmp / "my config.yaml")], [str(tmp / "my config.yaml"), "refine.wieght_mv", "weight_mv"]


def _config_wrong_type(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "c.yaml").write_text("fuse:\n  voxel_size: small\n")
    return ["run", str(tmp / "scene"), "--config", str(tmp / "c.yaml")], [str(tmp / "c.yaml"), "fuse.voxel_size", "expected a number"]


def _config_bad_yaml(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "c.yaml").write_text("refine:\n  steps: [1, 2\n")
    return ["run", str(tmp / "scene"), "--config", str(tmp / "c.yaml")], [str(tmp / "c.yaml"), "invalid YAML"]


def _config_not_a_mapping(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "c.yaml").write_text("- refine\n- fuse\n")
    return ["run", str(tmp / "scene"), "--config", str(tmp / "c.yaml")], [str(tmp / "c.yaml"), "expected a mapping"]


def _config_missing(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    return ["run", str(tmp / "scene"), "--config", str(tmp / "nope.yaml")], [str(tmp / "nope.yaml"), "cannot read config file"]


def _scene_yaml_typo(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "scene" / "recon.yaml").write_text("refnie:\n  steps: 10\n")
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "recon.yaml"), "unknown section 'refnie'", "refine"]


def _set_typo(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    return ["run", str(tmp / "scene"), "--set", "depth.num_neigbors=3"], ["depth.num_neigbors", "num_neighbors"]


def _set_wrong_type(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    return ["run", str(tmp / "scene"), "--set", "refine.steps=lots"], ["refine.steps", "expected an integer"]


def _set_bad_choice(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    return ["run", str(tmp / "scene"), "--set", "depth.estimator=midas"], ["depth.estimator", "mvs"]


BEFORE_SFM = {
    "scene-missing": _missing,
    "scene-empty": _empty,
    "no-images-only-text": _only_text,
    "one-image": _one_image,
    "all-truncated-jpeg": _all_truncated,
    "config-typo": _config_typo,
    "config-wrong-type": _config_wrong_type,
    "config-invalid-yaml": _config_bad_yaml,
    "config-not-a-mapping": _config_not_a_mapping,
    "config-file-missing": _config_missing,
    "scene-recon-yaml-typo": _scene_yaml_typo,
    "set-typo": _set_typo,
    "set-wrong-type": _set_wrong_type,
    "set-bad-choice": _set_bad_choice,
}


@pytest.mark.parametrize("case", sorted(BEFORE_SFM))
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, needles = BEFORE_SFM[case](tmp_path)
    one_line_error(recon(*args), *needles)


@pytest.mark.slow
def test_images_without_overlap_fail_clearly(tmp_path):
    args, needles = _no_overlap(tmp_path)
    line = one_line_error(recon(*args), *needles)
    assert "only 0 of 4" in line or "only 1 of 4" in line or "only 2 of 4" in line
    log = (tmp_path / "scene" / "recon" / "log.txt").read_text()
    assert "Traceback" in log and "ReconError" in log  # the full story is in the log file


# ---- the user's COLMAP model does not match the images -------------------------------------------------


def test_model_naming_a_missing_image(scene):
    (scene / "images" / "view_003.png").unlink()
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(scene / "sparse" / "0"), "view_003.png", "use_existing_model=false")


def test_model_of_other_image_sizes(scene):
    for p in (scene / "images").glob("*.png"):
        with Image.open(p) as im:
            im.resize((200, 120)).save(p)
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(scene / "sparse" / "0"), "160x120", "200x120")


def test_model_with_a_truncated_image(scene):
    src = scene / "images" / "view_002.png"
    _truncated_jpeg(scene / "images" / "broken.jpg", src)
    src.write_bytes(src.read_bytes()[:3000])  # an image the model registers is unreadable
    res = recon("run", str(scene), "--until", "sfm")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = stderr_lines(res)
    assert lines[-1].startswith("error: ") and "view_002.png" in lines[-1] and str(scene / "sparse" / "0") in lines[-1]
    assert all(line.startswith("skipping ") for line in lines[:-1]) and any("broken.jpg" in line for line in lines)


def test_unreadable_model(scene):
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        (scene / "sparse" / "0" / name).write_bytes(bytes(range(64)))
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(scene / "sparse" / "0"), "cannot read the COLMAP model", "use_existing_model=false")


# ---- skipping is right: the run goes on and names what it skipped -----------------------------------------


def test_non_image_files_and_a_truncated_jpeg_are_skipped(scene):
    (scene / "images" / "notes.txt").write_text("shot on a tuesday")
    (scene / "images" / "thumbs").mkdir()
    (scene / "images" / "thumbs" / "index.html").write_text("<html/>")
    _truncated_jpeg(scene / "images" / "extra shot.jpg", scene / "images" / "view_000.png")
    res = recon("run", str(scene), "--until", "sfm")
    lines = clean_success(res)
    assert len(lines) == 2, res.stderr
    assert "notes.txt" in lines[0] and "thumbs/index.html" in lines[0] and "not JPEG/PNG" in lines[0]
    assert str(scene / "images" / "extra shot.jpg") in lines[1] and "truncated" in lines[1]
    summary = json.loads((scene / "recon" / "manifest.json").read_text())["stages"]["sfm"]["summary"]
    assert summary["registered"] == 8 and summary["unreadable"] == 1


# ---- depth priors ---------------------------------------------------------------------------------------


def _write_priors(scene: Path) -> dict[str, Path]:
    """``depth_prior/<stem>.npy`` = the true depth of every view."""
    cams, _, _ = load_gt_cameras(scene / "gt")
    out = {}
    for name in sorted(cams):
        path = scene / "depth_prior" / f"{Path(name).stem}.npy"
        path.parent.mkdir(exist_ok=True)
        np.save(path, load_gt_depth(scene / "gt", name).astype(np.float32))
        out[name] = path
    return out


def _break_prior(path: Path, how: str) -> None:
    arr = np.load(path)
    if how == "nan":
        arr[40:60, 60:90] = np.nan
    elif how == "inf":
        arr[0, 0] = np.inf
    elif how == "wrong-shape":
        arr = arr[:, :100]
    elif how == "rgb":
        arr = np.repeat(arr[..., None], 3, axis=2)
    np.save(path, arr)


PRIOR = ["--until", "depth", "--set", "depth.estimator=prior", *FAST]


@pytest.mark.slow
def test_bad_depth_priors_are_named_and_left_out(scene):
    priors = _write_priors(scene)
    broken = dict(zip(("nan", "inf", "wrong-shape", "rgb"), list(priors.values())[:4]))
    for how, path in broken.items():
        _break_prior(path, how)
    res = recon("run", str(scene), *PRIOR)
    lines = clean_success(res)
    assert len(lines) == 4, res.stderr
    for how, path in broken.items():
        line = next((line for line in lines if str(path) in line), None)
        assert line is not None and "left out" in line, (how, res.stderr)
    assert any("NaN/inf" in line for line in lines) and any("does not match the image" in line for line in lines)
    written = sorted(p.name for p in (scene / "recon" / "depth" / "views").glob("*.npz"))
    assert written == [f"{Path(n).stem}.npz" for n in list(priors)[4:]]


@pytest.mark.slow
def test_all_depth_priors_bad_fails_clearly(scene):
    """Every prior malformed: non-zero exit, the last line names the files and the fix.

    The depth stage warns about each view as it fails, before it knows that
    none will succeed, so the error line is preceded by one warning per view
    (see the report: buffering them, as the sfm stage does, would leave one line).
    """
    priors = _write_priors(scene)
    for path in priors.values():
        _break_prior(path, "nan")
    res = recon("run", str(scene), *PRIOR)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = stderr_lines(res)
    error = lines[-1]
    assert error.startswith("error: no view got a depth map") and str(priors["view_000.png"]) in error
    assert "write 0 for unknown pixels" in error and "depth.estimator" in error
    assert len(lines) == 1 + len(priors) and all("view left out" in line for line in lines[:-1])


def test_missing_depth_prior_folder(scene):
    one_line_error(recon("run", str(scene), *PRIOR), str(scene / "depth_prior"), "not found", "depth.estimator=mvs")


# ---- output folder: read-only, full, already in use ---------------------------------------------------------


def _user_namespaces() -> bool:
    """Whether a tmpfs can be mounted in a user+mount namespace (Linux, unprivileged user namespaces on)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def with_tmpfs(mount_point: Path, options: str) -> tuple[str, ...]:
    """Command prefix: run the command with a fresh tmpfs (``options``, e.g. ``size=96k`` or ``ro``) at ``mount_point``."""
    mount_point.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", options, str(mount_point))


def test_read_only_output_folder(scene, tmp_path):
    out = tmp_path / "mnt" / "out"
    if _user_namespaces():
        prefix = with_tmpfs(tmp_path / "mnt", "ro,size=64k")  # a read-only file system (EROFS), even for root
    elif os.geteuid() != 0:
        (tmp_path / "mnt").mkdir()
        (tmp_path / "mnt").chmod(0o555)
        prefix = ()
    else:
        pytest.skip("root without user namespaces: no way to make a folder read-only")
    line = one_line_error(recon("run", str(scene), "--out", str(out), prefix=prefix), str(out), "cannot write here", "--out")
    assert "read-only" in line.lower() or "permission denied" in line.lower()


@pytest.mark.parametrize("size", ["16k", "96k", "1200k", "4m"])
def test_full_output_folder(scene, tmp_path, size):
    """A real ENOSPC: the output folder lives on a small tmpfs that fills up (at the config, in sfm, depth, fuse).

    COLMAP and Open3D can report success after a failed write; the free-space
    check after them must catch it, and their own complaints (RPly prints one
    line per failed vertex) must stay in the log file.
    """
    if not _user_namespaces():
        pytest.skip("needs unprivileged user namespaces to mount a small tmpfs")
    out = tmp_path / "mnt" / "out"
    res = recon("run", str(scene), "--out", str(out), *FAST, prefix=with_tmpfs(tmp_path / "mnt", f"size={size}"))
    line = one_line_error(res, "no space left on the device while writing", str(out), "--out")
    assert line.count("error:") == 1


# ---- images that must work: the format zoo, through every stage -------------------------------------------------


ZOO = {
    # renamed/re-encoded file name: (ground-truth name, what it tests)
    "view 000 é.jpg": ("view_000.png", "spaces and non-ASCII in the name"),
    "view_001.png": ("view_001.png", "grayscale PNG"),
    "view_002.png": ("view_002.png", "RGBA PNG"),
    "view_003.png": ("view_003.png", "16-bit PNG"),
    "view_004.jpg": ("view_004.png", "EXIF orientation 6 (stored rotated)"),
    "view_005.jpg": ("view_005.png", "very large JPEG (4000x3000)"),
    "view_006.png": ("view_006.png", "another size and camera (240x180)"),
}


def _make_zoo(scene: Path) -> None:
    images = scene / "images"

    def take(i: int) -> Image.Image:
        p = images / f"view_{i:03d}.png"
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        p.unlink()
        return rgb

    take(0).save(images / "view 000 é.jpg", quality=95)
    take(1).convert("L").save(images / "view_001.png")
    rgba = np.asarray(take(2).convert("RGBA")).copy()
    rgba[..., 3] = 180
    Image.fromarray(rgba).save(images / "view_002.png")
    Image.fromarray(np.asarray(take(3).convert("L")).astype(np.uint16) * 257).save(images / "view_003.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored pixels rotated 90° clockwise
    take(4).transpose(Image.Transpose.ROTATE_90).save(images / "view_004.jpg", quality=95, exif=exif.tobytes())
    take(5).resize((4000, 3000), Image.Resampling.BICUBIC).save(images / "view_005.jpg", quality=90)
    take(6).resize((240, 180), Image.Resampling.LANCZOS).save(images / "view_006.png")
    (images / "notes.txt").write_text("not an image")
    _truncated_jpeg(images / "broken.jpg", images / "view_007.png")


@dataclass
class ZooRun:
    scene: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory) -> ZooRun:
    """12 views 320x240 re-encoded into every supported kind of photo, run through all stages (real SfM)."""
    scene = render_scene(tmp_path_factory.mktemp("zoo") / "zoo", shape="blob", n_views=12, width=320, height=240, seed=0)
    _make_zoo(scene)
    res = recon("run", str(scene), "--set", "sfm.max_image_size=320", *FAST, timeout=600)
    return ZooRun(scene, res)


@pytest.mark.slow
def test_zoo_runs_through_and_names_what_it_skipped(zoo_run):
    lines = clean_success(zoo_run.result)
    assert len(lines) == 2, zoo_run.result.stderr
    assert "notes.txt" in lines[0] and str(zoo_run.scene / "images" / "broken.jpg") in lines[1]
    out = zoo_run.scene / "recon"
    assert (out / "mesh.ply").stat().st_size > 10_000 and (out / "mesh.glb").exists() and (out / "report.html").exists()


def _registered(zoo_run: ZooRun) -> dict[str, tuple]:
    """name → (camera width, height, camera centre in the normalized frame) of the published model."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(zoo_run.scene / "recon" / "sparse"))
    out = {}
    for i in rec.reg_image_ids():
        im = rec.images[i]
        out[im.name] = (im.camera.width, im.camera.height, np.asarray(im.projection_center()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_image_registers_where_it_was_taken(zoo_run, name):
    """Each special photo registers, upright, at its true position (similarity-aligned to the ground truth)."""
    from pipeline.geometry import camera_center, umeyama

    assert zoo_run.result.returncode == 0, zoo_run.result.stderr
    reg = _registered(zoo_run)
    assert name in reg, f"{name} ({ZOO[name][1]}) did not register: {sorted(reg)}"
    with Image.open(zoo_run.scene / "recon" / "sfm" / "input" / name) as prepared:  # what SIFT saw
        assert prepared.size == ((240, 180) if name == "view_006.png" else (320, 240))  # upright, huge one downscaled
    width, height, _ = reg[name]
    assert abs(width / height - 4 / 3) < 0.02  # undistorted camera, still landscape
    gt_name = {k: v[0] for k, v in ZOO.items()}
    cams, _, _ = load_gt_cameras(zoo_run.scene / "gt")
    names = sorted(reg)
    est = np.array([reg[n][2] for n in names])
    gt = np.array([camera_center(cams[gt_name.get(n, n)][1]) for n in names])
    s, R, t = umeyama(est, gt)
    aligned = (s * (R @ est.T)).T + t
    err = np.linalg.norm(aligned - gt, axis=1)
    spread = np.linalg.norm(gt - gt.mean(0), axis=1).mean()
    assert err[names.index(name)] < 0.02 * spread, f"{name}: {err[names.index(name)]:.4f} vs spread {spread:.3f}"


@pytest.mark.slow
def test_names_with_spaces_and_non_ascii_reach_every_stage(zoo_run):
    out = zoo_run.scene / "recon"
    assert (out / "sfm" / "images" / "view 000 é.jpg").exists()
    assert (out / "depth" / "views" / "view 000 é.npz").exists()
    assert (out / "refine" / "views" / "view 000 é.npz").exists()


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 6000x4000 JPEG read with max_size=1000: right size, and peak memory far below the full decode (72 MB)."""
    big = tmp_path / "big.jpg"
    noise = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).resize((6000, 4000), Image.Resampling.BILINEAR).save(big, quality=85)
    probe = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from PIL import Image
        from pipeline.io import load_rgb
        with Image.open({str(big)!r}) as im:
            pass
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rgb = load_rgb({str(big)!r}, max_size=1000)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(rgb.shape[1], rgb.shape[0], (after - before) * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    width, height, grown = (int(v) for v in res.stdout.split())
    assert (width, height) == (1000, 667)
    full_decode = 6000 * 4000 * 3
    assert grown < 0.5 * full_decode, f"peak grew by {grown / 1e6:.1f} MB (full decode {full_decode / 1e6:.0f} MB)"


# ---- an unexpected error: one line, traceback in the log file ---------------------------------------------------


def test_unexpected_error_keeps_the_traceback_in_the_log(scene):
    driver = textwrap.dedent("""
        import dataclasses, sys
        import cli
        from pipeline import stages

        def boom(ctx):
            raise ZeroDivisionError("deep inside a library")

        stages.BY_NAME["depth"] = dataclasses.replace(stages.BY_NAME["depth"], run=boom)
        sys.argv = ["recon", *sys.argv[1:]]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", driver, "run", str(scene)], cwd=REPO, capture_output=True, text=True, timeout=300)
    log = scene / "recon" / "log.txt"
    line = one_line_error(res, "unexpected ZeroDivisionError", "deep inside a library", str(log))
    assert res.returncode == 2 and line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: deep inside a library" in text

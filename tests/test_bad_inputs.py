"""Bad inputs through the real CLI (``python -m cli`` in a subprocess): one clear line, never a traceback.

Every bad file is generated here. A case either fails with a non-zero exit and
*exactly one* non-empty line on stderr (``error: ...`` naming the file and
what to do; the traceback goes to ``OUT/log.txt``), or — where skipping is the
right answer (a non-image file, a truncated JPEG among good photos, one bad
depth prior) — succeeds with one warning line per skipped file.

Scenes that must get through SfM use a rendered 8-view 160x120 scene whose
true cameras are supplied as a COLMAP model (``SCENE_DIR/sparse/0``, see
:func:`pipeline.synthetic.groundtruth.write_gt_model`), so no feature matching runs;
the image-format zoo (grayscale, RGBA, 16-bit, EXIF rotation, a huge JPEG,
mixed sizes, names with spaces and non-ASCII) runs the real SfM on 12 views.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.workspace import view_key
from pipeline.synthetic.groundtruth import load_gt_cameras, load_gt_depth, write_gt_model
from pipeline.synthetic.render import render_scene

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "depth.max_image_side=160", "--set", "refine.steps=30"]


# ---- running the CLI ---------------------------------------------------------------------------


def recon(*args: str, prefix: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """``recon ARGS`` as a user runs it (a fresh process, stderr not a terminal)."""
    return subprocess.run([*prefix, sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


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
    scene = render_scene(tmp_path_factory.mktemp("bad") / "blob8", shape="blob", n_views=8, width=160, height=120,
                         seed=0)
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
    return (["run", str(tmp / "scene"), "--config", str(tmp / "my config.yaml")],
            [str(tmp / "my config.yaml"), "refine.wieght_mv", "weight_mv"])


def _config_wrong_type(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "c.yaml").write_text("fuse:\n  voxel_size: small\n")
    return (["run", str(tmp / "scene"), "--config", str(tmp / "c.yaml")],
            [str(tmp / "c.yaml"), "fuse.voxel_size", "expected a number"])


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
    return (["run", str(tmp / "scene"), "--config", str(tmp / "nope.yaml")],
            [str(tmp / "nope.yaml"), "cannot read config file"])


def _scene_yaml_typo(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    (tmp / "scene" / "recon.yaml").write_text("refnie:\n  steps: 10\n")
    return ["run", str(tmp / "scene")], [str(tmp / "scene" / "recon.yaml"), "unknown section 'refnie'", "refine"]


def _set_typo(tmp: Path):
    _noise_images(tmp / "scene" / "images", 3)
    return ["run", str(tmp / "scene"), "--set", "mvs.num_neigbors=3"], ["mvs.num_neigbors", "num_neighbors"]


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
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(scene / "sparse" / "0"), "view_003.png",
                   "use_existing_model=false")


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
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(scene / "sparse" / "0"),
                   "cannot read the COLMAP model", "use_existing_model=false")


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
    assert written == [f"{view_key(n)}.npz" for n in list(priors)[4:]]


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
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def with_tmpfs(mount_point: Path, options: str) -> tuple[str, ...]:
    """Command prefix: run the command with a fresh tmpfs (``options``, e.g. ``size=96k`` or ``ro``) at
    ``mount_point``."""
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
    line = one_line_error(recon("run", str(scene), "--out", str(out), prefix=prefix), str(out), "cannot write here",
                          "--out")
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


# ---- never lose or mix up a user's files ---------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(out: Path) -> dict[str, bytes]:
    """A folder of the user's own files, with the names recon gives its outputs."""
    for rel, text in (("export/model.obj", "v 0 0 0"), ("sfm/notes.txt", "my SfM notes"), ("depth/a.png", "png?"),
                      ("refine/x.txt", "x"), ("fuse/y.txt", "y"), ("mesh.ply", "my mesh"), ("config.yaml", "mine: 1"),
                      ("sparse/0/cameras.txt", "# my cameras")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return _tree(out)


def test_an_output_folder_holding_the_users_files_is_refused_untouched(scene, tmp_path):
    out = tmp_path / "my project"
    before = _user_folder(out)
    one_line_error(recon("run", str(scene), "--out", str(out), *FAST), str(out), "did not write", "--force-out")
    assert _tree(out) == before


def test_force_out_uses_such_a_folder_and_leaves_the_other_files(scene, tmp_path):
    out = tmp_path / "my project"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "notes.txt").write_text("mine")
    res = recon("run", str(scene), "--out", str(out), "--force-out", "--until", "sfm")
    assert clean_success(res) == [] or all("using a folder that holds other files" in line
                                           for line in clean_success(res))
    assert (out / "keep" / "notes.txt").read_text() == "mine" and (out / "sparse" / "images.bin").is_file()
    # now a recon output: no flag needed
    assert clean_success(recon("run", str(scene), "--out", str(out), "--until", "sfm")) == []


@pytest.mark.parametrize("where", ["scene", "images", "inside-images", "parent", "a-file"])
def test_output_folder_mixed_with_the_inputs_is_refused_before_writing(scene, where):
    out = {"scene": scene, "images": scene / "images", "inside-images": scene / "images" / "out",
           "parent": scene.parent, "a-file": scene / "images" / "view_000.png"}[where]
    before = _tree(scene)
    one_line_error(recon("run", str(scene), "--out", str(out)), str(out), "--out")
    assert _tree(scene) == before


@pytest.mark.parametrize("override, key", [
    ("refine.steps=-1", "refine.steps"),
    ("fuse.voxel_size=-1", "fuse.voxel_size"),
    ("refine.weight_edge=.nan", "refine.weight_edge"),
    ("fuse.min_confidence=nan", "fuse.min_confidence"),
    ("depth.device=gpu", "depth.device"),
    ("mvs.ncc_window=4", "mvs.ncc_window"),
    ("sfm.camera_model=FISHEYE9", "sfm.camera_model"),
])
def test_a_bad_setting_value_fails_before_anything_is_written(scene, override, key):
    one_line_error(recon("run", str(scene), "--set", override), key)
    assert not (scene / "recon").exists()


def test_cuda_on_a_machine_without_it_fails_before_anything_is_written(scene):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for key in ("depth.device", "refine.device"):
        one_line_error(recon("run", str(scene), "--set", f"{key}=cuda"), key, "no CUDA device", "auto or cpu")
    assert not (scene / "recon").exists()


def test_a_model_of_shuffled_image_names_is_refused(scene):
    import pycolmap

    model = scene / "sparse" / "0"
    rec = pycolmap.Reconstruction(str(model))
    ids = sorted(rec.reg_image_ids())
    names = [rec.images[i].name for i in ids]
    for i, name in zip(ids, names[1:] + names[:1]):
        rec.images[i].name = name
    rec.write_binary(str(model))
    one_line_error(recon("run", str(scene), "--until", "sfm"), str(model), "does not fit the photos",
                   "use_existing_model=false")


def _sfm_summary(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["stages"]["sfm"]["summary"]


def test_photos_in_the_scene_folder_never_take_in_earlier_outputs(scene, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(scene / "images", flat)
    shutil.copytree(scene / "sparse", flat / "sparse")
    for run in ("run1", "run2", "deeper/run3"):
        assert clean_success(recon("run", str(flat), "--out", str(flat / run), "--until", "sfm")) == []
        assert _sfm_summary(flat / run)["images"] == 8


def test_two_photos_with_one_stem_keep_their_own_caches(scene):
    """``view_000.png`` beside ``view_000.jpg`` (a different photo): a depth map each, none mixed up."""
    import pycolmap

    with Image.open(scene / "images" / "view_001.png") as im:
        im.convert("RGB").save(scene / "images" / "view_000.jpg", quality=97)
    (scene / "images" / "view_001.png").unlink()
    model = scene / "sparse" / "0"
    rec = pycolmap.Reconstruction(str(model))
    for i in rec.reg_image_ids():
        if rec.images[i].name == "view_001.png":
            rec.images[i].name = "view_000.jpg"
    rec.write_binary(str(model))
    assert clean_success(recon("run", str(scene), "--until", "depth", *FAST)) == []
    views = scene / "recon" / "depth" / "views"
    assert sorted(p.name for p in views.glob("view_000*")) == ["view_000.jpg.npz", "view_000.png.npz"]
    assert len(list(views.glob("*.npz"))) == 8


def test_a_photo_left_out_of_the_model_is_named_and_strict_fails(scene):
    _noise_images(scene / "images", 1)  # img_0.png: not in the model
    lines = clean_success(recon("run", str(scene), "--until", "sfm"))
    assert lines[-1].startswith("warning: 1 photo(s) did not register") and "img_0.png" in lines[-1]
    strict = recon("run", str(scene), "--until", "sfm", "--strict")
    # named above
    strict.stderr = "\n".join(line for line in strict.stderr.splitlines() if not line.startswith("warning:"))
    one_line_error(strict, "--strict", "img_0.png")


def test_a_photo_with_a_very_long_name(scene):
    import pycolmap

    long_name = "v" * 240 + ".png"
    (scene / "images" / "view_003.png").rename(scene / "images" / long_name)
    model = scene / "sparse" / "0"
    rec = pycolmap.Reconstruction(str(model))
    for i in rec.reg_image_ids():
        if rec.images[i].name == "view_003.png":
            rec.images[i].name = long_name
    rec.write_binary(str(model))
    assert clean_success(recon("run", str(scene), "--until", "depth", *FAST)) == []
    assert len(list((scene / "recon" / "depth" / "views").glob("*.npz"))) == 8


def test_output_files_follow_the_umask(scene):
    res = subprocess.run([sys.executable, "-m", "cli", "run", str(scene), "--until", "sfm"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr
    out = scene / "recon"
    for f in (out / "manifest.json", out / "config.yaml", out / "sparse" / "images.bin",
              out / "sfm" / "normalization.json"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    for d in (out, out / "sparse", out / "sfm", out / "sfm" / "model"):
        assert d.stat().st_mode & 0o777 == 0o755, d


def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes(scene):
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(scene), *FAST], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (scene / "recon" / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and lines == ["error: terminated (SIGTERM); finished work is kept, run the same "
                                                "command again to resume"], err
    assert clean_success(recon("run", str(scene), *FAST)) == []


@pytest.mark.parametrize("args, needles", [
    (["export", "{scene}/images/view_000.png"], ["OUT_DIR", "is a file", "--help"]),
    (["export", "{scene}", "--format", "xyz"], ["'xyz'", "--help"]),
    (["run", "{scene}", "--fromm", "depth"], ["--fromm", "--help"]),
])
def test_a_wrong_command_line_is_one_line(scene, args, needles):
    one_line_error(recon(*[a.format(scene=scene) for a in args]), *needles)


def test_an_unreadable_mesh_given_to_eval_is_one_line_without_native_noise(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_text("not a mesh")
    res = recon("eval", str(bad), "--gt", str(bad), "--no-align")
    one_line_error(res, str(bad), "no triangles")
    assert "RPly" not in res.stdout + res.stderr and "Open3D" not in res.stdout + res.stderr


# ---- masks: checked before SfM, by name ------------------------------------------------------------------------


def _masks(scene: Path, names: list[str], size: tuple[int, int] = (160, 120), suffix: str = ".png") -> Path:
    masks = scene / "masks"
    masks.mkdir(exist_ok=True)
    for n in names:
        Image.new("L", size, 255).save(masks / (Path(n).stem + suffix))
    return masks


@pytest.mark.parametrize("how", ["not-an-image", "other-size"])
def test_a_bad_mask_fails_before_sfm(scene, how):
    masks = _masks(scene, [f"view_{i:03d}.png" for i in range(8)])
    bad = masks / "view_004.png"
    if how == "not-an-image":
        bad.write_text("this is not a PNG")
        needles = [str(bad), "cannot read mask"]
    else:
        Image.new("L", (80, 60), 255).save(bad)
        needles = [str(bad), "80x60", "160x120", "fuse.resize_masks=true"]
    one_line_error(recon("run", str(scene), *FAST), *needles)
    assert not (scene / "recon" / "sfm").exists() and not (scene / "recon" / ".building" / "sfm").exists()


@pytest.mark.slow
def test_masks_of_another_size_jpeg_masks_and_unmatched_masks(scene):
    """Resized on request, JPEG masks used, a mask named after no photo reported by name; a mask keeping
    only a 2x2 speck leaves that view out of the fusion instead of crashing it."""
    masks = _masks(scene, [f"view_{i:03d}.png" for i in range(1, 8)], size=(320, 240))
    speck = np.zeros((120, 160), np.uint8)
    speck[61:63, 81:83] = 255
    Image.fromarray(speck).save(masks / "view_000.jpg", quality=100)
    Image.new("L", (160, 120), 255).save(masks / "no such photo.png")
    res = recon("run", str(scene), *FAST, "--set", "fuse.resize_masks=true")
    lines = clean_success(res)
    assert len(lines) == 1 and "no such photo.png" in lines[0] and "match no photo" in lines[0], res.stderr
    fuse_summary = json.loads((scene / "recon" / "manifest.json").read_text())["stages"]["fuse"]["summary"]
    # the speck's view may add a block or be left out
    assert fuse_summary["views"] >= 7 and fuse_summary["faces"] > 1000


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
    "view_008.Jpg": ("view_008.png", "an extension in odd case"),
    "view_009.jPeg": ("view_009.png", "another extension in odd case"),
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
    take(8).save(images / "view_008.Jpg", format="JPEG", quality=95)
    take(9).save(images / "view_009.jPeg", format="JPEG", quality=95)
    with Image.open(images / "view_010.png") as im:
        im.save(images / "view_010_copy.png", compress_level=9)  # the same picture under another name (other bytes)
    Image.new("RGB", (15, 15), "gray").save(images / "thumb.png")  # COLMAP's affine SIFT segfaulted on it
    (images / "notes.txt").write_text("not an image")
    _truncated_jpeg(images / "broken.jpg", images / "view_007.png")


@dataclass
class ZooRun:
    scene: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory) -> ZooRun:
    """12 views 320x240 re-encoded into every supported kind of photo, run through all stages (real SfM)."""
    scene = render_scene(tmp_path_factory.mktemp("zoo") / "zoo", shape="blob", n_views=12, width=320, height=240,
                         seed=0)
    _make_zoo(scene)
    res = recon("run", str(scene), "--set", "sfm.max_image_size=320", *FAST, timeout=600)
    return ZooRun(scene, res)


@pytest.mark.slow
def test_zoo_runs_through_and_names_what_it_skipped(zoo_run):
    lines = clean_success(zoo_run.result)
    assert len(lines) == 4, zoo_run.result.stderr
    images = zoo_run.scene / "images"
    assert "notes.txt" in lines[0] and "not JPEG/PNG" in lines[0]
    assert any(str(images / "broken.jpg") in line for line in lines[1:3])
    assert any(str(images / "thumb.png") in line and "15x15" in line for line in lines[1:3])
    assert str(images / "view_010_copy.png") in lines[3] and "same picture as view_010.png" in lines[3]
    summary = json.loads((zoo_run.scene / "recon" / "manifest.json").read_text())["stages"]["sfm"]["summary"]
    assert (summary["duplicate_of"] == {"view_010_copy.png": "view_010.png"}
            and summary["skipped"] == ["broken.jpg", "thumb.png"])
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
    from pipeline.core.poses import camera_center, umeyama

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


def _colmap_step_processes(parent: int | None = None) -> list[int]:
    """PIDs of running COLMAP step processes (``python -m pipeline.sfm.colmap_steps``), of ``parent`` only when
    given."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"pipeline.sfm.colmap_steps" not in (proc / "cmdline").read_bytes():
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent is None or ppid == parent:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_ctrl_c_during_matching_stops_at_once_and_the_run_resumes(tmp_path):
    """COLMAP matches in a child process: Ctrl-C does not wait for the matching block to end, and no COLMAP work is left
    running."""
    scene = tmp_path / "scene"
    shutil.copytree(REPO / "sample_scenes" / "blob" / "images", scene / "images")
    building = scene / "recon" / ".building" / "sfm"
    # Ctrl-C as at a terminal: a runner started in the background (`cmd &` in a script, nohup) hands its processes
    # an ignored SIGINT, which Python keeps ignored, so the run would not see this test's signal at all
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(scene), "--until", "sfm"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[int] = []  # the step processes in order: feature extraction, then matching
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(seen) < 2 and proc.poll() is None:
        seen += [pid for pid in _colmap_step_processes(proc.pid) if pid not in seen]
        time.sleep(0.02)
    assert len(seen) == 2, "matching never started"
    time.sleep(0.05)  # at once: matching the 12 small photos, mapping and the rest take under 2 s on a fast machine
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    # matching did not run to its end (the database is renamed when it does)
    assert not (building / "database.db").exists()
    assert _colmap_step_processes() == []
    assert clean_success(recon("run", str(scene), "--until", "sfm")) == []


@pytest.mark.slow
def test_names_with_spaces_and_non_ascii_reach_every_stage(zoo_run):
    out = zoo_run.scene / "recon"
    assert (out / "sfm" / "images" / "view 000 é.jpg").exists()
    assert (out / "depth" / "views" / "view 000 é.jpg.npz").exists()
    assert (out / "refine" / "views" / "view 000 é.jpg.npz").exists()


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 6000x4000 JPEG read with max_size=1000: right size, and peak memory far below the full decode (72 MB)."""
    big = tmp_path / "big.jpg"
    noise = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).resize((6000, 4000), Image.Resampling.BILINEAR).save(big, quality=85)
    probe = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from PIL import Image
        from pipeline.core.io import load_rgb
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
        from pipeline import graph as stages

        def boom(ctx):
            raise ZeroDivisionError("deep inside a library")

        stages.BY_NAME["depth"] = dataclasses.replace(stages.BY_NAME["depth"], run=boom)
        sys.argv = ["recon", *sys.argv[1:]]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", driver, "run", str(scene)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    log = scene / "recon" / "log.txt"
    line = one_line_error(res, "unexpected ZeroDivisionError", "deep inside a library", str(log))
    assert res.returncode == 2 and line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: deep inside a library" in text

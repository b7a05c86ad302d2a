"""Config: defaults, YAML files, presets, --set overrides and their errors."""

from pathlib import Path

import pytest

from pipeline.config import PRESETS, ReconConfig, config_to_yaml, describe_settings, load_config, valid_keys
from pipeline.core.errors import ConfigError
from pipeline.sfm.stage import Matcher


def test_defaults_are_the_tuned_values():
    # lr is not the research value 5e-5: that rate was for a network; the δz pyramid needs its own (README).
    cfg = ReconConfig()
    r = cfg.refine
    assert (r.samples_per_view, r.weight_mv, r.weight_edge, r.weight_surf, r.weight_mag, r.huber_delta,
            r.occlusion_tol) == (1024, 2.0, 0.02, 0.01, 0.005, 1e-2, 0.25)


def test_overrides_are_typed():
    cfg = load_config(overrides=["refine.lr=1e-3", "sfm.matcher=sequential", "sfm.max_image_size=800",
                                 "export.formats=glb,stl"])
    assert cfg.refine.lr == pytest.approx(1e-3) and isinstance(cfg.refine.lr, float)
    assert cfg.sfm.matcher is Matcher.sequential
    assert cfg.sfm.max_image_size == 800
    assert cfg.export.formats == ("glb", "stl")


def test_int_given_for_float_is_accepted():
    assert load_config(overrides=["refine.weight_mv=3"]).refine.weight_mv == 3.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("refine.lrr=1", "unknown setting 'refine.lrr'; valid keys for refine: lr,"),
        ("refine.lr=abc", "refine.lr: expected a number"),
        ("sfm.max_image_size=1.5", "sfm.max_image_size: expected an integer"),
        ("sfm.matcher=fancy", "not one of: exhaustive, sequential"),
        ("nosection=1", "must be written section.name"),
        ("foo.bar=1", "unknown section 'foo'"),
        ("refine.lr", "expected section.name=value"),
        ("sfm.use_existing_model=maybe", "expected true or false"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_then_override(tmp_path: Path):
    f = tmp_path / "recon.yaml"
    f.write_text("refine:\n  weight_edge: 0.5\n  lr: 1e-2\nfuse:\n  voxel_size: 0.01\n")
    cfg = load_config([f], overrides=["refine.weight_edge=0.25"])
    assert cfg.refine.weight_edge == 0.25
    assert cfg.refine.lr == pytest.approx(1e-2)
    assert cfg.fuse.voxel_size == 0.01


@pytest.mark.parametrize(
    "text, message",
    [
        ("refine:\n  weight_edgee: 1\n", "unknown setting 'refine.weight_edgee'"),
        ("refin:\n  lr: 1\n", "unknown section 'refin'"),
        ("refine: [1, 2]\n", "must be a mapping"),
        ("refine:\n  lr: [1\n", "invalid YAML"),
        ("- 1\n", "expected a mapping of sections"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path: Path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config([f])
    assert str(f) in str(info.value) and message in str(info.value)


def test_yaml_is_safe_loaded(tmp_path: Path):
    f = tmp_path / "evil.yaml"
    f.write_text("refine: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config([f])


def test_preset_mv_only_zeroes_regularizers():
    import dataclasses

    default = ReconConfig().refine
    r = load_config(presets=["mv-only"]).refine
    zeroed = ["weight_edge", "weight_surf", "weight_mag", "weight_anchor", "weight_photo"]
    assert [key.split(".", 1)[1] for key in PRESETS["mv-only"]] == zeroed
    assert all(getattr(default, name) > 0 for name in zeroed)  # the defaults use every loss ...
    assert all(getattr(r, name) == 0.0 for name in zeroed)  # ... the preset only L_mv
    assert r.weight_mv == default.weight_mv == 2.0
    assert dataclasses.replace(r, **{name: getattr(default, name) for name in zeroed}) == default  # nothing else


def test_effective_config_round_trips(tmp_path: Path):
    cfg = load_config(overrides=["refine.lr=0.01", "sfm.matcher=sequential"])
    f = tmp_path / "config.yaml"
    f.write_text(config_to_yaml(cfg))
    assert load_config([f]) == cfg


def test_every_setting_has_help():
    rows = describe_settings()
    assert [r.key for r in rows] == valid_keys()
    assert all(r.help.strip() and r.type for r in rows)
    assert [r.key for r in describe_settings("fuse")] == valid_keys("fuse")
    with pytest.raises(ConfigError, match="unknown section 'mesh'; sections: sfm, "):
        describe_settings("mesh")


def test_defaults_follow_their_own_rules():
    from pipeline.config import config_problems

    assert config_problems(ReconConfig()) == []


def test_every_number_declares_its_rule():
    import dataclasses
    import typing

    from pipeline.config import SECTIONS
    from pipeline.core.settings import field_check

    cfg = ReconConfig()
    missing = []
    for sec in SECTIONS:
        section = getattr(cfg, sec)
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            numeric = hints[f.name] in (int, float) or typing.get_args(hints[f.name])[:1] in ((int,), (float,))
            if numeric and field_check(f) is None:
                missing.append(f"{sec}.{f.name}")
    assert missing == []


@pytest.mark.parametrize("override, message", [
    ("refine.steps=-1", "refine.steps must be >= 0 (got -1)"),
    ("fuse.voxel_size=-1", "fuse.voxel_size must be > 0, or null for automatic (got -1.0)"),
    ("fuse.voxel_size=0",
     "fuse.voxel_size must be > 0, or null for automatic (got 0.0; 0 meant automatic before 2026-12)"),
    ("fuse.block_count=0",
     "fuse.block_count must be >= 1, or null for automatic (got 0; 0 meant automatic before 2026-12)"),
    ("refine.cpu_threads=0",
     "refine.cpu_threads must be >= 1, or null for automatic (got 0; 0 meant automatic before 2026-12)"),
    ("refine.weight_edge=.nan", "refine.weight_edge: expected a finite number"),
    ("fuse.min_confidence=nan", "fuse.min_confidence: expected a finite number"),
    ("fuse.min_confidence=1.5", "fuse.min_confidence must be >= 0 and <= 1 (got 1.5)"),
    ("refine.lr=inf", "refine.lr: expected a finite number"),
    ("mvs.ncc_window=4", "mvs.ncc_window must be odd and >= 3 (got 4)"),
    ("depth.reference_side=8", "depth.reference_side must be 0 (never scale) or >= 16 (got 8)"),
    ("depth.device=gpu", "depth.device must be auto, cpu, cuda or cuda:N (got gpu)"),
    ("refine.pyramid_strides=1,4,2", "refine.pyramid_strides must be increasing positive integers"),
    ("mvs.propagation_shifts=3,0", "mvs.propagation_shifts must be a list whose items are >= 1 (got 3,0)"),
    ("sfm.camera_model=FISHEYE9", "sfm.camera_model must be a COLMAP camera model"),
    ("sfm.num_threads=0", "sfm.num_threads must be -1 (all cores) or >= 1 (got 0)"),
    ("depth.estimator=torchscript", "depth.estimator=torchscript needs depth.torchscript_path"),
])
def test_bad_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["refine.steps=-1", "fuse.min_views=0"])
    assert "refine.steps" in str(info.value) and "fuse.min_views" in str(info.value)


def test_cuda_must_exist_where_the_run_happens(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError,
                       match="refine.device=cuda: torch sees no CUDA device on this machine; use auto or cpu"):
        load_config(overrides=["refine.device=cuda"])
    assert load_config(overrides=["refine.device=cuda"], on_this_machine=False).refine.device == "cuda"  # a Ray driver


def test_bad_value_in_a_yaml_file_names_the_setting(tmp_path: Path):
    f = tmp_path / "recon.yaml"
    f.write_text("fuse:\n  voxel_size: -0.01\n")
    with pytest.raises(ConfigError, match=r"fuse.voxel_size must be > 0, or null for automatic"):
        load_config([f])


def test_null_means_automatic(tmp_path: Path):
    assert (ReconConfig().fuse.voxel_size, ReconConfig().fuse.block_count) == (None, None)
    f = tmp_path / "recon.yaml"
    f.write_text("fuse:\n  voxel_size: 0.01\n  sdf_trunc: 0.05\n  depth_max: ~\n")
    cfg = load_config([f], overrides=["fuse.voxel_size=null", "fuse.block_count=1000"])
    fuse = cfg.fuse
    assert (fuse.voxel_size, fuse.sdf_trunc, fuse.depth_max, fuse.block_count) == (None, 0.05, None, 1000)
    assert "voxel_size: null" in config_to_yaml(cfg)
    g = tmp_path / "effective.yaml"
    g.write_text(config_to_yaml(cfg))
    assert load_config([g]) == cfg


def test_refine_cpu_threads_null_is_torchs_default():
    from pipeline.graph import stage_fingerprint

    assert ReconConfig().refine.cpu_threads == 1  # one thread by default: docs/help-history.md
    assert load_config(overrides=["refine.cpu_threads=null"]).refine.cpu_threads is None
    assert load_config(overrides=["refine.cpu_threads=2"]).refine.cpu_threads == 2
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["refine.cpu_threads=0"])
    assert str(info.value) == ("refine.cpu_threads must be >= 1, or null for automatic "
                               "(got 0; 0 meant automatic before 2026-12)")
    # Threads change how refine runs, not what it writes: its cache stays valid.
    fingerprints = {stage_fingerprint("refine", load_config(overrides=[f"refine.cpu_threads={n}"]), {"depth": "x"})
                    for n in ("null", "1", "2")}
    assert len(fingerprints) == 1


def test_an_old_zero_for_automatic_fails_in_one_line(tmp_path: Path):
    f = tmp_path / "recon.yaml"
    f.write_text("fuse:\n  sdf_trunc: 0\n  depth_max: 0.0\n")
    with pytest.raises(ConfigError) as info:
        load_config([f])
    message = str(info.value)
    assert "fuse.sdf_trunc must be > 0, or null for automatic (got 0.0; 0 meant automatic before 2026-12)" in message
    assert "fuse.depth_max must be > 0" in message and "\n" not in message


def test_loading_the_config_imports_no_heavy_library():
    """A bad --set must fail in well under a second: the config never imports torch, open3d or pycolmap."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from pipeline.config import load_config; load_config(overrides=['fuse.voxel_size=0.01']); "
            "print(sorted({'torch', 'open3d', 'pycolmap'} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_classic_camera_models_are_colmap_models():
    from pipeline.sfm.config import CLASSIC_CAMERA_MODELS, colmap_camera_models

    assert CLASSIC_CAMERA_MODELS <= set(colmap_camera_models())


def test_stage_packages_expose_config_run_and_core_function():
    """Each stage package's ``__init__`` gives its Config, ``run`` and its core function; unknown names fail."""
    import importlib

    expected = {"sfm": "map_once", "depth": "compute_depth_maps", "refine": "refine_depth_maps",
                "fuse": "fuse_depth_maps", "export": "export_mesh_files"}
    for name, core in expected.items():
        package = importlib.import_module(f"pipeline.{name}")
        assert callable(package.run) and callable(getattr(package, core))
        extra = {"MvsConfig"} if name == "depth" else set()
        assert set(package.__all__) == {f"{name.capitalize()}Config", "run", core} | extra
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope
# ---- the mvs section (plane-sweep settings, formerly in depth) --------------------------------------

RENAMED_LINE = ("setting depth.refine_hypotheses is now mvs.fine_hypotheses (renamed 2026-12); "
                "update your recon.yaml or --set")


def test_an_old_key_by_set_names_the_new_one():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["depth.refine_hypotheses=4"])
    assert str(info.value) == RENAMED_LINE


def test_an_old_key_in_yaml_names_the_new_one(tmp_path: Path):
    f = tmp_path / "recon.yaml"
    f.write_text("depth:\n  refine_hypotheses: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config([f])
    assert str(info.value) == f"{f}: {RENAMED_LINE}"


def test_every_old_key_names_a_new_key_that_exists():
    from pipeline.config import RENAMED

    mvs_moves = {old: new for old, new in RENAMED.items() if new.startswith("mvs.")}
    assert len(mvs_moves) == 34 and set(mvs_moves.values()) == set(valid_keys("mvs"))
    assert RENAMED["export.decimate"] == "export.target_faces"
    for old, new in RENAMED.items():
        assert new in valid_keys()
        assert old not in valid_keys()
        with pytest.raises(ConfigError, match=f"setting {old} is now {new} "):
            load_config(overrides=[f"{old}=1"])


def test_the_mvs_section_follows_depth():
    keys = valid_keys()
    assert {"mvs.num_hypotheses", "mvs.fine_hypotheses", "mvs.fine_radius", "mvs.rescale_tolerance",
            "mvs.chunk_pixels"} <= set(keys)
    sections = list(dict.fromkeys(k.split(".")[0] for k in keys))
    assert sections[sections.index("depth") + 1] == "mvs"
    assert load_config(overrides=["mvs.num_hypotheses=64"]).mvs.num_hypotheses == 64


def test_the_depth_fingerprint_covers_the_mvs_section():
    from pipeline.graph import stage_fingerprint

    base = stage_fingerprint("depth", ReconConfig(), {"sfm": "x"})
    changed = stage_fingerprint("depth", load_config(overrides=["mvs.num_hypotheses=64"]), {"sfm": "x"})
    memory_only = stage_fingerprint("depth", load_config(overrides=["mvs.chunk_pixels=1024"]), {"sfm": "x"})
    assert changed != base and memory_only == base


@pytest.mark.parametrize("name", ["sfm", "refine", "fuse", "export"])
def test_a_one_section_stage_hashes_its_section_as_before(name):
    from pipeline.core.settings import fingerprint_fields
    from pipeline.graph import BY_NAME, stage_settings

    cfg = ReconConfig()
    assert BY_NAME[name].sections == (name,)
    assert stage_settings(cfg, name) == fingerprint_fields(getattr(cfg, name))

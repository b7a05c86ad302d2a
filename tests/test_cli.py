"""CLI: help, exit codes, one-line errors, settings reaching the stages."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import cli
from pipeline import graph as stages
from pipeline.config import SECTIONS


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("cmd", [[], ["run"], ["stage"], ["status"], ["config"], ["synth"]])
def test_help(runner, cmd):
    result = runner.invoke(cli.main, cmd + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_missing_scene_is_one_line_error(runner, tmp_path):
    result = runner.invoke(cli.main, ["run", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "scene folder not found" in result.output
    assert "Traceback" not in result.output


def test_bad_setting_lists_valid_keys(runner, tmp_path):
    (tmp_path / "images").mkdir()
    result = runner.invoke(cli.main, ["run", str(tmp_path), "--set", "refine.wieght_mv=1"])
    assert result.exit_code == 1
    assert "valid keys for refine" in result.output and "weight_mv" in result.output


def test_bad_stage_name(runner, tmp_path):
    result = runner.invoke(cli.main, ["stage", "mesh", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_config_lists_settings(runner):
    result = runner.invoke(cli.main, ["config"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("[")] == [f"[{sec}]" for sec in SECTIONS]
    assert "  weight_mv: float = 2.0  (must be >= 0)" in lines
    assert "  voxel_size: float or null = null  (must be > 0, or null for automatic)" in lines
    assert "  matcher: exhaustive|sequential = exhaustive" in lines
    assert "  pyramid_strides: list of int = 1,2,4,8,16,32  (must be increasing positive integers, e.g. 1,2,4,8)" \
        in lines
    help_line = lines[lines.index("  weight_mv: float = 2.0  (must be >= 0)") + 1]
    assert help_line == "      Weight of the multiview reprojection loss L_mv."


def test_config_of_one_section(runner):
    result = runner.invoke(cli.main, ["config", "fuse"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("[")] == ["[fuse]"]
    assert result.output.startswith("[fuse]\n")
    assert "  block_count: int or null = null  (must be >= 1, or null for automatic)" in result.output
    assert "weight_mv" not in result.output


def test_config_of_an_unknown_section_is_one_line(runner):
    result = runner.invoke(cli.main, ["config", "mesh"])
    assert result.exit_code == 1
    assert result.output == f"error: unknown section 'mesh'; sections: {', '.join(SECTIONS)}\n"


def test_settings_reach_the_stage(runner, tmp_path, monkeypatch):
    seen = {}

    def fake(name):
        def run(ctx):
            seen[name] = ctx.settings
            if name == "sfm":
                (ctx.stage_dir / "model").mkdir()
            if name == "fuse":
                (ctx.stage_dir / "mesh.ply").write_text("ply")
            if name == "export":
                (ctx.stage_dir / "mesh.glb").write_text("glb")
        return run

    for name, spec in list(stages.BY_NAME.items()):
        monkeypatch.setitem(stages.BY_NAME, name, dataclasses.replace(spec, run=fake(name)))
    (tmp_path / "images").mkdir()
    (tmp_path / "recon.yaml").write_text("refine:\n  weight_surf: 0.5\n")
    result = runner.invoke(cli.main, ["stage", "refine", str(tmp_path), "--no-progress", "--set",
                                      "refine.weight_edge=0", "--preset", "mv-only"])
    assert result.exit_code == 0, result.output
    assert seen["refine"].weight_edge == 0 and seen["refine"].weight_mag == 0
    assert seen["refine"].weight_surf == 0  # the preset overrides the scene's recon.yaml; --set overrides both
    assert "fuse" not in seen
    result = runner.invoke(cli.main, ["status", str(tmp_path), "--set", "refine.weight_edge=0", "--preset", "mv-only"])
    assert "sfm     done" in result.output and "fuse    missing" in result.output


def test_unexpected_error_is_one_line_with_log(runner, tmp_path, monkeypatch):
    def boom(ctx):
        raise ZeroDivisionError("deep inside a library")

    monkeypatch.setitem(stages.BY_NAME, "sfm", dataclasses.replace(stages.BY_NAME["sfm"], run=boom))
    (tmp_path / "images").mkdir()
    result = runner.invoke(cli.main, ["run", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: unexpected ZeroDivisionError") and "log.txt" in last
    assert "Traceback" in (tmp_path / "recon" / "log.txt").read_text()


def test_a_signal_inside_a_library_import_still_reads_as_the_signal(capsys, tmp_path):
    """SIGTERM landing inside ``import open3d`` comes out as ``ImportError: initialization failed`` caused by it: the
    command still ends as terminated (exit 143, one line, resumable), and a Ctrl-C in a library's error handling as
    interrupted (130)."""
    from pipeline.core import console

    def raised(exc: BaseException, inner: BaseException, chain: str) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as cause:
                if chain == "cause":
                    raise exc from cause
                raise exc  # noqa: B904 - the context, as a library's handler would leave it
        except BaseException as outer:  # noqa: BLE001
            return outer

    cases = [(raised(ImportError("initialization failed"), console.Terminated(), "cause"), 143, "terminated (SIGTERM)"),
             (raised(RuntimeError("native failure"), KeyboardInterrupt(), "context"), 130, "interrupted")]
    for exc, code, what in cases:
        with pytest.raises(SystemExit) as stop:
            console._fail(exc, tmp_path / "log.txt")
        assert stop.value.code == code
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {what}; finished work is kept, run the same command again to resume"]
    with pytest.raises(SystemExit) as stop:  # an unrelated error stays an unexpected one
        console._fail(raised(ImportError("initialization failed"), ValueError("x"), "cause"), None)
    assert stop.value.code == 2 and "unexpected ImportError" in capsys.readouterr().err

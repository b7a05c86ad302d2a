"""``recon`` command line: parse, call the workflow, report. No logic lives here."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made the
# depth stage 5-8x slower (bench/bench_depth.py). Set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from pipeline.config import PRESETS, ReconConfig, describe_settings, load_config
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.console import _fail, _setup_logging, _stop_on_sigterm
from pipeline.core.errors import ReconError
from pipeline.core.native_output import native_output_to
from pipeline.core.output_folder import FORCE_FLAG, adopt_output_dir
from pipeline.core.workspace import Workspace
from pipeline.export.config import DecimationMethod, ExportConfig, TextureFormat
from pipeline.graph import STAGE_NAMES
from workflows.summary import EarlyReport, _print_summary, _write_report

# Freed tensors are reused instead of being mapped and zeroed afresh (a fifth of a refine step); before any thread.
keep_freed_memory()

STAGE_CHOICE = click.Choice(STAGE_NAMES)


def _workspace(scene_dir: str, out: str | None) -> Workspace:
    """The scene's workspace (nothing is created)."""
    ws = Workspace.create(scene_dir, out)
    if not ws.scene_dir.is_dir():
        raise ReconError(f"{ws.scene_dir}: scene folder not found; pass a folder that holds images/")
    return ws


@dataclass(frozen=True)
class SceneArgs:
    """The options :func:`config_options` gathers: the scene, its output folder, the settings, the console."""

    scene_dir: str
    out: str | None
    config_file: tuple[str, ...]
    presets: tuple[str, ...]
    overrides: tuple[str, ...]
    verbose: bool
    no_progress: bool

    @property
    def show_progress(self) -> bool:
        """Progress bars only on a terminal: redirected stderr stays free of bar redraws."""
        return _show_progress(self.no_progress)


def _with_scene(args: SceneArgs, body: Callable[[Workspace, ReconConfig], None], *, writes: bool = True,
                force_out: bool = False) -> None:
    """What every command on a scene does around ``body(ws, cfg)``: workspace, settings, logging, one-line failures.

    The settings are checked before anything is written. A command that ``writes`` a run then
    adopts the output folder (:func:`pipeline.core.output_folder.adopt_output_dir`, ``force_out``),
    opens the log file and sends native output to it; Ctrl-C and SIGTERM end it as one line too.
    One that only reads (``status``) writes nothing and leaves Ctrl-C to click.
    """
    log_file = None
    try:
        ws = _workspace(args.scene_dir, args.out)
        _setup_logging(args.verbose)
        cfg = _config(ws, args.config_file, args.overrides, args.presets)
        if not writes:
            body(ws, cfg)
            return
        _stop_on_sigterm()
        adopt_output_dir(ws, force=force_out)
        log_file = ws.log_path
        with native_output_to(log_file):
            _setup_logging(args.verbose, log_file)
            body(ws, cfg)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
        if isinstance(exc, KeyboardInterrupt) and not writes:
            raise
        _fail(exc, log_file)


def _show_progress(no_progress: bool) -> bool:
    """Progress bars only on a terminal: redirected stderr stays free of bar redraws."""
    return not no_progress and sys.stderr.isatty()


def _config(ws: Workspace, config_file: tuple[str, ...], overrides: tuple[str, ...], presets: tuple[str, ...]):
    files = [ws.scene_config_path] if ws.scene_config_path.is_file() else []
    files += [Path(p) for p in config_file]
    return load_config(files, overrides, presets)


_SCENE_ARGS = tuple(f.name for f in dataclasses.fields(SceneArgs))


def config_options(fn):
    """The options of a command on SCENE_DIR (--out, --config, --preset, --set, -v, --no-progress) as one ``SceneArgs``.

    ``fn``'s first parameter is that ``args``; the command's ``scene_dir`` argument goes into it too.
    """

    command = fn

    @functools.wraps(command)
    def gathered(**kwargs):
        args = SceneArgs(**{name: kwargs.pop(name) for name in _SCENE_ARGS})
        return command(args, **kwargs)

    fn = gathered
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override one setting (repeatable); `recon config` lists them.")(fn)
    fn = click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
                      help="Named bundle of settings, e.g. mv-only (refine with L_mv alone).")(fn)
    fn = click.option("--config", "config_file", multiple=True, type=click.Path(dir_okay=False),
                      help="YAML config file (SCENE_DIR/recon.yaml is read first when present).")(fn)
    fn = click.option("--out", type=click.Path(file_okay=False), default=None,
                      help="Output folder [default: SCENE_DIR/recon].")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Debug logging on the console.")(fn)
    fn = click.option("--no-progress", is_flag=True, help="Hide progress bars.")(fn)
    return fn


def force_out_option(fn):
    return click.option(FORCE_FLAG, "force_out", is_flag=True,
                        help="Write into --out even if it holds files recon did not write "
                             "(recon replaces only its own).")(fn)


class _OneLineErrors(click.Group):
    """The ``recon`` group: a wrong command line (unknown option, bad value) is one ``error:`` line too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "recon"
            click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        sys.exit(0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recon")
def main() -> None:
    """recon: photos → accurate, clean, coloured mesh.

    Stages: sfm → depth → refine → fuse → export, each cached in the output
    folder so a run resumes where it stopped.
    """


@main.command()
@click.argument("scene_dir", type=click.Path())
@config_options
@force_out_option
@click.option("--force", multiple=True, type=STAGE_CHOICE, help="Re-run this stage even if cached (repeatable).")
@click.option("--from", "start_from", type=STAGE_CHOICE, help="Re-run this stage and every stage after it.")
@click.option("--until", type=STAGE_CHOICE, help="Stop after this stage.")
@click.option("--skip", multiple=True, type=STAGE_CHOICE,
              help="Leave out a skippable stage (refine: fuse the initial depth maps).")
@click.option("--strict", is_flag=True,
              help="Exit non-zero when a photo is left out (not registered, unreadable, a duplicate).")
def run(args: SceneArgs, force_out, force, start_from, until, skip, strict) -> None:
    """Run every stage on SCENE_DIR that is not already cached and up to date."""

    def body(ws: Workspace, cfg: ReconConfig) -> None:
        from workflows.local import run_pipeline

        early: list[EarlyReport] = []  # the report's work, done while the export runs

        def before_stage(name: str) -> None:
            if name == "export":
                early.append(EarlyReport(ws))

        try:
            result = run_pipeline(ws, cfg, until=until, start_from=start_from, force=tuple(force),
                                  skip=tuple(skip), show_progress=args.show_progress, before_stage=before_stage)
        except BaseException:
            for report in early:
                report.cancel()
            raise
        if any(st.status == "ran" for st in result.stages) or not ws.report_path.exists():
            _write_report(ws, early[0] if early else None)
        _print_summary(result, strict=strict)

    _with_scene(args, body, force_out=force_out)


@main.command()
@click.argument("name", type=STAGE_CHOICE)
@click.argument("scene_dir", type=click.Path())
@config_options
@force_out_option
@click.option("--no-upstream", is_flag=True, help="Fail instead of computing missing upstream stages.")
@click.option("--skip", multiple=True, type=STAGE_CHOICE, help="Leave out a skippable upstream stage.")
def stage(args: SceneArgs, name, force_out, no_upstream, skip) -> None:
    """Run stage NAME on SCENE_DIR (computing missing upstream stages first)."""

    def body(ws: Workspace, cfg: ReconConfig) -> None:
        from workflows.local import run_pipeline

        result = run_pipeline(ws, cfg, until=name, force=(name,), skip=tuple(skip), require_upstream=no_upstream,
                              show_progress=args.show_progress)
        _print_summary(result)

    _with_scene(args, body, force_out=force_out)


@main.command()
@click.argument("scene_dir", type=click.Path())
@config_options
@click.option("--skip", multiple=True, type=STAGE_CHOICE, help="As given to `recon run`.")
def status(args: SceneArgs, skip) -> None:
    """Show each stage as done / stale / missing, and why."""
    from workflows.local import pipeline_status

    def body(ws: Workspace, cfg: ReconConfig) -> None:
        for st in pipeline_status(ws, cfg, tuple(skip)):
            click.echo(f"{st.name:<7} {st.state:<8} {st.why}")

    _with_scene(args, body, writes=False)


@main.command("config")
@click.argument("section", required=False)
def config_cmd(section: str | None) -> None:
    """List every setting (or those of SECTION) with its type, default, rule and meaning."""
    from pipeline.core.settings import shown_value

    try:
        rows = describe_settings(section)
    except ReconError as exc:
        _fail(exc, None)
    current = None
    for row in rows:
        if row.section != current:
            click.echo(("\n" if current is not None else "") + f"[{row.section}]")
            current = row.section
        rule = f"  (must be {row.rule})" if row.rule else ""
        click.echo(f"  {row.name}: {row.type} = {shown_value(row.default)}{rule}\n      {row.help}")


@main.command()
@click.argument("shape")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--object-mesh", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Render this OBJ/PLY as the object instead.")
@click.option("--views", "n_views", default=12, show_default=True, help="Number of views.")
@click.option("--width", default=320, show_default=True)
@click.option("--height", default=240, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--scale", default=1.0, show_default=True, help="Scale of the whole scene (world units).")
@click.option("--rings", default=2, show_default=True, help="Camera rings (elevations).")
@click.option("--compress-depth", is_flag=True, help="Store GT depth as compressed .npz (smaller scenes).")
def synth(shape, out_dir, object_mesh, n_views, width, height, seed, scale, rings, compress_depth) -> None:
    """Render scene SHAPE (blob, thin, knot) with ground truth (images/ + gt/) into OUT_DIR."""
    try:
        _setup_logging(False)
        from pipeline.synthetic.render import render_scene
        from pipeline.synthetic.shapes import SHAPES

        if object_mesh is None and shape not in SHAPES:
            raise ReconError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
        path = render_scene(Path(out_dir), shape=shape, n_views=n_views, width=width, height=height, seed=seed,
                            object_mesh=Path(object_mesh) if object_mesh else None, scale=scale, rings=rings,
                            compress_depth=compress_depth)
        click.echo(f"wrote {path}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, None)


@main.command("export")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "formats", multiple=True, type=click.Choice(["ply", "obj", "glb", "stl"]), default=("glb",),
              show_default=True, help="Mesh format (repeatable).")
@click.option("--target-faces", type=click.IntRange(min=1), default=ExportConfig().target_faces, show_default=True,
              help="Decimate to this many triangles.")
@click.option("--target-ratio", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Decimate to this fraction of the triangles (with --target-faces the smaller count wins).")
@click.option("--full", is_flag=True, help="Keep every triangle of OUT/mesh.ply (no decimation).")
@click.option("--decimation", type=click.Choice([m.value for m in DecimationMethod]), default="fast",
              show_default=True, help="Decimation library.")
@click.option("--textured/--no-textured", default=True, show_default=True,
              help="Bake a texture from the photos into GLB and OBJ (else per-vertex colours).")
@click.option("--texture-size", type=click.IntRange(256, 16384), default=None,
              help="Texture side in texels, a multiple of 64 [default: from the photos' resolution].")
@click.option("--texture-format", type=click.Choice([f.value for f in TextureFormat]), default="png",
              show_default=True, help="Texture image format.")
@click.option("--frame", type=click.Choice(["normalized", "sfm"]), default="normalized", show_default=True,
              help="normalized: frame of OUT/mesh.ply and OUT/sparse; sfm: the original SfM frame.")
@click.option("--dest", type=click.Path(file_okay=False), default=None, help="Output folder [default: OUT/exports].")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--decimate", type=int, default=None, hidden=True)
def export_cmd(out_dir, formats, target_faces, target_ratio, full, decimation, textured, texture_size,
               texture_format, frame, dest, no_progress, decimate) -> None:
    """Export OUT/mesh.ply as GLB/OBJ (textured) or PLY/STL, decimated, optionally in the SfM frame, with cameras."""
    try:
        _setup_logging(False)
        if decimate is not None:
            raise ReconError("--decimate is now --target-faces (and --full keeps every triangle)")
        if texture_size is not None and texture_size % 64:
            raise ReconError(f"--texture-size {texture_size}: expected a multiple of 64, "
                             f"e.g. {texture_size // 64 * 64}")
        from tqdm import tqdm

        from pipeline.export.stage import ExportOptions, export_outputs

        overrides = {"target_faces": None if full else target_faces, "target_ratio": None if full else target_ratio,
                     "decimation": decimation, "textured": textured, "texture_size": texture_size,
                     "texture_format": texture_format, "frame": frame}
        cfg = load_config(overrides=[f"export.{k}={'null' if v is None else str(v).lower()}"
                                     for k, v in overrides.items()])
        show = _show_progress(no_progress)
        result = export_outputs(
            Path(out_dir), ExportOptions.from_config(cfg.export, formats=formats), dest=Path(dest) if dest else None,
            progress=lambda it, desc, total: tqdm(it, desc=f"export: {desc}", total=total, unit="view",
                                                  disable=not show, leave=False, dynamic_ncols=True))
        for p in [*result.files.values(), *result.extra_files, *([result.cameras] if result.cameras else [])]:
            click.echo(f"wrote {p}")
        if result.textured:
            click.echo(f"texture {result.texture_size[0]}x{result.texture_size[1]}, {result.faces} faces")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, None)


@main.command("eval")
@click.argument("out", type=click.Path(exists=True))
@click.option("--gt", required=True, type=click.Path(exists=True),
              help="Ground truth: a scene's gt/ folder, the scene folder, or a mesh file.")
@click.option("--threshold", "thresholds", multiple=True, type=float,
              help="F-score threshold as a fraction of the GT object diagonal (repeatable) [default: 0.005 and 0.01].")
@click.option("--threshold-abs", type=float, default=None, help="Also score at this absolute distance (GT units).")
@click.option("--no-align", is_flag=True, help="The mesh is already in the ground-truth frame.")
@click.option("--icp", is_flag=True, help="Refine the camera alignment with point-to-plane ICP.")
@click.option("--cameras", type=click.Path(exists=True, file_okay=False), default=None,
              help="COLMAP model of the mesh's cameras (default: OUT/sparse, or sparse/ beside a mesh file).")
@click.option("--margin", type=float, default=0.05, show_default=True,
              help="Crop box growth per side, as a fraction of the GT object diagonal.")
def eval_cmd(out, gt, thresholds, threshold_abs, no_align, icp, cameras, margin) -> None:
    """Score OUT (a recon output folder or a mesh) against ground truth; writes OUT/eval.json."""
    try:
        _setup_logging(False)
        from pipeline.analysis.evaluate import evaluate_reconstruction, format_summary
        from pipeline.analysis.metrics import DEFAULT_THRESHOLDS_REL

        result = evaluate_reconstruction(Path(out), Path(gt), thresholds_rel=thresholds or DEFAULT_THRESHOLDS_REL,
                                         threshold_abs=threshold_abs, align=not no_align, icp=icp,
                                         cameras=Path(cameras) if cameras else None, margin=margin)
        click.echo(format_summary(result))
        out_path = Path(out)
        if out_path.is_dir() and (out_path / "report.html").exists():
            from pipeline.analysis.report import build_report

            build_report(Workspace.create(out_path.resolve().parent, out_path))
    except Exception as exc:  # noqa: BLE001
        _fail(exc, None)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--scene", type=click.Path(exists=True, file_okay=False), default=None,
              help="Scene folder [default: the parent of OUT].")
def diagnose(out, scene) -> None:
    """Check a run: depth statistics, camera convention, over-smoothing, anchoring."""
    try:
        _setup_logging(False)
        from pipeline.analysis.diagnose import diagnose as run_diagnose
        from pipeline.analysis.diagnose import worst_verdict

        out_path = Path(out).resolve()
        ws = Workspace.create(scene or out_path.parent, out_path)
        report = run_diagnose(ws)
        for name, row in report["views"].items():
            cells = "  ".join(f"{k} mean {v['mean']:.4g} std {v['std']:.3g} min {v['min']:.4g} max {v['max']:.4g}"
                              for k, v in row.items())
            click.echo(f"{name}: {cells}")
        for c in report["checks"]:
            click.echo(f"[{c['verdict'].upper():4}] {c['name']}: {c['detail']}")
        if worst_verdict(report) == "fail":
            sys.exit(1)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, None)


@main.command()
@click.argument("scene_dir", type=click.Path())
@config_options
@force_out_option
@click.option("--variant", "variants", multiple=True,
              help="NAME (built in: default, mv-only, no-refine) or NAME='--set section.key=value ...' (repeatable).")
@click.option("--gt", type=click.Path(exists=True), default=None,
              help="Ground truth to score each variant against (default: SCENE_DIR/gt when present).")
def ablate(args: SceneArgs, force_out, variants, gt) -> None:
    """Run refine/fuse variants over shared sfm and depth caches and print one table."""

    def body(ws: Workspace, cfg: ReconConfig) -> None:
        from workflows.ablate import format_table, parse_variant, run_ablation

        chosen = [parse_variant(v) for v in (variants or ("default", "mv-only", "no-refine"))]
        gt_path = Path(gt) if gt else (ws.scene_dir / "gt" if (ws.scene_dir / "gt").is_dir() else None)
        results = run_ablation(ws, cfg, chosen, gt=gt_path, show_progress=args.show_progress)
        click.echo(format_table(results))

    _with_scene(args, body, force_out=force_out)


@main.command()
@click.argument("scene_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--address", default=None,
              help="Ray cluster to join: HOST:PORT of its head (as `ray start --head` prints it) or 'auto' "
                   "[default: start Ray on this machine, loopback only].")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Most scenes processed at once [default: the cluster's CPU count].")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for the batch table: recon_batch.csv and recon_batch.json.")
@click.option("--out", "out_root", type=click.Path(file_okay=False), default=None,
              help="Output root: each scene's output goes to OUT/<scene folder name> [default: SCENE_DIR/recon].")
@click.option("--views-per-task", type=click.IntRange(min=0), default=8, show_default=True,
              help="Views per Ray task of the depth stage (0: the stage runs in one task).")
@click.option("--cpus-per-task", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs each Ray task asks for (also its OMP_NUM_THREADS).")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="GPUs a depth/refine/fuse task asks for when the cluster has GPUs (a fraction shares one).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the Ray started on this machine (without --address) [default: all].")
@click.option("--skip", multiple=True, type=STAGE_CHOICE,
              help="Leave out a skippable stage in every scene (refine: fuse the initial depth maps).")
@force_out_option
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one setting for every scene (repeatable); `recon config` lists them.")
@click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
              help="Named bundle of settings, e.g. mv-only.")
@click.option("--config", "config_file", multiple=True, type=click.Path(dir_okay=False),
              help="YAML config file (each SCENE_DIR/recon.yaml is read first when present).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on the console.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def batch(scene_dirs, address, parallel, report_dir, out_root, views_per_task, cpus_per_task, gpus_per_task, num_cpus,
          skip, force_out, overrides, presets, config_file, verbose, no_progress) -> None:
    """Run the pipeline on every SCENE_DIR as Ray tasks (this machine, or a cluster with --address) and print one table.

    Caches are those of `recon run`: a second batch, or `recon run` on one of
    the scenes, reuses them. A failing scene is a 'failed' row; the others go on.
    """
    from tqdm import tqdm

    from workflows.batch import REPORT_NAME, format_table, make_jobs, run_batch, write_reports

    report = Path(report_dir)
    log_file = report / f"{REPORT_NAME}.log"
    try:
        _setup_logging(verbose, log_file)
        # A bad --set fails here, once, not in every scene; devices are checked where the tasks run.
        load_config(list(config_file), overrides, presets, on_this_machine=False)
        _stop_on_sigterm()
        jobs = make_jobs(scene_dirs, out_root=out_root, config_files=config_file, overrides=overrides, presets=presets,
                         skip=skip, force_out=force_out)
        with tqdm(total=len(jobs), desc="batch: scenes", unit="scene", disable=no_progress, leave=False,
                  dynamic_ncols=True) as bar:
            def done(row) -> None:
                bar.set_postfix_str(f"{row.scene} {row.status}")
                bar.update(1)

            result = run_batch(jobs, address=address, parallel=parallel, num_cpus=num_cpus, cpus_per_task=cpus_per_task,
                               gpus_per_task=gpus_per_task, views_per_task=views_per_task, on_scene_done=done)
        click.echo(format_table(result.rows))
        csv_path, json_path = write_reports(result.rows, report, result.info)
        click.echo(f"wrote {csv_path}\nwrote {json_path}")
        if result.failed:
            names = ", ".join(r.scene for r in result.failed)
            raise ReconError(f"{len(result.failed)} of {len(result.rows)} scene(s) failed ({names}); "
                             f"see the table above or {csv_path}")
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
        _fail(exc, log_file)


if __name__ == "__main__":
    main(prog_name="recon")

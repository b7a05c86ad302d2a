"""The effective configuration: defaults ← config files ← presets ← ``--set`` overrides.

YAML layout mirrors :class:`ReconConfig`::

    refine:
      weight_edge: 0.0
    fuse:
      voxel_size: 0.005

``--set refine.weight_edge=0`` overrides one value (parsed as YAML, then
checked against the declared type). Unknown keys and wrong types raise a
one-line :class:`~pipeline.core.errors.ConfigError` that lists the valid keys;
once everything is applied, every setting's rule (range, choices, finite
numbers, a CUDA device that exists) is checked, so a bad value fails before
any stage runs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.settings import (
    coerce,
    field_check,
    field_help,
    resolved_hints,
    section_problems,
    to_plain,
    type_name,
)
from pipeline.depth.config import DepthConfig, MvsConfig
from pipeline.export.config import ExportConfig
from pipeline.fuse.config import FuseConfig
from pipeline.refine.config import RefineConfig
from pipeline.sfm.config import SfmConfig


@dataclass(kw_only=True)
class ReconConfig:
    """All settings, one section per stage (``mvs``: the depth stage's plane sweep)."""

    sfm: SfmConfig = field(default_factory=SfmConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    mvs: MvsConfig = field(default_factory=MvsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ReconConfig))

_MVS_MOVED = (
    "num_neighbors", "neighbor_angle_deg", "max_neighbor_angle_deg", "num_hypotheses", "pyramid_levels", "edge_radius",
    "propagation_shifts", "polish_hypotheses", "polish_iterations", "smooth_radius", "offset_penalty", "ncc_window",
    "best_k", "cost_truncation", "min_ncc", "range_percentile", "range_margin", "plane_candidates", "plane_max_gap",
    "plane_distance", "plane_min_inliers", "cross_view_candidates", "geometric_filter", "geo_neighbors",
    "geo_min_consistent", "geo_max_reproj_px", "geo_max_rel_depth", "geo_free_space_margin",
    "geo_unverified_min_confidence", "geo_average", "chunk_pixels",
)
RENAMED: dict[str, str] = {
    **{f"depth.{name}": f"mvs.{name}" for name in _MVS_MOVED},
    "depth.refine_hypotheses": "mvs.fine_hypotheses",
    "depth.refine_radius": "mvs.fine_radius",
    "depth.mvs_rescale_tolerance": "mvs.rescale_tolerance",
    "export.decimate": "export.target_faces",
}
"""Old key → new key of the settings that moved or were renamed (2026-12: the plane-sweep settings left ``depth``
for their own section ``mvs``; ``export.decimate``, where 0 kept every triangle, became ``export.target_faces``,
where null does); :func:`set_value` names the new key when given an old one."""

PRESETS: dict[str, dict[str, Any]] = {
    "mv-only": {"refine.weight_edge": 0.0, "refine.weight_surf": 0.0, "refine.weight_mag": 0.0,
                "refine.weight_anchor": 0.0, "refine.weight_photo": 0.0},
}
"""Named bundles of overrides (``--preset NAME``). ``mv-only``: refinement with L_mv alone (the ablation)."""


def valid_keys(section: str | None = None) -> list[str]:
    """``section.key`` names of every setting (or of one section)."""
    cfg = ReconConfig()
    out = []
    for sec in SECTIONS if section is None else (section,):
        out += [f"{sec}.{f.name}" for f in dataclasses.fields(getattr(cfg, sec))]
    return out


@dataclass(frozen=True)
class SettingInfo:
    """One setting as ``recon config`` shows it."""

    section: str
    name: str
    type: str
    """As :func:`pipeline.core.settings.type_name` writes it, e.g. ``float or null``."""
    default: Any
    """JSON-able (enums as their value, tuples as lists, None for automatic)."""
    rule: str
    """The value "must be <rule>"; "" when any value of the type goes."""
    help: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def describe_settings(section: str | None = None) -> list[SettingInfo]:
    """Every setting (or those of one section), in declaration order, for ``recon config``.

    Raises:
        ConfigError: ``section`` is not a section (one line listing them).
    """
    if section is not None and section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    cfg = ReconConfig()
    rows = []
    for sec in SECTIONS if section is None else (section,):
        values = getattr(cfg, sec)
        hints = resolved_hints(type(values))
        for f in dataclasses.fields(values):
            check = field_check(f)
            rows.append(SettingInfo(section=sec, name=f.name, type=type_name(hints[f.name]),
                                    default=to_plain(getattr(values, f.name)), rule=check.rule if check else "",
                                    help=field_help(f)))
    return rows


def config_problems(cfg: ReconConfig, *, on_this_machine: bool = True) -> list[str]:
    """Every setting that breaks its rule, one line each (see :func:`pipeline.core.settings.section_problems`).

    Args:
        on_this_machine: also check what depends on this machine (a CUDA device asked for must exist).
    """
    problems = []
    for sec in SECTIONS:
        section = getattr(cfg, sec)
        problems += section_problems(section, sec, runtime=on_this_machine)
        extra = getattr(section, "cross_problems", None)
        if extra is not None:
            problems += extra()
    return problems


def set_value(cfg: ReconConfig, key: str, value: Any) -> None:
    """Set ``section.name`` on ``cfg`` in place, checking the key and the type."""
    if "." not in key:
        raise ConfigError(f"setting {key!r} must be written section.name; sections: {', '.join(SECTIONS)}")
    sec, name = key.split(".", 1)
    if sec not in SECTIONS:
        raise ConfigError(f"unknown section {sec!r} in {key!r}; sections: {', '.join(SECTIONS)}")
    section = getattr(cfg, sec)
    hints = resolved_hints(type(section))
    if name not in hints:
        if key in RENAMED:
            raise ConfigError(f"setting {key} is now {RENAMED[key]} (renamed 2026-12); update your recon.yaml or --set")
        names = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"unknown setting {key!r}; valid keys for {sec}: {names}")
    setattr(section, name, coerce(value, hints[name], key))


def apply_mapping(cfg: ReconConfig, data: Any, source: str) -> None:
    """Apply a nested ``{section: {name: value}}`` mapping (from a YAML file)."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(data).__name__}")
    for sec, values in data.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {sec!r}; sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping of settings")
        for name, value in values.items():
            try:
                set_value(cfg, f"{sec}.{name}", value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"refine.lr=1e-3"`` → ``("refine.lr", 0.001)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.name=value, e.g. refine.weight_edge=0")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    files: list[Path] | tuple[Path, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    presets: list[str] | tuple[str, ...] = (),
    base: ReconConfig | None = None,
    *,
    on_this_machine: bool = True,
) -> ReconConfig:
    """Build the effective config from defaults (or a copy of ``base``), YAML files (in order), presets and ``--set``
    overrides.

    Args:
        on_this_machine: the config is for a run on this machine: devices it asks for must exist here
            (False on a Ray driver whose workers may have GPUs it lacks).

    Raises:
        ConfigError: a file, key, type or value is wrong (one line naming each bad setting and its rule).
    """
    cfg = copy.deepcopy(base) if base is not None else ReconConfig()
    for path in files:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror}); check the path") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
        apply_mapping(cfg, data, str(path))
    for name in presets:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        for key, value in PRESETS[name].items():
            set_value(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)
    problems = config_problems(cfg, on_this_machine=on_this_machine)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def config_to_dict(cfg: ReconConfig) -> dict[str, Any]:
    return to_plain(cfg)


def config_to_yaml(cfg: ReconConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

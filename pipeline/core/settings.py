"""Declaring settings: keyword-only dataclasses whose fields carry help text and a check.

Each stage module defines its own ``<Stage>Config`` dataclass with
:func:`setting` fields; :mod:`pipeline.config` gathers them into one
:class:`~pipeline.config.ReconConfig`, handles files and ``--set`` and runs
every field's :class:`Check` when the config is loaded (:func:`section_problems`),
so a bad value fails before any stage runs.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A rule a setting's value must follow, e.g. ``>= 1``; :meth:`problem` says what is wrong."""

    rule: str
    """Shown in errors and by ``recon config``: the value "must be <rule>"."""
    test: Callable[[Any], bool]
    on_this_machine: Callable[[Any], str | None] | None = None
    """For a value that follows the rule: why this machine cannot use it (no CUDA device), else None.
    Run only when the config is loaded to run here (not on a Ray driver that only submits work)."""
    note: Callable[[Any], str | None] | None = None
    """For a value that breaks the rule: a hint added to the error (why a value that used to work no longer does)."""

    def problem(self, value: Any) -> str | None:
        """None when ``value`` follows the rule, else ``"must be <rule>"``."""
        return None if self.test(value) else f"must be {self.rule}"


def at_least(low: float) -> Check:
    return Check(f">= {low}", lambda v: v >= low)


def greater_than(low: float) -> Check:
    return Check(f"> {low}", lambda v: v > low)


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """``low <= v <= high``, with either end open."""
    text = f"{'>' if open_low else '>='} {low} and {'<' if open_high else '<='} {high}"
    return Check(text, lambda v: (v > low if open_low else v >= low) and (v < high if open_high else v <= high))


ZERO_WAS_AUTOMATIC = "0 meant automatic before 2026-12"


def or_automatic(check: Check) -> Check:
    """``check``, or None (YAML ``null``) for automatic; a 0, which meant automatic before, is refused with a note."""
    return Check(f"{check.rule}, or null for automatic", lambda v: v is None or check.test(v), check.on_this_machine,
                 note=lambda v: ZERO_WAS_AUTOMATIC if v == 0 else None)


def zero_or_at_least(low: float, zero_means: str) -> Check:
    return Check(f"0 ({zero_means}) or >= {low}", lambda v: v == 0 or v >= low)


def odd_at_least(low: int) -> Check:
    return Check(f"odd and >= {low}", lambda v: v >= low and v % 2 == 1)


def threads() -> Check:
    return Check("-1 (all cores) or >= 1", lambda v: v == -1 or v >= 1)


def each(check: Check) -> Check:
    """Every item of a tuple follows ``check``."""
    return Check(f"a list whose items are {check.rule}", lambda v: all(check.test(x) for x in v))


def increasing_positive() -> Check:
    return Check("increasing positive integers, e.g. 1,2,4,8",
                 lambda v: len(v) > 0 and v[0] >= 1 and all(a < b for a, b in zip(v, v[1:])))


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _torch_cuda_problem(value: str) -> str | None:
    if not value.startswith("cuda"):
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(value.split(":")[1]) if ":" in value else 0
    if count == 0:
        return "torch sees no CUDA device on this machine; use auto or cpu"
    if index >= count:
        return f"torch sees only {count} CUDA device(s) (cuda:0..cuda:{count - 1}); use one of them, auto or cpu"
    return None


def _open3d_cuda_problem(value: str) -> str | None:
    if not value.startswith("cuda"):
        return None
    import open3d as o3d

    count = o3d.core.cuda.device_count() if o3d.core.cuda.is_available() else 0
    index = int(value.split(":")[1]) if ":" in value else 0
    if count <= index:
        return "this Open3D build sees no such CUDA device; use auto or cpu"
    return None


def device_choice(library: str) -> Check:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist for ``library`` (``torch`` or ``open3d``)."""
    on_this_machine = _torch_cuda_problem if library == "torch" else _open3d_cuda_problem
    return Check("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None,
                 on_this_machine)


def setting(default: Any, help: str, *, affects_output: bool = True, check: Check | None = None) -> Any:
    """A config field with its help text (shown by ``recon config``) and the rule its value must follow.

    Args:
        default: default value (immutable).
        help: one sentence: what it does, with units.
        affects_output: False for settings that change how a stage runs but not
            what it writes (device, progress bars); they stay out of the
            fingerprint, so changing them does not invalidate caches.
        check: the rule (range, choices) checked when the config is loaded;
            numbers must also be finite, whatever the rule.
    """
    return dataclasses.field(default=default, metadata={"help": help, "affects_output": affects_output, "check": check})


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def field_check(f: dataclasses.Field) -> Check | None:
    return f.metadata.get("check")


def section_problems(section: Any, prefix: str, *, runtime: bool = True) -> list[str]:
    """One line per setting of ``section`` that breaks its rule: ``"prefix.name must be <rule> (got value)"``.

    None is never checked: it is the "automatic" value of the ``X | None`` settings (YAML ``null``).

    Args:
        section: a stage's config dataclass.
        prefix: its section name (``refine``), for the messages.
        runtime: also run the checks that depend on this machine (CUDA devices).
    """
    problems = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue
        check = field_check(f)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            problems.append(f"{prefix}.{f.name} must be a finite number (got {value})")
            continue
        if check is None:
            continue
        shown = ",".join(str(to_plain(x)) for x in value) if isinstance(value, tuple) else to_plain(value)
        problem = check.problem(value)
        if problem:
            note = check.note(value) if check.note is not None else None
            problems.append(f"{prefix}.{f.name} {problem} (got {shown}{'; ' + note if note else ''})")
        elif runtime and check.on_this_machine is not None:
            problem = check.on_this_machine(value)
            if problem:
                problems.append(f"{prefix}.{f.name}={shown}: {problem}")
    return problems


def check_section(section: Any, prefix: str, *, runtime: bool = True) -> None:
    """Raise :class:`ConfigError` (one line, every problem) when a setting of ``section`` breaks its rule."""
    problems = section_problems(section, prefix, runtime=runtime)
    if problems:
        raise ConfigError("; ".join(problems))


def fingerprint_fields(cfg: Any) -> dict[str, Any]:
    """The settings of a stage config that change its output, as JSON-able values.

    A config with a ``resolved_for_fingerprint(fields)`` method replaces automatic values by what they resolve
    to on this machine (e.g. the depth maps' size), so an automatic value and the same value set by hand share
    caches, and a machine where it resolves differently computes the stage again.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("affects_output", True):
            out[f.name] = to_plain(getattr(cfg, f.name))
    resolve = getattr(cfg, "resolved_for_fingerprint", None)
    return resolve(out) if callable(resolve) else out


def to_plain(value: Any) -> Any:
    """Enums → their value, tuples → lists, None stays None (YAML ``null``); for YAML/JSON output."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML-parsed value to the declared type of setting ``key``.

    Raises:
        ConfigError: the value does not fit the type (one line, says what would).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(coerce(v, inner, key) for v in value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            valid = ", ".join(str(m.value) for m in annotation)
            raise ConfigError(f"{key}: {value!r} is not one of: {valid}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:
            value = float(value) if annotation is float else int(value)
        except ValueError:
            pass
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def type_name(annotation: Any) -> str:
    """A setting's type as ``recon config`` shows it: ``int``, ``float or null``, ``list of int``, ``auto|single``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin in (tuple, list):
        return f"list of {type_name(args[0] if args else str)}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(str(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def shown_value(value: Any) -> str:
    """A value as it is written in YAML or ``--set``: ``null``, ``true``, ``1,2,4``, ``exhaustive``, ``0.002``."""
    value = to_plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(shown_value(v) for v in value)
    return str(value)


def resolved_hints(cls: type) -> dict[str, Any]:
    """Field name → type, with string annotations resolved."""
    return typing.get_type_hints(cls)

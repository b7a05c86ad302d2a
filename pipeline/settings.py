"""Declaring settings: keyword-only dataclasses whose fields carry help text.

Each stage module defines its own ``<Stage>Config`` dataclass with
:func:`setting` fields; :mod:`pipeline.config` gathers them into one
:class:`~pipeline.config.ReconConfig` and handles files and ``--set``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from pipeline.errors import ConfigError


def setting(default: Any, help: str, *, affects_output: bool = True) -> Any:
    """A config field with its help text (shown by ``recon config``).

    Args:
        default: default value (immutable).
        help: one sentence: what it does, with units.
        affects_output: False for settings that change how a stage runs but not
            what it writes (device, progress bars); they stay out of the
            fingerprint, so changing them does not invalidate caches.
    """
    return dataclasses.field(default=default, metadata={"help": help, "affects_output": affects_output})


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def fingerprint_fields(cfg: Any) -> dict[str, Any]:
    """The settings of a stage config that change its output, as JSON-able values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("affects_output", True):
            out[f.name] = to_plain(getattr(cfg, f.name))
    return out


def to_plain(value: Any) -> Any:
    """Enums → their value, tuples → lists; for YAML/JSON output."""
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
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def resolved_hints(cls: type) -> dict[str, Any]:
    """Field name → type, with string annotations resolved."""
    return typing.get_type_hints(cls)

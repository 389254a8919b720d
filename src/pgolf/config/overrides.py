"""Typed, validated overrides of a RunConfig: dotted keys (`model.num_layers`), TOML files, dict round trips.

Every way of changing a config (TOML file, record env vars, CLI `--set`) goes through `set_value`, so a
bad key or value always fails the same way: a ConfigError naming the key and the type it expects.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from pgolf.config.schema import CHOICES, EVAL_MODES, RANGES, SECTIONS, RunConfig

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what was expected."""


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert `value` (a string from env/CLI, or a TOML/JSON value) to the field type `tp`."""
    expected = _type_name(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).strip().replace("_", ""))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(str(value).strip().replace("_", "")) if isinstance(value, str) else float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if typing.get_origin(tp) is list:
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise ValueError(value)
            (inner,) = typing.get_args(tp)
            return [coerce(key, inner, v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}") from None
    raise ConfigError(f"config key '{key}': unsupported field type {expected}")  # pragma: no cover


def _resolve_key(cfg: RunConfig, key: str) -> tuple[Any, str, Any]:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"unknown config key '{key}': expected SECTION.FIELD with SECTION one of {', '.join(SECTIONS)}"
        )
    section = getattr(cfg, parts[0])
    types = _field_types(section)
    if parts[1] not in types:
        known = ", ".join(sorted(types))
        raise ConfigError(f"unknown config key '{key}': section '{parts[0]}' has fields {known}")
    return section, parts[1], types[parts[1]]


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `cfg.<section>.<field>` from a dotted key, converting and checking the value."""
    section, name, tp = _resolve_key(cfg, key)
    converted = coerce(key, tp, value)
    check_field(key, converted)
    setattr(section, name, converted)


def check_field(key: str, value: Any) -> None:
    """The value of one field against its declared choices or range (schema.CHOICES / schema.RANGES)."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}': expected one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RANGES and value not in RANGES[key]:
        raise ConfigError(f"config key '{key}': expected a number {RANGES[key]}, got {value!r}")
    if key == "eval.plan":
        bad = [m for m in value if m not in EVAL_MODES]
        if bad:
            raise ConfigError(
                f"config key 'eval.plan': unknown modes {bad}; expected a subset of {EVAL_MODES}"
            )


def check_fields(cfg: RunConfig) -> None:
    """check_field for every field of `cfg` (a config built in Python skips set_value)."""
    for section in SECTIONS:
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            check_field(f"{section}.{name}", value)


def allowed_text(key: str) -> str:
    """What a field accepts, in words, for help texts: its choices, its range, or ''."""
    if key in CHOICES:
        return " | ".join(CHOICES[key])
    if key in RANGES:
        return str(RANGES[key])
    if key == "eval.plan":
        return "subset of " + ",".join(EVAL_MODES)
    return ""


def describe_keys(cfg: RunConfig) -> list[tuple[str, str, str, str]]:
    """(key, type, value in cfg, allowed values) for every field: the table `pgolf config keys` prints."""
    rows = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for name, tp in _field_types(obj).items():
            key = f"{section}.{name}"
            allowed = allowed_text(key) or ("true | false" if tp is bool else "")
            rows.append((key, _type_name(tp), _toml_value(getattr(obj, name)), allowed))
    return rows


def apply_sets(cfg: RunConfig, assignments: list[str]) -> None:
    """Apply CLI `--set a.b=v` strings in order."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. model.num_layers=6), got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)


def apply_mapping(cfg: RunConfig, mapping: dict[str, Any], source: str) -> None:
    """Apply a nested {section: {field: value}} mapping (a TOML file or JSON dump)."""
    for section, values in mapping.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown section '{section}'; expected one of {', '.join(SECTIONS)}")
        for name, value in values.items():
            try:
                set_value(cfg, f"{section}.{name}", value)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: invalid TOML ({err})") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict[str, Any], source: str = "config") -> RunConfig:
    cfg = RunConfig(preset=str(mapping.get("preset", "custom")))
    apply_mapping(cfg, mapping, source)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """Render the resolved config as TOML; `from_dict(tomllib.loads(to_toml(c)))` gives `c` back."""
    data = to_dict(cfg)
    lines = [f"preset = {_toml_value(data.pop('preset'))}"]
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for name, value in data[section].items():
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"

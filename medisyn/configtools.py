"""Typed configs from YAML plus ``key=value`` overrides, checked before any work starts.

Every stage reads one frozen dataclass. This module turns nested dicts into those
dataclasses and rejects, with the offending key path and the valid choices, anything a
user could get wrong: an unknown key (with a "did you mean"), a wrong type, a value outside
a ``Literal``'s choices, a missing file. It imports nothing heavy, so the CLI can validate a
config in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key (or file) and the fix."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's form."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not a valid choice; expected one of " + ", ".join(repr(c) for c in choices)
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            items = list(value)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        kt, vt = get_args(tp)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; users write it anyway
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    path = f"{where}.{key}" if where else key
    hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown key {path!r}{hint} valid keys{' of ' + repr(where) if where else ''}: {', '.join(names)}"
    )


def build(cls: type, data: Any, where: str = "") -> Any:
    """Construct dataclass ``cls`` from a nested dict, checking every key and type."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), where)
        path = f"{where}.{key}" if where else str(key)
        kwargs[key] = _coerce(value, hints[key], path)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {', '.join(missing)}")
    for key, value in kwargs.items():  # before the constructor: its own checks may divide by these
        check_range(cls, key, value, f"{where}.{key}" if where else key)
    return cls(**kwargs)  # __post_init__ checks raise ConfigErrors that name their key


def check_range(cls: type, key: str, value: Any, path: str) -> None:
    """Every float must be finite; a field named in the class's ``RANGES`` must lie in its range.

    ``RANGES`` maps a field to ``">=1"``, ``">0"``, ``">=-1"`` or ``"0..1"`` (inclusive)."""
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{path}: {v} is not a finite number")
    spec = getattr(cls, "RANGES", {}).get(key)
    if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if ".." in spec:
        lo, hi = (float(x) for x in spec.split(".."))
        ok, want = lo <= value <= hi, f"in [{spec.replace('..', ', ')}]"
    elif spec.startswith(">="):
        ok, want = value >= float(spec[2:]), f">= {spec[2:]}"
    elif spec.startswith(">"):
        ok, want = value > float(spec[1:]), f"> {spec[1:]}"
    else:
        raise ValueError(f"{cls.__name__}.RANGES[{key!r}]: bad range {spec!r}")
    if not ok:
        raise ConfigError(f"{path}: {value} must be {want}")


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the offending text (which could be anything a user pasted)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or type(exc).__name__)


def load_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's data; not UTF-8, binary or malformed is a one-line ConfigError naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {str(path)!r} is a binary file, not YAML")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML ({yaml_problem(exc)})") from None


def named_file(name_or_path: str, folder: Path, what: str, also: str = "") -> Path:
    """``folder/<name>.yaml`` for a bare name, else the path itself; a missing file is a
    ConfigError that lists the shipped names (and ``also``, other accepted names)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join([*sorted(p.stem for p in folder.glob("*.yaml")), *([also] if also else [])])
        raise ConfigError(f"{what}: no file {str(path)!r}; known: {known}, or a path")
    return path


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    data = load_yaml_file(p, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation at a dotted path, or a ConfigError naming the first unknown part."""
    tp: Any = cls
    where = ""
    for part in dotted.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                raise _unknown_key(tp, part, where)
            tp = hints[part]
        elif get_origin(tp) in (tuple, list) and part.isdigit():
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            raise ConfigError(f"override {dotted!r}: {where!r} has no sub-key {part!r}")
        where = f"{where}.{part}" if where else part
    return tp


def apply_overrides(cls: type, data: dict, overrides: list[str]) -> dict:
    """Merge ``key.sub=value`` strings into ``data``; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=2)")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        tp = _field_type(cls, dotted)
        value: Any = raw if tp is str else _parse_scalar(raw, dotted)
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, list):
                child = node[int(part)]
                child = dict(child) if isinstance(child, dict) else child
                node[int(part)] = child
            else:
                child = dict(child) if isinstance(child, dict) else (list(child) if isinstance(child, list) else {})
                node[part] = child
            node = child
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return data


def _parse_scalar(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}={raw!r}: cannot parse the value") from None

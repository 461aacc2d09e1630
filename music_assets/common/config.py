"""Typed configuration: a dataclass per stage is the one place where a setting, its type, its
default and its meaning are written.

A stage's config class is a frozen dataclass whose fields carry their help text in
`field(metadata={"help": ...})`, as Hugging Face's `TrainingArguments` and TRL's `RewardConfig`
do. Why dataclasses rather than Dagster `Config` classes: logic modules take the object itself
(no mirror to keep in step), and they stay importable without Dagster or pydantic, so the trainer
runs on a machine that has only torch. The Dagster resources are derived from these classes
(`resources/config.py`: same fields, defaults and descriptions, shown in the UI), and the YAML
loader (`music_assets/settings.py`) validates a file against them with `from_mapping`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names its dotted path."""


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING,
            path: bool = False) -> Any:
    """A config field with its help text. `factory` builds a mutable default (a list, a nested
    config); `path=True` marks a file-system path, which the loader resolves relative to the file
    that set it."""
    metadata = {"help": help, "path": path}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nearest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or the list of valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid) or 'none'}"


def check_keys(raw: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Refuses keys outside `valid`, naming the first one's full path and the nearest valid name."""
    valid = set(valid)
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{_join(where, key)}: unknown key; {nearest(str(key), valid)}")


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested_config(tp: Any) -> tuple[str, type] | None:
    """('one', C) for a field of config class C (or C | None), ('dict', C) for dict[str, C]."""
    if dataclasses.is_dataclass(tp):
        return "one", tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return "one", inner[0]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return "dict", args[1]
    return None


def check_tree(cls: type, raw: Any, where: str) -> None:
    """Unknown keys anywhere in `raw` (a mapping for config class `cls`), before type validation,
    so that a misspelt key is reported as such rather than silently taking the default."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, config_fields(cls), where)
    types_ = field_types(cls)
    for key, value in raw.items():
        nested = nested_config(types_[key])
        if nested is None or value is None:
            continue
        kind, inner = nested
        if kind == "one":
            check_tree(inner, value, _join(where, key))
        elif not isinstance(value, Mapping):
            raise ConfigError(f"{_join(where, key)}: expected a mapping of names to settings, got {type(value).__name__}")
        else:
            for name, item in value.items():
                check_tree(inner, item, _join(where, key, str(name)))


def from_mapping(cls: type, raw: Mapping[str, Any] | None, where: str = "") -> Any:
    """An instance of config class `cls` from plain data (YAML, JSON, a Dagster resource's
    fields): unknown keys and wrong types are refused with the value's dotted path. Types are
    checked (and "5" read as 5, as YAML users expect) by pydantic, imported only here."""
    from pydantic import TypeAdapter, ValidationError

    raw = dict(raw or {})
    check_tree(cls, raw, where)
    try:
        return TypeAdapter(cls).validate_python(_over_defaults(cls, raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _join(where, *(str(p) for p in first["loc"]))
        got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], Mapping) else ""
        raise ConfigError(f"{loc or where or cls.__name__}: {first['msg']}{got}") from None


def _over_defaults(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each partly given nested config completed from that field's own default, not
    from the nested class's: `judge_sampling: {max_tokens: 64}` keeps the judge's temperature 0."""
    types_ = field_types(cls)
    for name, f in config_fields(cls).items():
        nested = nested_config(types_[name])
        value = raw.get(name)
        if not nested or nested[0] != "one" or not isinstance(value, Mapping):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        base = to_mapping(default) if dataclasses.is_dataclass(default) else {}
        raw[name] = _over_defaults(nested[1], {**base, **value})
    return raw


def to_mapping(obj: Any) -> dict[str, Any]:
    """Plain data for a config object (the inverse of `from_mapping`)."""
    return dataclasses.asdict(obj)


def describe(obj: Any, where: str = "") -> list[tuple[str, Any, str]]:
    """(dotted path, value, help) for every leaf setting of a config object, in field order."""
    rows = []
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), _join(where, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, path)
        elif isinstance(value, Mapping) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, item in value.items():
                rows += describe(item, _join(path, str(name)))
        else:
            rows.append((path, value, f.metadata.get("help", "")))
    return rows


def path_fields(cls: type, where: str = "") -> list[str]:
    """Dotted paths of the fields marked `path=True`, with '*' for a dict's entries."""
    found = []
    types_ = field_types(cls)
    for name, f in config_fields(cls).items():
        if f.metadata.get("path"):
            found.append(_join(where, name))
        nested = nested_config(types_[name])
        if nested:
            kind, inner = nested
            found += path_fields(inner, _join(where, name) if kind == "one" else _join(where, name, "*"))
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)

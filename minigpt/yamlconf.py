"""Strict YAML -> frozen dataclasses: the generic loader behind minigpt.config (which declares the job itself).

A duplicate key is an error (plain YAML keeps the last one silently), an unknown key is an error naming its dotted
path, every value is checked against its field's annotation, and `key=value` overrides are applied to the raw
mapping before validation, so an override of a key that does not exist fails the same way. Two shorthands, both
declared by the dataclasses themselves:
  * a dataclass with a `from_yaml(raw)` classmethod may be written in a short form (`model: smollm2-135m`);
  * a `tuple[X, ...]` of dataclasses whose first field is `name` may be written as a mapping name -> fields
    (`domains: {legal: {sources: [...]}}`), and its errors name `domains.legal`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A job file or override is invalid; the message is one line naming what is wrong."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML strictly (duplicate keys are ConfigError; syntax errors stay yaml.YAMLError)."""
    return yaml.load(text, Loader=_StrictLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _named_items(tp: Any) -> type | None:
    """X when `tp` is tuple[X, ...] of a dataclass whose first field is `name` (writable as a name mapping)."""
    if typing.get_origin(tp) is not tuple:
        return None
    item = typing.get_args(tp)[0]
    if dataclasses.is_dataclass(item) and dataclasses.fields(item)[0].name == "name":
        return item
    return None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses; errors name `path`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    named = _named_items(tp)
    if named is not None and not isinstance(value, list | tuple):
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{path}: expected a non-empty mapping of {named.__name__} name -> fields")
        return tuple(build(named, {"name": str(k), **v} if isinstance(v, dict) else v, f"{path}.{k}")
                     for k, v in value.items())
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type, raw: Any, path: str = "") -> Any:
    """The dataclass `cls` from a raw YAML value; ConfigError (one line, naming the dotted path) when invalid."""
    if hasattr(cls, "from_yaml"):
        raw = cls.from_yaml(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'job'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {key_path!r} (expected one of: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, key_path)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{path or 'job'}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path and not str(e).startswith(path) else str(e)) from None


def _child_type(tp: Any, part: str) -> Any:
    """The annotation one override step below `tp` (a dataclass field, or an item of a name mapping)."""
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
        if dataclasses.is_dataclass(arg):
            return typing.get_type_hints(arg).get(part)
        if _named_items(arg) is not None:
            return _named_items(arg)
    return None


def apply_override(raw: dict, override: str, root: type) -> None:
    """Apply one `dotted.key=value` override to the raw mapping of `root`, in place; the value is parsed as YAML
    (numbers, lists, ...). A short form on the way (`model: name`) is expanded with its class's from_yaml."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e.__class__.__name__})") from None
    node, tp = raw, root
    for i, part in enumerate(parts[:-1]):
        tp = _child_type(tp, part)
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict) and hasattr(tp, "from_yaml"):
            nxt = node[part] = tp.from_yaml(nxt)
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


__all__ = ["ConfigError", "apply_override", "build", "load_yaml"]

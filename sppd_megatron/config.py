"""One config style for every stage: typed dataclasses filled from YAML plus dotted overrides.

Unknown keys, wrong types and bad values fail when the config loads, naming the file and the key,
never at the first training step. Each stage owns its dataclass (``TrainConfig`` in training,
``SampleConfig`` in sampling, ...); this module only knows how to fill any of them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot work; the message names the file and the dotted key."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, where)
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    except ValueError as exc:  # __post_init__ cross-field checks
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a mapping")
        node[keys[-1]] = value
    return data


def config_from_dict(cls: type[T], data: dict, source: str = "<config>") -> T:
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML), apply ``overrides`` and build ``cls``; errors name the file and key."""
    data: dict = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    apply_overrides(data, overrides or [])
    return config_from_dict(cls, data, source)


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable dict of a config (paths as strings)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def parse_config_command(prog: str, cls: type[T], argv: list[str] | None, doc: str | None, example: str) -> T:
    """The shared command line of config-driven verbs: ``VERB CONFIG.yaml [dotted.key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("config", help=f"YAML file of {cls.__name__} keys")
    parser.add_argument("overrides", nargs="*", help=f"dotted.key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def report_error(prog: str, exc: BaseException) -> int:
    """Print a user error (bad config, bad record, missing file) as one line; the exit code is 2."""
    import sys

    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2

"""One config style for every stage: typed dataclasses filled from YAML plus dotted overrides.

Unknown keys, wrong types and bad values fail when the config loads, naming the file and the key,
never at the first training step. Each stage owns its dataclass (``TrainConfig`` in training,
``SampleConfig`` in sampling, ...); this module only knows how to fill any of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot work; the message names the file and the dotted key."""


class RunStopped(RuntimeError):
    """A run that cannot go on for a reason the user can act on (a directory another command holds,
    a non-finite training step, a rollout engine that stopped answering, a failed stage)."""


USER_ERRORS = (ValueError, OSError, RunStopped)
"""What a verb reports as one line and exit status 2 (:func:`report_error`): bad configs, bad
records and files (ValueError and its kinds), unreadable or unwritable paths and a full disk
(OSError), and :class:`RunStopped`. Anything else is a bug and keeps its traceback."""

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused before parsing (no recipe comes near it)."""
MAX_ERROR_CHARS = 2000
"""An error line longer than this keeps its start and end (a huge value quoted in it is cut)."""
INT_LIMIT = 2**63
"""Integers in configs must fit in 64 bits (every count and size is handed to torch or numpy)."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, tp


def _short(value: Any) -> str:
    """``repr`` of a config value, cut so a huge one never floods the error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


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
        if not isinstance(value, (str, int, float, bool)) or value not in allowed:
            raise ConfigError(f"{where}: {_short(value)} is not one of {list(allowed)}")
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
            if not -INT_LIMIT < value < INT_LIMIT:
                raise ConfigError(f"{where}: {value} is out of range (integers must fit in 64 bits)")
            return value
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {_short(value)} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{where}: expected a path, got {_short(value)}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k)[:60] for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    except (ValueError, ArithmeticError) as exc:  # __post_init__ cross-field checks
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {_short(text)}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {_short(text)}: empty key")
    if raw == "":
        return key.split("."), ""
    try:
        return key.split("."), yaml.load(raw, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {_short(text)}: not a YAML value ({_yaml_problem(exc)})") from None


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
        data = read_yaml_mapping(path, ConfigError)
    apply_overrides(data, overrides or [])
    return config_from_dict(cls, data, source)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: a big file parses fast


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def read_yaml_mapping(path: str | Path, error: type[Exception] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (safe loader: tags never build objects), else ``error``
    naming the file (and line)."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise error(f"{path}: {size} bytes, too large for a config (the limit is {MAX_CONFIG_BYTES})")
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        where = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise error(f"{path}{':' + str(where + 1) if where is not None else ''}: not valid YAML "
                    f"({_yaml_problem(exc)})") from None
    except RecursionError:
        raise error(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


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


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong and where: an OSError names its path, a longer message is
    joined onto one line."""
    import errno

    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
        if exc.errno == errno.ENOSPC:
            text += " (what was finished is kept: free some space and run the same command again to resume)"
    else:
        text = str(exc) or type(exc).__name__
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) > MAX_ERROR_CHARS:  # a 10 MB value quoted in a message stays readable
        line = f"{line[:MAX_ERROR_CHARS // 2]} ...({len(line) - MAX_ERROR_CHARS} characters)... {line[-MAX_ERROR_CHARS // 2:]}"
    return line


def report_error(prog: str, exc: BaseException) -> int:
    """Print a user error (:data:`USER_ERRORS`) as one line on stderr; the exit code is 2."""
    import sys

    # One write: ranks of a job share the terminal, and a pipe keeps a write this short whole.
    sys.stderr.write(f"{prog}: error: {error_line(exc)}\n")
    sys.stderr.flush()
    return 2

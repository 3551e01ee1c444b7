"""A seeded fuzzer of the files the tools read: each corruption returns the damaged bytes and the line it hit.

Corruptions (the issue's list): ``truncate`` (cut inside a record), ``byte_flip`` (a structural byte
replaced), ``wrong_type``, ``missing_field``, ``extra_field``, ``nan``, ``huge`` (numbers beyond
float range or 64 bits), ``empty`` (a 0-byte file), ``long_line`` (a 10 MB line), ``invalid_utf8``,
and for tensor files ``wrong_shape``. Field-level corruptions need to know a record's fields: a
:class:`Fields` says which are required and which hold strings, numbers and lists.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

TEN_MB = 10 * 1024 * 1024
LINE_CORRUPTIONS = ("truncate", "byte_flip", "wrong_type", "missing_field", "extra_field", "nan", "huge", "empty",
                    "long_line", "invalid_utf8")
STRUCTURAL = b'{}[]":,'


@dataclass
class Fields:
    """What a record holds: ``required`` fields, and which fields are strings, numbers, lists."""

    required: list[str]
    strings: list[str] = field(default_factory=list)
    numbers: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)
    extra_ok: bool = False
    """Unknown fields are allowed (benchmark layouts carry their own), so ``extra_field`` is no corruption."""


def _wrong(value):
    """A value of another JSON type."""
    if isinstance(value, str):
        return ["not", "a", "string"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "not a number"
    if isinstance(value, list):
        return {"not": "a list"}
    return 12345


def corrupt_record_line(lines: list[bytes], how: str, fields: Fields, rng: random.Random) -> tuple[list[bytes], int]:
    """``lines`` (JSONL, one record each) with one corruption; returns them and the 1-based line it hit."""
    lines = list(lines)
    i = rng.randrange(len(lines))
    if how == "truncate":  # cut the last line short: a record half written
        i = len(lines) - 1
        lines[i] = lines[i][: rng.randrange(1, max(2, len(lines[i]) - 2))]
        return lines, i + 1
    if how == "byte_flip":
        spots = [j for j, b in enumerate(lines[i]) if b in STRUCTURAL]
        j = rng.choice(spots)
        lines[i] = lines[i][:j] + b"Q" + lines[i][j + 1:]
        return lines, i + 1
    if how == "invalid_utf8":
        j = rng.randrange(1, len(lines[i]) - 1)
        lines[i] = lines[i][:j] + b"\xff\xfe" + lines[i][j:]
        return lines, i + 1
    if how == "long_line":
        lines.insert(i, b"x" * TEN_MB)
        return lines, i + 1
    record = json.loads(lines[i])
    if how == "wrong_type":
        name = rng.choice(fields.strings + fields.numbers + fields.lists)
        record[name] = _wrong(record.get(name, ""))
    elif how == "missing_field":
        record.pop(rng.choice(fields.required))
    elif how == "extra_field":
        record["zz_not_a_field"] = 1
    elif how in ("nan", "huge"):
        name = rng.choice(fields.numbers)
        record[name] = float("nan") if how == "nan" else float("inf")
        text = json.dumps(record, allow_nan=True)
        if how == "huge":  # a literal beyond float range, which JSON readers turn into inf
            text = text.replace("Infinity", "1e999")
        lines[i] = text.encode()
        return lines, i + 1
    else:
        raise ValueError(how)
    lines[i] = json.dumps(record, allow_nan=True).encode()
    return lines, i + 1


def corrupt_jsonl(data: bytes, how: str, fields: Fields, rng: random.Random) -> tuple[bytes, int | None]:
    """A damaged copy of a JSONL file and the line hit (None for an empty file)."""
    if how == "empty":
        return b"", None
    lines = [line for line in data.split(b"\n") if line.strip()]
    damaged, line = corrupt_record_line(lines, how, fields, rng)
    tail = b"" if how == "truncate" else b"\n"
    return b"\n".join(damaged) + tail, line


def corrupt_json_object(data: bytes, how: str, fields: Fields, rng: random.Random) -> bytes:
    """A damaged copy of a one-object JSON file (config.json, sppd_model.json...)."""
    if how == "empty":
        return b""
    if how == "truncate":
        return data[: rng.randrange(1, len(data) - 1)]
    if how == "long_line":
        return b"x" * TEN_MB + b"\n" + data
    if how in ("byte_flip", "invalid_utf8"):
        damaged, _ = corrupt_record_line([data.replace(b"\n", b" ")], how, fields, rng)
        return damaged[0]
    damaged, _ = corrupt_record_line([json.dumps(json.loads(data)).encode()], how, fields, rng)
    return damaged[0]


def corrupt_binary(data: bytes, how: str, rng: random.Random, header: int = 64) -> bytes:
    """A damaged copy of a binary file: ``truncate``, ``byte_flip`` (within its first ``header`` bytes,
    where formats keep their lengths and tags), ``empty``."""
    if how == "empty":
        return b""
    if how == "truncate":
        return data[: rng.randrange(1, len(data) - 1)]
    if how == "byte_flip":
        j = rng.randrange(min(header, len(data)))
        return data[:j] + bytes([data[j] ^ 0xFF]) + data[j + 1:]
    raise ValueError(how)

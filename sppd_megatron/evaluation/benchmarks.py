"""Benchmark names -> prompt lists: the shared data's test sets by name, or any JSONL as ``name=path``.

Loading is :func:`sppd_megatron.sampling.prompts.load_prompts` (GSM8K ``#### N`` golds, MATH-500's
``problem``/``unique_id``, GaoKao's ``$...$`` golds, errors with file:line), so evaluation reads a
benchmark exactly as sampling reads a prompts file.
"""

from __future__ import annotations

from pathlib import Path

import sppd_megatron
from sppd_megatron.records import Prompt
from sppd_megatron.sampling.prompts import PromptFields, load_prompts, source_name

# Paths relative to the shared data directory (see ../shared/data/README.md).
NAMED_BENCHMARKS = {
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "gaokao2023en": "gaokao2023en/test.jsonl",
}


def default_data_dir() -> Path:
    """``../shared/data`` relative to the repository root (never copied into the repository)."""
    return (Path(sppd_megatron.__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def resolve_benchmark(spec: str, data_dir: str | Path | None = None) -> tuple[str, Path, bool]:
    """``(name, path, custom)`` for ``gsm8k`` / ``math500`` / ``gaokao2023en``, ``name=path.jsonl`` or ``path.jsonl``."""
    spec = spec.strip()
    if "=" in spec:
        name, path = (part.strip() for part in spec.split("=", 1))
        if not name or not path:
            raise ValueError(f"benchmark {spec!r}: expected name=path.jsonl")
        return name, Path(path), True
    if spec in NAMED_BENCHMARKS:
        return spec, Path(data_dir or default_data_dir()) / NAMED_BENCHMARKS[spec], False
    if spec.endswith(".jsonl"):
        path = Path(spec)
        return source_name(path), path, True
    raise ValueError(f"unknown benchmark {spec!r}: use one of {sorted(NAMED_BENCHMARKS)}, name=path.jsonl or a .jsonl path")


def load_benchmarks(specs: list[str], data_dir: str | Path | None = None, fields: PromptFields | None = None,
                    limit: int | None = None) -> dict[str, list[Prompt]]:
    """Name -> the first ``limit`` prompts of each benchmark; ``fields`` apply to custom files only
    (the named benchmarks' layouts are detected)."""
    out: dict[str, list[Prompt]] = {}
    for spec in specs:
        name, path, custom = resolve_benchmark(spec, data_dir)
        if name in out:
            raise ValueError(f"benchmark {name!r} is listed twice")
        if not path.is_file():
            hint = "" if custom else f" (named benchmarks are read from {path.parent.parent}; set data_dir)"
            raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist{hint}")
        out[name] = load_prompts(path, fields if custom else None, limit)
    return out

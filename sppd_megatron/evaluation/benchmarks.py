"""Benchmark specs -> prompt lists: ``[NAME=]SOURCE``, where SOURCE is any prompt source.

Sources are :mod:`sppd_megatron.sampling.prompts`'s (the packaged ``gsm8k`` / ``math500`` /
``gaokao2023en``, ``hf:DATASET[:SPLIT]``, a JSONL path), read by its ``load_prompts``, so evaluation
reads a benchmark exactly as sampling reads its prompts. ``NAME=`` labels a benchmark in the tables.
"""

from __future__ import annotations

from sppd_megatron.records import Prompt
from sppd_megatron.sampling.prompts import (
    NAMED_BENCHMARKS,
    SOURCE_SYNTAX,
    PromptFields,
    is_named_benchmark,
    load_prompts,
    source_name,
)


def resolve_benchmark(spec: str) -> tuple[str, str]:
    """``(name, source)`` of ``gsm8k``, ``hf:DATASET[:SPLIT]``, ``path.jsonl`` or ``name=<any of those>``."""
    spec = spec.strip()
    if "=" in spec:
        name, source = (part.strip() for part in spec.split("=", 1))
        if not name or not source:
            raise ValueError(f"benchmark {spec!r}: expected NAME=SOURCE ({SOURCE_SYNTAX})")
        return name, source
    if is_named_benchmark(spec):
        return spec, spec
    if spec.startswith("hf:") or spec.endswith(".jsonl"):
        return source_name(spec), spec
    raise ValueError(f"unknown benchmark {spec!r}: use one of {sorted(NAMED_BENCHMARKS)}, hf:DATASET[:SPLIT], "
                     "a .jsonl path or NAME=SOURCE")


def load_benchmarks(specs: list[str], fields: PromptFields | None = None,
                    limit: int | None = None) -> dict[str, list[Prompt]]:
    """Name -> the first ``limit`` prompts of each benchmark; ``fields`` apply to sources other than the
    named benchmarks (whose layouts are detected)."""
    out: dict[str, list[Prompt]] = {}
    for spec in specs:
        name, source = resolve_benchmark(spec)
        if name in out:
            raise ValueError(f"benchmark {name!r} is listed twice")
        out[name] = load_prompts(source, None if is_named_benchmark(source) else fields, limit)
    return out

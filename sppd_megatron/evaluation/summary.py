"""Accuracy per benchmark and mode, with a 95% Wilson score interval, as JSON and a markdown table.

:func:`summarize` is a pure function of the prediction records (and the modes), and the writers
fix key order and float formatting, so one predictions file always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from sppd_megatron.evaluation.modes import Mode, classes_of, judge, parse_modes
from sppd_megatron.records import Prediction

SUMMARY_VERSION = 1
Z_95 = 1.959963984540054  # two-sided 95% standard-normal quantile
DIGITS = 6  # floats in summary.json are rounded to this many decimals


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927), clamped to [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or n
    successes, which matters for small benchmarks and for accuracies near 0 or 1.
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _round(x: float) -> float:
    return round(x, DIGITS) + 0.0  # + 0.0 turns -0.0 into 0.0


def mode_stats(correct: int, n: int, no_answer: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": _round(correct / n), "ci_low": _round(low),
            "ci_high": _round(high), "no_answer": no_answer}


def default_modes(predictions: Sequence[Prediction]) -> list[Mode]:
    """What the records support: greedy if all have it, then maj/orm modes at the smallest sample count."""
    modes: list[Mode] = []
    if predictions and all(p.greedy_generation is not None for p in predictions):
        modes.append(Mode("greedy"))
    n = min((len(p.generations) for p in predictions), default=0)
    if n:
        modes.append(Mode("maj", n))
        if all(p.scores is not None for p in predictions):
            modes += [Mode("orm_vote", n), Mode("orm_max", n)]
    return modes


def summarize(predictions: Iterable[Prediction], modes: Sequence[str | Mode] | None = None) -> dict:
    """Per benchmark (in first-seen order) and mode: n, correct, accuracy, Wilson 95% CI, no_answer.

    ``modes`` default to what the records support (:func:`default_modes`).
    """
    predictions = list(predictions)
    modes = parse_modes(modes) if modes is not None else default_modes(predictions)
    by_benchmark: dict[str, list[Prediction]] = {}
    for pred in predictions:
        by_benchmark.setdefault(pred.benchmark, []).append(pred)
    results: dict[str, dict] = {}
    for bench, preds in by_benchmark.items():
        tallies = {m.name: [0, 0] for m in modes}  # correct, no_answer
        for pred in preds:
            classes = classes_of(pred) if any(m.kind != "greedy" for m in modes) else None
            for mode in modes:
                verdict = judge(mode, pred, classes)
                tallies[mode.name][0] += verdict.correct
                tallies[mode.name][1] += verdict.answer is None
        results[bench] = {name: mode_stats(c, len(preds), none) for name, (c, none) in tallies.items()}
    return {
        "summary_version": SUMMARY_VERSION,
        "interval": "wilson score, 95%",
        "benchmarks": list(by_benchmark),
        "modes": [m.name for m in modes],
        "questions": {bench: len(preds) for bench, preds in by_benchmark.items()},
        "results": results,
    }


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def render_markdown(summary: dict) -> str:
    """Modes as rows, benchmarks as columns (as in the paper's tables): ``acc [low, high]`` in %."""
    benches = summary["benchmarks"]
    header = ["mode"] + [f"{b} (n={summary['questions'][b]})" for b in benches]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(benches)) + "|",
    ]
    for mode in summary["modes"]:
        cells = []
        for bench in benches:
            s = summary["results"][bench][mode]
            cells.append(f"{_percent(s['accuracy'])} [{_percent(s['ci_low'])}, {_percent(s['ci_high'])}]")
        lines.append("| " + " | ".join([mode] + cells) + " |")
    lines += ["", "Accuracy in % with its 95% Wilson score interval; n = questions per benchmark."]
    return "\n".join(lines) + "\n"


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_summary(summary: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out_dir`` (each replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "summary.json", out / "summary.md"
    _write_atomic(json_path, summary_json(summary))
    _write_atomic(md_path, render_markdown(summary))
    return json_path, md_path

"""Questions in, model prompts out.

Prompts come from a *source*, one syntax wherever prompts are read (``sample``'s ``input``, ``run``'s
``prompts.path`` and benchmarks, ``eval --bench``):

- ``gsm8k``, ``math500``, ``gaokao2023en``: the test sets shipped inside the package (``sppd_megatron/data``,
  each with its origin and licence beside it);
- ``hf:DATASET[:SPLIT]`` or ``hf:DATASET:CONFIG:SPLIT``: a Hugging Face dataset read through ``datasets``, a
  directory written by ``save_to_disk`` or anything ``datasets.load_dataset`` accepts (the hub, its cache);
- anything else: a JSONL file.

:func:`load_prompts` reads our own Prompt records and the benchmark layouts (GSM8K ``{question, answer:
"... #### N"}``, MATH-500 ``{problem, answer, unique_id}``, GaoKao ``{question, answer}``) row by row; field
names can be overridden. :func:`render_prompt` turns a question into the exact text the policy is
conditioned on, using a recorded PromptTemplate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sppd_megatron.records import Prompt, PromptTemplate, RecordError, json_lines
from sppd_megatron.tokenization import encode

BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "data"
"""The package's copies of the named test sets."""
NAMED_BENCHMARKS = {
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "gaokao2023en": "gaokao2023en/test.jsonl",
}
HF_PREFIX = "hf:"
SOURCE_SYNTAX = f"{', '.join(NAMED_BENCHMARKS)}, hf:DATASET[:SPLIT], hf:DATASET:CONFIG:SPLIT or a JSONL path"


@dataclass
class PromptFields:
    """Field names of a prompts file; None means "detect from the layout"."""

    question: str | None = None
    """Field holding the question (detected: ``question``, then ``problem``)."""
    answer: str | None = None
    """Field holding the gold answer (detected: ``gold_answer``, then ``answer``; GSM8K's text after ``####``)."""
    id: str | None = None
    """Field holding a unique id (detected: ``id``, then ``unique_id``; else ``<source>-<row>``)."""


def is_named_benchmark(source: str) -> bool:
    return str(source).strip() in NAMED_BENCHMARKS


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """``hf:DATASET[:SPLIT]`` / ``hf:DATASET:CONFIG:SPLIT`` -> (dataset, config, split)."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise ValueError(f"prompt source {source!r}: expected hf:DATASET[:SPLIT] or hf:DATASET:CONFIG:SPLIT")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def source_path(source: str | Path) -> Path | None:
    """The file or directory a source reads (what a run's manifest fingerprints); None for a hub dataset."""
    source = str(source).strip()
    if is_named_benchmark(source):
        return BENCHMARK_DIR / NAMED_BENCHMARKS[source]
    if source.startswith(HF_PREFIX):
        dataset = Path(_parse_hf(source)[0])
        return dataset if dataset.exists() else None
    return Path(source)


def source_name(source: str | Path) -> str:
    """A short label: ``gsm8k`` -> ``gsm8k-test``, ``hf:org/name:train`` -> ``name-train``,
    ``data/gsm8k/test.jsonl`` -> ``gsm8k-test`` (benchmark folder and split)."""
    text = str(source).strip()
    if text.startswith(HF_PREFIX):
        dataset, _, split = _parse_hf(text)
        base = Path(dataset.rstrip("/")).name
        return f"{base}-{split}" if split else base
    path = source_path(text)
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line, row, None) or (line, None, reason) per non-empty line."""
    hint = "" if path.suffix else f" (not a file; named benchmarks: {', '.join(NAMED_BENCHMARKS)})"
    return json_lines(path, "prompts", hint)


def _hf_rows(source: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """Rows of a Hugging Face dataset, numbered from 1 like lines."""
    try:
        import datasets
    except ImportError as exc:
        raise RecordError(f"reading {source} needs the datasets package ({exc})") from None
    name, config, split = _parse_hf(source)
    try:
        if Path(name).is_dir() and config is None:
            data = datasets.load_from_disk(name)  # a save_to_disk directory
        else:
            data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise RecordError(f"cannot load the dataset ({type(exc).__name__}: {exc})", source) from None
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise RecordError(f"split {split!r} not in the dataset; it has {sorted(data)} "
                              "(hf:DATASET:SPLIT picks one)", source)
        data = data[split]
    for index, row in enumerate(data, 1):
        yield index, row, None


def _first(row: dict, names: list[str]) -> str | None:
    return next((n for n in names if n in row), None)


def _gsm8k_gold(answer: str) -> str:
    """GSM8K's gold is the text after the last ``####`` (thousands separators dropped, as graders do)."""
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _row_to_prompt(row: dict, fields: PromptFields, source: str, row_index: int) -> Prompt:
    q_field = fields.question or _first(row, ["question", "problem"])
    a_field = fields.answer or _first(row, ["gold_answer", "answer"])
    id_field = fields.id or _first(row, ["id", "unique_id"])
    if q_field is None or q_field not in row:
        raise RecordError(f"no question field (looked for {fields.question or 'question/problem'})")
    if a_field is None or a_field not in row:
        raise RecordError(f"no gold answer field (looked for {fields.answer or 'gold_answer/answer'})")
    gold = row[a_field]
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        if not math.isfinite(gold):
            raise RecordError(f"field '{a_field}' is {gold} (NaN/inf is no answer)")
        gold = str(gold)
    if not isinstance(gold, str):
        raise RecordError(f"field '{a_field}' must be a string, got {type(gold).__name__}")
    if a_field == "answer" and "####" in gold:  # GSM8K: worked solution, then "#### N"
        gold = _gsm8k_gold(gold)
    qid = row[id_field] if id_field and id_field in row else f"{source}-{row_index:05d}"
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise RecordError(f"field '{id_field}' must be a string or an integer, got {type(qid).__name__}")
    # Our own Prompt records carry their source; benchmark rows get "<benchmark-split>:<row>".
    own_source = row.get("source") if "gold_answer" in row else None
    prompt = Prompt(id=str(qid), question=row[q_field], gold_answer=gold,
                    source=own_source if isinstance(own_source, str) else f"{source}:{row_index}")
    prompt.validate()
    return prompt


def load_prompts(source: str | Path, fields: PromptFields | None = None, limit: int | None = None) -> list[Prompt]:
    """The first ``limit`` prompts of a source (see the module docstring) in its order.

    A bad row raises RecordError naming the file (or ``hf:`` source) and line (row, from 1).
    """
    text = str(source).strip()
    fields = fields or PromptFields()
    if text.startswith(HF_PREFIX):
        where, rows = text, _hf_rows(text)
    else:
        where = source_path(text)
        rows = _jsonl_rows(where)
    name = source_name(text)
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, row, reason in rows:
        if limit is not None and len(out) >= limit:
            break
        if reason is None and not isinstance(row, dict):
            reason = "expected a JSON object"
        if reason is not None:
            raise RecordError(reason, where, lineno)
        try:
            prompt = _row_to_prompt(row, fields, name, len(out))
        except RecordError as exc:
            raise RecordError(exc.reason, where, lineno) from None
        if prompt.id in seen:
            raise RecordError(f"duplicate id {prompt.id!r} (first on line {seen[prompt.id]})", where, lineno)
        seen[prompt.id] = lineno
        out.append(prompt)
    if not out:
        raise RecordError("no prompts in this file", where)
    return out


def resolve_template(template: PromptTemplate, tokenizer) -> PromptTemplate:
    """The template with the tokenizer's chat template filled in verbatim, so a tree records it."""
    if not template.use_chat_template:
        return PromptTemplate(**{**template.__dict__, "chat_template": None})
    chat = template.chat_template or getattr(tokenizer, "chat_template", None)
    if not chat:
        raise ValueError("use_chat_template is true but the tokenizer has no chat template "
                         "(set template.use_chat_template=false to use plain_format)")
    return PromptTemplate(**{**template.__dict__, "chat_template": chat})


def render_prompt(template: PromptTemplate, tokenizer, question: str) -> tuple[str, list[int]]:
    """``(prompt_text, prompt_token_ids)`` for a question under a resolved template.

    The ids are :func:`~sppd_megatron.tokenization.encode`'s, the ones training computes from the
    same text: the tokenizer's BOS once, whether the chat template writes it or not.
    """
    if template.use_chat_template:
        messages = [{"role": "user", "content": question}]
        if template.system_prompt:
            messages.insert(0, {"role": "system", "content": template.system_prompt})
        text = tokenizer.apply_chat_template(messages, chat_template=template.chat_template,
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = template.plain_format.format(system=template.system_prompt, question=question)
    return text, encode(tokenizer, text)

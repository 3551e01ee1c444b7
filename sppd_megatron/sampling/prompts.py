"""Questions in, model prompts out.

:func:`load_prompts` reads our own Prompt records and the benchmark layouts in ../shared/data
(GSM8K ``{question, answer: "... #### N"}``, MATH-500 ``{problem, answer, unique_id}``, GaoKao
``{question, answer}``) line by line; field names can be overridden. :func:`render_prompt` turns a
question into the exact text the policy is conditioned on, using a recorded PromptTemplate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sppd_megatron.records import Prompt, PromptTemplate, RecordError
from sppd_megatron.tokenization import encode


@dataclass
class PromptFields:
    """Field names of a prompts file; None means "detect from the layout"."""

    question: str | None = None
    """Field holding the question (detected: ``question``, then ``problem``)."""
    answer: str | None = None
    """Field holding the gold answer (detected: ``gold_answer``, then ``answer``; GSM8K's text after ``####``)."""
    id: str | None = None
    """Field holding a unique id (detected: ``id``, then ``unique_id``; else ``<source>-<row>``)."""


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


def source_name(path: Path) -> str:
    """``../shared/data/gsm8k/test.jsonl`` -> ``gsm8k-test``: benchmark folder and split."""
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def load_prompts(path: str | Path, fields: PromptFields | None = None, limit: int | None = None) -> list[Prompt]:
    """All prompts of a JSONL file in file order; a bad line raises RecordError(file, line)."""
    path = Path(path)
    fields = fields or PromptFields()
    source = source_name(path)
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise RecordError(f"cannot open prompts ({exc.strerror})", path) from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RecordError(f"not UTF-8 text (byte {exc.start} of the line)", path, lineno) from None
            except json.JSONDecodeError as exc:
                raise RecordError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, lineno) from None
            except RecursionError:
                raise RecordError("malformed JSON (nested too deeply)", path, lineno) from None
            if not isinstance(row, dict):
                raise RecordError("expected a JSON object", path, lineno)
            try:
                prompt = _row_to_prompt(row, fields, source, len(out))
            except RecordError as exc:
                raise RecordError(exc.reason, path, lineno) from None
            if prompt.id in seen:
                raise RecordError(f"duplicate id {prompt.id!r} (first on line {seen[prompt.id]})", path, lineno)
            seen[prompt.id] = lineno
            out.append(prompt)
    if not out:
        raise RecordError("no prompts in this file", path)
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

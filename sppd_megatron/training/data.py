"""Training records -> token rows -> micro-batches. Tokenisation happens here, once, and is checked.

Texts are tokenised with :func:`sppd_megatron.tokenization.encode`, as sampling tokenised the
prompts the steps were generated from, so a model trains on the ids it was sampled with.

Every record is read, validated and tokenised before the first forward pass, so bad data (missing
fields, an empty step, NaN values, a pair longer than ``max_length``, ids outside the model's
vocabulary, a step that re-tokenises differently when joined to its prefix) stops the run with
``file:line: reason`` before any training time is spent.

A pair is two rows (chosen, rejected) that always travel together, so they share a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from sppd_megatron.records import PreferencePair, RecordError, SFTExample, iter_jsonl_lenient
from sppd_megatron.tokenization import encode

MAX_REPORTED_ERRORS = 10


class DataError(ValueError):
    """Bad training data; the message lists ``file:line: reason`` for each problem found."""


@dataclass
class Row:
    """One sequence: ``ids[:context_len]`` is context (no loss), the rest is the continuation."""

    ids: list[int]
    context_len: int
    ends_with_eos: bool


@dataclass
class Example:
    rows: list[Row]  # [response] for SFT, [chosen, rejected] for pairs
    values: list[float | None]
    ref_logps: list[float | None]
    where: str  # file:line, for messages
    tree: str = ""  # the question the record came from (data.group_by: tree)
    state: str = ""  # the context its continuations share (data.group_by: state)


def _tokenize_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    ctx_ids = encode(tokenizer, context)
    full_ids = encode(tokenizer, context + continuation)
    if full_ids[: len(ctx_ids)] != ctx_ids or len(full_ids) == len(ctx_ids):
        raise RecordError(
            "the continuation re-tokenises differently when joined to its context (a token merges across "
            "the boundary); end steps with the delimiter or use a tokenizer whose boundary is stable",
        )
    return full_ids, len(ctx_ids)


def _row(tokenizer, context: str, continuation: str, ends: bool, append_eos: bool) -> Row:
    ids, ctx_len = _tokenize_continuation(tokenizer, context, continuation)
    eos = ends and append_eos
    if eos:
        if tokenizer.eos_token_id is None:
            raise RecordError("the tokenizer has no EOS token; set data.append_eos=false")
        ids = ids + [tokenizer.eos_token_id]
    return Row(ids=ids, context_len=ctx_len, ends_with_eos=eos)


def load_examples(path: str | Path, stage: str, tokenizer, max_length: int, vocab_size: int,
                  append_eos: bool = True, need_values: bool = False) -> list[Example]:
    """Read, validate and tokenise every record of ``path``; raise DataError listing what is wrong."""
    record_cls = SFTExample if stage == "sft" else PreferencePair
    errors: list[str] = []
    examples: list[Example] = []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training file not found")

    def fail(line: int, reason: str) -> None:
        errors.append(f"{path}:{line}: {reason}")

    for lineno, rec, reason in iter_jsonl_lenient(path, record_cls):
        if rec is None:
            fail(lineno, reason)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        try:
            if isinstance(rec, SFTExample):
                rows = [_row(tokenizer, rec.prompt, rec.response, rec.ends, append_eos)]
                values, refs = [rec.value], [None]
            else:
                if need_values and (rec.chosen_value is None or rec.rejected_value is None):
                    raise RecordError("chosen_value and rejected_value are required by this loss (dynamic margin / SVPO)")
                rows = [
                    _row(tokenizer, rec.prompt + rec.prefix, rec.chosen, rec.chosen_ends, append_eos),
                    _row(tokenizer, rec.prompt + rec.rejected_context, rec.rejected, rec.rejected_ends, append_eos),
                ]
                values = [rec.chosen_value, rec.rejected_value]
                refs = [rec.ref_chosen_logp, rec.ref_rejected_logp]
            for r in rows:
                if len(r.ids) > max_length:
                    raise RecordError(
                        f"sequence of {len(r.ids)} tokens is longer than data.max_length={max_length} "
                        "(raise data.max_length or drop the record)"
                    )
                top = max(r.ids)
                if top >= vocab_size:
                    raise RecordError(
                        f"token id {top} is outside the model's vocabulary ({vocab_size}): wrong tokenizer for this model?"
                    )
            tree = rec.question_id or f"{path}:{lineno}"
            state = rec.prompt if isinstance(rec, SFTExample) else rec.prompt + rec.prefix
            examples.append(Example(rows=rows, values=values, ref_logps=refs, where=f"{path}:{lineno}", tree=tree,
                                    state=state))
        except RecordError as exc:
            fail(lineno, exc.reason)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        more = " (stopped after the first 10)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DataError(f"bad training data in {path}{more}:\n" + "\n".join(errors))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples

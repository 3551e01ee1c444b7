"""Training records -> token rows -> micro-batches. Tokenisation happens here, once, and is checked.

Texts are tokenised with :func:`sppd_megatron.tokenization.encode`, as sampling tokenised the
prompts the steps were generated from, so a model trains on the ids it was sampled with.

Every record is read, validated and tokenised before the first forward pass, so bad data (missing
fields, an empty step, NaN values, ids outside the model's vocabulary, a step that re-tokenises
differently when joined to its prefix) stops the run with ``file:line: reason`` before any
training time is spent. A record longer than ``max_length`` does too, unless ``data.overlong``
says otherwise (``drop`` it to a rejects file, or ``truncate`` its context; see DataConfig).

:func:`build_example` is the one place a record becomes token rows: ``sppd-megatron pairs`` calls
it on every record it builds, with the training stage's settings, so the loop never hands
training a record that training would refuse.

A pair is two rows (chosen, rejected) that always travel together, so they share a micro-batch.
The ``prm`` stage reads scored trees instead: one example per sibling group (the children of one
state), a row per child state (:func:`state_row`, the same rows the value-head PRM scores), so
siblings share a micro-batch too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from sppd_megatron.records import PreferencePair, RecordError, SFTExample, Tree, iter_jsonl_lenient
from sppd_megatron.tokenization import BoundaryMergeError, encode_continuation
from sppd_megatron.training.config import Overlong

MAX_REPORTED_ERRORS = 10


class DataError(ValueError):
    """Bad training data; the message lists ``file:line: reason`` for each problem found."""


class TooLong(RecordError):
    """A record whose rows do not fit ``max_length`` under the ``data.overlong`` mode in force."""


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
    line: int = 0  # the record's line in its file
    truncated: bool = False  # a row's context was cut to fit (data.overlong=truncate)


def _row(tokenizer, context: str, continuation: str, ends: bool, append_eos: bool) -> Row:
    ids, ctx_len = encode_continuation(tokenizer, context, continuation)
    eos = ends and append_eos
    if eos:
        if tokenizer.eos_token_id is None:
            raise RecordError("the tokenizer has no EOS token; set data.append_eos=false")
        ids = ids + [tokenizer.eos_token_id]
    return Row(ids=ids, context_len=ctx_len, ends_with_eos=eos)


def state_row(tokenizer, prompt: str, prefix: str, step: str) -> Row:
    """The row whose last token is where a value head reads V(state after ``step``): context ``prompt +
    prefix`` (the earlier steps), continuation ``step`` and no EOS. Training (stage prm) and serving
    (:class:`~sppd_megatron.training.value_prm.MegatronValuePRM`) build value rows only here.

    A value is read at the state's last token and no loss reads the step's log-probs, so a step that
    does not tokenise as a continuation of its context (BoundaryMergeError: its first token merges
    with the context's last, or it is empty) is still a state: its row is the whole state's
    tokenisation, its context the ids that tokenisation shares with the context's own.
    """
    try:
        return _row(tokenizer, prompt + prefix, step, ends=False, append_eos=False)
    except BoundaryMergeError as exc:
        context, full = exc.context_ids, exc.full_ids
        shared = next((i for i, (a, b) in enumerate(zip(context, full)) if a != b), min(len(context), len(full)))
        return Row(ids=full, context_len=max(0, min(shared, len(full) - 1)), ends_with_eos=False)


def _fit(row: Row, max_length: int, overlong: Overlong) -> Row:
    """``row`` if it fits ``max_length``; its left-truncated copy under ``truncate``; else TooLong."""
    if len(row.ids) <= max_length:
        return row
    if overlong != "truncate":
        raise TooLong(f"sequence of {len(row.ids)} tokens is longer than data.max_length={max_length} "
                      "(raise data.max_length, or set data.overlong=drop or truncate)")
    cut = len(row.ids) - max_length
    if cut >= row.context_len:  # at least one context token must stay to predict the first scored one
        raise TooLong(f"continuation of {len(row.ids) - row.context_len} tokens does not fit data.max_length="
                      f"{max_length} with any context; data.overlong=truncate cuts only the context, never the "
                      "continuation (raise data.max_length)")
    return Row(ids=row.ids[cut:], context_len=row.context_len - cut, ends_with_eos=row.ends_with_eos)


def build_example(rec: SFTExample | PreferencePair, tokenizer, max_length: int, vocab_size: int | None = None,
                  append_eos: bool = True, need_values: bool = False, overlong: Overlong = "error",
                  where: str = "", line: int = 0) -> Example:
    """The token rows of one record, as training sees them; RecordError (TooLong if too long) says why not.

    ``vocab_size`` None skips the vocabulary check (a caller that knows the tokenizer, not the model).
    """
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
    fitted = [_fit(r, max_length, overlong) for r in rows]
    _check_vocab(fitted, vocab_size)
    state = rec.prompt if isinstance(rec, SFTExample) else rec.prompt + rec.prefix
    return Example(rows=fitted, values=values, ref_logps=refs, where=where, line=line,
                   truncated=any(f is not r for f, r in zip(fitted, rows)), tree=rec.question_id or where,
                   state=state)


def _check_vocab(rows: list[Row], vocab_size: int | None) -> None:
    if vocab_size is not None:
        top = max(max(r.ids) for r in rows)
        if top >= vocab_size:
            raise RecordError(
                f"token id {top} is outside the model's vocabulary ({vocab_size}): wrong tokenizer for this model?"
            )


def value_examples(tree: Tree, value_name: str, tokenizer, max_length: int, vocab_size: int | None = None,
                   overlong: Overlong = "error", where: str = "", line: int = 0) -> list[Example]:
    """Stage prm: one example per state of ``tree`` that has children, its children's states as rows,
    labelled with their ``values[value_name]``; RecordError when a step has no such value."""
    children: dict[int, list] = {}
    for node in tree.nodes[1:]:
        if value_name not in node.values:
            raise RecordError(f"tree {tree.id}: node {node.node_id} has no value '{value_name}' "
                              f"(values: {sorted(node.values) or 'none'}; data.value_name)")
        children.setdefault(node.parent, []).append(node)
    out = []
    for parent, kids in sorted(children.items()):
        prefix = tree.state_text(parent)
        rows = [state_row(tokenizer, tree.prompt, prefix, k.text) for k in kids]
        fitted = [_fit(r, max_length, overlong) for r in rows]
        _check_vocab(fitted, vocab_size)
        out.append(Example(rows=fitted, values=[k.values[value_name] for k in kids], ref_logps=[None] * len(kids),
                           where=where, line=line, tree=tree.id, state=tree.prompt + prefix,
                           truncated=any(f is not r for f, r in zip(fitted, rows))))
    return out


def _records(path: Path, stage: str):
    """``(file, line, record or None, reason)`` for every line the stage reads."""
    if stage == "prm":
        from sppd_megatron.scoring.cli import input_shards

        try:
            files, cls = input_shards(path), Tree
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
    else:
        files, cls = [path], SFTExample if stage == "sft" else PreferencePair
    for file in files:
        for lineno, rec, reason in iter_jsonl_lenient(file, cls):
            yield file, lineno, rec, reason


def load_examples(path: str | Path, stage: str, tokenizer, max_length: int, vocab_size: int,
                  append_eos: bool = True, need_values: bool = False, overlong: Overlong = "error",
                  rejects: str | Path | None = None, value_name: str = "tree") -> list[Example]:
    """Every record of ``path`` read, validated and tokenised; DataError lists what is wrong.

    A list for small files and tools; training streams the same records into a memory-mapped
    :class:`~sppd_megatron.training.dataset.TokenizedDataset` with :func:`read_examples`.
    """
    return list(read_examples(path, stage, tokenizer, max_length, vocab_size, append_eos, need_values, overlong,
                              rejects, value_name))


def read_examples(path: str | Path, stage: str, tokenizer, max_length: int, vocab_size: int,
                  append_eos: bool = True, need_values: bool = False, overlong: Overlong = "error",
                  rejects: str | Path | None = None, value_name: str = "tree") -> Iterator[Example]:
    """Yield the examples of ``path`` in file order; at the end raise DataError if any record was bad.

    Bad records do not stop the reading until ``MAX_REPORTED_ERRORS``, so one run names them all.
    With ``overlong=drop`` the records too long are left out; ``rejects`` (given on one rank) is
    where they are listed, ``{"file", "line", "reason"}`` each, and the counts are printed. Stage
    ``prm`` reads the scored trees of ``path`` (a directory of shards or one file), labelled by ``value_name``.
    """
    errors: list[str] = []
    dropped: list[tuple[Path, int, str]] = []
    kept = truncated = 0
    path = Path(path)
    if not (path.is_file() or (stage == "prm" and path.is_dir())):
        raise DataError(f"{path}: training file not found")

    def fail(file: Path, line: int, reason: str) -> None:
        errors.append(f"{file}:{line}: {reason}")

    for file, lineno, rec, reason in _records(path, stage):
        if rec is None:
            fail(file, lineno, reason)
        else:
            try:
                if stage == "prm":
                    built = value_examples(rec, value_name, tokenizer, max_length, vocab_size, overlong,
                                           where=f"{file}:{lineno}", line=lineno)
                else:
                    built = [build_example(rec, tokenizer, max_length, vocab_size, append_eos, need_values,
                                           overlong, where=f"{file}:{lineno}", line=lineno)]
            except TooLong as exc:
                if overlong == "drop":
                    dropped.append((file, lineno, exc.reason))
                else:
                    fail(file, lineno, exc.reason)
            except RecordError as exc:
                fail(file, lineno, exc.reason)
            else:
                if not errors:  # after the first bad record, only look for more
                    for example in built:
                        kept += 1
                        truncated += example.truncated
                        yield example
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        more = " (stopped after the first 10)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DataError(f"bad training data in {path}{more}: " + "; ".join(errors))
    if rejects is not None:
        _report_overlong(path, rejects, overlong, dropped, truncated, max_length)
    if not kept:
        raise DataError(f"{path}: no records" + (f" left after dropping {len(dropped)} longer than "
                                                 f"data.max_length={max_length}" if dropped else ""))


def _report_overlong(path: Path, rejects: str | Path, overlong: Overlong, dropped: list[tuple[Path, int, str]],
                     truncated: int, max_length: int) -> None:
    from sppd_megatron.scoring.rejects import RejectsFile

    if overlong == "drop":  # the file is rewritten every time, as the records are re-read
        with RejectsFile(rejects) as out:
            for file, line, reason in dropped:
                out.add(file, line, reason, "longer than data.max_length")
    if dropped:
        print(f"{path}: dropped {len(dropped)} record(s) longer than data.max_length={max_length} "
              f"(data.overlong=drop); listed in {rejects}", flush=True)
    if truncated:
        print(f"{path}: truncated the context of {truncated} record(s) to data.max_length={max_length} "
              "(data.overlong=truncate)", flush=True)

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

import numpy as np
import torch

from sppd_megatron.records import PreferencePair, RecordError, SFTExample, iter_jsonl_lenient
from sppd_megatron.tokenization import encode_continuation

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


def _row(tokenizer, context: str, continuation: str, ends: bool, append_eos: bool) -> Row:
    ids, ctx_len = encode_continuation(tokenizer, context, continuation)
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
            examples.append(Example(rows=rows, values=values, ref_logps=refs, where=f"{path}:{lineno}"))
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


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_example_indices(n: int, step: int, global_batch: int, seed: int, shuffle: bool) -> list[int]:
    """The examples of optimizer step ``step``: a deterministic walk over shuffled epochs.

    Depends only on (n, step, batch, seed), not on the parallel layout or on where a run resumed.
    """
    out = []
    start = step * global_batch
    for pos in range(start, start + global_batch):
        epoch, i = divmod(pos, n)
        out.append(int(epoch_order(n, epoch, seed, shuffle)[i]))
    return out


def collate(examples: list[Example], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``examples`` in order (pair rows adjacent) as padded tensors.

    ``labels[r, t]`` is the token at t+1; ``loss_mask[r, t]`` marks positions predicting a
    continuation token; ``step_end[r]`` is the position of the continuation's last non-EOS token
    (the value head reads the hidden state there).
    """
    rows = [r for ex in examples for r in ex.rows]
    n = len(rows)
    tokens = torch.full((n, max_length), pad_id, dtype=torch.long)
    labels = torch.full((n, max_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, max_length), dtype=torch.float32)
    step_end = torch.zeros(n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        tokens[i, : len(ids)] = ids
        labels[i, : len(ids) - 1] = ids[1:]
        loss_mask[i, r.context_len - 1 : len(ids) - 1] = 1.0
        step_end[i] = len(ids) - 1 - (1 if r.ends_with_eos else 0)
    values = torch.tensor([v if v is not None else float("nan") for ex in examples for v in ex.values])
    refs = torch.tensor([v if v is not None else float("nan") for ex in examples for v in ex.ref_logps])
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "step_end": step_end,
        "values": values,
        "ref_logps": refs,
        "position_ids": torch.arange(max_length).unsqueeze(0).expand(n, max_length).contiguous(),
    }

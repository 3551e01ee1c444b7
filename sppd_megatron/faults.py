"""Fault injection: one way to make any stage fail at a named point, for tests and failure drills.

    SPPD_FAULT=<point>[[<label>]][@<rank>][:<n>[:<action>]][,<more>...]

The n-th time (default 1) this process reaches ``<point>``, ``<action>`` (default ``kill``) happens:

- ``kill``: SIGKILL this process, like a node failure or the OOM killer (nothing is flushed beyond
  what was already fsynced; a pipeline's trainer and export children die with it, the pipeline
  itself sees its child die);
- ``enospc`` / ``eacces``: the write at that point fails with ``OSError`` (ENOSPC, "No space left
  on device") or ``PermissionError`` (EACCES) naming the file it was writing;
- ``hang``: the process stops there until it is killed (a stuck process holding its locks);
- ``nan``: only at ``train.grad``: one gradient element of this rank becomes NaN (a bad rank).

``@<rank>`` restricts the fault to one torch.distributed rank (``RANK`` of torchrun); without it
every rank counts and fails. ``[<label>]`` restricts it to processes that set that label (a trainer
sets its stage: ``sft``, ``dpo``, ``step_dpo``, ``svpo``), so ``train.step[dpo]:2`` kills only a DPO
trainer, e.g. the DPO-PRM child of a pipeline. Counting is per process, so a pipeline's training
children each count from zero. Every point is listed in :data:`POINTS` with where it sits;
docs/faults.md has the table.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass

ENV = "SPPD_FAULT"

POINTS: dict[str, str] = {
    "sample.tree": "sample: before the n-th tree is appended to its shard",
    "score.tree": "score: before the n-th scored tree is appended to its shard (any scorer: tree, mc, hf)",
    "pairs.write": "pairs: before the n-th dataset file (sft, dpo, step, svpo, in that order) is written",
    "train.reference": "train: before the precomputed reference log-probs are written",
    "train.grad": "train: after the backward pass of optimizer step n, before the non-finite check",
    "train.metrics": "train: before the metrics line of optimizer step n is written",
    "train.step": "train: after optimizer step n and its checkpoint (if one is due)",
    "ckpt.model": "checkpoint save n: after the model's dist checkpoint, before the optimizer's",
    "ckpt.state": "checkpoint save n: after the model and optimizer files, before trainer_state.json",
    "ckpt.latest": "checkpoint save n: after trainer_state.json, before the `latest` marker moves",
    "export.shard": "mcore-to-hf: before the n-th safetensors shard file is written",
    "eval.question": "eval: before the n-th prediction is appended to predictions.jsonl",
    "report.write": "run: before report.json and report.md are written",
}
ACTIONS = ("kill", "enospc", "eacces", "hang", "nan")


class FaultSpecError(ValueError):
    """``SPPD_FAULT`` names an unknown point or action."""


@dataclass(frozen=True)
class Fault:
    point: str
    n: int
    action: str
    rank: int | None
    label: str | None = None


_WHERE = re.compile(r"^(?P<point>[a-z_.]+)(\[(?P<label>[\w-]+)\])?(@(?P<rank>\d+))?$")


def parse(spec: str) -> list[Fault]:
    """The faults of an ``SPPD_FAULT`` value (see the module docstring)."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        where = _WHERE.match(parts[0])
        if len(parts) > 3 or where is None:
            raise FaultSpecError(f"{ENV}={spec!r}: {item!r} is not <point>[[<label>]][@<rank>][:<n>[:<action>]]")
        point = where["point"]
        if point not in POINTS:
            raise FaultSpecError(f"{ENV}={spec!r}: unknown point {point!r}; points: {', '.join(POINTS)}")
        try:
            n = int(parts[1]) if len(parts) > 1 else 1
        except ValueError:
            raise FaultSpecError(f"{ENV}={spec!r}: the count of {item!r} must be an integer") from None
        action = parts[2] if len(parts) > 2 else "kill"
        if action not in ACTIONS or n < 1:
            raise FaultSpecError(f"{ENV}={spec!r}: {item!r} needs a count >= 1 and an action in {ACTIONS}")
        if action == "nan" and point != "train.grad":
            raise FaultSpecError(f"{ENV}={spec!r}: action nan exists only at train.grad")
        faults.append(Fault(point, n, action, int(where["rank"]) if where["rank"] else None, where["label"]))
    return faults


_counts: dict[str, int] = {}
_parsed: tuple[str, list[Fault]] | None = None
_label: str | None = None


def set_label(label: str | None) -> None:
    """Name this process for ``[<label>]`` faults (the trainer: its stage)."""
    global _label
    _label = label


def _armed() -> list[Fault]:
    global _parsed
    spec = os.environ.get(ENV, "")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    return _parsed[1]


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def hit(point: str, path: str | os.PathLike | None = None) -> str | None:
    """Mark that this process reached ``point`` (about to write ``path``, if it writes).

    Returns ``"nan"`` when a nan fault is due here (the caller poisons its numbers), else None;
    the other actions never return. Costs a dict lookup when ``SPPD_FAULT`` is unset.
    """
    if not os.environ.get(ENV):
        return None
    if point not in POINTS:
        raise FaultSpecError(f"fault point {point!r} is not in faults.POINTS")
    faults = [f for f in _armed() if f.point == point and f.rank in (None, _rank()) and f.label in (None, _label)]
    if not faults:
        return None
    _counts[point] = count = _counts.get(point, 0) + 1
    for fault in faults:
        if fault.n != count:
            continue
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "hang":
            while True:
                time.sleep(3600)
        if fault.action in ("enospc", "eacces"):
            code = errno.ENOSPC if fault.action == "enospc" else errno.EACCES
            raise (PermissionError if code == errno.EACCES else OSError)(code, os.strerror(code), str(path or point))
        return fault.action
    return None


def reset() -> None:
    """Forget the counts (tests that run several commands in one process)."""
    _counts.clear()

"""Evaluation modes of SPPD section 6.1 and how each one picks a question's final answer.

| name          | what decides the answer                                                        |
|---------------|--------------------------------------------------------------------------------|
| ``greedy``    | the greedy (temperature 0) chain of thought, pass@1                            |
| ``maj@N``     | the answer given most often among the first N samples (self-consistency)       |
| ``orm_vote@N``| the answer whose samples' ORM scores sum highest among the first N samples     |
| ``orm_max@N`` | the answer of the single highest-scored sample among the first N samples       |
| ``sbs@B``     | step-level beam search of width B guided by the reward model's step values: the best-valued finished solution |
| ``sbs_vote@B``| the same search: the answer whose finished solutions' values sum highest        |

Rules shared by the sampling modes, so every mode is a pure function of a Prediction record:

- answers are grouped into equivalence classes with ``scoring.grading.answers_equal`` (not string
  equality), greedily in sample order: a sample joins the first earlier class whose first member
  it equals. A class is represented by its first member, whose verdict is the class's verdict.
  Because a sample's class depends only on earlier samples, ``maj@4`` and ``maj@8`` of one run
  see the same classes for the first four samples;
- a sample without an answer (None: nothing boxed, no ``####``, no "the answer is") never wins;
  when all N samples lack one the question counts as wrong (and as ``no_answer``);
- ties go to the class (or, for ``orm_max``, the sample) that occurs first in sample order.

The ``sbs`` modes read their own record of the search (:mod:`.sbs`, ``Prediction.sbs``), whose
finished solutions are in order of value; the same rules apply to them (a solution without an
answer never wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from sppd_megatron.records import Prediction
from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS, answers_equal

MODE_KINDS = ("greedy", "maj", "orm_vote", "orm_max", "sbs", "sbs_vote")
_MODE_RE = re.compile(r"^(greedy|maj|orm_vote|orm_max|sbs|sbs_vote)(?:@(\d+))?$")


@dataclass(frozen=True)
class Mode:
    """A parsed mode name: ``kind`` (one of MODE_KINDS) and ``n`` samples (1 for greedy)."""

    kind: str
    n: int = 1

    @property
    def name(self) -> str:
        return "greedy" if self.kind == "greedy" else f"{self.kind}@{self.n}"

    @property
    def samples_needed(self) -> int:
        """Sampled solutions per question this mode reads (the greedy one and beam searches are not samples)."""
        return 0 if self.kind in ("greedy", "sbs", "sbs_vote") else self.n

    @property
    def needs_orm(self) -> bool:
        return self.kind in ("orm_vote", "orm_max")

    @property
    def beam_width(self) -> int | None:
        """B of a step-level beam search mode, None for the others."""
        return self.n if self.kind in ("sbs", "sbs_vote") else None


def parse_mode(text: str | Mode) -> Mode:
    """``"greedy"``, ``"maj@8"``, ``"orm_vote@64"``, ``"ORM_MAX@4"`` -> Mode; anything else is a ValueError."""
    if isinstance(text, Mode):
        return text
    match = _MODE_RE.match(str(text).strip().lower())
    if not match:
        raise ValueError(f"unknown evaluation mode {text!r}; use greedy, maj@N, orm_vote@N, orm_max@N, sbs@B or sbs_vote@B")
    kind, n = match.group(1), match.group(2)
    if kind == "greedy":
        if n is not None:
            raise ValueError(f"mode {text!r}: greedy takes no @N (it is one deterministic solution)")
        return Mode("greedy", 1)
    if n is None or int(n) < 1:
        raise ValueError(f"mode {text!r}: {kind} needs a sample count N >= 1, e.g. {kind}@8")
    return Mode(kind, int(n))


def parse_modes(texts: Sequence[str | Mode]) -> list[Mode]:
    """Parse and de-duplicate (first occurrence kept), so a mode never appears twice in a table."""
    out: list[Mode] = []
    for text in texts:
        mode = parse_mode(text)
        if mode not in out:
            out.append(mode)
    if not out:
        raise ValueError("no evaluation modes given")
    return out


# --- equivalence classes -------------------------------------------------------------------------


def answer_classes(answers: Sequence[str | None],
                   timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS) -> list[int | None]:
    """Per sample, the index of the first sample with an equivalent answer (None for no answer)."""
    classes: list[int | None] = []
    representatives: list[int] = []
    for i, answer in enumerate(answers):
        if answer is None:
            classes.append(None)
            continue
        home = next((r for r in representatives if answers_equal(answer, answers[r], timeout_seconds)), None)
        if home is None:
            representatives.append(i)
            home = i
        classes.append(home)
    return classes


def classes_of(pred: Prediction, timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS) -> list[int | None]:
    """The record's stored classes, or computed from its answers when it has none stored."""
    if pred.answer_classes is not None:
        return list(pred.answer_classes)
    return answer_classes(pred.answers, timeout_seconds)


# --- selection: which sample's verdict a mode takes ---------------------------------------------


def _best_class(classes: Sequence[int | None], weights: Sequence[float]) -> int | None:
    """The class with the largest total weight; ties go to the class that occurs first."""
    totals: dict[int, float] = {}
    for cls, weight in zip(classes, weights):
        if cls is not None:
            totals[cls] = totals.get(cls, 0.0) + weight
    if not totals:
        return None
    # dicts keep insertion order and a class first appears at its representative's index,
    # so max() over this order returns the earliest of the tied classes.
    return max(totals, key=lambda cls: totals[cls])


def select_majority(classes: Sequence[int | None], scores: Sequence[float] | None) -> int | None:
    return _best_class(classes, [1.0] * len(classes))


def select_orm_vote(classes: Sequence[int | None], scores: Sequence[float] | None) -> int | None:
    return _best_class(classes, _need_scores(scores, len(classes)))


def select_orm_max(classes: Sequence[int | None], scores: Sequence[float] | None) -> int | None:
    scores = _need_scores(scores, len(classes))
    candidates = [i for i, cls in enumerate(classes) if cls is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda i: scores[i])  # max() keeps the first of equal scores


def _need_scores(scores: Sequence[float] | None, n: int) -> Sequence[float]:
    if scores is None or len(scores) < n:
        raise ValueError("ORM modes need an ORM score for every sample (evaluate with an ORM)")
    return scores


SELECTORS: dict[str, Callable[[Sequence[int | None], Sequence[float] | None], int | None]] = {
    "maj": select_majority,
    "orm_vote": select_orm_vote,
    "orm_max": select_orm_max,
}


@dataclass(frozen=True)
class Verdict:
    """A mode's decision on one question: the chosen answer (None: none), and whether it is right."""

    answer: str | None
    correct: bool


def judge(mode: Mode, pred: Prediction, classes: Sequence[int | None] | None = None) -> Verdict:
    """Apply ``mode`` to one question's record; ``classes`` may pass precomputed answer classes."""
    if mode.kind == "greedy":
        if pred.greedy_generation is None:
            raise ValueError(f"{pred.benchmark}/{pred.id}: no greedy solution recorded (mode greedy)")
        return Verdict(pred.greedy_answer, bool(pred.greedy_correct) and pred.greedy_answer is not None)
    if mode.beam_width is not None:
        search = (pred.sbs or {}).get(str(mode.beam_width))
        if search is None:
            raise ValueError(f"{pred.benchmark}/{pred.id}: no step-level beam search of width {mode.beam_width} recorded "
                             f"(mode {mode.name})")
        select = select_orm_max if mode.kind == "sbs" else select_orm_vote
        chosen = select(search.answer_classes, search.values)
        if chosen is None:
            return Verdict(None, False)
        return Verdict(search.answers[chosen], bool(search.correct[chosen]))
    if len(pred.generations) < mode.n:
        raise ValueError(f"{pred.benchmark}/{pred.id}: {len(pred.generations)} samples recorded, {mode.name} needs {mode.n}")
    classes = list(classes if classes is not None else classes_of(pred))[: mode.n]
    scores = pred.scores[: mode.n] if pred.scores is not None else None
    chosen = SELECTORS[mode.kind](classes, scores)
    if chosen is None:
        return Verdict(None, False)
    return Verdict(pred.answers[chosen], bool(pred.correct[chosen]))

"""An arithmetic step checker for the demo's generated problems: a measuring instrument, never a reward.

The demo's problems (:mod:`.problems`) are a start amount and a chain of operations, and their
solutions write one numbered equation per operation, then the answer::

    Ann has 7 pens. She gets 5 more. She gives away half. How many pens does Ann have now?
    Step 1: 7 + 5 = 12.\\n\\nStep 2: 12 / 2 = 6.\\n\\nThe answer is \\boxed{6}.

Given the question and the steps before it, a step is *right* when it is the one correct next step:
equation k applies the question's k-th operation to the amount the previous step wrote (the start
amount for k = 1) and computes it correctly; the answer step comes after the last operation and
boxes the amount the previous step wrote. A step continuing a wrong prefix can therefore be right
(it carries the wrong amount on correctly). Anything else is wrong: a miscopied operand, the wrong
operation (doubling a "triples"), an arithmetic slip, a premature or misplaced answer, text that is
no step. When the prefix itself cannot be read (no written amount to continue from), the step is
not checked (None).

It measures how often a process reward's D_step pairs prefer a right step to a wrong one (their
*precision*); the demo prints it per process reward. Nothing in training reads it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from sppd_megatron.records import PreferencePair

_START = re.compile(r"\b[A-Z][a-z]+ has (\d+) [a-z]+\.")
_OPERATIONS = [
    (re.compile(r"\b(?:He|She) (?:gets|finds|buys) (\d+) more\."), "+", None),
    (re.compile(r"\b(?:He|She) (?:gives away|loses|sells) (\d+)\."), "-", None),
    (re.compile(r"\b(?:He|She) doubles them\."), "*", 2),
    (re.compile(r"\b(?:He|She) triples them\."), "*", 3),
    (re.compile(r"\b(?:He|She) gives away half\."), "/", 2),
]
_EQUATION = re.compile(r"^\s*Step (\d+):\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\.\s*$")
_ANSWER = re.compile(r"^\s*The answer is \\boxed\{(-?\d+)\}\.?\s*$")


def parse_question(text: str) -> tuple[int, list[tuple[str, int]]] | None:
    """``(start amount, [(operator, operand), ...])`` of a generated problem found in ``text`` (e.g. a
    rendered prompt), or None when ``text`` holds no such problem."""
    start = _START.search(text)
    if start is None:
        return None
    found = []
    for pattern, operator, operand in _OPERATIONS:
        for m in pattern.finditer(text, start.end()):
            found.append((m.start(), operator, operand if operand is not None else int(m.group(1))))
    return int(start.group(1)), [(op, n) for _, op, n in sorted(found)]


def _apply(value: int, operator: str, operand: int) -> int | None:
    if operator == "/":
        return value // operand if value % operand == 0 else None
    return {"+": value + operand, "-": value - operand, "*": value * operand}[operator]


def split_steps(text: str) -> list[str]:
    """A solution's steps as written (each up to and including its blank line); none for no text."""
    from sppd_megatron.evaluation.orm import split_steps as cut

    return [s for s in cut(text) if s]


def check_step(question: tuple[int, list[tuple[str, int]]], prefix: Iterable[str], step: str) -> bool | None:
    """Whether ``step`` is the correct next step after ``prefix`` (the earlier steps' texts); None when
    the prefix cannot be followed."""
    start, operations = question
    amount, done = start, 0
    for earlier in prefix:
        m = _EQUATION.match(earlier)
        if m is None:
            return None
        amount, done = int(m.group(5)), done + 1
    m = _EQUATION.match(step)
    if m is not None:
        k, a, operator, b, c = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        return (done < len(operations) and k == done + 1 and a == amount and (operator, b) == operations[done]
                and _apply(a, operator, b) == c)
    m = _ANSWER.match(step)
    if m is not None:
        return done == len(operations) and int(m.group(1)) == amount
    return False


PAIR_CLASSES = ("right over wrong", "wrong over right", "both wrong", "both right", "not checked")


def pair_class(pair: PreferencePair) -> str:
    """Which of :data:`PAIR_CLASSES` a step pair falls in (chosen first)."""
    question = parse_question(pair.prompt)
    if question is None:
        return "not checked"
    chosen = check_step(question, split_steps(pair.prefix), pair.chosen)
    rejected = check_step(question, split_steps(pair.rejected_context), pair.rejected)
    if chosen is None or rejected is None:
        return "not checked"
    return {(True, False): "right over wrong", (False, True): "wrong over right",
            (False, False): "both wrong", (True, True): "both right"}[(chosen, rejected)]


def pair_precision(pairs: Iterable[PreferencePair]) -> dict:
    """Counts of each class and the precision: the share of the pairs whose chosen step is right and
    rejected step wrong."""
    counts = Counter(pair_class(p) for p in pairs)
    total = sum(counts.values())
    out = {"pairs": total, **{c: counts.get(c, 0) for c in PAIR_CLASSES}}
    out["precision"] = round(counts.get("right over wrong", 0) / total, 4) if total else None
    return out

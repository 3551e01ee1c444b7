"""Multi-step arithmetic word problems with numbered step solutions, generated deterministically.

The demo needs data that a tiny character-level model can partly learn on a CPU in minutes, with
solutions split into steps that can each be right or wrong. Each problem is a person with some
items and a chain of operations (gets more, gives away, doubles, ...); its solution has one
numbered step per operation and a final answer step::

    Ann has 7 pens. She gets 5 more. She gives away 3. How many pens does Ann have now?

    Step 1: 7 + 5 = 12.\\n\\nStep 2: 12 - 3 = 9.\\n\\nThe answer is \\boxed{9}.

The pretraining corpus can carry a *misconception*: in a share of its "triples" steps the writer
doubled instead (``7 * 2 = 14``) and carried the wrong amount on to a wrong final answer, as a noisy
web corpus carries common mistakes. A model trained on it triples by doubling most of the time, yet
still triples now and then when sampling. Nothing downstream is told about it: SPPD sees only the
questions and gold answers of its prompts, and finds the right step through the trees' outcomes and
process values. Held-out, OOD and prompt problems are always correct.

Written here rather than taken from reasoning-gym: its generators produce long English problems
that a character model cannot learn in the demo's CPU budget, and a few lines give exact control
of the step count (in-distribution 2-3 steps, harder out-of-distribution 4-5) and of the number
ranges. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sppd_megatron.records import Prompt

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cal", "He"), ("Dee", "She"), ("Eli", "He"), ("Fay", "She"),
         ("Gus", "He"), ("Ivy", "She"), ("Jon", "He"), ("Kim", "She")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "shells", "stamps", "eggs", "cups", "rocks"]
MAX_VALUE = 40
"""Every intermediate amount stays in 1..40 and operands are single digits: small enough for a tiny
character model to learn partly in minutes, large enough that it still makes arithmetic slips."""
MAX_OPERAND = 9


@dataclass(frozen=True)
class Problem:
    """One generated problem: question, numbered solution steps and the answer."""

    id: str
    question: str
    steps: list[str]
    """Each step's text exactly as a solution writes it, delimiter included (the last ends the solution)."""
    answer: int

    @property
    def solution(self) -> str:
        return "".join(self.steps)

    def to_prompt(self, source: str) -> Prompt:
        return Prompt(id=self.id, question=self.question, gold_answer=str(self.answer), source=source)


def _operation(rng: random.Random, value: int, pronoun: str) -> tuple[str, str, int, int]:
    """A random operation applicable to ``value``: (sentence, operator, operand, new value)."""
    choices = []
    if value < MAX_VALUE - 1:
        n = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
        verb = rng.choice(["gets", "finds", "buys"])
        choices.append((f"{pronoun} {verb} {n} more.", "+", n, value + n))
    if value > 1:
        n = rng.randint(1, min(MAX_OPERAND, value - 1))
        verb = rng.choice(["gives away", "loses", "sells"])
        choices.append((f"{pronoun} {verb} {n}.", "-", n, value - n))
    for factor, word in ((2, "doubles"), (3, "triples")):
        if value * factor <= MAX_VALUE:
            choices.append((f"{pronoun} {word} them.", "*", factor, value * factor))
    if value % 2 == 0 and value >= 4:
        choices.append((f"{pronoun} gives away half.", "/", 2, value // 2))
    return rng.choice(choices)


def _apply(value: int, operator: str, operand: int) -> int | None:
    """``value operator operand`` when it is a positive whole amount, else None."""
    if operator == "/":
        return value // operand if value % operand == 0 else None
    out = {"+": value + operand, "-": value - operand, "*": value * operand}[operator]
    return out if out > 0 else None


def _written_steps(start: int, operations: list[tuple[str, int]]) -> list[str] | None:
    """Numbered solution steps and the answer step for ``operations`` applied from ``start``, or
    None when an amount on the way is not a positive whole number."""
    steps, value = [], start
    for k, (operator, operand) in enumerate(operations, 1):
        new = _apply(value, operator, operand)
        if new is None:
            return None
        steps.append(f"Step {k}: {value} {operator} {operand} = {new}.\n\n")
        value = new
    return steps + [f"The answer is \\boxed{{{value}}}."]


def make_problem(seed: int, index: int, num_steps: int, split: str, misconception_rate: float = 0.0) -> Problem:
    """Problem ``index`` of a split: a pure function of (seed, split, index, num_steps, misconception_rate).

    With ``misconception_rate`` > 0, each "triples" step of the written solution is a doubling with
    that probability, and the later steps and the written answer follow from the wrong amount
    (unless that amount cannot go on, e.g. an odd number to halve: then the solution stays right).
    ``answer`` is always the true answer.
    """
    rng = random.Random(f"{seed}:{split}:{index}:{num_steps}")
    # Its own stream, so the problem text is the same at every rate.
    slips = random.Random(f"{seed}:{split}:{index}:{num_steps}:misconception")
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    true_ops, written_ops = [], []
    for _ in range(num_steps):
        sentence, operator, operand, value = _operation(rng, value, pronoun)
        sentences.append(sentence)
        true_ops.append((operator, operand))
        slipped = sentence.endswith("triples them.") and slips.random() < misconception_rate
        written_ops.append((operator, 2 if slipped else operand))
    sentences.append(f"How many {item} does {name} have now?")
    steps = _written_steps(start, written_ops) or _written_steps(start, true_ops)
    return Problem(id=f"{split}-{index:05d}", question=" ".join(sentences), steps=steps, answer=value)


def make_split(seed: int, split: str, count: int, min_steps: int, max_steps: int,
               exclude: set[str] | None = None, misconception_rate: float = 0.0) -> list[Problem]:
    """``count`` problems with ``min_steps..max_steps`` operations, none whose question is in ``exclude``.

    Splits are disjoint by question text (pass the questions of earlier splits), so held-out
    accuracy is measured on questions the model never trained on.
    """
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"steps range {min_steps}..{max_steps} is empty")
    seen = set(exclude or ())
    out: list[Problem] = []
    index = 0
    while len(out) < count:
        steps = min_steps + index % (max_steps - min_steps + 1)
        problem = make_problem(seed, index, steps, split, misconception_rate)
        index += 1
        if problem.question in seen:
            continue
        seen.add(problem.question)
        out.append(problem)
        if index > 100 * count + 1000:
            raise ValueError(f"split {split}: cannot find {count} distinct problems")
    return out

"""The demo's generated problems: deterministic, disjoint splits, correct numbered solutions."""

from __future__ import annotations

import re

from sppd_megatron.pipeline.problems import make_split
from sppd_megatron.scoring.grading import extract_answer, grade


def test_splits_are_deterministic_and_disjoint():
    a = make_split(0, "train", 50, 2, 3)
    assert a == make_split(0, "train", 50, 2, 3)
    held = make_split(0, "held", 30, 2, 3, exclude={p.question for p in a})
    assert not {p.question for p in a} & {p.question for p in held}
    assert len({p.id for p in a}) == 50


def test_solutions_are_numbered_steps_that_compute_the_answer():
    for p in make_split(1, "ood", 40, 4, 5):
        *steps, final = p.steps
        assert 4 <= len(steps) <= 5
        value = None
        for k, step in enumerate(steps, 1):
            m = re.fullmatch(rf"Step {k}: (\d+) ([-+*/]) (\d+) = (\d+)\.\n\n", step)
            assert m, step
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value is None or a == value
            assert r == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and 0 < r <= 99
            value = r
        assert value == p.answer and extract_answer(final) == str(p.answer)
        assert grade(p.solution, p.to_prompt("t").gold_answer)

"""The demo corpus's misconception: same questions, "triples" steps written as doublings, true answers kept."""

import re

from sppd_megatron.pipeline.problems import make_split


def _equations(solution):
    return [tuple(map(str, m)) for m in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)]


def test_misconception_changes_only_triples_steps_and_follows_through():
    right = make_split(0, "pretrain", 400, 2, 3)
    wrong = make_split(0, "pretrain", 400, 2, 3, misconception_rate=1.0)
    assert [p.question for p in right] == [p.question for p in wrong]
    assert [p.answer for p in right] == [p.answer for p in wrong]  # the true answer, whatever is written
    slipped = 0
    for r, w in zip(right, wrong):
        for (a, op, b, c), (a2, op2, b2, c2) in zip(_equations(r.solution), _equations(w.solution)):
            assert op == op2
            assert eval(f"{a2} {op2} {b2}") == int(c2)  # every written step is right arithmetic
            if op == "*" and b == "3":
                assert b2 == "2" or w.solution == r.solution  # doubled, or the wrong amount could not go on
        if w.solution != r.solution:
            slipped += 1
            assert f"\\boxed{{{w.answer}}}" not in w.solution
    assert slipped > 50


def test_rate_zero_is_the_correct_corpus():
    for p in make_split(0, "pretrain", 200, 2, 3, misconception_rate=0.0):
        assert all(eval(f"{a} {op} {b}") == int(c) for a, op, b, c in _equations(p.solution))
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}.")

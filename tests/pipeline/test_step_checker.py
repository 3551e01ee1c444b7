"""The demo's arithmetic step checker (a measuring instrument) on generated problems and written slips."""

from sppd_megatron.pipeline.problems import make_split
from sppd_megatron.pipeline.step_checker import check_step, pair_class, pair_precision, parse_question, split_steps
from sppd_megatron.records import PreferencePair


def test_every_step_of_every_true_solution_is_right_and_each_kind_of_slip_is_wrong():
    problems = make_split(3, "check", 200, 2, 5)
    for p in problems:
        q = parse_question(p.question)
        assert q is not None and len(q[1]) == len(p.steps) - 1, p.question
        for k, step in enumerate(p.steps):
            assert check_step(q, p.steps[:k], step) is True, (p.question, k)
    p = next(p for p in problems if len(p.steps) == 3)
    q = parse_question(p.question)
    first = p.steps[0]
    a, rest = first.split(": ", 1)[1].split(" ", 1)
    assert check_step(q, [], first.replace(f": {a} ", f": {int(a) + 1} ", 1)) is False  # miscopied operand
    c = first.rsplit("= ", 1)[1].split(".")[0]
    assert check_step(q, [], first.replace(f"= {c}.", f"= {int(c) + 1}.")) is False  # arithmetic slip
    assert check_step(q, [], p.steps[1]) is False  # a step out of order
    assert check_step(q, [], p.steps[-1]) is False  # the answer before the operations
    assert check_step(q, [], "gibberish\n\n") is False
    assert check_step(q, ["gibberish\n\n"], p.steps[1]) is None  # a prefix that cannot be followed


def test_a_step_carrying_a_wrong_amount_on_correctly_is_right():
    (p,) = [p for p in make_split(0, "pretrain", 400, 2, 3, misconception_rate=1.0) if "triples" in p.question][:1]
    q = parse_question(p.question)
    k = next(i for i, (op, n) in enumerate(q[1]) if (op, n) == ("*", 3))
    assert check_step(q, p.steps[:k], p.steps[k]) is False  # the doubling written for "triples"
    assert all(check_step(q, p.steps[:j], p.steps[j]) is not False for j in range(k + 1, len(p.steps)))


def test_pair_classes_and_precision():
    p = make_split(0, "heldout", 1, 2, 2)[0]
    prompt = f"Q: {p.question}\nA: "
    good, bad = p.steps[0], p.steps[0].replace("=", "= 1", 1)
    pairs = [PreferencePair(prompt=prompt, chosen=good, rejected=bad),
             PreferencePair(prompt=prompt, chosen=bad, rejected=good),
             PreferencePair(prompt=prompt, chosen=bad, rejected="nonsense\n\n"),
             PreferencePair(prompt=prompt, prefix=p.steps[0], chosen=p.steps[1], rejected=p.steps[1])]
    assert [pair_class(x) for x in pairs] == ["right over wrong", "wrong over right", "both wrong", "both right"]
    out = pair_precision(pairs)
    assert out["pairs"] == 4 and out["precision"] == 0.25 and out["not checked"] == 0
    assert split_steps("a\n\nb\n\nc") == ["a\n\n", "b\n\n", "c"]

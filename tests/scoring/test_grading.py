"""The one grader: extraction, equivalence, time limit in threads/processes, agreement on real data."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time

import pytest

from answer_classes import _rows, build_classes

from sppd_megatron.scoring import grading
from sppd_megatron.scoring.grading import answers_equal, extract_answer, grade


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1} then \boxed{\{1, 2\}} done", r"\{1, 2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5", "5"),
        ("She pays 3 + 4 = 7 dollars.\n#### 1,000", "1,000"),
        ("So the answer is 12 apples.", "12"),
        ("The final answer is: $\\frac{3}{4}$.", r"\frac{3}{4}"),
        ("The answer is \\boxed{x+1}.", "x+1"),
        ("no answer stated here, 3 + 4 = 7", None),
        ("unclosed \\boxed{12", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\boxed{\frac12}", "0.5"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
        (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
        (r"\boxed{(1,2]}", r"(1,2]"),
        (r"\boxed{\{2,1\}}", r"\{1,2\}"),
        (r"\boxed{50\%}", "0.5"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{\$1,000}", "1,000"),
        (r"\boxed{18 \text{ dollars}}", "18"),
        ("The answer is 18 dollars.", "18"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{\frac{1}{2}}", r"$\frac{1}{2}$"),  # GaoKao golds come inside $...$
        (r"\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),  # a whole GSM8K solution
    ],
)
def test_equal_answers(pred, gold):
    assert grade(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\boxed{3}", "4"),
        (r"\boxed{[1,2)}", "(1,2]"),
        (r"\boxed{\sqrt{3}}", r"2\sqrt{2}"),
        (r"\boxed{\{1,3\}}", r"\{1,2\}"),
        ("3 + 4 = 7, so 7", "7"),  # no stated answer is wrong, however close
    ],
)
def test_unequal_answers(pred, gold):
    assert not grade(pred, gold)


def test_fast_path_needs_no_worker():
    assert grading._fast_verdict("1,000", "1000.0") is True
    assert grading._fast_verdict("12", "13") is False
    assert grading._fast_verdict(r"\frac12", "0.5") is None


def test_threads_agree_with_sequential():
    cases = [(rf"\boxed{{\sqrt{{{4 * i * i}}}}}", f"{2 * i + (i % 2)}") for i in range(1, 9)]
    expected = [answers_equal(extract_answer(p), g, timeout_seconds=None) for p, g in cases]
    grading._equal_cached.cache_clear()
    results: dict[int, bool] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, grade(*cases[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected == [i % 2 == 0 for i in range(1, 9)]


def test_time_limit_kills_a_slow_call_and_recovers():
    grading._equal_cached.cache_clear()
    # sympy needs ~50 s to compare 2^(2^32) with 3; the deadline cuts it off and judges "unequal".
    started = time.perf_counter()
    assert answers_equal(r"2^{2^{2^{5}}}", "3", timeout_seconds=0.5) is False
    assert time.perf_counter() - started < 10
    assert answers_equal(r"\sqrt{18}", r"3\sqrt{2}") is True  # a fresh worker takes over


def test_time_limit_works_off_the_main_thread():
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.append(answers_equal(r"2^{2^{2^{5}}}", "4", timeout_seconds=0.5)))
    worker.start()
    worker.join(timeout=30)
    assert verdicts == [False]


def _grade_in_child(args):
    return grade(*args)


def test_works_inside_daemonic_pool_processes():
    cases = [(r"\boxed{\sqrt{8}}", r"2\sqrt{2}"), (r"\boxed{\frac{2}{3}}", "0.5")]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_grade_in_child, cases) == [True, False]


# --- real data (the packaged MATH-500 and GSM8K test sets) ---------------------------------------


def _raw_math_verify(prediction_text: str, gold: str) -> bool:
    """The baseline: math-verify as documented, gold wrapped in $...$, its own timeouts (main thread)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$")
    pred_parsed = parse(prediction_text)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed))


def _stated(answer: str) -> str:
    return f"So the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.slow
def test_answer_classes_against_raw_math_verify(capsys):
    """Per class: rewrites accepted, one-digit changes rejected; ours against raw math-verify."""
    grading._quiet_math_verify()
    rows = []
    for name, cases in build_classes().items():
        counts = {"rewrites": 0, "ours_accepts": 0, "mv_accepts": 0, "wrong": 0, "ours_rejects": 0, "mv_rejects": 0}
        missed, let_through = [], []
        for case in cases:
            for text in case.rewrites:
                assert text != case.gold
                counts["rewrites"] += 1
                ours = grade(_stated(text), case.gold)
                counts["ours_accepts"] += ours
                counts["mv_accepts"] += _raw_math_verify(_stated(text), case.gold)
                if not ours:
                    missed.append((text, case.gold))
            for text in case.perturbed:
                counts["wrong"] += 1
                ours = not grade(_stated(text), case.gold)
                counts["ours_rejects"] += ours
                counts["mv_rejects"] += not _raw_math_verify(_stated(text), case.gold)
                if not ours:
                    let_through.append((text, case.gold))
        rows.append((name, len(cases), counts, missed, let_through))
    with capsys.disabled():
        print("\n| class | golds | rewrites accepted: grade / raw math-verify | one-digit changes rejected: grade / raw math-verify |")
        print("|---|---:|---|---|")
        for name, n, c, _, _ in rows:
            print(f"| {name} | {n} | {c['ours_accepts']}/{c['rewrites']} ({c['ours_accepts'] / c['rewrites']:.1%}) / "
                  f"{c['mv_accepts']}/{c['rewrites']} ({c['mv_accepts'] / c['rewrites']:.1%}) | "
                  f"{c['ours_rejects']}/{c['wrong']} ({c['ours_rejects'] / c['wrong']:.1%}) / "
                  f"{c['mv_rejects']}/{c['wrong']} ({c['mv_rejects'] / c['wrong']:.1%}) |")
        for name, _, _, missed, let_through in rows:
            for text, gold in missed[:5]:
                print(f"  {name}: rewrite {text!r} of {gold!r} not accepted")
            for text, gold in let_through[:5]:
                print(f"  {name}: wrong {text!r} for {gold!r} accepted")
    for name, _, c, missed, let_through in rows:
        assert c["ours_rejects"] >= c["mv_rejects"], name
        assert not missed, (name, missed[:5])
        assert not let_through, (name, let_through[:5])


def test_math500_reference_solutions_agree_with_answers(capsys):
    rows = _rows("math500")
    agree = sum(grade(r["solution"], r["answer"]) for r in rows)
    restated = sum(extract_answer(r["solution"]) != r["answer"] for r in rows)
    with capsys.disabled():
        # Every boxed answer is written as `answer` is, so this checks extraction; the classes check forms.
        print(f"\nMATH-500: the answer boxed in `solution` equals `answer` in {agree}/{len(rows)} "
              f"({restated} written differently)")
    assert len(rows) == 500
    assert agree / len(rows) >= 0.99


def _with_commas(number: str) -> str:
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    whole, _, frac = digits.partition(".")
    return f"{sign}{int(whole):,}" + (f".{frac}" if frac else "")


def test_gsm8k_gold_equals_its_rewritings_and_not_perturbations(capsys):
    rows = _rows("gsm8k")
    golds = [extract_answer(r["answer"]) for r in rows]
    assert all(golds)
    rewritten = wrong = 0
    rng = random.Random(0)
    for row, gold in zip(rows, golds):
        plain = gold.replace(",", "")
        c = _with_commas(plain)
        for text in (
            rf"\boxed{{{c}}}", f"#### {c}", f"The answer is {c} dollars.", rf"\boxed{{\${c}}}",
            rf"\boxed{{{plain}\text{{ apples}}}}", f"The answer is ${c}$.", rf"\boxed{{{plain}.00}}",
        ):
            rewritten += 1
            assert grade(text, row["answer"]), (text, gold)
    sample = rng.sample(list(zip(rows, golds)), 300)
    for row, gold in sample:
        value = float(gold.replace(",", ""))
        for other in (value + 1, value - 1, value * 10 if value else 3, value + 0.5):
            text = str(other) if other != int(other) else str(int(other))
            wrong += 1
            assert not grade(rf"\boxed{{{_with_commas(text)}}}", row["answer"]), (text, gold)
            assert not grade(f"The answer is {text}.", row["answer"]), (text, gold)
    with capsys.disabled():
        print(f"\nGSM8K: {rewritten} rewritings judged equal (100%), {2 * wrong} perturbed answers judged unequal (100%)")

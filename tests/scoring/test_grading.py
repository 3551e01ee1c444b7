"""The one grader: extraction, equivalence, time limit in threads/processes, agreement on real data."""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
from pathlib import Path

import pytest

from sppd_megatron.scoring import grading
from sppd_megatron.scoring.grading import answers_equal, extract_answer, grade

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


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


# --- real data ----------------------------------------------------------------------------------


needs_shared_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present (CI has ../shared/data)")


def _rows(name: str) -> list[dict]:
    path = DATA / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@needs_shared_data
def test_math500_reference_solutions_agree_with_answers(capsys):
    rows = _rows("math500/test.jsonl")
    agree = sum(grade(r["solution"], r["answer"]) for r in rows)
    # The same check with the fast path bypassed, so math-verify itself is measured too.
    mv_agree = sum(
        bool(grading._POOL.run(extract_answer(r["solution"]) or "", r["answer"], 10.0)) for r in rows
    )
    with capsys.disabled():
        print(f"\nMATH-500 grader agreement: grade {agree / len(rows):.1%}, math-verify alone {mv_agree / len(rows):.1%}")
    assert len(rows) == 500
    assert agree / len(rows) >= 0.99
    assert mv_agree / len(rows) >= 0.99


def _with_commas(number: str) -> str:
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    whole, _, frac = digits.partition(".")
    return f"{sign}{int(whole):,}" + (f".{frac}" if frac else "")


@needs_shared_data
def test_gsm8k_gold_equals_its_rewritings_and_not_perturbations(capsys):
    rows = _rows("gsm8k/test.jsonl")
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

"""Each mode's arithmetic on hand-written records and through the harness with a scripted engine."""

from __future__ import annotations

import json

import pytest

from sppd_megatron.evaluation.harness import evaluate
from sppd_megatron.evaluation.modes import Mode, answer_classes, judge, parse_mode, parse_modes
from sppd_megatron.evaluation.orm import OutcomeRewardModel, split_steps
from sppd_megatron.records import Prediction, read_jsonl
from sppd_megatron.tokenization import build_char_tokenizer

from .helpers import FixedScorePRM, ScriptedEngine, prediction, prompts


def test_parse_mode_names_and_errors():
    assert parse_mode("greedy") == Mode("greedy", 1)
    assert parse_mode("maj@8") == Mode("maj", 8)
    assert parse_mode("ORM_VOTE@64").name == "orm_vote@64"
    assert parse_mode(" orm_max@1 ") == Mode("orm_max", 1)
    assert parse_modes(["maj@4", "greedy", "maj@4"]) == [Mode("maj", 4), Mode("greedy")]
    for bad, message in [("maj", "needs a sample count"), ("maj@0", "needs a sample count"),
                         ("greedy@2", "takes no @N"), ("pass@1", "unknown evaluation mode"), ("", "unknown")]:
        with pytest.raises(ValueError, match=message):
            parse_mode(bad)


def verdict(mode: str, pred: Prediction):
    v = judge(parse_mode(mode), pred)
    return v.answer, v.correct


def test_majority_takes_the_most_frequent_equivalent_answer():
    # "1,000" and "1000" are one answer (numeric equivalence, not string equality).
    pred = prediction(["7", "1,000", "1000", "7", "1000"], [False, True, True, False, True])
    assert answer_classes(pred.answers) == [0, 1, 1, 0, 1]
    assert verdict("maj@5", pred) == ("1,000", True)
    assert verdict("maj@1", pred) == ("7", False)
    # maj@4: 7 and 1000 have two votes each; the earliest first occurrence (7, sample 0) wins.
    assert verdict("maj@4", pred) == ("7", False)


def test_majority_equivalence_uses_math_verify():
    pred = prediction(["\\frac{1}{2}", "0.5", "3"], [True, True, False])
    assert answer_classes(pred.answers) == [0, 0, 2]
    assert verdict("maj@3", pred) == ("\\frac{1}{2}", True)


def test_tie_goes_to_the_earliest_first_occurrence():
    assert verdict("maj@4", prediction(["2", "3", "3", "2"], [False, True, True, False])) == ("2", False)
    assert verdict("maj@4", prediction(["3", "2", "2", "3"], [True, False, False, True])) == ("3", True)
    assert verdict("maj@2", prediction(["2", "3"], [False, True])) == ("2", False)


def test_unparseable_answers_never_win():
    pred = prediction([None, None, None, "4"], [False, False, False, True], scores=[0.9, 0.9, 0.9, 0.1])
    assert answer_classes(pred.answers) == [None, None, None, 3]
    assert verdict("maj@4", pred) == ("4", True)
    assert verdict("orm_vote@4", pred) == ("4", True)
    assert verdict("orm_max@4", pred) == ("4", True)
    # All unparseable: wrong, with no answer, in every mode.
    for mode in ("maj@3", "orm_vote@3", "orm_max@3"):
        assert verdict(mode, pred) == (None, False)


def test_n_equals_one_is_the_first_sample():
    pred = prediction(["5", "6", "6"], [True, False, False], scores=[0.1, 0.9, 0.9])
    for mode in ("maj@1", "orm_vote@1", "orm_max@1"):
        assert verdict(mode, pred) == ("5", True)
    none_first = prediction([None, "6"], [False, True], scores=[0.5, 0.5])
    for mode in ("maj@1", "orm_vote@1", "orm_max@1"):
        assert verdict(mode, none_first) == (None, False)


def test_orm_vote_sums_per_answer_and_orm_max_takes_one_sample():
    pred = prediction(["A", "A", "B"], [True, True, False], scores=[0.4, 0.4, 0.7])
    assert verdict("orm_vote@3", pred) == ("A", True)  # 0.8 vs 0.7
    assert verdict("orm_max@3", pred) == ("B", False)  # the single best sample
    assert verdict("maj@3", pred) == ("A", True)
    # Ties: equal sums go to the earliest class, equal maxima to the earliest sample.
    tie = prediction(["B", "A", "A"], [False, True, True], scores=[0.5, 0.25, 0.25])
    assert verdict("orm_vote@3", tie) == ("B", False)
    assert verdict("orm_max@2", prediction(["B", "A"], [False, True], scores=[0.5, 0.5])) == ("B", False)
    assert verdict("orm_max@3", prediction(["B", "A", "C"], [False, True, False], scores=[0.2, 0.5, 0.5])) == ("A", True)


def test_greedy_reads_the_greedy_solution_and_orm_modes_need_scores():
    pred = prediction(["1"], [False], greedy=("2", True))
    assert verdict("greedy", pred) == ("2", True)
    with pytest.raises(ValueError, match="no greedy solution"):
        judge(parse_mode("greedy"), prediction(["1"], [False]))
    with pytest.raises(ValueError, match="ORM score"):
        judge(parse_mode("orm_max@1"), pred)
    with pytest.raises(ValueError, match="needs 4"):
        judge(parse_mode("maj@4"), pred)


def test_split_steps_keeps_text_and_orm_reductions():
    assert split_steps("a\n\nb\n\nc") == ("a\n\n", "b\n\n", "c")
    assert split_steps("") == ("",)

    class StepValues:
        name = "steps"

        def score(self, question, steps):
            return self.score_batch([None])[0]

        def score_batch(self, queries):
            return [[0.9, 0.2, 0.4][: len(q.steps)] for q in queries]

    solutions = ["a\n\nb\n\nc"]
    assert OutcomeRewardModel(StepValues(), "last").score_solutions(["q"], solutions) == [0.4]
    assert OutcomeRewardModel(StepValues(), "min").score_solutions(["q"], solutions) == [0.2]
    assert OutcomeRewardModel(StepValues(), "mean").score_solutions(["q"], solutions) == [pytest.approx(0.5)]


# --- through evaluate(), with a scripted engine ---------------------------------------------------

SCRIPT = {
    # greedy right; samples: 9 twice (wrong) vs 12 once (right, best ORM score)
    "Q-alpha?": ("so \\boxed{12}", ["\\boxed{9}", "x \\boxed{12}", "\\boxed{9}", "nothing", "\\boxed{12}"]),
    # greedy unparseable; samples all unparseable except the last
    "Q-beta?": ("I do not know", ["hmm", "hmm", "no", "still no", "#### 5"]),
    # tie 3 vs 4 at maj@2; 4 wins at maj@4
    "Q-gamma?": ("The answer is 4", ["\\boxed{3}", "\\boxed{4}", "\\boxed{4}", "\\boxed{3.0}", "\\boxed{4}"]),
}
SCORES = {"x \\boxed{12}": 0.9, "\\boxed{9}": 0.3, "\\boxed{3}": 0.8, "\\boxed{4}": 0.35}
GOLDS = [("Q-alpha?", "12"), ("Q-beta?", "#### 5"), ("Q-gamma?", "4")]


@pytest.fixture
def scripted_run(tmp_path):
    tok = build_char_tokenizer()
    engine = ScriptedEngine(tok, SCRIPT)
    prm = FixedScorePRM(SCORES)
    modes = ["greedy", "maj@1", "maj@2", "maj@4", "orm_vote@4", "orm_max@4", "maj@5"]
    summary = evaluate(engine, tok, {"toy": prompts(*GOLDS)}, modes, tmp_path, orm=prm, progress=False,
                       questions_per_batch=2)
    return summary, engine, prm, tmp_path


def test_evaluate_arithmetic_per_mode(scripted_run):
    summary, _, _, _ = scripted_run
    got = {mode: (s["correct"], s["no_answer"]) for mode, s in summary["results"]["toy"].items()}
    # (correct, no_answer) over alpha, beta, gamma; see SCRIPT and SCORES.
    assert got == {
        "greedy": (2, 1),      # 12 right; beta states nothing; "The answer is 4" right
        "maj@1": (0, 1),       # 9, none, 3
        "maj@2": (0, 1),       # ties 9|12 and 3|4 go to the first answer: 9, 3
        "maj@4": (0, 1),       # 9 (2 votes); none; 3 and 3.0 (2) tie 4 (2) -> 3
        "orm_vote@4": (1, 1),  # 12 (0.9) beats 9 (0.3 + 0.3); 3 (0.8 + 0.5) beats 4 (0.35 + 0.35)
        "orm_max@4": (1, 1),   # 12 (0.9); 3 (0.8)
        "maj@5": (2, 0),       # 9|12 tie -> 9; beta's last sample 5; 4 (3 votes)
    }
    assert summary["results"]["toy"]["maj@4"]["n"] == 3


def test_evaluate_samples_once_and_records_everything(scripted_run):
    _, engine, prm, out = scripted_run
    # One engine call per group of two questions; each question: 1 greedy + 5 samples (max N), once.
    assert [len(call) for call in engine.calls] == [12, 6]
    assert sum(r.temperature == 0 for call in engine.calls for r in call) == 3
    assert len({r.seed for call in engine.calls for r in call}) == 18
    assert len(prm.queries) == 15  # every sample scored once
    preds = list(read_jsonl(out / "predictions.jsonl", Prediction))
    assert [p.id for p in preds] == ["q0", "q1", "q2"]
    alpha = preds[0]
    assert alpha.generations == SCRIPT["Q-alpha?"][1]
    assert alpha.answers == ["9", "12", "9", None, "12"]
    assert alpha.correct == [False, True, False, False, True]
    assert alpha.answer_classes == [0, 1, 0, None, 1]
    assert alpha.scores == [0.3, 0.9, 0.3, 0.5, 0.5]
    assert (alpha.greedy_answer, alpha.greedy_correct) == ("12", True)
    assert preds[1].gold_answer == "#### 5" and preds[1].answers[-1] == "5" and preds[1].correct[-1]
    assert preds[2].answer_classes == [0, 1, 1, 0, 1]
    assert json.loads((out / "summary.json").read_text())["modes"][0] == "greedy"

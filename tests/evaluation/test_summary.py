"""The summary: Wilson intervals, hand-checked counts, and byte-for-byte output of a fixed predictions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.evaluation.modes import Mode
from sppd_megatron.evaluation.summary import default_modes, render_markdown, summarize, wilson_interval, write_summary
from sppd_megatron.records import Prediction, read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
MODES = ["greedy", "maj@1", "maj@3", "orm_vote@3", "orm_max@3"]


def fixture_predictions() -> list[Prediction]:
    return list(read_jsonl(FIXTURES / "predictions.jsonl", Prediction))


def test_wilson_interval_known_values():
    # Reference values from the closed form (Wilson 1927), e.g. 0/20 -> [0, z^2 / (n + z^2)].
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.161125), abs=1e-6)
    assert wilson_interval(2, 4) == pytest.approx((0.150039, 0.849961), abs=1e-6)
    assert wilson_interval(20, 20) == pytest.approx((0.838875, 1.0), abs=1e-6)
    low, high = wilson_interval(81, 263)  # Wilson's textbook example (Newcombe 1998, method 3)
    assert (low, high) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_fixture_counts_match_hand_computation():
    summary = summarize(fixture_predictions(), MODES)
    got = {b: {m: (s["correct"], s["no_answer"]) for m, s in r.items()} for b, r in summary["results"].items()}
    assert got == {
        "gsm8k": {"greedy": (2, 1), "maj@1": (2, 1), "maj@3": (3, 1), "orm_vote@3": (2, 1), "orm_max@3": (1, 1)},
        "math500": {"greedy": (2, 0), "maj@1": (2, 0), "maj@3": (2, 0), "orm_vote@3": (1, 0), "orm_max@3": (0, 0)},
    }
    assert summary["benchmarks"] == ["gsm8k", "math500"] and summary["modes"] == MODES
    assert summary["questions"] == {"gsm8k": 4, "math500": 3}
    s = summary["results"]["gsm8k"]["maj@3"]
    assert (s["n"], s["accuracy"]) == (4, 0.75)


def test_fixed_predictions_give_the_same_bytes(tmp_path):
    for run in ("a", "b"):
        write_summary(summarize(fixture_predictions(), MODES), tmp_path / run)
        for name in ("summary.json", "summary.md"):
            assert (tmp_path / run / name).read_bytes() == (FIXTURES / name).read_bytes(), name


def test_markdown_table_layout():
    text = render_markdown(json.loads((FIXTURES / "summary.json").read_text()))
    lines = text.splitlines()
    assert lines[0] == "| mode | gsm8k (n=4) | math500 (n=3) |"
    assert lines[4] == "| maj@3 | 75.0 [30.1, 95.4] | 66.7 [20.8, 93.9] |"
    assert "Wilson" in text


def test_default_modes_follow_what_the_records_hold():
    preds = fixture_predictions()
    assert default_modes(preds) == [Mode("greedy"), Mode("maj", 3), Mode("orm_vote", 3), Mode("orm_max", 3)]
    assert summarize([])["benchmarks"] == []


def test_bad_prediction_lines_name_file_and_line(tmp_path):
    from sppd_megatron.records import RecordError

    lines = (FIXTURES / "predictions.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["scores"] = bad["scores"][:2]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(RecordError, match=r"p.jsonl:2: .*'scores' must be a list parallel"):
        list(read_jsonl(path, Prediction))

from __future__ import annotations

import pytest

from sppd_megatron.sampling.steps import StepDelimiter, TerminalRules, extract_final_answer


def test_delimiter_modes():
    assert StepDelimiter.from_mode("blank_line") == StepDelimiter("\n\n", "\n\n")
    assert StepDelimiter.from_mode("step_prefix") == StepDelimiter("\nStep ", "\n")
    assert StepDelimiter.from_mode("stop_string", "<|step|>") == StepDelimiter("<|step|>", "<|step|>")
    with pytest.raises(ValueError):
        StepDelimiter.from_mode("stop_string")


def test_step_prefix_keeps_the_newline_and_drops_the_next_header(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer("Step 1: 2+3=5.\nStep ", add_special_tokens=False)["input_ids"]
    n = StepDelimiter.from_mode("step_prefix").kept_token_count(ids, decode)
    assert decode(ids[:n]) == "Step 1: 2+3=5.\n"
    # Without the stop string the whole generation is kept; blank-line steps keep their delimiter.
    assert StepDelimiter.from_mode("step_prefix").kept_token_count(ids[:5], decode) == 5
    assert StepDelimiter.from_mode("blank_line").kept_token_count(ids, decode) == len(ids)


@pytest.mark.parametrize("text,answer", [
    ("so the total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("#### 42\n", "42"),
    ("no answer yet \\boxed{4", None),
    ("nothing here", None),
])
def test_answer_extraction(text, answer):
    assert extract_final_answer(text) == answer


def test_terminal_rules_order():
    rules = TerminalRules(max_depth=3, max_total_tokens=10)
    kw = dict(depth=1, total_tokens=1)
    assert rules.classify(ended_with_eos=True, state_text="x", **kw) == ("eos", None)
    assert rules.classify(ended_with_eos=True, state_text="\\boxed{3}", **kw) == ("eos", "3")
    assert rules.classify(ended_with_eos=False, state_text="so \\boxed{3}", **kw) == ("answer", "3")
    # An answer split over two steps is found in the state text.
    assert rules.classify(ended_with_eos=False, state_text="\\boxed{1" + "2}", **kw)[0] == "answer"
    assert rules.classify(ended_with_eos=False, state_text="x", depth=3, total_tokens=1) == ("max_depth", None)
    assert rules.classify(ended_with_eos=False, state_text="x", depth=1, total_tokens=10) == ("max_tokens", None)
    assert rules.classify(ended_with_eos=False, state_text="x", **kw) == (None, None)

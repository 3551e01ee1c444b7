from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.records import PromptTemplate, RecordError
from sppd_megatron.sampling.prompts import PromptFields, load_prompts, render_prompt, resolve_template

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_gsm8k_layout(prompts_file):
    prompts = load_prompts(prompts_file)
    assert [p.gold_answer for p in prompts] == ["5", "3", "42"]
    assert prompts[0].id == "gsm8k-test-00000" and prompts[0].source == "gsm8k-test:0"
    assert len(load_prompts(prompts_file, limit=2)) == 2


@pytest.mark.parametrize("rel,gold_check", [
    ("gsm8k/test.jsonl", lambda g: g.replace("-", "").isdigit()),
    ("math500/test.jsonl", lambda g: g != ""),
    ("gaokao2023en/test.jsonl", lambda g: g != ""),
])
def test_shared_benchmarks_load(rel, gold_check):
    prompts = load_prompts(SHARED / rel, limit=5)
    assert len(prompts) == 5
    assert all(p.question and gold_check(p.gold_answer) for p in prompts)
    if rel.startswith("math500"):
        assert prompts[0].id.startswith("test/")  # MATH-500 unique_id


def test_own_records_and_field_overrides(tmp_path):
    own = tmp_path / "prompts.jsonl"
    own.write_text(json.dumps({"id": "q1", "question": "1+1?", "gold_answer": "2", "source": "mine:1"}) + "\n")
    [p] = load_prompts(own)
    assert (p.id, p.gold_answer, p.source) == ("q1", "2", "mine:1")
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"key": "a", "prompt_text": "2+2?", "target": 4}) + "\n")
    [p] = load_prompts(custom, PromptFields(question="prompt_text", answer="target", id="key"))
    assert (p.id, p.question, p.gold_answer) == ("a", "2+2?", "4")


@pytest.mark.parametrize("lines,line_no,message", [
    (['{"question": "a", "answer": "1"}', "{not json"], 2, "malformed JSON"),
    (['{"question": "a"}'], 1, "no gold answer field"),
    (['{"id": "x", "question": "a", "answer": "1"}', '{"id": "x", "question": "b", "answer": "2"}'], 2, "duplicate id"),
    (['{"question": "", "answer": "1"}'], 1, "empty"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, line_no, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError) as err:
        load_prompts(path)
    assert f"{path}:{line_no}:" in str(err.value) and message in str(err.value)


def test_render_with_chat_template_and_plain(tokenizer):
    tmpl = resolve_template(PromptTemplate(), tokenizer)
    assert tmpl.chat_template == tokenizer.chat_template  # recorded verbatim
    text, ids = render_prompt(tmpl, tokenizer, "What is 2+3?")
    assert text == ("<|system|>\nPlease reason step by step and put your answer in \\boxed{}.\n"
                    "<|user|>\nWhat is 2+3?\n<|assistant|>\n")
    assert tokenizer.decode(ids) == text
    plain = resolve_template(PromptTemplate(use_chat_template=False), tokenizer)
    assert plain.chat_template is None
    text, _ = render_prompt(plain, tokenizer, "Q?")
    assert text.endswith("Question: Q?\nAnswer:\n")

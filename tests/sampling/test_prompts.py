from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.records import PromptTemplate, RecordError
from sppd_megatron.sampling.prompts import (
    NAMED_BENCHMARKS,
    PromptFields,
    load_prompts,
    render_prompt,
    resolve_template,
    source_name,
    source_path,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_gsm8k_layout(prompts_file):
    prompts = load_prompts(prompts_file)
    assert [p.gold_answer for p in prompts] == ["5", "3", "42"]
    assert prompts[0].id == "gsm8k-test-00000" and prompts[0].source == "gsm8k-test:0"
    assert len(load_prompts(prompts_file, limit=2)) == 2


@pytest.mark.parametrize("name,rows,empty_golds", [("gsm8k", 1319, 0), ("math500", 500, 0), ("gaokao2023en", 385, 2)])
def test_named_benchmarks_ship_in_the_package(name, rows, empty_golds):
    prompts = load_prompts(name)
    assert len(prompts) == rows
    assert all(p.question for p in prompts)
    assert sum(not p.gold_answer for p in prompts) == empty_golds  # as distributed (two GaoKao rows have none)
    if name == "gsm8k":
        assert all(p.gold_answer.lstrip("-").replace(".", "").isdigit() for p in prompts)
    assert len(load_prompts(name, limit=5)) == 5
    if name == "math500":
        assert prompts[0].id.startswith("test/")  # MATH-500 unique_id
    else:
        assert prompts[0].id == f"{name}-test-00000"
    path = source_path(name)
    assert path.parent.parent.name == "data" and (path.parent / "ORIGIN.md").is_file()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the copies' origin) is not beside the repository")
@pytest.mark.parametrize("name", sorted(NAMED_BENCHMARKS))
def test_packaged_copies_are_the_original_files(name):
    assert source_path(name).read_bytes() == (SHARED / NAMED_BENCHMARKS[name]).read_bytes()


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["What is 2+3?", "What is 6*7?"], "answer": ["2+3=5\n#### 5", "6*7=42\n#### 42"]}
    single = tmp_path / "single"
    datasets.Dataset.from_dict(rows).save_to_disk(str(single))
    prompts = load_prompts(f"hf:{single}")
    assert [(p.id, p.gold_answer) for p in prompts] == [("single-00000", "5"), ("single-00001", "42")]
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"problem": ["1+1?"], "answer": ["2"]})}
                         ).save_to_disk(str(splits))
    [p] = load_prompts(f"hf:{splits}:test")
    assert (p.id, p.question, p.gold_answer, p.source) == ("splits-test-00000", "1+1?", "2", "splits-test:0")
    assert len(load_prompts(f"hf:{splits}:train", limit=1)) == 1
    assert source_name(f"hf:{splits}:train") == "splits-train"
    with pytest.raises(RecordError, match=r"split None not in the dataset; it has \['test', 'train'\]"):
        load_prompts(f"hf:{splits}")
    custom = tmp_path / "custom"
    datasets.Dataset.from_dict({"prompt_text": ["2+2?", ""], "target": [4, 5]}).save_to_disk(str(custom))
    with pytest.raises(RecordError) as err:  # a bad row names the source and the row
        load_prompts(f"hf:{custom}", PromptFields(question="prompt_text", answer="target"))
    assert f"hf:{custom}:2:" in str(err.value) and "empty" in str(err.value)
    with pytest.raises(RecordError, match="cannot load the dataset"):
        load_prompts(f"hf:{tmp_path / 'missing'}:test")


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

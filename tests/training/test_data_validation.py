"""Bad training data stops the run before training, naming the file and line of each problem."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppd_megatron.tokenization import build_char_tokenizer
from sppd_megatron.training.data import DataError, load_examples
from sppd_megatron.training.packing import pad

REPO = Path(__file__).resolve().parents[2]
GOOD = {"prompt": "Q: 1+2?\n", "prefix": "Step 1: 1+2=3.\n\n", "chosen": "The answer is 3.", "rejected": "The answer is 4.",
        "chosen_value": 0.9, "rejected_value": 0.1}


def _write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def _load(path, stage="step_dpo", max_length=128, vocab=101, need_values=True):
    return load_examples(path, stage, build_char_tokenizer(), max_length, vocab, need_values=need_values)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({k: v for k, v in GOOD.items() if k != "rejected"}, "missing required field(s) ['rejected']"),
        ({**GOOD, "chosen": ""}, "field 'chosen' is empty"),
        ({**GOOD, "chosen": "x" * 300}, "longer than data.max_length=128"),
        ({**GOOD, "chosen_value": float("nan")}, "NaN"),
        ({**GOOD, "rejected_value": 1.5}, "outside [0, 1]"),
        ({**GOOD, "chosen_value": None}, "chosen_value and rejected_value are required"),
        ('{"prompt": "Q", "chosen": ', "malformed JSON"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        _load(path)
    assert f"{path}:2: " in str(err.value)
    assert message in str(err.value)


def test_all_problems_are_listed(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "chosen": ""}, GOOD, {**GOOD, "rejected": "y" * 500}])
    with pytest.raises(DataError) as err:
        _load(path)
    assert f"{path}:2: " in str(err.value) and f"{path}:4: " in str(err.value)


def test_wrong_tokenizer_is_caught(tmp_path):
    path = _write(tmp_path, [GOOD])
    with pytest.raises(DataError, match="outside the model's vocabulary .* wrong tokenizer"):
        _load(path, vocab=50)


def test_token_merge_across_the_step_boundary_is_caught(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "</s>": 4}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    path = _write(tmp_path, [{"prompt": "ba", "prefix": "", "chosen": "b", "rejected": "a"}])
    with pytest.raises(DataError, match=r":1: the continuation re-tokenises differently"):
        load_examples(path, "dpo", tok, 16, 5)


def test_masks_cover_only_the_continuation_and_eos_only_at_the_end(tmp_path):
    path = _write(tmp_path, [{**GOOD, "chosen_ends": False, "rejected_ends": True}])
    tok = build_char_tokenizer()
    (ex,) = _load(path)
    batch = pad([ex], 128, tok.pad_token_id)
    ctx = len(GOOD["prompt"] + GOOD["prefix"])
    chosen_len, rejected_len = len(GOOD["chosen"]), len(GOOD["rejected"]) + 1  # + EOS
    rows = batch["loss_row"].tolist()
    assert rows.count(0) == chosen_len and rows.count(1) == rejected_len
    # The prompt and shared prefix are never loss: the first scored token is predicted from the context's last.
    assert batch["loss_index"][0] == ctx - 1 and batch["loss_index"][chosen_len] == 128 + ctx - 1
    assert batch["loss_label"][-1] == tok.eos_token_id
    assert tok.eos_token_id not in batch["tokens"][0].tolist()
    assert batch["row_end_index"].tolist() == [ctx + chosen_len - 1, 128 + ctx + rejected_len - 2]


def test_cli_fails_fast_without_training(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "chosen_value": float("nan")}])
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml", f"data.train_file={path}",
         f"output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert f"{path}:2: field 'chosen_value' is nan" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# --- data.overlong: error (default), drop, truncate -------------------------------------------------

LONG = {**GOOD, "prompt": "Q: " + "what is 1+2? " * 12 + "\n"}  # 160 + 16 context chars + 16 + EOS = 193 tokens


def test_overlong_is_an_error_by_default_naming_file_and_line(tmp_path):
    path = _write(tmp_path, [GOOD, LONG])
    with pytest.raises(DataError, match=rf"{path}:2: sequence of 193 tokens is longer than data.max_length=128"):
        _load(path)


def test_overlong_drop_lists_the_record_in_rejects_and_keeps_the_rest(tmp_path, capsys):
    path = _write(tmp_path, [GOOD, LONG, GOOD])
    rejects = tmp_path / "out" / "rejects.jsonl"
    examples = load_examples(path, "step_dpo", build_char_tokenizer(), 128, 101, overlong="drop", rejects=rejects)
    assert [ex.line for ex in examples] == [1, 3]
    (row,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert (row["file"], row["line"], row["category"]) == (str(path), 2, "longer than data.max_length")
    assert "sequence of 193 tokens is longer than data.max_length=128" in row["reason"]
    assert "dropped 1 record(s) longer than data.max_length=128" in capsys.readouterr().out
    with pytest.raises(DataError, match="no records left after dropping 1"):
        load_examples(_write(tmp_path, [LONG]), "step_dpo", build_char_tokenizer(), 128, 101, overlong="drop")


def test_overlong_truncate_cuts_the_context_from_the_left_like_trl_keep_end(tmp_path):
    """Each row equals TRL's DataCollatorForPreference(truncation_mode="keep_end") row, and the whole
    continuation (+ EOS) is still scored."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = build_char_tokenizer()
    record = {**LONG, "rejected": "The answer is 42, surely."}  # rows of 193 and 202 tokens: cut by 65 and 74
    short, long = load_examples(_write(tmp_path, [GOOD, record]), "step_dpo", tok, 128, 101, overlong="truncate")
    assert not short.truncated and long.truncated
    context = tok(record["prompt"] + record["prefix"], add_special_tokens=False)["input_ids"]
    rows = [tok(record[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k in ("chosen", "rejected")]
    trl = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=128, truncation_mode="keep_end")(
        [{"prompt_ids": context, "chosen_ids": rows[0], "rejected_ids": rows[1]}])
    for i, (row, continuation) in enumerate(zip(long.rows, rows)):
        n = int(trl["attention_mask"][i].sum())
        assert row.ids == trl["input_ids"][i, :n].tolist() and len(row.ids) == 128
        assert row.ids[row.context_len:] == continuation  # never cut
        assert trl["completion_mask"][i, row.context_len:n].all() and not trl["completion_mask"][i, :row.context_len].any()
    scored = pad([long], 128, tok.pad_token_id)["loss_row"].tolist()
    assert scored.count(0) == len(rows[0]) and scored.count(1) == len(rows[1])


def test_overlong_truncate_never_cuts_the_continuation(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "chosen": "x" * 200}])
    with pytest.raises(DataError, match=rf"{path}:2: continuation of 201 tokens does not fit data.max_length=128 "
                                        "with any context; data.overlong=truncate cuts only the context"):
        load_examples(path, "step_dpo", build_char_tokenizer(), 128, 101, overlong="truncate")


def test_train_with_overlong_drop_trains_on_the_rest_and_lists_the_dropped(tmp_path):
    path = _write(tmp_path, [GOOD, LONG, GOOD])
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml", f"data.train_file={path}",
         f"output_dir={out}", "data.max_length=128", "data.overlong=drop", "schedule.global_batch_size=2",
         "schedule.train_steps=1", "checkpoint.save_final=false", "logging.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{path}: dropped 1 record(s) longer than data.max_length=128" in proc.stdout
    (row,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert row["line"] == 2 and "193 tokens" in row["reason"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

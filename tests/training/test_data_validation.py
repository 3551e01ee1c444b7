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

"""The memory-mapped training set: the same examples as reading the file, built once, rebuilt when stale."""

import json
from pathlib import Path

import pytest

from sppd_megatron.config import load_config
from sppd_megatron.testing.distributed import torchrun
from sppd_megatron.tokenization import build_char_tokenizer
from sppd_megatron.training.config import TrainConfig
from sppd_megatron.training.data import DataError, load_examples
from sppd_megatron.training.dataset import training_dataset

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "configs" / "tiny-cpu" / "data" / "step_pairs.jsonl"


def _cfg(tmp_path: Path, train_file: Path) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "tiny-cpu" / "step_dpo.yaml",
                       [f"output_dir={tmp_path / 'run'}", f"data.train_file={train_file}"])


def test_mapped_examples_equal_the_file_read_directly(tmp_path):
    cfg, tok = _cfg(tmp_path, PAIRS), build_char_tokenizer()
    dataset = training_dataset(cfg, tok, 101, need_values=True)
    direct = load_examples(PAIRS, "step_dpo", tok, 256, 101, need_values=True)
    assert len(dataset) == len(direct) == 32
    for i, ex in enumerate(direct):
        got = dataset[i]
        assert [(r.ids, r.context_len, r.ends_with_eos) for r in got.rows] == \
               [(r.ids, r.context_len, r.ends_with_eos) for r in ex.rows]
        assert got.values == pytest.approx(ex.values) and got.ref_logps == ex.ref_logps and got.where == ex.where
    questions = [json.loads(line)["question_id"] for line in PAIRS.read_text().splitlines()]
    keys = dataset.group_keys("tree")
    assert all((keys[i] == keys[j]) == (questions[i] == questions[j]) for i in range(32) for j in range(32))


def test_built_once_and_rebuilt_when_the_file_changes(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(PAIRS.read_text())
    cfg, tok = _cfg(tmp_path, data), build_char_tokenizer()
    training_dataset(cfg, tok, 101, need_values=True)
    marker = tmp_path / "run" / "dataset" / "tokens.npy"
    built = marker.stat().st_mtime_ns
    training_dataset(cfg, tok, 101, need_values=True)
    assert marker.stat().st_mtime_ns == built  # a resumed run maps what is there
    data.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:5]))
    assert len(training_dataset(cfg, tok, 101, need_values=True)) == 5


def test_bad_record_stops_every_rank_with_its_line(tmp_path):
    lines = PAIRS.read_text().splitlines()
    record = json.loads(lines[2])
    record["chosen_value"] = float("nan")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:3: "):
        training_dataset(_cfg(tmp_path, bad), build_char_tokenizer(), 101, need_values=True)
    # Two ranks: rank 0 reads the file, rank 1 must get the same message instead of waiting forever.
    proc = torchrun(["-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml", f"data.train_file={bad}",
                     f"output_dir={tmp_path / 'two'}", "logging.progress=false"], nproc=2, cwd=REPO, timeout=300,
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{bad}:3:") >= 2, proc.stderr[-3000:]

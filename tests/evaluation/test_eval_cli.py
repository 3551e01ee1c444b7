"""``sppd-megatron eval`` on the tiny CPU model: the 20 + 20 question run, resume after a kill,
Megatron checkpoints exported on the fly, an HF PRM as the ORM, custom JSONL, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppd_megatron.evaluation.cli import EXPORT_DIR, EXPORT_STAMP, main
from sppd_megatron.records import Prediction, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def eval_args(model, out, *extra: str) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--no-progress", "engine.num_threads=1", *extra]


def predictions(out: Path) -> list[Prediction]:
    return list(read_jsonl(out / "predictions.jsonl", Prediction))


def test_tiny_model_on_20_gsm8k_and_20_math500(tiny_hf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = eval_args(tiny_hf, out, "--bench", "gsm8k,math500", "--modes", "greedy,maj@2", "--limit", "20",
                     "--max-new-tokens", "32", "questions_per_batch=10")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| mode | gsm8k (n=20) | math500 (n=20) |" in printed and "| maj@2 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == {"gsm8k": 20, "math500": 20}
    assert summary["modes"] == ["greedy", "maj@2"]
    for stats in (s for per_bench in summary["results"].values() for s in per_bench.values()):
        assert stats["n"] == 20 and 0.0 <= stats["ci_low"] <= stats["accuracy"] <= stats["ci_high"] <= 1.0
    assert (out / "summary.md").read_text().startswith("| mode | gsm8k (n=20) | math500 (n=20) |")
    preds = predictions(out)
    assert [p.benchmark for p in preds] == ["gsm8k"] * 20 + ["math500"] * 20
    assert preds[20].id == "test/precalculus/807.json"  # MATH-500's unique_id
    assert preds[0].gold_answer == "18" and preds[0].prompt.startswith("<|system|>\nPlease reason step by step")
    assert all(len(p.generations) == 2 and p.greedy_generation is not None for p in preds)

    # A finished run re-summarises from predictions.jsonl without building an engine, for any
    # modes its samples support.
    def no_engine(*a, **k):
        raise AssertionError("no generation should be needed")

    monkeypatch.setattr("sppd_megatron.sampling.engines.build_engine", no_engine)
    assert main(eval_args(tiny_hf, out, "--bench", "gsm8k,math500", "--modes", "maj@1", "--limit", "20",
                          "--max-new-tokens", "32", "questions_per_batch=10")) == 0
    assert json.loads((out / "summary.json").read_text())["modes"] == ["maj@1"]
    # More samples than were drawn: a clear error pointing at the record.
    assert main(eval_args(tiny_hf, out, "--bench", "gsm8k", "--modes", "maj@4", "--limit", "20",
                          "--max-new-tokens", "32", "questions_per_batch=10")) == 2
    assert "predictions.jsonl:1: question gsm8k/gsm8k-test-00000 has 2 samples" in capsys.readouterr().err


def test_resume_after_kill_gives_the_same_files(tiny_hf, tmp_path):
    common = ["--bench", "gsm8k,math500", "--modes", "greedy,maj@2", "--limit", "5", "--max-new-tokens", "12",
              "questions_per_batch=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(eval_args(tiny_hf, full, *common)) == 0

    env = {**os.environ, "SPPD_FAULT": "eval.question:5", "PYTHONPATH": str(ROOT)}  # dies before its 5th
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", "eval", *eval_args(tiny_hf, killed, *common)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(predictions(killed)) == 4 and not (killed / "summary.json").exists()
    with (killed / "predictions.jsonl").open("a") as fh:  # a crash in the middle of a line
        fh.write('{"id": "half-writ')

    assert main(eval_args(tiny_hf, killed, *common)) == 0
    for name in ("predictions.jsonl", "summary.json", "summary.md"):
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name


def test_megatron_checkpoint_is_exported_once_and_matches_hf(tiny_hf, tmp_path):
    from sppd_megatron.conversion.hf_to_mcore import convert_hf_to_mcore

    ckpt = convert_hf_to_mcore(tiny_hf, tmp_path / "ckpt")
    common = ["--bench", "gsm8k", "--modes", "greedy", "--limit", "2", "--max-new-tokens", "10"]
    assert main(eval_args(ckpt, tmp_path / "from_ckpt", *common)) == 0
    assert main(eval_args(tiny_hf, tmp_path / "from_hf", *common)) == 0
    stamp = tmp_path / "from_ckpt" / EXPORT_DIR / EXPORT_STAMP
    assert stamp.is_file()
    got = [p.greedy_generation for p in predictions(tmp_path / "from_ckpt")]
    assert got == [p.greedy_generation for p in predictions(tmp_path / "from_hf")]
    # Resuming with the same checkpoint reuses the export.
    before = stamp.stat().st_mtime_ns
    assert main(eval_args(ckpt, tmp_path / "from_ckpt", *common)) == 0
    assert stamp.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def tiny_value_head_prm(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    path = save_tiny_hf_checkpoint(tmp_path_factory.mktemp("prm"), family="llama", seed=1)
    head = torch.nn.Linear(64, 1)
    save_file({"v_head.summary.weight": head.weight.detach().clone(), "v_head.summary.bias": head.bias.detach().clone()},
              str(path / "value_head.safetensors"))
    return path


def test_hf_prm_as_orm(tiny_hf, tiny_value_head_prm, tmp_path):
    out = tmp_path / "orm"
    args = eval_args(tiny_hf, out, "--bench", "gsm8k", "--modes", "orm_vote@2,orm_max@2,maj@2", "--limit", "3",
                     "--max-new-tokens", "10", "--orm", str(tiny_value_head_prm), "--orm-type", "value_head",
                     "orm.hf.device=cpu")
    assert main(args) == 0
    preds = predictions(out)
    assert all(len(p.scores) == 2 and all(0.0 <= s <= 1.0 for s in p.scores) for p in preds)
    assert json.loads((out / "eval_manifest.json").read_text())["orm"] == "value_head:last"
    assert json.loads((out / "summary.json").read_text())["modes"] == ["orm_vote@2", "orm_max@2", "maj@2"]


def test_hf_dataset_benchmark(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    local = tmp_path / "arith"  # a directory written by datasets, as the hub's cache would hold
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"question": ["What is 1+1?", "What is 2+2?"],
                                                              "answer": ["1+1=2\n#### 2", "2+2=4\n#### 4"]})}
                         ).save_to_disk(str(local))
    out = tmp_path / "hf"
    assert main(eval_args("tiny:llama", out, "--modes", "greedy", "--max-new-tokens", "4",
                          "--bench", f"hf:{local}:test,gsm8k", "--limit", "1")) == 0
    preds = predictions(out)
    assert [(p.benchmark, p.id, p.gold_answer) for p in preds] == [("arith-test", "arith-test-00000", "2"),
                                                                  ("gsm8k", "gsm8k-test-00000", "18")]
    assert "| mode | arith-test (n=1) | gsm8k (n=1) |" in capsys.readouterr().out


def test_custom_jsonl_fields_and_bad_input(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prob": "What is 1+1?", "sol": "2"}\n{"prob": "What is 2+2?", "sol": "4"}\n')
    out = tmp_path / "custom"
    base = eval_args("tiny:llama", out, "--modes", "greedy", "--max-new-tokens", "4")
    assert main([*base, "--bench", f"mine={data}", "--question-field", "prob", "--answer-field", "sol"]) == 0
    preds = predictions(out)
    assert [(p.benchmark, p.question, p.gold_answer) for p in preds] == [("mine", "What is 1+1?", "2"),
                                                                         ("mine", "What is 2+2?", "4")]
    capsys.readouterr()

    data.write_text('{"prob": "What is 1+1?", "sol": "2"}\n{"prob": "no gold"}\n')
    assert main([*base, "--bench", f"mine={data}", "--question-field", "prob", "--answer-field", "sol",
                 f"output_dir={tmp_path / 'bad'}"]) == 2
    assert f"{data}:2: no gold answer field" in capsys.readouterr().err
    # Resuming a directory with settings that change the generations is refused.
    assert main([*base, "--bench", "gsm8k", "--limit", "1", "--seed", "1"]) == 2
    assert "different settings (keys ['seed'])" in capsys.readouterr().err
    for extra, message in [(["--modes", "maj@0"], "needs a sample count"),
                           (["--modes", "orm_max@4"], "need an ORM"),
                           (["--bench", "nosuchbench"], "unknown benchmark 'nosuchbench'"),
                           (["--limit", "x"], "--limit: 'x' is not a valid int"),
                           (["no_such_key=1"], "unknown key")]:
        assert main([*base, "--bench", "gsm8k", *extra]) == 2
        assert message in capsys.readouterr().err, extra

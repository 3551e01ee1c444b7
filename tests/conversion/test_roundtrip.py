"""Tiny random Llama / Llama-3 (rope scaling, tied) / Qwen2 checkpoints built here: HF -> Megatron -> HF.

Megatron logits equal transformers' to 1e-4 (fp32) at TP=1, TP=2 and PP=2 (the PP=2 run loads a
checkpoint the trainer's writer saved at TP=2, so resharding on load is covered); the round trip and the
in-memory weight export are bit-exact. Two torchrun launches group all checks. ``pytest -s`` prints
the largest logit differences measured (the README quotes them).
"""

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    torchrun([str(HERE / "worker_convert.py"), str(root)], nproc=1)
    return root


@pytest.mark.distributed
def test_tp1_logits_roundtrip_and_export(converted):
    results = json.loads((converted / "convert_results.json").read_text())
    assert set(results) == {"llama", "qwen2", "llama3"}
    for name, r in results.items():
        print(f"\n{name} TP=1: Megatron vs transformers logits, max abs difference {r['tp1_logits_max_abs_diff']:.2g}")
        assert r["tp1_logits_max_abs_diff"] <= 1e-4, name
        meta = json.loads((converted / f"mcore_{name}" / "sppd_model.json").read_text())
        assert meta["suggested_parallel"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
        assert (converted / f"back_{name}" / "tokenizer.json").is_file()


@pytest.mark.distributed
def test_tp2_and_pp2_logits(converted):
    torchrun([str(HERE / "worker_parallel.py"), str(converted)], nproc=2)
    results = json.loads((converted / "parallel_results.json").read_text())
    for name, r in results.items():
        print(f"\n{name} TP=2 / PP=2: Megatron vs transformers logits, max abs difference "
              f"{r['tp2_logits_max_abs_diff']:.2g} / {r['pp2_logits_max_abs_diff']:.2g}")
        assert r["tp2_logits_max_abs_diff"] <= 1e-4, name
        assert r["pp2_logits_max_abs_diff"] <= 1e-4, name

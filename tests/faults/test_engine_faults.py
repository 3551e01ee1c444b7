"""Rollout servers that die, hang or answer garbage mid-sampling (the SGLang and vLLM fakes of
tests/sampling/fake_engines.py, written from their sources): retried with backoff on a rebuilt engine,
then one line; a resumed run continues from the last finished group, to the uninterrupted trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultlib import clean_error, tree_digest
from sppd_megatron.sampling.engines import sglang_engine
from sppd_megatron.sampling.engines.base import GenerationRequest
from sppd_megatron.sampling.engines.retry import EngineFailed, RetryingEngine
from sppd_megatron.sampling.engines.vllm_engine import VLLMEngine
from tests.sampling.fake_engines import EngineFaults, fake_sglang, fake_vllm_generator

ROOT = Path(__file__).resolve().parents[2]
PROG = "sppd-megatron sample"


@pytest.fixture
def sglang(monkeypatch, tmp_path):
    """``sglang`` replaced by the fake; ``arm(script, from_call)`` sets the faults of the next engines."""
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    fault_file = tmp_path / "sglang-faults.json"
    EngineFaults(fault_file)
    monkeypatch.setattr(sglang_engine, "_import_sglang", lambda: fake_sglang(fault_file=fault_file))

    def arm(script=None, from_call=None) -> Path:
        EngineFaults(fault_file, script, from_call)
        return fault_file

    return arm


def _sample_argv(out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/tiny-cpu/sample.yaml"), "input=gsm8k", f"output_dir={out}", "model=/models/policy",
            "engine.name=sglang", "engine.dp_size=2", "engine.retry_backoff_s=0.01", "engine.request_timeout_s=1",
            "num_questions=6", "questions_per_round=2", "shard_size=4", "K=6", "max_depth=4", "progress=false", *extra]


def test_sglang_that_dies_hangs_or_answers_garbage_is_retried_to_the_same_trees(sglang, tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main

    assert main(_sample_argv(tmp_path / "reference")) == 0
    reference = tree_digest(tmp_path / "reference", "trees-*.jsonl")
    assert len(reference) == 2
    capsys.readouterr()

    sglang({2: "die", 4: "hang", 6: "garbage"})
    assert main(_sample_argv(tmp_path / "faulty")) == 0
    err = capsys.readouterr().err
    for why in ("scheduler is dead", "did not answer within engine.request_timeout_s=1", "answered garbage"):
        assert why in err and "retrying in" in err, (why, err)
    assert tree_digest(tmp_path / "faulty", "trees-*.jsonl") == reference
    for fault in ("die", "hang", "garbage"):
        tally.fault("sample[sglang]", f"engine {fault}", "recovered")


def test_a_server_that_stays_down_ends_in_one_line_and_the_run_resumes_from_the_last_group(sglang, tmp_path,
                                                                                           capsys, tally):
    from sppd_megatron.sampling.cli import main

    counted = sglang()
    assert main(_sample_argv(tmp_path / "reference")) == 0
    calls = json.loads(counted.read_text())["calls"]
    capsys.readouterr()
    out = tmp_path / "out"
    sglang(from_call=(calls // 2 + 1, "die"))  # dead for good from half-way through
    assert main(_sample_argv(out, "engine.max_retries=2")) == 2
    err = capsys.readouterr().err
    clean_error(err, PROG, "engine sglang: no valid answer after 3 attempts", "scheduler is dead",
                "run the same command again to resume", alone=False)
    written = sum(len(p.read_text().splitlines()) for p in out.glob("trees-*.jsonl"))
    assert 0 < written < 6 and written % 2 == 0  # whole groups only
    tally.fault("sample[sglang]", "engine down", "clean error")

    sglang()  # the server is back
    assert main(_sample_argv(out)) == 0
    assert tree_digest(out, "trees-*.jsonl") == tree_digest(tmp_path / "reference", "trees-*.jsonl")
    tally.fault("sample[sglang]", "engine down", "recovered")


def test_vllm_child_that_dies_hangs_or_answers_garbage_is_restarted_then_fails_in_one_line(tmp_path, tally):
    requests = [GenerationRequest([5, 6, 7, i], 4, seed=i, affinity=f"q{i % 2}") for i in range(4)]
    fault_file = tmp_path / "vllm-faults.json"

    def engine(max_retries: int) -> RetryingEngine:
        def build(path: str) -> VLLMEngine:
            return VLLMEngine(path, "builtin:char", backend=fake_vllm_generator, request_timeout_s=3,
                              extra={"fake_fault_file": str(fault_file)})
        return RetryingEngine(build, "/models/policy", "vllm", max_retries=max_retries, backoff_s=0.01)

    EngineFaults(fault_file)
    healthy = engine(0)
    expected = healthy.generate(requests)
    healthy.close()

    EngineFaults(fault_file, {1: "die", 2: "hang", 3: "garbage"})
    retried = engine(3)
    try:
        assert retried.generate(requests) == expected  # the 4th child answers, as the first would have
    finally:
        retried.close()
    for fault in ("die", "hang", "garbage"):
        tally.fault("sample[vllm]", f"engine {fault}", "recovered")

    EngineFaults(fault_file, from_call=(1, "die"))
    down = engine(1)
    with pytest.raises(EngineFailed, match="engine vllm: no valid answer after 2 attempts .*died"):
        down.generate(requests)
    down.close()
    tally.fault("sample[vllm]", "engine down", "clean error")

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sppd_megatron.records import Tree, read_jsonl
from sppd_megatron.sampling.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path, prompts_file):
    cfg = {"input": str(prompts_file), "output_dir": str(tmp_path / "out"), "model": "tiny:llama",
           "engine": {"num_threads": 1}, "K": 6, "C": 2, "max_depth": 4, "max_step_tokens": 8,
           "max_total_tokens": 24, "seed": 3, "questions_per_round": 2, "shard_size": 2, "progress": False}
    path = tmp_path / "sample.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("trees-*.jsonl"))}


def test_sample_writes_shards_and_resume_skips_finished(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(config_file)]) == 0
    shards = shard_bytes(out)
    assert list(shards) == ["trees-00000.jsonl", "trees-00001.jsonl"]
    trees = [t for name in shards for t in read_jsonl(out / name, Tree)]
    assert [t.id for t in trees] == ["gsm8k-test-00000", "gsm8k-test-00001", "gsm8k-test-00002"]
    assert all(t.sampling["K"] == 6 and t.sampling["C"] == 2 and t.policy == "tiny:llama" for t in trees)
    manifest = json.loads((out / "sample_manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["K"] == 6
    assert "sampled 3 trees" in capsys.readouterr().out
    # Running again finds every tree done and writes nothing.
    assert main([str(config_file)]) == 0
    assert "sampled 0 trees (3 already done)" in capsys.readouterr().out
    assert shard_bytes(out) == shards
    # A config that would change the trees is refused for this directory; output_dir/progress may change.
    assert main([str(config_file), "K=7"]) == 2
    assert "different config" in capsys.readouterr().err


def test_bad_config_and_input_are_reported(config_file, tmp_path, capsys):
    assert main([str(config_file), "C=0"]) == 2
    assert "K and C must be >= 1" in capsys.readouterr().err
    assert main([str(config_file), "no_such_key=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    assert main([str(config_file), f"input={bad}", f"output_dir={tmp_path / 'o2'}"]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", [[], ["algorithm=mcts", "mcts.max_trees=2"]], ids=["tree", "mcts"])
def test_killed_run_resumes_to_the_same_shards(config_file, tmp_path, algorithm):
    """Kill `sample` (SIGKILL) mid-run, tear its last line, restart: shards equal an uninterrupted run's
    (tree sampling, and MCTS)."""
    reference = tmp_path / "reference"
    assert main([str(config_file), f"output_dir={reference}", *algorithm]) == 0

    env = {**os.environ, "SPPD_FAULT": "sample.tree:2", "PYTHONPATH": str(ROOT)}  # dies before its 2nd tree
    killed = subprocess.run([sys.executable, "-m", "sppd_megatron.cli", "sample", str(config_file), *algorithm],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "out"
    first = (out / "trees-00000.jsonl").read_text()
    assert first.count("\n") == 1  # killed after its first tree: mid-way through the first group
    with (out / "trees-00000.jsonl").open("a") as fh:  # and as if the kill had hit a write
        fh.write('{"gold_answer": "3", "id": "gsm8k-te')

    assert main([str(config_file), *algorithm]) == 0
    assert shard_bytes(out) == shard_bytes(reference)
    trees = [t for name in shard_bytes(out) for t in read_jsonl(out / name, Tree)]
    assert all((t.sampling.get("algorithm") == "mcts") == bool(algorithm) for t in trees)
    assert all(t.nodes[0].visits for t in trees) if algorithm else all(t.nodes[0].visits is None for t in trees)

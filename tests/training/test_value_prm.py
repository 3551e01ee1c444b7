"""The value head as a process reward: a ``prm`` checkpoint served to ``score`` (scorer ``value_head``).

- its packed, batched scores equal transformers' hidden states of the exported model run one state
  at a time, through the value head's weights (no packing, no Megatron on that side);
- ``score`` on 2 processes (TP=2, PP=2) writes the values of one process within 1e-5;
- ``eval`` guides step-level beam search with it, on one process and on two (TP=2), alike;
- a checkpoint without a value head is refused with a clear message.

``pytest -s`` prints the measured differences.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppd_megatron.records import Tree, read_jsonl
from sppd_megatron.testing.distributed import torchrun

REPO = Path(__file__).resolve().parents[2]
TREES = REPO / "configs" / "tiny-cpu" / "data" / "trees.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{args[:2]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("value_prm")
    _cli("train", "configs/tiny-cpu/prm.yaml", f"output_dir={tmp / 'prm'}", "schedule.train_steps=3",
         "logging.progress=false", "logging.tensorboard=false")
    trees = tmp / "trees"
    trees.mkdir()
    (trees / "trees-00000.jsonl").write_bytes(TREES.read_bytes())
    return tmp


def _score_args(tmp: Path, out: str, *extra: str) -> list[str]:
    return ["score", "configs/tiny-cpu/score.yaml", f"input_dir={tmp / 'trees'}", f"output_dir={tmp / out}",
            "scorers=[value_head]", f"value_head.path={tmp / 'prm'}", "value_head.pack_length=700",
            "trees_per_batch=3", "progress=false", *extra]


def _values(scored: Path) -> list[float]:
    trees = list(read_jsonl(scored / "trees-00000.jsonl", Tree))
    assert len(trees) == 8
    return [n.values["value_head"] for t in trees for n in t.nodes[1:]]


@pytest.fixture(scope="module")
def exported(trained):
    hf = trained / "hf"
    _cli("convert", "mcore-to-hf", "--ckpt", str(trained / "prm" / "checkpoints" / "iter_0000003"), "--out", str(hf))
    return hf


def test_scores_equal_transformers_hidden_states_through_the_head(trained, exported):
    ckpt, hf = trained / "prm", exported
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "training" / "value_prm_worker.py"), str(ckpt),
                           str(hf), str(TREES)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    print(f"\nvalue-head PRM vs transformers + head, {result['states']} states of {result['queries']} "
          f"trajectories scored in one packed batch: max abs difference {result['max_abs_diff']:.2e}")
    assert result["max_abs_diff"] < 1e-5
    # The head was trained: it does not say the same thing everywhere.
    flat = [v for row in result["values"] for v in row]
    assert max(flat) - min(flat) > 1e-3


def test_score_on_two_processes_equals_one(trained):
    _cli(*_score_args(trained, "one"))
    one = _values(trained / "one")
    for name, layout in (("tp2", "value_head.parallel.tensor_model_parallel_size=2"),
                         ("pp2", "value_head.parallel.pipeline_model_parallel_size=2")):
        torchrun(["-m", "sppd_megatron", *_score_args(trained, name, layout)], nproc=2, cwd=REPO, timeout=600)
        two = _values(trained / name)
        diff = max(abs(a - b) for a, b in zip(one, two))
        print(f"\nscore with the value-head PRM, {name} vs one process: max abs difference {diff:.2e} "
              f"over {len(one)} step values")
        assert len(two) == len(one) and diff < 1e-5
        summary = json.loads((trained / name / "score_summary.json").read_text())
        assert summary["scored"] == 8 and summary["scorers"] == {"value_head": "value_head"}


@pytest.fixture(scope="module")
def toy_bench(trained):
    from sppd_megatron.pipeline.problems import make_split
    from sppd_megatron.records import write_jsonl

    bench = trained / "toy.jsonl"
    write_jsonl(bench, [p.to_prompt("toy") for p in make_split(0, "heldout", 3, 2, 3)])
    return bench


def test_eval_beam_search_guided_by_the_value_head(trained, exported, toy_bench):
    from sppd_megatron.records import Prediction

    bench = toy_bench
    args = ["eval", "--model", str(exported), "--bench", f"toy={bench}", "--modes", "greedy,sbs@2,sbs_vote@2",
            "--value-model", str(trained / "prm"), "--sbs-expansions", "2", "--max-new-tokens", "24", "--no-progress",
            "orm.value_head.pack_length=700", "template.use_chat_template=false", "engine.num_threads=1"]
    _cli(*args, "--out", str(trained / "eval1"))
    one = list(read_jsonl(trained / "eval1" / "predictions.jsonl", Prediction))
    assert len(one) == 3 and all(len(p.sbs["2"].generations) >= 1 for p in one)
    torchrun(["-m", "sppd_megatron", *args, "--out", str(trained / "eval2"),
              "orm.value_head.parallel.tensor_model_parallel_size=2"], nproc=2, cwd=REPO, timeout=600)
    two = list(read_jsonl(trained / "eval2" / "predictions.jsonl", Prediction))
    assert [p.sbs["2"].generations for p in two] == [p.sbs["2"].generations for p in one]
    diff = max(abs(a - b) for p, q in zip(one, two) for a, b in zip(p.sbs["2"].values, q.sbs["2"].values))
    print(f"\neval sbs@2 guided by the value-head PRM, TP=2 vs one process: same solutions, values within {diff:.1e}")
    assert diff < 1e-5
    summary = json.loads((trained / "eval1" / "summary.json").read_text())
    assert summary["modes"] == ["greedy", "sbs@2", "sbs_vote@2"]


def test_a_checkpoint_without_value_head_is_refused(trained, exported):
    # A converted policy has no value head; it is an sppd-megatron checkpoint all the same.
    _cli("convert", "hf-to-mcore", "--hf", str(exported), "--out", str(trained / "policy"))
    proc = _cli(*_score_args(trained, "bad", f"value_head.path={trained / 'policy'}"), check=False)
    assert proc.returncode == 2
    assert "has no value head (train it with stage prm or svpo)" in proc.stderr
    proc = _cli(*_score_args(trained, "bad2", f"value_head.path={trained / 'nowhere'}"), check=False)
    assert proc.returncode == 2 and "no sppd-megatron checkpoint" in proc.stderr


def test_mcts_mixes_the_value_head_into_leaf_evaluations(trained, toy_bench):
    """AlphaMath's evaluation: an expanded non-terminal step is worth lambda * (2 V - 1), V the value head's
    reading of its state; so Q N - sum over children of Q N = lambda (2 V - 1) at every such step."""
    sample = trained / "mcts-sample.yaml"
    sample.write_text(json.dumps({
        "input": str(toy_bench), "output_dir": str(trained / "mcts"), "model": "tiny:llama",
        "engine": {"num_threads": 1}, "algorithm": "mcts", "K": 6, "C": 2, "max_depth": 3, "max_step_tokens": 6,
        "max_total_tokens": 18, "mcts": {"max_trees": 1, "value_weight": 0.5, "value_model": str(trained / "prm")},
        "template": {"use_chat_template": False}, "progress": False}))
    _cli("sample", str(sample))
    shard = trained / "mcts" / "trees-00000.jsonl"
    (trained / "mcts-trees").mkdir()
    (trained / "mcts-trees" / shard.name).write_bytes(shard.read_bytes())
    _cli("score", "configs/tiny-cpu/score.yaml", f"input_dir={trained / 'mcts-trees'}",
         f"output_dir={trained / 'mcts-scored'}", "scorers=[value_head]", f"value_head.path={trained / 'prm'}",
         "progress=false")
    checked = 0
    for tree in read_jsonl(trained / "mcts-scored" / shard.name, Tree):
        for node in tree.nodes[1:]:
            kids = tree.children(node.node_id)
            if node.terminal or not kids:
                continue
            own = node.q * node.visits - sum(k.q * k.visits for k in kids)
            assert own == pytest.approx(0.5 * (2 * node.values["value_head"] - 1), abs=1e-5)
            checked += 1
    assert checked >= 3

"""``sppd-megatron run`` with the learned-PRM and SVPO stages, and with MCTS sampling (``sample.algorithm``).

On the toy loop of ``configs/tiny-cpu/run.yaml`` with the fitted policy of ``conftest.py``:

- ``prm`` trains a value head on the trees' Monte-Carlo values, ``prm_score`` scores the trees with it
  in a child process, ``prm_pairs`` builds pairs from its values, ``step_dpo_prm`` trains step-DPO on
  them from the DPO-PRM checkpoint; ``svpo`` trains on the SVPO pairs and is evaluated with sbs@2
  guided by its own value head (a child process); a re-run skips every stage;
- ``sample.algorithm: mcts`` with ``pairs.value_name: mcts_q`` runs the same loop on MCTS trees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.records import PreferencePair, Tree, read_jsonl

from pipeline_run import command as _command, run as _run  # noqa: E402 (tests/ is on sys.path, no package)

LEARNED = [
    "stages=[sample, score, pairs, dpo_prm, prm, prm_score, prm_pairs, step_dpo_prm, svpo, eval]",
    "train.prm.config=configs/tiny-cpu/prm.yaml",
    "train.prm.overrides={schedule: {global_batch_size: 2, train_steps: 2}, data: {value_name: mc}}",
    "train.svpo.config=configs/tiny-cpu/svpo.yaml",
    "train.svpo.overrides={schedule: {global_batch_size: 2, micro_batch_size: 2, train_steps: 2}}",
    "pairs.svpo.enabled=true", "prm_pairs={step: {threshold: 0.0}}",
    "prm_score={value_head: {pack_length: 600}, calibration_label: mc}",
    "eval.models=[base, step_dpo_prm, svpo]", "eval.value_heads={svpo: svpo}", "eval.sbs_modes=['sbs@2']",
    "eval.sbs_expansions=2",
]


@pytest.fixture(scope="module")
def learned_run(demo_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("learned") / "run"
    proc = _run(_command(demo_data, run_dir, *LEARNED))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_learned_prm_and_svpo_stages(learned_run, demo_data):
    it = learned_run / "iter1"
    for stage in ("prm", "prm_score", "prm_pairs", "step_dpo_prm", "svpo", "eval/svpo", "eval/step_dpo_prm"):
        assert json.loads((it / stage / "manifest.json").read_text())["status"] == "done", stage
    # The value head was trained and read: every step of every tree has its value, beside the old ones.
    trees = [t for p in sorted((it / "prm_score" / "scored").glob("trees-*.jsonl")) for t in read_jsonl(p, Tree)]
    assert trees and all({"tree", "mc", "value_head"} <= set(n.values) for t in trees for n in t.nodes[1:])
    assert not (it / "prm" / "hf").exists()  # a value model is read from its checkpoint, never exported
    pairs = list(read_jsonl(it / "prm_pairs" / "step_pairs.jsonl", PreferencePair))
    assert pairs and all(p.chosen_value > p.rejected_value for p in pairs)
    step_dpo_prm = json.loads((it / "step_dpo_prm" / "manifest.json").read_text())["config"]
    assert "dpo_prm/train/checkpoints" in step_dpo_prm["init"]["path"]
    assert step_dpo_prm["data"]["train_file"].endswith("prm_pairs/step_pairs.jsonl")
    report = json.loads((learned_run / "report.json").read_text())["iterations"]["1"]
    assert report["prm_calibration"]["label"] == "mc" and report["prm_calibration"]["values"]["value_head"]["states"] > 0
    assert report["prm_pairs"]["step"] == len(pairs)
    assert report["train"]["prm"]["step"] == 2 and report["train"]["svpo"]["step"] == 2
    svpo = report["eval"]["svpo"]["results"]["fitted"]
    assert set(svpo) == {"greedy", "maj@2", "sbs@2"} and svpo["sbs@2"]["n"] == 6
    assert "sbs@2" not in report["eval"]["base"]["results"]["fitted"]
    md = (learned_run / "report.md").read_text()
    assert "| +SVPO |" in md and "| +SPPD, learned PRM (dynamic margin) |" in md
    # A re-run skips every stage, the value-head ones included.
    proc = _run(_command(demo_data, learned_run, *LEARNED))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running in" not in proc.stdout and proc.stdout.count("skipped") >= 12


def test_mcts_is_a_switch_of_the_run(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(_command(demo_data, run_dir, "stages=[sample, score, pairs, eval]", "sample.algorithm=mcts",
                         "sample.K=6", "sample.mcts={max_trees: 2, stop_correct: 1}", "score.scorers=[tree]",
                         "pairs={value_name: mcts_q, step: {threshold: 0.3}, svpo: {enabled: false}}",
                         "eval.models=[base]"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    trees = list(read_jsonl(run_dir / "iter1" / "score" / "scored" / "trees-00000.jsonl", Tree))
    assert trees and all(t.sampling["algorithm"] == "mcts" and t.nodes[0].visits > 0 for t in trees)
    assert all("mcts_q" in n.values and "tree" in n.values for t in trees for n in t.nodes[1:])
    assert any(n.correct for t in trees for n in t.nodes)
    stats = json.loads((run_dir / "iter1" / "pairs" / "pairs_stats.json").read_text())
    assert stats["step"]["pairs"] > 0

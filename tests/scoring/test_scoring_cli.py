"""Tree values, grading of trees, and ``sppd-megatron score`` end to end (resume, rejects, real HF PRM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sppd_megatron.config import load_config
from sppd_megatron.models.tiny import save_tiny_hf_checkpoint
from sppd_megatron.pairs.handmade import handmade_tree, step
from sppd_megatron.records import Tree, read_jsonl, write_jsonl
from sppd_megatron.scoring.cli import ScoreConfig, main, run_scoring
from sppd_megatron.scoring.hf_prm import HFPRMConfig
from sppd_megatron.scoring.tree_scoring import grade_tree
from sppd_megatron.scoring.tree_value import tree_values

ROOT = Path(__file__).resolve().parents[2]


def unscored_tree(tree_id: str, gold: str = "5") -> Tree:
    return handmade_tree(tree_id, f"Question {tree_id}: what is 2+3?", gold, [
        step("Let x = 2+3.\n", children=[
            step("So x = 5.\n", children=[step("\\boxed{5}")]),
            step("So x = 6.\n", children=[step("\\boxed{6}")]),
        ]),
        step("Let x = 2*3.\n", children=[step("\\boxed{6}"), step("hmm\n", terminal=False)]),
        step("The answer is 5.")
    ], grade_leaves=False)


def test_grade_tree_and_tree_values():
    t = unscored_tree("q1")
    assert all(n.correct is None for n in t.nodes)
    grade_tree(t)
    assert {n.node_id: n.correct for n in t.nodes if n.terminal} == {3: True, 5: False, 7: False, 9: True}
    assert t.nodes[3].answer == "5" and t.nodes[9].answer == "5"
    values = tree_values(t)
    # node 1: leaves 3 (right), 5 (wrong); node 6: 7 (wrong), 8 (unfinished, counts as a failure)
    assert values == {1: 0.5, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0, 9: 1.0}


def _write_inputs(tmp_path: Path) -> Path:
    inputs = tmp_path / "trees"
    write_jsonl(inputs / "trees-00000.jsonl", [unscored_tree("q1"), unscored_tree("q2", gold="6")])
    write_jsonl(inputs / "trees-00001.jsonl", [unscored_tree("q3")])
    with (inputs / "trees-00001.jsonl").open("a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({**unscored_tree("q4").to_dict(), "nodes": []}) + "\n")
    return inputs


@pytest.fixture(scope="module")
def value_head_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prm")
    save_tiny_hf_checkpoint(path, family="llama", seed=2)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"v_head.summary.weight": torch.randn(1, 64) * 0.1}, str(path / "value_head.safetensors"))
    return path


def test_score_cli_resumes_and_rejects(tmp_path, value_head_dir):
    inputs = _write_inputs(tmp_path)
    cfg = ScoreConfig(input_dir=str(inputs), output_dir=str(tmp_path / "scored"), scorers=["tree", "hf"],
                      value_names={"hf": "skywork"}, trees_per_batch=2, progress=False,
                      hf=HFPRMConfig(path=str(value_head_dir), device="cpu"))
    summary = run_scoring(cfg)
    assert (summary["scored"], summary["rejected"], summary["already_done"]) == (3, 2, 0)
    rejects = [json.loads(line) for line in (tmp_path / "scored" / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"]) for r in rejects] == [("trees-00001.jsonl", 2), ("trees-00001.jsonl", 3)]
    assert "malformed JSON" in rejects[0]["reason"] and "no nodes" in rejects[1]["reason"]
    full = {p.name: p.read_bytes() for p in sorted((tmp_path / "scored").glob("trees-*.jsonl"))}
    trees = list(read_jsonl(tmp_path / "scored" / "trees-00000.jsonl", Tree))
    assert [t.id for t in trees] == ["q1", "q2"]
    for t in trees:
        assert all(set(n.values) == {"tree", "skywork"} for n in t.nodes[1:])
        assert all(0.0 <= v <= 1.0 for n in t.nodes[1:] for v in n.values.values())
    assert trees[1].nodes[5].correct is True  # q2's gold is 6

    # a crash after q1 (half of q2's line written): the rerun completes it with identical bytes
    shard = tmp_path / "scored" / "trees-00000.jsonl"
    first_line = full["trees-00000.jsonl"].split(b"\n")[0] + b"\n"
    shard.write_bytes(first_line + full["trees-00000.jsonl"][len(first_line):][:50])
    (tmp_path / "scored" / "trees-00001.jsonl").unlink()
    summary = run_scoring(cfg)
    assert (summary["scored"], summary["already_done"], summary["rejected"]) == (2, 1, 2)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "scored").glob("trees-*.jsonl"))} == full


def test_score_main_with_the_tiny_cpu_config(tmp_path, capsys):
    inputs = _write_inputs(tmp_path)
    config = ROOT / "configs" / "tiny-cpu" / "score.yaml"
    cfg = load_config(ScoreConfig, config)  # the shipped config loads
    assert cfg.scorers
    rc = main([str(config), f"input_dir={inputs}", f"output_dir={tmp_path / 'out'}", "scorers=[tree]",
               "progress=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "scored 3 trees" in out and "2 rejected" in out
    assert main([str(config), "input_dir=/nonexistent", f"output_dir={tmp_path / 'o2'}"]) == 2
    assert main([str(config), "no_such_key=1"]) == 2


def test_calibration_against_a_label_value(tmp_path):
    """``calibration_label: mc`` puts each other value's Brier score and AUC against ``mc`` in the summary."""
    inputs = tmp_path / "trees"
    trees = [unscored_tree("q1"), unscored_tree("q2", gold="6")]
    for t in trees:
        for n in t.nodes[1:]:
            n.values["mc"] = 1.0 if "5" in t.state_text(n.node_id) else 0.25
    write_jsonl(inputs / "trees-00000.jsonl", trees)
    cfg = ScoreConfig(input_dir=str(inputs), output_dir=str(tmp_path / "out"), scorers=["tree"],
                      calibration_label="mc", progress=False)
    summary = run_scoring(cfg)
    assert summary["calibration"]["label"] == "mc"
    tree = summary["calibration"]["values"]["tree"]
    assert tree["states"] == 18 and 0 <= tree["brier"] <= 1 and 0 <= tree["auc"] <= 1
    assert json.loads((tmp_path / "out" / "score_summary.json").read_text())["calibration"] == summary["calibration"]

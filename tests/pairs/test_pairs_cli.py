"""``sppd-megatron pairs`` end to end: outputs, rejects with file and line, stats, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.config import load_config
from sppd_megatron.pairs.cli import PairsConfig, TrainableConfig, TrainingData, main, run_pairs
from sppd_megatron.pairs.handmade import handmade_tree, step
from sppd_megatron.records import PreferencePair, SFTExample, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def scored_tree(tree_id: str):
    return handmade_tree(tree_id, f"{tree_id}: what is 2+3?", "5", [
        step("Let x = 2+3.\n", v=0.75, children=[
            step("So x = 5.\n", v=0.875, children=[step("\\boxed{5}", v=1.0)]),
            step("So x = 6.\n", v=0.25, children=[step("\\boxed{6}", v=0.0)]),
        ]),
        step("Let x = 2*3.\n", v=0.25, children=[step("\\boxed{6}", v=0.0)]),
        step("x is 5, \\boxed{5}", v=0.625),
    ], value_name="tree")


def write_inputs(tmp_path: Path) -> Path:
    inputs = tmp_path / "scored"
    write_jsonl(inputs / "trees-00000.jsonl", [scored_tree("q1"), scored_tree("q2")])
    unscored = handmade_tree("q3", "q3?", "1", [step("\\boxed{1}")])
    write_jsonl(inputs / "trees-00001.jsonl", [unscored])
    bad_value = scored_tree("q4").to_dict()
    bad_value["nodes"][1]["values"]["tree"] = 1.5
    with (inputs / "trees-00001.jsonl").open("a") as fh:
        fh.write(json.dumps(bad_value) + "\n")
        fh.write(json.dumps(scored_tree("q1").to_dict()) + "\n")  # the same question twice
        fh.write("[1, 2\n")
    return inputs


def test_pairs_outputs_rejects_and_stats(tmp_path):
    inputs = write_inputs(tmp_path)
    cfg = PairsConfig(input_dir=str(inputs), output_dir=str(tmp_path / "pairs"), progress=False)
    stats = run_pairs(cfg)
    out = tmp_path / "pairs"
    sft = list(read_jsonl(out / "sft.jsonl", SFTExample))
    dpo = list(read_jsonl(out / "dpo.jsonl", PreferencePair))
    steps = list(read_jsonl(out / "step_pairs.jsonl", PreferencePair))
    svpo = list(read_jsonl(out / "svpo_pairs.jsonl", PreferencePair))
    assert [e.question_id for e in sft] == ["q1", "q2"] and sft[0].value == 0.75
    assert [p.question_id for p in dpo] == ["q1", "q2"] and dpo[0].rejected == "Let x = 2*3.\n\\boxed{6}"
    assert [(p.question_id, p.chosen, p.rejected) for p in steps] == [
        ("q1", "So x = 5.\n", "So x = 6.\n"), ("q2", "So x = 5.\n", "So x = 6.\n")]
    assert len(svpo) == 14 and {p.pair_type for p in svpo} == {"sibling", "cousin", "terminal"}

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    where = [(Path(r["file"]).name, r["line"], r["category"]) for r in rejects]
    assert where == [("trees-00001.jsonl", 1, "tree not usable"), ("trees-00001.jsonl", 2, "invalid tree record"),
                     ("trees-00001.jsonl", 3, "duplicate tree"), ("trees-00001.jsonl", 4, "invalid tree record")]
    assert "no value 'tree'" in rejects[0]["reason"] and "outside [0, 1]" in rejects[1]["reason"]

    assert stats["trees_read"] == 6 and stats["trees_used"] == 2 and stats["rejected"] == 4
    assert stats["step"]["depth_histogram"] == {"2": 2}
    assert stats["step"]["gap"]["mean"] == 0.625
    assert stats["step"]["pairs_per_question"]["mean_over_all_questions"] == 1.0
    assert stats["svpo"]["pair_types"] == {"cousin": 4, "sibling": 2, "terminal": 8}
    assert json.loads((out / "pairs_stats.json").read_text())["rejected"] == 4

    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    run_pairs(cfg)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first  # deterministic output


def test_caps_thresholds_and_dedup_through_the_config(tmp_path):
    inputs = tmp_path / "scored"
    write_jsonl(inputs / "trees-00000.jsonl", [scored_tree("q1")])
    cfg = load_config(PairsConfig, ROOT / "configs" / "tiny-cpu" / "pairs.yaml", [
        f"input_dir={inputs}", f"output_dir={tmp_path / 'out'}", "step.threshold=0.3",
        "step.max_pairs_per_question=2", "svpo.max_pairs_per_question=3", "progress=false"])
    stats = run_pairs(cfg)
    assert stats["step"]["pairs"] == 2 and stats["step"]["gap"]["min"] == 0.5  # the 2 largest of 3
    assert stats["svpo"]["pairs"] == 3


def test_main_prints_a_table_and_fails_cleanly(tmp_path, capsys):
    inputs = write_inputs(tmp_path)
    config = ROOT / "configs" / "tiny-cpu" / "pairs.yaml"
    assert main([str(config), f"input_dir={inputs}", f"output_dir={tmp_path / 'p'}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "step_pairs.jsonl" in printed and "rejected: 4" in printed
    assert main([str(config), "step.threshold=1.5"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_records_training_would_refuse_go_to_rejects_with_their_reason(tmp_path, capsys):
    """With ``trainable`` set, a record longer than its training stage's data.max_length is rejected,
    counted, and never written to the dataset; the others are untouched."""
    inputs = tmp_path / "scored"
    write_jsonl(inputs / "trees-00000.jsonl", [scored_tree("q1"), scored_tree("q2")])
    # q1's DPO-PRM chosen row is 35 prompt + 32 response + EOS = 68 tokens (q2's too); step pairs are 58; SVPO rows up to 68 fit 58 by truncating their context.
    trainable = "trainable={tokenizer: 'builtin:char', datasets: {sft: {max_length: 68}, dpo: {max_length: 67}, " \
                "step: {max_length: 58}, svpo: {max_length: 58, overlong: truncate}}}"
    config = ROOT / "configs" / "tiny-cpu" / "pairs.yaml"
    out = tmp_path / "pairs"
    assert main([str(config), f"input_dir={inputs}", f"output_dir={out}", "progress=false", trainable]) == 0
    stats = json.loads((out / "pairs_stats.json").read_text())
    assert stats["untrainable"] == {"sft": 0, "dpo": 2, "step": 0, "svpo": 0}
    assert stats["sft"]["examples"] == 2 and stats["dpo"]["pairs"] == 0 and stats["step"]["pairs"] == 2
    assert stats["rejected_by_reason"] == {"too long for training": 2}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["output"], r["question_id"], r["line"]) for r in rejects] == [("dpo.jsonl", "q1", 1), ("dpo.jsonl", "q2", 2)]
    assert rejects[0]["reason"] == ("training would refuse it: sequence of 68 tokens is longer than data.max_length=67 "
                                    "(raise data.max_length, or set data.overlong=drop or truncate)")
    assert "refused by training (in rejects.jsonl): SFT-PRM 0, DPO-PRM 2, step pairs 0, SVPO pairs 0" in capsys.readouterr().out
    # one token less for SFT: those go too; the same records without length settings are all written
    assert main([str(config), f"input_dir={inputs}", f"output_dir={out}", "progress=false",
                 trainable.replace("sft: {max_length: 68}", "sft: {max_length: 67}")]) == 0
    assert json.loads((out / "pairs_stats.json").read_text())["untrainable"]["sft"] == 2
    assert main([str(config), f"input_dir={inputs}", f"output_dir={out}", "progress=false"]) == 0
    stats = json.loads((out / "pairs_stats.json").read_text())
    # (without trainable settings only what every stage refuses is checked: a step merging with its context)
    assert not any(stats["untrainable"].values()) and stats["dpo"]["pairs"] == 2 and stats["rejected"] == 0


def test_trainable_settings_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ValueError, match=r"trainable.datasets: unknown \['sftt'\]"):
        PairsConfig(input_dir="x", output_dir="y", trainable=TrainableConfig("builtin:char", {"sftt": TrainingData(64)}))


@pytest.mark.parametrize("recipe", sorted(p.parent.name for p in (ROOT / "configs" / "recipes").glob("*/pairs.yaml")))
def test_recipe_pairs_check_what_the_recipe_trainers_take(recipe):
    """A cluster recipe's pairs.yaml checks records against the same tokenizer and data settings as its
    training recipes, so its datasets never hold a record those would refuse."""
    from sppd_megatron.training.config import TrainConfig

    folder = ROOT / "configs" / "recipes" / recipe
    pairs = load_config(PairsConfig, folder / "pairs.yaml")
    trainers = {"sft": "sft-*.yaml", "dpo": "dpo-*.yaml", "step": "step_dpo-*.yaml"}
    assert set(pairs.trainable.datasets) == set(trainers)
    for kind, pattern in trainers.items():
        (path,) = folder.glob(pattern)
        train = load_config(TrainConfig, path)
        data = pairs.trainable.datasets[kind]
        assert (data.max_length, data.append_eos, data.overlong) == (
            train.data.max_length, train.data.append_eos, train.data.overlong), path
        if train.init.source == "hf":
            assert pairs.trainable.tokenizer == (train.data.tokenizer or train.init.path), path

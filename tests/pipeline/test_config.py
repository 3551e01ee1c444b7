"""RunConfig: the shipped run configs load; mistakes in any stage section fail at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from sppd_megatron.config import ConfigError
from sppd_megatron.pipeline import demo
from sppd_megatron.pipeline.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths in the configs are relative to the project root


@pytest.mark.parametrize("path", ["configs/tiny-cpu/run.yaml", "configs/demo/run.yaml"])
def test_shipped_run_configs_load(path):
    cfg = load_run_config(path)
    assert cfg.stages[0] == "sample" and cfg.stages[-1] == "eval"
    step = cfg.train_config("step_dpo", "out", "mcore", "ckpt", "pairs.jsonl", margin_mode="fixed")
    assert step["init"] == {"source": "mcore", "path": "ckpt", "seed": 0}
    assert step["loss"]["margin_mode"] == "fixed" and step["model"] is None


@pytest.mark.parametrize("override, message", [
    ("sample.KK=3", "unknown key(s) ['KK'] for SampleConfig"),
    ("score.scorers=[prm]", "'prm' is not one of"),
    ("pairs.step.threshold=1.5", "threshold"),
    ("train.sft_prm.config=configs/tiny-cpu/dpo.yaml", "is a 'dpo' recipe"),
    ("train.dpo_prm.overrides.optim.lrr=1", "unknown key(s) ['lrr']"),
    ("stages=[sample,eval]", None),
    ("eval.benchmarks={}", "needs eval.benchmarks"),
    ("pairs.trainable={tokenizer: builtin:char}", "pairs.trainable is set by the run"),
])
def test_bad_sections_fail_when_loading(override, message):
    if message is None:
        assert load_run_config("configs/tiny-cpu/run.yaml", [override]).stages == ["sample", "eval"]
        return
    with pytest.raises((ConfigError, ValueError)) as err:
        load_run_config("configs/tiny-cpu/run.yaml", [override])
    assert message in str(err.value)


def test_demo_data_and_run_config(tmp_path):
    size = demo.DemoSize(pretrain_problems=20, pretrain_steps=2, prompts=5, heldout=4, ood=3, K=2, maj_n=3)
    template = load_run_config(demo._config_file("run.yaml")).template
    files = demo.data_stage(tmp_path, size, template, log=lambda _: None)
    assert [len(Path(files[k]).read_text().splitlines()) for k in ("pretrain", "prompts", "heldout", "ood")] \
        == [20, 5, 4, 3]
    cfg = load_run_config(demo._config_file("run.yaml"),
                          demo.run_overrides(tmp_path, size, files, str(tmp_path / "policy"), threads=1))
    assert cfg.eval.modes == ["greedy", "maj@3"] and cfg.sample.get("K") == 2
    assert cfg.train.margin_ablation == ["none", "fixed"] and Path(cfg.train.step_dpo.config).is_absolute()


def test_pairs_are_checked_against_the_training_recipes_that_read_them():
    """The run hands its pairs stage the policy's tokenizer and each training stage's data settings,
    overrides included; a dataset no stage trains on is not checked."""
    cfg = load_run_config("configs/demo/run.yaml", ["train.dpo_prm.overrides.data.max_length=300",
                                                    "train.dpo_prm.overrides.data.overlong=truncate"])
    trainable = cfg.pairs_config("scored", "out", "runs/demo/pretrain/hf").trainable
    assert trainable.tokenizer == "runs/demo/pretrain/hf"
    assert {k: (d.max_length, d.append_eos, d.overlong) for k, d in trainable.datasets.items()} == {
        "sft": (256, True, "error"), "dpo": (300, True, "truncate"), "step": (256, True, "error")}
    only_sft = load_run_config("configs/demo/run.yaml", ["stages=[sample, score, pairs, sft_prm]",
                                                  "train.margin_ablation=[]"])
    assert set(only_sft.pairs_config("scored", "out", "policy").trainable.datasets) == {"sft"}


def test_demo_with_svpo_configs_load(tmp_path):
    """``demo --with-svpo``: the main run gains the learned-PRM stages, the MCTS run trains SVPO whose
    own value head guides its beam search; the shared stages keep the default demo's configs."""
    size = demo.PRESETS["default"]
    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("prompts", "heldout", "ood")}
    common = demo.run_overrides(tmp_path, size, files, str(tmp_path / "policy"), threads=1)
    default = load_run_config(demo._config_file("run.yaml"), common)
    main = load_run_config(demo._config_file("run.yaml"), common + demo.svpo_overrides(size))
    assert main.stages[-5:] == ["prm", "prm_score", "prm_pairs", "step_dpo_prm", "eval"]
    for name in ("sample_config", "score_config", "pairs_config"):
        args = ("policy", "out") if name == "sample_config" else ("in", "out", "policy")
        assert getattr(default, name)(*args) == getattr(main, name)(*args), name
    assert main.pairs_config("in", "out", "policy", "value_head").step.threshold == 0.1
    assert main.value_score_config("in", "out", "ckpt").value_head.pack_length == 512
    assert main.train_config("prm", "out", "hf", "policy", "scored")["data"]["value_name"] == "tree"
    mcts = load_run_config(demo._config_file("run.yaml"), common + demo.mcts_overrides(tmp_path, size))
    assert mcts.sample_config("policy", "out").algorithm == "mcts" and mcts.pairs["value_name"] == "mcts_q"
    assert mcts.eval.value_heads == {"svpo": "svpo"} and mcts.eval.sbs_modes == ["sbs@3"]
    assert mcts.pairs_config("in", "out", "policy").trainable.datasets.keys() == {"svpo"}
    heldout = load_run_config(demo._config_file("run.yaml"),
                              demo.calibration_overrides(tmp_path, size, files["heldout"], "policy", False))
    assert heldout.stages == ["sample"] and heldout.sample_config("policy", "out").K == 8


@pytest.mark.parametrize("override, message", [
    ("stages=[sample, score, prm_score, eval]", "stage prm_score needs stage prm"),
    ("stages=[sample, score, pairs, prm, prm_score, prm_pairs, step_dpo_prm, eval] "
     "train.prm.config=configs/tiny-cpu/prm.yaml", "needs stage dpo_prm"),
    ("stages=[sample, score, prm, eval]", "train.prm.config is not set"),
    ("eval.value_heads={base: svpo}", "not a value-head stage of this run"),
    ("prm_score={value_head: {packlength: 5}}", "unknown key(s) ['packlength']"),
    ("eval.sbs_modes=[maj@3]", "holds modes other than"),
])
def test_bad_value_head_sections_fail_when_loading(override, message):
    overrides = override.split(" train.")
    overrides[1:] = ["train." + o for o in overrides[1:]]
    with pytest.raises((ConfigError, ValueError)) as err:
        load_run_config("configs/tiny-cpu/run.yaml", overrides)
    assert message in str(err.value)

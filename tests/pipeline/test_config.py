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

"""Every recipe under configs/ loads with its config class and its layout validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from sppd_megatron.config import load_config
from sppd_megatron.pairs.cli import PairsConfig
from sppd_megatron.planning.memory import GIB, inputs_for_recipe, plan_memory
from sppd_megatron.planning.validate import layout_from_recipe_name, validate_recipe
from sppd_megatron.sampling.config import SampleConfig
from sppd_megatron.scoring.cli import ScoreConfig
from sppd_megatron.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.glob("*/*.yaml") if layout_from_recipe_name(p))
OTHER = {"sample.yaml": SampleConfig, "score.yaml": ScoreConfig, "pairs.yaml": PairsConfig}
TINY = sorted((ROOT / "configs" / "tiny-cpu").glob("*.yaml"))


def test_recipe_set_is_complete():
    names = {str(p.relative_to(RECIPES)) for p in RECIPES.glob("*/*.yaml")}
    for model in ("qwen2.5-7b-base", "llama3.1-8b-instruct"):
        for stage in ("sample.yaml", "score.yaml", "pairs.yaml", "sft-1n8g-tp2pp1.yaml",
                      "dpo-1n8g-tp2pp1.yaml", "step_dpo-1n8g-tp2pp1.yaml"):
            assert f"{model}/{stage}" in names
    assert {"llama3-70b/sft-4n8g-tp8pp4.yaml", "llama3-70b/step_dpo-4n8g-tp8pp4.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_train_recipe_loads_validates_and_fits_80gb(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.precision.params_dtype == "bf16" and cfg.init.source in ("hf", "mcore")
    model, layout = validate_recipe(cfg, path)
    assert layout.world_size == layout.tp * layout.pp * layout.dp
    assert not layout.warnings, layout.warnings
    # the paper's settings
    assert cfg.loss.beta == 0.1
    if cfg.stage == "sft":
        assert (cfg.optim.optimizer, cfg.optim.lr) == ("adam", 5e-6)
    else:
        assert (cfg.optim.optimizer, cfg.optim.lr) == ("sgd", 1e-5)
    if cfg.stage == "step_dpo":
        assert cfg.loss.gamma in (0.1, 0.5, 1.0, 2.0, 5.0) and cfg.loss.margin_mode == "dynamic"
    assert cfg.optim.lr_decay_style == "cosine"
    plan = plan_memory(inputs_for_recipe(cfg, model, layout.dp, layout.num_microbatches))
    assert plan.peak.total / GIB + 4 <= 80, f"{path.name}: {plan.peak.total / GIB:.1f} GiB"


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.glob("*/*.yaml") if p.name in OTHER),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_data_recipes_load(path):
    cfg = load_config(OTHER[path.name], path)
    if path.name == "sample.yaml":
        assert (cfg.K, cfg.C, cfg.engine.name, cfg.max_total_tokens) == (64, 2, "sglang", 2048)
        assert cfg.engine.dp_size * cfg.engine.tp_size == 8
    if path.name == "pairs.yaml":
        assert cfg.step.threshold == 0.5


@pytest.mark.parametrize("path", [p for p in TINY if p.stem in ("sft", "dpo", "step_dpo", "svpo")],
                         ids=lambda p: p.name)
def test_tiny_recipes_validate(path):
    cfg = load_config(TrainConfig, path)
    _, layout = validate_recipe(cfg, path)
    assert layout.dp == 1


def test_seventy_b_layout_is_the_one_that_fits():
    """TP=8 PP=4 fits 80 GB; TP=8 PP=2 (DP=2) does not, for the same DPO recipe."""
    path = RECIPES / "llama3-70b" / "dpo-4n8g-tp8pp4.yaml"
    totals = {}
    for pp in (4, 2):
        cfg = load_config(TrainConfig, path, [f"parallel.pipeline_model_parallel_size={pp}"])
        model, layout = validate_recipe(cfg, None, nodes=4, gpus_per_node=8, arch="Llama-3-70B")
        totals[pp] = plan_memory(inputs_for_recipe(cfg, model, layout.dp, layout.num_microbatches)).peak.total / GIB
    assert totals[4] + 4 <= 80 < totals[2] + 4

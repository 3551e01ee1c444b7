"""The validator rejects layouts that cannot work, naming the fix; known architectures are right."""

from __future__ import annotations

import pytest

from sppd_megatron.config import load_config
from sppd_megatron.planning.architectures import HF_CONFIGS, architecture_for_checkpoint, known_architecture
from sppd_megatron.planning.memory import total_parameters
from sppd_megatron.planning.validate import layout_from_recipe_name, validate_layout, validate_recipe
from sppd_megatron.training.config import TrainConfig

QWEN = known_architecture("Qwen2.5-7B")
LLAMA8 = known_architecture("Llama-3.1-8B")
LLAMA70 = known_architecture("Llama-3-70B")


def test_known_architectures_have_the_published_sizes():
    # model cards: 7.62B, 8.03B, 70.6B parameters
    assert total_parameters(QWEN) == 7_615_616_512
    assert total_parameters(LLAMA8) == 8_030_261_248
    assert total_parameters(LLAMA70) == 70_553_706_496
    assert known_architecture("Meta-Llama-3.1-8B-Instruct") == LLAMA8
    with pytest.raises(KeyError, match="unknown architecture"):
        known_architecture("gpt2")


def test_checkpoint_config_json_wins_over_the_name(tmp_path):
    import json

    ckpt = tmp_path / "Qwen2.5-7B"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**HF_CONFIGS["Qwen2.5-7B"], "num_hidden_layers": 4}))
    assert architecture_for_checkpoint(ckpt).num_layers == 4
    assert architecture_for_checkpoint(tmp_path / "Llama-3-70B").num_layers == 80
    with pytest.raises(ValueError, match="--arch"):
        architecture_for_checkpoint(tmp_path / "mystery-model")


def test_a_good_layout_gives_dp_and_microbatches():
    layout = validate_layout(LLAMA70, tp=8, pp=4, nodes=4, gpus_per_node=8, global_batch_size=64, micro_batch_size=1)
    assert (layout.dp, layout.num_microbatches, layout.warnings) == (1, 64, [])


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (QWEN, dict(tp=3, pp=1, nodes=1, gpus_per_node=8), r"TP x PP = 3 x 1 = 3 does not divide the 8 GPUs"),
        (QWEN, dict(tp=8, pp=1, nodes=1, gpus_per_node=8), r"does not divide num_attention_heads=28"),
        (LLAMA8, dict(tp=16, pp=1, nodes=2, gpus_per_node=8), r"does not divide num_query_groups \(KV heads\)=8"),
        (LLAMA8, dict(tp=1, pp=3, nodes=3, gpus_per_node=1), r"pipeline_model_parallel_size=3 does not divide num_layers=32"),
        (QWEN, dict(tp=2, pp=1, nodes=1, gpus_per_node=8, global_batch_size=6, micro_batch_size=1),
         r"global_batch_size=6 is not a multiple of micro_batch_size x data-parallel size = 1 x 4"),
        (LLAMA8, dict(tp=0, pp=1, nodes=1, gpus_per_node=8), r"tensor_model_parallel_size=0 must be >= 1"),
    ],
)
def test_bad_layouts_are_rejected_with_the_reason(model, kwargs, message):
    kwargs = {"global_batch_size": 64, "micro_batch_size": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        validate_layout(model, **kwargs)


def test_heads_message_names_the_model():
    with pytest.raises(ValueError, match=r"choose a divisor of it \(model: 28 layers, 28 heads, 4 KV heads"):
        validate_layout(QWEN, tp=8, pp=1, nodes=1, gpus_per_node=8, global_batch_size=64, micro_batch_size=1)


def test_warnings_for_tp_across_nodes_and_pipeline_bubbles():
    layout = validate_layout(LLAMA70, tp=8, pp=1, nodes=2, gpus_per_node=4, global_batch_size=4, micro_batch_size=1)
    assert any("spans nodes" in w for w in layout.warnings)
    layout = validate_layout(LLAMA70, tp=8, pp=4, nodes=4, gpus_per_node=8, global_batch_size=2, micro_batch_size=1)
    assert any("bubble" in w for w in layout.warnings)


def test_recipe_name_must_match_its_parallel_section(tmp_path):
    src = "configs/recipes/qwen2.5-7b-base/sft-1n8g-tp2pp1.yaml"
    assert layout_from_recipe_name(src) == {"nodes": 1, "gpus_per_node": 8, "tp": 2, "pp": 1}
    cfg = load_config(TrainConfig, src, ["parallel.tensor_model_parallel_size=4"])
    with pytest.raises(ValueError, match="file name says tp2pp1"):
        validate_recipe(cfg, src)
    model, layout = validate_recipe(cfg, None, nodes=1, gpus_per_node=8, arch="Qwen2.5-7B")
    assert layout.dp == 2 and model == QWEN


def test_unknown_checkpoint_without_arch_is_an_error():
    cfg = load_config(TrainConfig, "configs/recipes/qwen2.5-7b-base/sft-1n8g-tp2pp1.yaml",
                      ["init.path=/models/unknown"])
    with pytest.raises(ValueError, match="pass --arch"):
        validate_recipe(cfg, "elsewhere/sft.yaml")

"""Model configs, layer-spec switches and parallel-layout checks (no Megatron process state needed)."""

from unittest import mock

import pytest

from sppd_megatron.models import builder
from sppd_megatron.models.config import ModelConfig, model_config_from_hf


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_te_fp8_config_wiring_reaches_megatron(recipe):
    """The GPU path up to the point a CPU allows: megatron's TransformerConfig accepts our FP8/BF16 settings."""
    precision = builder.PrecisionConfig(params_dtype="bf16", transformer_impl="transformer_engine", fp8="hybrid",
                                        fp8_recipe=recipe)
    with mock.patch.object(builder.torch.cuda, "is_available", return_value=True), \
            mock.patch.object(builder, "transformer_engine_import_error", return_value=None):
        cfg, impl = builder.build_transformer_config(ModelConfig(), precision, tp=1, pp=1)
    assert impl == "transformer_engine"
    assert (cfg.fp8, cfg.fp8_recipe, cfg.bf16) == ("hybrid", recipe, True)
    assert cfg.bias_activation_fusion and cfg.masked_softmax_fusion
    assert cfg.transformer_impl == "transformer_engine" and not cfg.use_cpu_initialization


def test_memory_switches_reach_megatron():
    """Recompute and sequence parallelism as megatron's TransformerConfig takes them (SP only with TE)."""
    from sppd_megatron.parallel.state import ParallelConfig

    local = builder.PrecisionConfig(transformer_impl="local")
    cfg, _ = builder.build_transformer_config(ModelConfig(), local, 1, 1, parallel=ParallelConfig(recompute="full"))
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    cfg, _ = builder.build_transformer_config(ModelConfig(), local, 1, 1, parallel=ParallelConfig(recompute="selective"))
    assert cfg.recompute_granularity == "selective" and cfg.recompute_modules == ["core_attn"]
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(RuntimeError, match="sequence_parallel needs TransformerEngine"):
        builder.build_transformer_config(ModelConfig(), local, 2, 1, parallel=sp)
    te = builder.PrecisionConfig(params_dtype="bf16", transformer_impl="transformer_engine")
    with mock.patch.object(builder.torch.cuda, "is_available", return_value=True), \
            mock.patch.object(builder, "transformer_engine_import_error", return_value=None):
        cfg, _ = builder.build_transformer_config(ModelConfig(), te, 2, 1, parallel=sp)
    assert cfg.sequence_parallel
    with pytest.raises(ValueError, match="tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        ParallelConfig(overlap_param_gather=True)


def test_parallel_layout_errors_say_what_to_do():
    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2, num_layers=2)
    cfg.check_parallel(2, 2)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        cfg.check_parallel(3, 1)
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig(num_attention_heads=8, num_query_groups=2, hidden_size=64).check_parallel(4, 1)
    with pytest.raises(ValueError, match="does not divide num_layers=2"):
        cfg.check_parallel(1, 4)


def test_hf_config_reading():
    llama31 = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }
    cfg = model_config_from_hf(llama31)
    assert (cfg.family, cfg.num_query_groups, cfg.rope_theta, cfg.rope_scaling.factor) == ("llama", 8, 500000.0, 8.0)
    assert cfg.padded_vocab_size == 128256 and not cfg.qkv_bias
    qwen = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6,
            "tie_word_embeddings": False}
    q = model_config_from_hf(qwen)
    assert q.qkv_bias and q.family == "qwen2" and q.padded_vocab_size == 151936
    with pytest.raises(ValueError, match="unsupported architecture"):
        model_config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    # Round trip through the HF dict we export.
    assert model_config_from_hf(cfg.to_hf_config_dict()) == cfg

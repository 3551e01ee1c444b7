"""Planner arithmetic: each part follows the layout, dtype and optimizer as documented."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sppd_megatron.models.config import ModelConfig
from sppd_megatron.planning.architectures import known_architecture
from sppd_megatron.planning.memory import MemoryInputs, format_plan, plan_memory, stage_parameters

TINY_TIED = ModelConfig(family="qwen2", vocab_size=101, hidden_size=64, num_layers=4, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=128, qkv_bias=True, tie_word_embeddings=True)


def test_tied_embeddings_get_a_copy_on_the_last_stage_only_with_pipelining():
    vocab = TINY_TIED.padded_vocab_size * TINY_TIED.hidden_size
    one = stage_parameters(TINY_TIED, tp=1, pp=1, stage=0)
    first, last = (stage_parameters(TINY_TIED, tp=1, pp=2, stage=s) for s in (0, 1))
    assert first + last == one + vocab
    assert stage_parameters(TINY_TIED, 1, 2, 1, value_head=True) == last + TINY_TIED.hidden_size + 1


def test_tensor_parallel_splits_everything_but_the_norms():
    full = stage_parameters(TINY_TIED, 1, 1, 0)
    half = stage_parameters(TINY_TIED, 2, 1, 0)
    norms = (2 * TINY_TIED.num_layers + 1) * TINY_TIED.hidden_size
    assert half == (full - norms) // 2 + norms


@pytest.mark.parametrize("optimizer, momentum, dtype, per_param", [
    ("adam", 0.0, "fp32", 8), ("adam", 0.0, "bf16", 12), ("sgd", 0.0, "fp32", 0),
    ("sgd", 0.9, "fp32", 4), ("sgd", 0.0, "bf16", 4), ("sgd", 0.9, "bf16", 8),
])
def test_optimizer_bytes_per_parameter(optimizer, momentum, dtype, per_param):
    inp = MemoryInputs(known_architecture("Llama-3.1-8B"), tp=2, params_dtype=dtype, optimizer=optimizer,
                       sgd_momentum=momentum)
    stage = plan_memory(inp).stages[0]
    assert stage.optimizer == per_param * stage.parameters
    assert stage.grads == 4 * stage.parameters  # fp32 main grads
    assert stage.weights == (2 if dtype == "bf16" else 4) * stage.parameters


def test_distributed_optimizer_reference_and_pipeline_in_flight():
    base = MemoryInputs(known_architecture("Llama-3-70B"), tp=8, pp=4, dp=4, optimizer="adam",
                        num_microbatches=16, seq_length=2048)
    plain, sharded = plan_memory(base), plan_memory(replace(base, distributed_optimizer=True))
    assert sharded.stages[0].optimizer * 4 == plain.stages[0].optimizer
    assert [s.microbatches_in_flight for s in plain.stages] == [4, 3, 2, 1]
    with_ref = plan_memory(replace(base, co_resident_reference=True))
    assert with_ref.stages[0].reference == with_ref.stages[0].weights
    unfused = plan_memory(replace(base, transformer_engine=False))
    assert unfused.stages[0].activations > plain.stages[0].activations  # the seq x seq softmax
    assert "fits" in format_plan(plain, 80.0, 4.0)

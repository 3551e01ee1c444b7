"""Build a Megatron-core GPTModel (one pipeline stage of it) from a :class:`ModelConfig`.

Layer implementations are chosen by ModuleSpec, as megatron-core intends: TransformerEngine layers
(BF16, or FP8 with TE's recipe) when TE and CUDA are present, megatron's local (pure torch) layers
otherwise. TE is never required: on CPU the local spec is the only path and is what the tests run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sppd_megatron.models.config import ModelConfig


@dataclass
class PrecisionConfig:
    """Numerics and layer implementation."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    """Model weights and activations; bf16 keeps fp32 main weights in the optimizer."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """auto: TransformerEngine when importable with CUDA, else local torch layers."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 GEMMs through TransformerEngine (GPU only; unverified on this CPU-only workplace)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """TE fp8 scaling recipe, passed to TransformerConfig.fp8_recipe."""
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"

    def __post_init__(self) -> None:
        if self.fp8 != "none" and self.transformer_impl == "local":
            raise ValueError("precision.fp8 needs transformer_impl transformer_engine (or auto on a GPU)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.params_dtype == "bf16" else torch.float32


def transformer_engine_available() -> bool:
    """TE usable here? A broken TE raises more than ImportError, so catch everything."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_transformer_impl(precision: PrecisionConfig) -> str:
    impl = precision.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "precision.transformer_impl=transformer_engine but TransformerEngine with CUDA is not "
            "available here; use transformer_impl=local (or auto)"
        )
    if precision.fp8 != "none" and impl != "transformer_engine":
        raise RuntimeError("precision.fp8 needs TransformerEngine on a GPU; set precision.fp8=none")
    return impl


def build_transformer_config(model: ModelConfig, precision: PrecisionConfig, tp: int, pp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    impl = resolve_transformer_impl(precision)
    dtype = precision.torch_dtype
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Initialise full weights on the CPU and slice them, so every TP layout starts identical;
        # real runs load converted checkpoints anyway.
        use_cpu_initialization=True,
        # Fusions need TE/Apex/CUDA kernels; the local spec uses the plain torch paths.
        bias_activation_fusion=impl == "transformer_engine",
        masked_softmax_fusion=impl == "transformer_engine",
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        deallocate_pipeline_outputs=False,
    )
    if precision.fp8 != "none":
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(**kwargs), impl


def layer_spec(impl: str):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


class ValueHead(torch.nn.Module):
    """SVPO's value head: one linear layer + tanh over the final hidden state (replicated across TP)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        # Own generator: the same initial head whatever layers this pipeline stage built before it.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.bias.zero_()
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=gen) * 0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(hidden)).squeeze(-1)


def build_gpt_model(model_cfg: ModelConfig, precision: PrecisionConfig, with_value_head: bool = False,
                    seed: int = 0):
    """This rank's pipeline stage of the policy (parallel_state must be initialised).

    With ``with_value_head`` the last stage gets ``model.value_head`` and the decoder's final hidden
    states are kept in ``model.last_hidden_states`` after each forward (a forward hook), so the value
    head reads them without changing GPTModel's forward contract.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    model_cfg.check_parallel(tp, pp)
    config, impl = build_transformer_config(model_cfg, precision, tp, pp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(impl),
        vocab_size=model_cfg.padded_vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rope_theta),
    )
    if model_cfg.rope_scaling is not None:
        rs = model_cfg.rope_scaling
        rope = model.rotary_pos_emb
        rope.inv_freq = rope._apply_scaling(
            rope.inv_freq,
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    if with_value_head and model.post_process:
        model.value_head = ValueHead(model_cfg.hidden_size, precision.torch_dtype, seed)
        model.last_hidden_states = None

        def _keep_hidden(_module, _inputs, output):
            model.last_hidden_states = output

        model.decoder.register_forward_hook(_keep_hidden)
    return model

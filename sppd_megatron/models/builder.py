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
    """auto: TransformerEngine on a CUDA machine (where a TE that fails to import is an error, not a
    fallback), local torch layers without CUDA; local: megatron's unfused torch layers, anywhere."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 GEMMs through TransformerEngine (GPU only; unverified on this CPU-only workplace)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """TE fp8 scaling recipe, passed to TransformerConfig.fp8_recipe."""
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    attention: Literal["auto", "dense", "flex"] = "auto"
    """Core attention under the tree masks of packed batches (data.packing other than none): ``dense``
    applies megatron's [B, 1, S, S] mask in its local core attention (local layers only); ``flex``
    swaps in FlexAttention with block masks (skips masked blocks, keeps no S x S scores; compiled on
    GPUs); ``auto``: flex on a CUDA machine, dense otherwise. Padded batches keep the layer spec's
    own causal core attention (TE's fused attention under transformer_engine)."""

    def __post_init__(self) -> None:
        if self.fp8 != "none" and self.transformer_impl == "local":
            raise ValueError("precision.fp8 needs transformer_impl transformer_engine (or auto on a GPU)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.params_dtype == "bf16" else torch.float32


def transformer_engine_import_error() -> Exception | None:
    """Why TransformerEngine cannot be used here (None when it imports).

    A broken TE raises more than ImportError (RuntimeError from its CUDA/cuDNN loader), so catch all.
    """
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def resolve_transformer_impl(precision: PrecisionConfig) -> str:
    """``local`` or ``transformer_engine`` for this machine, never a silent downgrade on a GPU.

    ``auto`` means TE on a CUDA machine and local layers without CUDA. A CUDA machine whose TE fails
    to import stops here with TE's own error: quietly building local layers there would train with
    unfused attention, which keeps [rows, heads, S, S] probabilities and breaks the memory plan.
    ``local`` is always available when asked for by name.
    """
    impl = precision.transformer_impl
    if impl == "local":
        if precision.fp8 != "none":
            raise RuntimeError("precision.fp8 needs TransformerEngine on a GPU; set precision.fp8=none")
        return "local"
    if not torch.cuda.is_available():
        if impl == "auto" and precision.fp8 == "none":
            return "local"
        raise RuntimeError(
            f"precision.transformer_impl={impl}{' with precision.fp8=' + precision.fp8 if precision.fp8 != 'none' else ''} "
            "needs TransformerEngine on a CUDA machine, and this machine has no CUDA; use "
            "precision.transformer_impl=local (or auto) and precision.fp8=none"
        )
    error = transformer_engine_import_error()
    if error is not None:
        raise RuntimeError(
            f"precision.transformer_impl={impl} on a CUDA machine, but TransformerEngine does not import "
            f"({type(error).__name__}: {error}); install it (pip install 'sppd-megatron[gpu]') or ask for the "
            "unfused local layers by name with precision.transformer_impl=local"
        ) from error
    return "transformer_engine"


def build_transformer_config(model: ModelConfig, precision: PrecisionConfig, tp: int, pp: int,
                             on_accelerator: bool = True, parallel=None):
    """Megatron's TransformerConfig for this model; ``on_accelerator`` is True for a model on a GPU."""
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
        # On a GPU each rank allocates and initialises only its own shard, on its device (Megatron's
        # CPU initialisation would build every full weight on every rank first). Every
        # caller then loads weights (a checkpoint, or a transformers model initialised under a seed,
        # which is what makes every layout start identical). Initialisation stays on although it is
        # overwritten: in megatron-core 0.16 it is also what marks tensor-parallel weights
        # (set_tensor_model_parallel_attributes), without which the gradient norm counts only TP
        # rank 0's shards and clipping is wrong at TP > 1. Off the GPU (CPU, meta) the torch.device
        # context decides where tensors go.
        use_cpu_initialization=not on_accelerator,
        # Fusions need TE/Apex/CUDA kernels; the local spec uses the plain torch paths.
        bias_activation_fusion=impl == "transformer_engine",
        masked_softmax_fusion=impl == "transformer_engine",
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        deallocate_pipeline_outputs=False,
        transformer_impl=impl,
    )
    if parallel is not None:
        if parallel.sequence_parallel and impl != "transformer_engine":
            raise RuntimeError("parallel.sequence_parallel needs TransformerEngine layers (megatron's local norms "
                               "cannot split the sequence); set precision.transformer_impl=transformer_engine")
        kwargs["sequence_parallel"] = parallel.sequence_parallel
        if parallel.recompute == "full":
            kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif parallel.recompute == "selective":
            kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if precision.fp8 != "none":
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(**kwargs), impl


def resolve_attention(precision: PrecisionConfig, impl: str, tree_masks: bool) -> str:
    """``default`` (the spec's own core attention), ``dense`` or ``flex`` for this model."""
    if not tree_masks:
        return "default"
    attention = precision.attention
    if attention == "auto":
        attention = "flex" if torch.cuda.is_available() else "dense"
    if attention == "dense" and impl == "transformer_engine":
        raise RuntimeError("packed batches under TransformerEngine layers need precision.attention=flex (TE's "
                           "core attention here takes causal masks only), or data.packing=none")
    return "default" if attention == "dense" else "flex"


def with_flex_attention(spec):
    """``spec`` (a GPT layer ModuleSpec) with FlexAttention as its core attention."""
    import copy

    from sppd_megatron.models.attention import flex_core_attention_class

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = flex_core_attention_class()
    return spec


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
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=gen, device="cpu") * 0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(hidden)).squeeze(-1)


def build_gpt_model(model_cfg: ModelConfig, precision: PrecisionConfig, with_value_head: bool = False,
                    seed: int = 0, device: str | torch.device | None = None, tree_masks: bool = False,
                    parallel=None):
    """This rank's pipeline stage of the policy (parallel_state must be initialised).

    Parameters are created uninitialised on ``device``: by default this rank's accelerator (the
    current CUDA device, as Megatron-LM's ``get_model`` places the model before DDP), or ``meta``
    for a shapes-only model. The caller loads the weights. ``tree_masks``: the model will be given
    packed batches' masks (see ``PrecisionConfig.attention``). RoPE follows the ``position_ids`` given
    to forward (:mod:`sppd_megatron.models.attention`). ``parallel`` (a ParallelConfig) brings
    recompute and sequence parallelism; parallel sizes come from parallel_state.

    With ``with_value_head`` the last stage gets ``model.value_head`` and the decoder's final hidden
    states are kept in ``model.last_hidden_states`` after each forward (a forward hook), so the value
    head reads them without changing GPTModel's forward contract.
    """
    from megatron.core import parallel_state

    from sppd_megatron.models.attention import positioned_gpt_model_class
    from sppd_megatron.parallel.state import accelerator_device

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    model_cfg.check_parallel(tp, pp)
    device = accelerator_device() if device is None else torch.device(device)
    config, impl = build_transformer_config(model_cfg, precision, tp, pp, on_accelerator=device.type == "cuda",
                                            parallel=parallel)
    if with_value_head and config.sequence_parallel:
        raise RuntimeError("the SVPO value head reads whole sequences; run svpo without parallel.sequence_parallel")
    with torch.device(device):  # what Megatron creates without naming a device (norms, value head)
        spec = layer_spec(impl)
        if resolve_attention(precision, impl, tree_masks) == "flex":
            spec = with_flex_attention(spec)
        model = positioned_gpt_model_class()(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model_cfg.padded_vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model_cfg.rope_theta),
        )
        if with_value_head and model.post_process:
            model.value_head = ValueHead(model_cfg.hidden_size, precision.torch_dtype, seed)
    # megatron's local norms (torch.nn.RMSNorm) ignore params_dtype and are created in fp32, where
    # Megatron-LM casts the whole module (Float16Module). An fp32 norm in a bf16 model is not what TE
    # builds, and megatron's bf16 optimizer cannot checkpoint it (its parameter map holds only the
    # bf16 parameters). Parameters only: RoPE's inv_freq is no parameter and stays fp32.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != precision.torch_dtype:
            param.data = param.data.to(precision.torch_dtype)
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
        model.last_hidden_states = None

        def _keep_hidden(_module, _inputs, output):
            model.last_hidden_states = output

        model.decoder.register_forward_hook(_keep_hidden)
    return model

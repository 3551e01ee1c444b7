"""Megatron process groups for the converter, which works in one process (world size 1, TP=1, PP=1).

The converter never needs more: dist checkpoints store global tensors, so a checkpoint written at
TP=1/PP=1 loads at any layout, and a TP=1/PP=1 model built on the ``meta`` device costs no memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sppd_megatron.conversion.errors import ConversionError


@contextmanager
def single_process_megatron(seed: int = 0) -> Iterator[None]:
    """Initialise torch.distributed (gloo) and parallel_state for one process unless already done."""
    from megatron.core import parallel_state

    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize, world_size_from_env

    started = not torch.distributed.is_initialized()
    if started:
        if world_size_from_env() != 1:
            raise ConversionError("the converter runs in one process; launch it without torchrun")
        initialize(ParallelConfig(), seed)
    elif (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ConversionError(
            "the converter needs TP=1/PP=1 process groups; run it in its own process "
            "(in-memory export from a parallel model: sppd_megatron.conversion.weight_sync)"
        )
    try:
        yield
    finally:
        if started:
            destroy()


def build_meta_model(model_cfg, dtype: torch.dtype):
    """A TP=1/PP=1 GPTModel whose parameters live on the ``meta`` device (shapes only, no memory)."""
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model

    precision = PrecisionConfig(params_dtype="bf16" if dtype == torch.bfloat16 else "fp32", transformer_impl="local")
    return build_gpt_model(model_cfg, precision, device="meta")

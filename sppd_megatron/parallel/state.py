"""Process groups: torch.distributed + megatron-core parallel_state, one process or under torchrun."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class ParallelConfig:
    """How the model and the data are split over processes (data parallel is what remains)."""

    tensor_model_parallel_size: int = 1
    """Shards attention heads / MLP columns / vocabulary over this many ranks (must divide heads and groups)."""
    pipeline_model_parallel_size: int = 1
    """Splits the layers into this many stages (must divide num_layers), 1F1B schedule."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer; Adam/AdamW)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, gloo otherwise), nccl or gloo."""
    recompute: str = "none"
    """Activation recompute: ``selective`` recomputes core attention in the backward pass (its
    [heads, S, S] scores are not kept), ``full`` recomputes every layer from its input (one layer's
    activations kept at a time); ``none`` keeps everything."""
    overlap_grad_reduce: bool = False
    """Reduce gradients bucket by bucket while the backward pass is still running (Megatron DDP)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather updated weights bucket by bucket during the next
    forward pass instead of after the optimizer step."""
    sequence_parallel: bool = False
    """Split norms, dropout and the residual stream along the sequence over the tensor-parallel ranks
    (needs TransformerEngine layers and tensor_model_parallel_size > 1)."""

    def __post_init__(self) -> None:
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError("parallel sizes must be >= 1")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute {self.recompute!r} is not none, selective or full")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend {self.backend!r} is not auto, nccl or gloo")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(cfg: ParallelConfig, seed: int) -> None:
    """Start torch.distributed (if needed) and megatron's model-parallel groups; seed the RNGs."""
    from megatron.core import parallel_state, tensor_parallel

    from sppd_megatron.parallel.cpu_shim import enable_cpu_shim

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        enable_cpu_shim()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    world = world_size_from_env()
    if cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size > world or (
        world % (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size)
    ):
        raise ValueError(
            f"tensor_model_parallel_size={cfg.tensor_model_parallel_size} x "
            f"pipeline_model_parallel_size={cfg.pipeline_model_parallel_size} does not divide the "
            f"{world} process(es); launch with torchrun --nproc-per-node N"
        )
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=30)
        if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)  # torchrun's env://
        else:
            # One process needs no rendezvous: an in-memory store, so no port can be taken (or
            # inherited from a parent's environment) and nothing in os.environ changes.
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def accelerator_device() -> torch.device:
    """Where this rank's model, batches and every tensor the trainer makes live.

    The current CUDA device (set from LOCAL_RANK by :func:`initialize`, as Megatron-LM does), or,
    on a machine without CUDA, the device the CPU shim substitutes for it.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    from sppd_megatron.parallel.cpu_shim import stand_in_device

    return stand_in_device()


def communication_device() -> torch.device:
    """Where tensors handed to torch.distributed must live: NCCL takes CUDA tensors, gloo CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """All ranks meet here (nothing to do in a run without torch.distributed)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

"""Weight sync for rollouts: the live Megatron policy -> HF-named tensors -> an engine, without disk.

:func:`export_hf_state_dict` is collective: every rank of the job iterates it. Tensor-parallel shards
are all-gathered inside each stage, later pipeline stages send their merged tensors to global rank 0,
and rank 0 alone receives the (HF name, tensor) pairs, one tensor at a time, in HF order. The
consumers take such an iterator:

- :func:`load_into_hf_model`: copy into a transformers model in place (the embedded engine);
- :func:`push_to_sglang`: ``Engine.update_weights_from_tensor`` in buckets (GPU machines only; SGLang
  cannot serve on this CPU workplace, so that call is written against its documented API, untested).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.conversion.mapping import mcore_to_hf_stage, te_named_state
from sppd_megatron.models.config import ModelConfig


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # Megatron DDP / Float16Module wrappers
        model = model.module
    return model


def _stage_items(model: torch.nn.Module, cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """(HF name, tensor) of this stage after gathering TP shards, computed piece by piece."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()

    def gathered(keys: list[str]) -> list[dict[str, torch.Tensor]]:
        if tp == 1:
            return [{k: state[k] for k in keys}]
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for k in keys:
            parts = [torch.empty_like(state[k]) for _ in range(tp)]
            torch.distributed.all_gather(parts, state[k].contiguous(), group=group)
            for r in range(tp):
                shards[r][k] = parts[r]
        return shards

    num_local = len(model.decoder.layers)
    offset = model.decoder.layers[0].layer_number - 1 if num_local else 0
    if model.pre_process:
        yield from mcore_to_hf_stage(gathered(["embedding.word_embeddings.weight"]), cfg, 0, 0, True, False)
    for local in range(num_local):
        prefix = f"decoder.layers.{local}."
        keys = [k for k in state if k.startswith(prefix) and not k.endswith("_extra_state")]
        shards = [{k.replace(prefix, "decoder.layers.0.", 1): v for k, v in s.items()} for s in gathered(keys)]
        yield from mcore_to_hf_stage(shards, cfg, offset + local, 1, False, False)
    if model.post_process:
        keys = ["decoder.final_layernorm.weight"] + ([] if cfg.tie_word_embeddings else ["output_layer.weight"])
        yield from mcore_to_hf_stage(gathered(keys), cfg, 0, 0, False, True)


def export_hf_state_dict(model: torch.nn.Module, model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) on global rank 0; every rank must iterate it (it is collective)."""
    from megatron.core import parallel_state

    from sppd_megatron.parallel.state import communication_device

    model = _unwrap(model)
    if parallel_state.get_data_parallel_rank() != 0:
        return  # data-parallel replicas hold the same weights; replica 0 exports
    state = te_named_state(
        model, {k: v.detach() for k, v in model.state_dict().items() if v is not None and isinstance(v, torch.Tensor)}
    )
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    items = _stage_items(model, model_cfg, state)
    if pp == 1:
        if tp_rank == 0:
            yield from items
        else:
            for _ in items:  # take part in the TP gathers
                pass
        return
    pp_ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    if stage == 0 and tp_rank == 0:
        yield from items
        for src in pp_ranks[1:]:  # later stages, in order
            while True:
                header: list[Any] = [None]
                torch.distributed.recv_object_list(header, src=src)
                if header[0] is None:
                    break
                name, shape, dtype = header[0]
                tensor = torch.empty(shape, dtype=dtype, device=communication_device())
                torch.distributed.recv(tensor, src=src)
                yield name, tensor
    elif tp_rank == 0:
        for name, tensor in items:
            tensor = tensor.contiguous()
            torch.distributed.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=pp_ranks[0])
            torch.distributed.send(tensor, dst=pp_ranks[0])
        torch.distributed.send_object_list([None], dst=pp_ranks[0])
    else:
        for _ in items:
            pass


def load_into_hf_model(hf_model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy HF-named tensors into a transformers model in place; return how many were copied."""
    params = dict(hf_model.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name not in params:
                raise ConversionError(f"{name}: the engine's model has no such parameter; is it the same architecture?")
            target = params[name]
            if target.shape != tensor.shape:
                raise ConversionError(
                    f"{name}: policy tensor {tuple(tensor.shape)} vs engine {tuple(target.shape)}; the engine "
                    "was started from a different model"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            copied.add(name)
    tied = {"lm_head.weight"} if getattr(hf_model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(params) - copied - tied)
    if missing:
        raise ConversionError(f"policy export did not provide {missing[:3]}; is the engine the same architecture?")
    return len(copied)


def push_to_sglang(engine: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 2**30) -> None:
    """Send HF-named tensors to an ``sglang.Engine`` with ``update_weights_from_tensor``, in buckets."""
    try:
        import sglang  # noqa: F401
    except Exception:
        raise ConversionError(
            "sglang is not installed here; install the gpu extra (pip install 'sppd-megatron[gpu]') on a GPU "
            "machine, or sync weights into the transformers engine with load_into_hf_model"
        ) from None
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
            bucket, size = [], 0
    engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=True)

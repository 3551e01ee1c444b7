"""A torch_dist save strategy that writes in this process, optionally producing tensors lazily.

megatron-core's own torch_dist strategy writes through ``FileSystemWriterAsync``, which even for a
synchronous save starts a ``spawn`` multiprocessing Manager (re-importing ``__main__``) and forks a
writer per bucket. Here the same translation of ShardedTensors to torch.distributed.checkpoint
objects is followed by ``torch.distributed.checkpoint.save`` with its in-process ``FileSystemWriter``;
the files are the standard DCP layout that megatron's torch_dist *load* strategy reads, so checkpoints
load (and reshard) exactly as megatron-written ones do.

Lazy data: ShardedTensors whose data lives on the ``meta`` device are resolved when the writer reaches
them, through ``lazy[(sharded key, global offset)]()``. The writer resolves items one by one, so a model
that never exists in memory can be written tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

LazyTensors = dict[tuple[str, tuple[int, ...]], Callable[[], torch.Tensor]]


class _LazyPlanner(MCoreSavePlanner):
    def __init__(self, lazy: LazyTensors, **kwargs):
        super().__init__(**kwargs)
        self.lazy = lazy

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if isinstance(data, torch.Tensor) and data.is_meta:
            where = (write_item.index.fqn, tuple(write_item.index.offset))
            produce = self.lazy.get(where)
            if produce is None:
                raise RuntimeError(f"no data was provided for {where[0]} at offset {where[1]}")
            data = produce().to(data.dtype).reshape(data.shape)
        return data


class SyncTorchDistSaveStrategy(SaveShardedStrategy):
    """Backend ``torch_dist`` version 1, written synchronously by this process."""

    def __init__(self, thread_count: int = 1, lazy: LazyTensors | None = None):
        super().__init__("torch_dist", 1)
        self.thread_count = thread_count
        self.lazy = lazy or {}

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir: str | Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        writer = dcp.FileSystemWriter(
            str(checkpoint_dir), single_file_per_rank=True, thread_count=self.thread_count, sync_files=True
        )
        dcp.save(
            mcore_to_pyt_state_dict(state, False),
            storage_writer=writer,
            planner=_LazyPlanner(self.lazy, flatten_state_dict=False, can_run_decentralized_global_plan=False),
        )

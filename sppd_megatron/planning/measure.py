"""Measure what a real training run holds per rank, to check :mod:`sppd_megatron.planning.memory`.

``measured_training(cfg)`` runs ``train(cfg)`` (one process or under torchrun) and records, from the
Megatron objects themselves:

- weights: bytes of this rank's model parameters;
- grads: bytes of their ``main_grad`` (the DDP gradient buffer views) and the whole buffer allocation;
- optimizer: bytes of per-parameter optimizer state (fp32 master copies, Adam moments, SGD momentum;
  scalar ``step`` counters are left out);
- activations: the peak of live tensors saved for backward (autograd saved-tensor hooks, storages
  counted once, parameters excluded), and the peak-RSS growth of the process during training.
"""

from __future__ import annotations

import resource
import threading
from contextlib import contextmanager

import torch


class SavedTensorTracker:
    """Live bytes of tensors autograd keeps for backward, counted once per storage; tracks the peak.

    The pack hook wraps each saved tensor in a handle whose finaliser runs when autograd frees the
    graph, so the live total falls as backward consumes it. Parameters (and views of them) are
    excluded: they are counted as weights.
    """

    def __init__(self, exclude: list[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [handles alive, nbytes]
        self.live = 0
        self.peak = 0
        self.lock = threading.Lock()  # backward may run in autograd's worker threads

    def _add(self, t: torch.Tensor) -> int | None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.excluded:
            return None
        with self.lock:
            entry = self.refs.setdefault(ptr, [0, storage.nbytes()])
            if entry[0] == 0:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
        return ptr

    def _drop(self, ptr: int) -> None:
        with self.lock:
            entry = self.refs[ptr]
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[ptr]

    @contextmanager
    def active(self):
        tracker = self

        class Handle:
            __slots__ = ("tensor", "ptr")

            def __init__(self, t: torch.Tensor):
                self.tensor = t
                self.ptr = tracker._add(t)

            def __del__(self):
                if self.ptr is not None:
                    tracker._drop(self.ptr)

        with torch.autograd.graph.saved_tensors_hooks(Handle, lambda h: h.tensor):
            yield self


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer) -> int:
    """Per-parameter state of a Megatron optimizer (chained, mixed-precision or distributed)."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    total = 0
    for opt in inner:
        torch_opt = opt.optimizer
        for state in torch_opt.state.values():
            total += tensor_bytes(v for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
        # fp32 master copies of bf16 weights (Float16OptimizerWithFloat16Params / distributed optimizer)
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(opt, name, None) or []:
                total += tensor_bytes(group)
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measured_training(cfg) -> dict:
    """Run ``train(cfg)`` and return this rank's measured bytes (see the module docstring)."""
    from megatron.core import parallel_state

    from sppd_megatron.training import trainer

    captured: dict = {}
    original_build_optimizer = trainer.build_optimizer
    original_run = trainer.run_forward_backward

    def build_optimizer(ddp_model, cfg_, train_steps):
        optimizer, scheduler = original_build_optimizer(ddp_model, cfg_, train_steps)
        captured["ddp_model"], captured["optimizer"] = ddp_model, optimizer
        params = list(ddp_model.module.parameters())
        captured["tracker"] = SavedTensorTracker(params)
        captured["rss_before_training"] = peak_rss_bytes()
        return optimizer, scheduler

    def run_forward_backward(model, step_fn, batches, cfg_, forward_only):
        tracker = captured.get("tracker")
        if tracker is None or forward_only:
            return original_run(model, step_fn, batches, cfg_, forward_only)
        with tracker.active():
            return original_run(model, step_fn, batches, cfg_, forward_only)

    trainer.build_optimizer = build_optimizer
    trainer.run_forward_backward = run_forward_backward
    try:
        trainer.train(cfg)
    finally:
        trainer.build_optimizer = original_build_optimizer
        trainer.run_forward_backward = original_run
    ddp_model, optimizer = captured["ddp_model"], captured["optimizer"]
    params = list(ddp_model.module.parameters())
    buffers = list(getattr(ddp_model, "buffers", [])) + list(getattr(ddp_model, "expert_parallel_buffers", []))
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "parameters": sum(p.numel() for p in params),
        "weights": tensor_bytes(params),
        "grads": tensor_bytes(getattr(p, "main_grad", None) for p in params),
        "grad_buffer_allocated": tensor_bytes(b.grad_data for b in buffers),
        "optimizer": optimizer_state_bytes(optimizer),
        "activations_saved_peak": captured["tracker"].peak,
        "rss_growth_during_training": peak_rss_bytes() - captured["rss_before_training"],
    }

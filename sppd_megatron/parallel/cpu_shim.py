"""Run megatron-core on machines without CUDA: the one place where its CUDA call sites are redirected.

megatron-core 0.16 hard-codes CUDA in a handful of places that matter for training (measured, see
docs/platform-notes.md): ``torch.cuda.current_device()`` as a device, ``device="cuda"`` in the default causal
mask, pipeline schedules (token counters) and optimizers (overflow buffers), the model-parallel RNG
tracker's CUDA generator state, and the optimizers' ``param.type() == 'torch.cuda.FloatTensor'`` checks.

Rather than fork megatron-core, :func:`enable_cpu_shim` installs
- a ``TorchFunctionMode`` that rewrites CUDA devices to CPU in tensor factories and ``.to()/.cuda()``,
  and reports CPU float tensors with their CUDA type names to those ``param.type()`` checks;
- a CPU ``torch.Generator`` standing in for the per-device CUDA generator used by the RNG tracker.

It is active only when CUDA is unavailable and only in processes that build Megatron models
(:func:`sppd_megatron.parallel.state.initialize`). On a GPU machine it is never entered.

The device that stands in for CUDA is the CPU. A test may choose ``meta`` instead: then the model
lives on ``meta`` exactly where it would live on a GPU, and any tensor the trainer creates without
naming the model's device lands on the CPU, where mixing it with the model's tensors raises (the
CPU-only way to find what would be left behind on a GPU machine).
Limitation: dropout inside the tracker's ``fork()`` draws from the CPU default generator, so it is not
tensor-parallel consistent on CPU; every recipe here trains with dropout 0 (as Llama and Qwen do).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: "_CudaToCpuMode | None" = None
_STAND_IN = torch.device("cpu")
_CPU_TYPE_TO_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def stand_in_device() -> torch.device:
    """The device that plays CUDA's part while the shim is active (the CPU unless a test chose meta)."""
    return _STAND_IN


def _redirect_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _STAND_IN
    if isinstance(device, str) and device.startswith("cuda"):
        return _STAND_IN
    if isinstance(device, torch.device) and device.type == "cuda":
        return _STAND_IN
    return device


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _redirect_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0].to(_STAND_IN)
        if func is torch.Tensor.to:
            args = tuple(_redirect_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_TO_CUDA.get(name, name)
        return func(*args, **kwargs)


class _CpuStandInGenerator:
    """Holds the 'CUDA' RNG state megatron's tracker swaps in and out, on a CPU generator."""

    def __init__(self) -> None:
        self.gen = torch.Generator(device="cpu")

    def get_state(self, *args, **kwargs):
        return self.gen.get_state()

    def set_state(self, state, *args, **kwargs):
        self.gen.set_state(state)

    def manual_seed(self, seed, *args, **kwargs):
        self.gen.manual_seed(int(seed))


def enable_cpu_shim(stand_in: str = "cpu") -> None:
    """Idempotently redirect megatron-core's CUDA call sites to ``stand_in`` (no-op when CUDA exists).

    ``stand_in`` is ``cpu`` for real work; ``meta`` only for device-placement tests (nothing computes).
    """
    global _ACTIVE_MODE, _STAND_IN
    if torch.cuda.is_available() or _ACTIVE_MODE is not None:
        return
    if stand_in not in ("cpu", "meta"):
        raise ValueError(f"the CUDA stand-in must be cpu or meta, not {stand_in!r}")
    _STAND_IN = torch.device(stand_in)
    from megatron.core.tensor_parallel import random as mp_random

    stand_in = _CpuStandInGenerator()
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_rng_state = stand_in.get_state
    torch.cuda.set_rng_state = stand_in.set_state
    torch.cuda.manual_seed = stand_in.manual_seed
    torch.cuda.manual_seed_all = stand_in.manual_seed
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    mp_random._get_cuda_rng_state = lambda *a, **k: stand_in.get_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: stand_in.set_state(state)
    _ACTIVE_MODE = _CudaToCpuMode()
    _ACTIVE_MODE.__enter__()

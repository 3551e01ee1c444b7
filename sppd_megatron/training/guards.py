"""Non-finite numbers never reach the optimizer or a checkpoint, and every rank agrees on it.

After each backward pass, :func:`nonfinite_quantity` looks at this rank's loss (last pipeline
stage) and gradients, and one all-reduce over the whole world tells every rank whether any rank
saw a NaN or an infinity. So all ranks stop together (``on_nonfinite: stop``, the default: one line
naming the step, the rank and the first non-finite quantity) or skip the optimizer step together
(``skip``: the step is counted in ``metrics.jsonl`` as ``skipped_steps``, its weights unchanged).
Megatron's own per-bucket check is off (``check_for_nan_in_grad``): it raised a traceback on the
rank that saw the NaN only. Before every checkpoint :func:`check_weights` makes sure no weight is
non-finite, so a checkpoint never holds one.
"""

from __future__ import annotations

import math

import torch

from sppd_megatron.config import RunStopped


class NonFiniteStep(RunStopped):
    """A training step met a NaN or an infinity (and ``on_nonfinite`` is ``stop``, or it is in the weights)."""


def _world_any(flag: torch.Tensor | bool) -> bool:
    """Whether ``flag`` (a bool or a 0-d tensor, on any device) is true on any rank: one all-reduce, one sync."""
    if isinstance(flag, bool):
        flag = torch.tensor(flag)
    if not torch.distributed.is_initialized():
        return bool(flag)
    from sppd_megatron.parallel.state import communication_device

    t = flag.reshape(1).to(device=communication_device(), dtype=torch.float32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _first_of_all_ranks(local: str | None) -> str | None:
    """The lowest rank's description (``rank R: ...``) among the ranks that have one."""
    if not torch.distributed.is_initialized():
        return local
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return next((f"rank {r}: {d}" for r, d in enumerate(gathered) if d is not None), None)


def _params(model):
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    return inner.named_parameters()


def _bad(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def _describe(t: torch.Tensor) -> str:
    values = t[~torch.isfinite(t)]
    return str(values[0].item()) if values.numel() else "?"


def _local_quantity(model, reports: list[dict]) -> str | None:
    """This rank's first non-finite quantity, in the order they are computed: weights, loss, gradients."""
    for name, p in _params(model):
        if _bad(p.data):
            return f"weight {name} is {_describe(p.data)} (an earlier update overflowed)"
    for i, report in enumerate(reports):
        if "loss" in report and _bad(report["loss"][0]):
            return f"loss is {_describe(report['loss'][0].reshape(1))} (micro-batch {i})"
    for name, p in _params(model):
        grad = getattr(p, "main_grad", None)
        if grad is None:
            grad = p.grad
        if grad is not None and _bad(grad):
            return f"gradient of {name} is {_describe(grad)}"
    return None


def nonfinite_quantity(ddp_model, reports: list[dict]) -> str | None:
    """None when the step's loss and gradients are finite on every rank; else (on every rank) the
    first non-finite quantity of the lowest rank that has one. Collective: every rank calls it.

    The fast path keeps the flags on the device and synchronises once per step (not per micro-batch).
    """
    losses = [r["loss"][0] for r in reports if "loss" in r]  # the last pipeline stage has them
    checks = [torch.stack(losses).float()] if losses else []
    # Megatron DDP keeps its gradient buffers in these lists (on a plain module ``buffers`` is a method).
    buffers = [b for name in ("buffers", "expert_parallel_buffers")
               if isinstance(getattr(ddp_model, name, None), list) for b in getattr(ddp_model, name)]
    checks += [b.grad_data for b in buffers]
    if not buffers:  # not Megatron DDP: look at the parameters themselves
        checks += [p.grad for _, p in _params(ddp_model) if p.grad is not None]
    flags = [(~torch.isfinite(t)).any() for t in checks if t.numel()]
    bad = torch.stack([f.to(flags[0].device) for f in flags]).any() if flags else torch.tensor(False)
    if not _world_any(bad):
        return None
    # Rare path: say which quantity it was (the fast check above only knows that something was).
    local = _local_quantity(ddp_model, reports) if bool(bad) else None
    return _first_of_all_ranks(local) or "a non-finite value"


def poison_gradient(ddp_model) -> None:
    """Fault injection (``SPPD_FAULT=train.grad:N:nan``): one gradient element of this rank becomes NaN."""
    for _, p in _params(ddp_model):
        grad = getattr(p, "main_grad", None)
        if grad is None:
            grad = p.grad
        if grad is not None and grad.numel():
            grad.view(-1)[0] = math.nan
            return


def check_weights(model, step: int, last_checkpoint: str) -> None:
    """Raise :class:`NonFiniteStep` (on every rank) if any rank holds a non-finite weight."""
    local = next((f"weight {name} is {_describe(p.data)}" for name, p in _params(model) if _bad(p.data)), None)
    if not _world_any(local is not None):
        return
    what = _first_of_all_ranks(local)
    raise NonFiniteStep(f"step {step}: {what} after the optimizer step; no checkpoint was written for it "
                        f"and {last_checkpoint}; lower optim.lr and run the same command again")


def stop_message(step: int, what: str, last_checkpoint: str) -> str:
    return (f"step {step}: {what}, found before the optimizer step (on_nonfinite=stop); no weight was changed "
            f"by it and {last_checkpoint}; lower optim.lr, check the data, or set on_nonfinite=skip to skip such "
            "steps, then run the same command again")

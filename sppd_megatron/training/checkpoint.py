"""Training checkpoints: model and optimizer as Megatron dist checkpoints, plus the loop's own state.

Layout under ``OUTPUT_DIR/checkpoints`` (the model part is the converter's format, see
:mod:`sppd_megatron.conversion.mcore_checkpoint`, so an iteration directory is also a valid
``init.source=mcore`` / ``convert mcore-to-hf`` input)::

    iter_0000010/sppd_model.json      architecture + tokenizer
    iter_0000010/model/               dist checkpoint of the model (any TP/PP on load)
    iter_0000010/optimizer/           dist checkpoint of the optimizer state
    iter_0000010/trainer_state.json   step, scheduler state, config fingerprint; written last
    latest                            the newest complete iteration number

A checkpoint counts only once ``trainer_state.json`` exists and ``latest`` points at it, so a run
killed mid-save resumes from the previous one. Saves run in-process (no writer subprocess that
could outlive a killed trainer).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sppd_megatron import faults
from sppd_megatron.conversion import mcore_checkpoint as mcore
from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.models.config import ModelConfig
from sppd_megatron.parallel.state import barrier, is_rank0

STATE_FILE = "trainer_state.json"
OPTIMIZER_SUBDIR = "optimizer"
# The distributed optimizer's default format (fully_sharded_model_space) fails to save in megatron-core
# 0.16 without TE/Apex (docs/platform-notes.md); dp_reshardable works and is what we write. It reshards
# model-parallel layouts but needs the same data-parallel size on resume.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    marker = root / "latest"
    if not marker.is_file():
        return None
    text = marker.read_bytes()[:64].decode("utf-8", "replace").strip()
    if not text.isdigit():  # written atomically, so this is damage, not a kill
        raise ConversionError(f"{marker}: holds {text!r}, not a step number; write the newest complete "
                              "iteration's number into it (or delete it to start again)")
    step = int(text)
    if not (iter_dir(root, step) / STATE_FILE).is_file():  # `latest` moves only after the state file is there
        raise ConversionError(f"{marker}: points at iteration {step}, which has no {STATE_FILE}; write the newest "
                              "complete iteration's number into it (or delete it to start again)")
    return step


def save(root: Path, step: int, model, optimizer, model_cfg: ModelConfig, tokenizer_spec: str,
         trainer_state: dict, keep_last: int = 0) -> Path:
    target = iter_dir(root, step)
    if is_rank0() and target.exists():
        shutil.rmtree(target)  # a partial save from a killed run
    barrier()
    mcore.save_model_checkpoint(model, target, model_cfg, tokenizer_spec, source=f"train step {step}")
    faults.hit("ckpt.model", target / OPTIMIZER_SUBDIR)
    mcore.save_sharded_state_dict(
        optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIMIZER_METADATA), target / OPTIMIZER_SUBDIR
    )
    faults.hit("ckpt.state", target / STATE_FILE)
    barrier()
    if is_rank0():
        tmp = target / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": step, **trainer_state}, indent=1, sort_keys=True))
        os.replace(tmp, target / STATE_FILE)
        faults.hit("ckpt.latest", root / "latest")
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(str(step))
        os.replace(marker_tmp, root / "latest")
        if keep_last > 0:
            done = sorted(p for p in root.glob("iter_*") if (p / STATE_FILE).is_file())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def read_trainer_state(root: Path, step: int) -> dict:
    path = iter_dir(root, step) / STATE_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{path}: unreadable ({exc}); the checkpoint is damaged, point `latest` at an "
                              "earlier complete one") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
            state.get("scheduler"), dict):
        raise ConversionError(f"{path}: not a trainer state (step, scheduler...); the checkpoint is damaged, "
                              "point `latest` at an earlier complete one")
    return state


def load(root: Path, step: int, model, optimizer, model_cfg: ModelConfig) -> dict:
    """Load model and optimizer state in place (any TP/PP layout); returns trainer_state.json's content."""
    from megatron.core import dist_checkpointing

    target = iter_dir(root, step)
    _prepare_distributed_optimizer_for_load(optimizer)  # before the model: it takes a (no-op) step
    _give_sgd_a_state_initialiser(optimizer)
    trainer_state = read_trainer_state(root, step)
    mcore.load_model_checkpoint(model, target, model_cfg)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = mcore.load_dist_checkpoint(dist_checkpointing.load, sharded, target / OPTIMIZER_SUBDIR)
    with torch.no_grad():  # fp32 main params of the distributed optimizer are views of leaf parameters
        optimizer.load_state_dict(loaded)
    _restore_step_counts(optimizer, trainer_state["step"] - int(trainer_state.get("skipped_steps", 0)))
    return trainer_state


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prepare_distributed_optimizer_for_load(optimizer) -> None:
    """Give a fresh distributed optimizer Adam states (and their ``step``) to load into.

    Without TE/Apex, megatron-core 0.16's DistributedOptimizer.state_dict() reads ``step`` from the
    torch optimizer's per-parameter state, which exists only after a first step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            groups = opt.optimizer.param_groups
            saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in groups]
            for g in groups:  # zero lr and decay: the dummy step must not move any weight
                g["lr"], g["weight_decay"] = 0.0, 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, (lr, wd) in zip(groups, saved):
                g["lr"], g["weight_decay"] = lr, wd


def _init_sgd_state(opt, config=None) -> None:
    for group in opt.param_groups:
        if group.get("momentum", 0.0):
            for p in group["params"]:
                opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p.data))


def _give_sgd_a_state_initialiser(optimizer) -> None:
    """megatron-core 0.16 builds SGD optimizers with ``init_state_fn=None`` but calls it when loading
    a sharded state dict; give SGD the (momentum buffer) initialiser it lacks."""
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "init_state_fn", "absent") is None:
            opt.init_state_fn = _init_sgd_state


def _restore_step_counts(optimizer, step: int) -> None:
    """Give every parameter its own Adam ``step`` tensor equal to the optimizer steps taken.

    megatron-core 0.16's DistributedOptimizer (without TE/Apex) restores ``step`` as one tensor shared
    by all parameters, from the state it had before loading (measured: 1 after the dummy init, not the
    saved count); torch's Adam then increments the shared tensor once per parameter. The count is the
    steps taken minus those skipped for non-finite numbers (``on_nonfinite: skip``).
    """
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)

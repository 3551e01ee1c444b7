"""Training checkpoints: Megatron dist checkpoints of model + optimizer, plus the loop's own state.

Layout under ``OUTPUT_DIR/checkpoints``::

    iter_0000010/            dist checkpoint (torch_dist) of {"model": ..., "optimizer": ...}
    iter_0000010/trainer_state.json   step, scheduler state, config fingerprint; written last
    latest                   the newest complete iteration number

A checkpoint counts only once ``trainer_state.json`` exists and ``latest`` points at it, so a run
killed mid-save resumes from the previous one. dist_checkpointing reshards across TP/PP on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sppd_megatron.parallel.state import is_rank0

STATE_FILE = "trainer_state.json"


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    marker = root / "latest"
    if not marker.is_file():
        return None
    step = int(marker.read_text().strip())
    return step if (iter_dir(root, step) / STATE_FILE).is_file() else None


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def save(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int = 0) -> Path:
    from megatron.core import dist_checkpointing

    target = iter_dir(root, step)
    if is_rank0():
        if target.exists():
            shutil.rmtree(target)  # a partial save from a killed run
        target.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(target))
    _barrier()
    if is_rank0():
        tmp = target / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": step, **trainer_state}, indent=1, sort_keys=True))
        os.replace(tmp, target / STATE_FILE)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(str(step))
        os.replace(marker_tmp, root / "latest")
        if keep_last > 0:
            done = sorted(p for p in root.glob("iter_*") if (p / STATE_FILE).is_file())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def load(root: Path, step: int, model, optimizer) -> dict:
    """Load model and optimizer state in place; returns trainer_state.json's content."""
    from megatron.core import dist_checkpointing

    target = iter_dir(root, step)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(target))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return json.loads((target / STATE_FILE).read_text())


def load_model_only(ckpt_dir: Path, model) -> None:
    """Load just the model weights of a training or converted checkpoint (any TP/PP layout)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(state["model"])

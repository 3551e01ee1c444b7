"""Training metrics: per-step reduction of the micro-batches' (sum, count) reports, and their writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sppd_megatron.parallel import state as pstate


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sum (sum, count) pairs over micro-batches and data-parallel ranks; mean per name on rank 0."""
    from megatron.core import parallel_state

    names = sorted(reports[0]) if reports else []
    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage() and names:
        stacked = torch.stack([torch.stack([r[n] for n in names]) for r in reports]).sum(0)  # [names, 2]
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
        result = {n: (stacked[i, 0] / stacked[i, 1].clamp(min=1)).item() for i, n in enumerate(names)}
    if torch.distributed.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [result]
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast_object_list(holder, src=src, group=parallel_state.get_pipeline_model_parallel_group())
        result = holder[0]
    return result


def _metric_lines(path: Path) -> list[tuple[str, int]]:
    """``(line, step)`` of each row; a torn last line (killed mid-write) is left out, any other bad line is
    an error naming the file and line."""
    from sppd_megatron.records import RecordError

    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows = []
    for lineno, raw in enumerate(complete.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            step = row["step"]
            if not isinstance(step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise RecordError("not a metrics row with an integer 'step' (move the file away to start it again)",
                              path, lineno) from None
        rows.append((raw.decode("utf-8"), step))
    return rows


class MetricsWriter:
    """metrics.jsonl (append, one line per step, resumable) + TensorBoard, on rank 0 only."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int):
        self.enabled = pstate.is_rank0()
        self.tb = None
        if not self.enabled:
            return
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop lines past the checkpoint we resume from
            kept = [line for line, step in _metric_lines(self.path) if step <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.fh = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row, sort_keys=True) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()

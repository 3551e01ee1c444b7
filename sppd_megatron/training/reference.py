"""Reference log-probs for the preference losses: a forward pass of the initial policy, stored once.

``loss.reference: precomputed`` computes every example's continuation log-prob sums before training
(in the run's own layout and packing) and keeps them beside the run (``reference_logps.jsonl``), so a
resumed run reuses the initial policy's values; ``co_resident`` keeps a frozen copy of the policy
that fills each micro-batch in turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from sppd_megatron import faults
from sppd_megatron.config import config_to_dict
from sppd_megatron.parallel import state as pstate
from sppd_megatron.training.batching import dp_rank_and_size, microbatches_of, run_forward_backward
from sppd_megatron.training.config import TrainConfig
from sppd_megatron.training.data import DataError
from sppd_megatron.training.forward import make_logp_step


def _gather_to_all(items: list) -> list:
    if not torch.distributed.is_initialized():
        return items
    out: list[list] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def reference_logps(model, examples: list, cfg: TrainConfig, pad_id: int, vocab_size: int) -> list[list[float]]:
    """Each example's continuation log-prob sums under ``model`` (forward only, any layout and packing)."""
    from megatron.core import parallel_state

    step_fn = make_logp_step(vocab_size)
    dp_rank, dp_size = dp_rank_and_size()
    mine = list(range(dp_rank, len(examples), dp_size))
    chunk_size = max(cfg.schedule.micro_batch_size * 8, 64)
    results = []
    model.eval()
    with torch.no_grad():
        for j in range(0, len(mine), chunk_size):
            chunk = mine[j: j + chunk_size]
            batches = microbatches_of([examples[i] for i in chunk], cfg, pad_id)
            reports = run_forward_backward(model, step_fn, batches, cfg, forward_only=True)
            if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
                # Rows come back per micro-batch; row_source says which row of the chunk each one is.
                owner = [(i, k) for i in chunk for k in range(len(examples[i].rows))]
                values: dict[int, list[float]] = {i: [0.0] * len(examples[i].rows) for i in chunk}
                for batch, report in zip(batches, reports):
                    for source, lp in zip(batch["row_source"].tolist(), report["seq_logps"].tolist()):
                        i, k = owner[source]
                        values[i][k] = lp
                results += list(values.items())
    model.train()
    by_index = dict(_gather_to_all(results))
    return [by_index[i] for i in range(len(examples))]


def precomputed_reference_file(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "reference_logps.jsonl"


def attach_reference(model, dataset, cfg: TrainConfig, pad_id: int, vocab_size: int) -> None:
    """Fill a TokenizedDataset's missing reference log-probs from a stored pass of the initial policy,
    computing it once.

    The pass runs before any checkpoint is loaded, so on resume the stored values (from the initial
    weights) are reused, never recomputed from trained weights.
    """
    if not dataset.missing_reference():
        return
    path = precomputed_reference_file(cfg)
    fingerprint = _data_fingerprint(cfg)
    stored = _read_reference_file(path, fingerprint, len(dataset))
    if stored is None:
        stored = reference_logps(model, dataset, cfg, pad_id, vocab_size)
        if pstate.is_rank0():
            faults.hit("train.reference", path)
            tmp = path.with_suffix(".tmp")
            with tmp.open("w") as fh:
                fh.write(json.dumps({"fingerprint": fingerprint, "count": len(stored)}) + "\n")
                for i, v in enumerate(stored):
                    fh.write(json.dumps({"index": i, "where": dataset.where(i), "ref_logps": v}) + "\n")
            os.replace(tmp, path)
        pstate.barrier()
    dataset.set_reference(stored)


def _read_reference_file(path: Path, fingerprint: str, count: int) -> list[list[float]] | None:
    """The stored values when ``path`` was written for this data and init (None: compute them again).

    The file is written atomically, so a bad line is damage, and finite numbers are checked as for
    any record read from a file: both stop the run naming the file and line.
    """
    if not path.is_file():
        return None
    lines = path.read_bytes().split(b"\n")
    lines = lines[:-1] if lines and not lines[-1] else lines

    def bad(line: int, why: str) -> DataError:
        return DataError(f"{path}:{line}: {why}; this file holds the initial policy's reference log-probs, "
                         "delete it to compute them again")

    try:
        head = json.loads(lines[0].decode("utf-8"))
        if head.get("fingerprint") != fingerprint or head.get("count") != count or len(lines) != count + 1:
            return None
    except (ValueError, AttributeError, IndexError):
        raise bad(1, "not the header of a reference log-prob file") from None
    values = []
    for i, raw in enumerate(lines[1:], 2):
        try:
            row = json.loads(raw.decode("utf-8"))
            if set(row) != {"index", "where", "ref_logps"} or row["index"] != i - 2 or not isinstance(row["where"], str):
                raise KeyError
            v = row["ref_logps"]
            ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              and math.isfinite(x) for x in v)
        except (ValueError, KeyError, TypeError):
            raise bad(i, "not a reference log-prob row") from None
        if not ok:
            raise bad(i, f"reference log-probs {str(v)[:80]} are not two finite numbers")
        values.append(v)
    return values


def _data_fingerprint(cfg: TrainConfig) -> str:
    h = hashlib.sha256(Path(cfg.data.train_file).read_bytes())
    h.update(json.dumps(config_to_dict(cfg.init), sort_keys=True).encode())
    h.update(json.dumps(config_to_dict(cfg.data), sort_keys=True).encode())
    return h.hexdigest()


def fill_reference(ref_model, logp_fn, batches: list[dict], cfg: TrainConfig) -> None:
    """``loss.reference=co_resident``: each micro-batch's reference log-probs from the frozen copy."""
    from megatron.core import parallel_state

    with torch.no_grad():
        reports = run_forward_backward(ref_model, logp_fn, batches, cfg, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        for batch, report in zip(batches, reports):
            batch["ref_logps"] = report["seq_logps"].float()

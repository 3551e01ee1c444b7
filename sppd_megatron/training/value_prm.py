"""A trained value head as a process reward model: an sppd-megatron checkpoint served to ``score``.

The ``prm`` training stage (value-head regression on tree, Monte-Carlo or MCTS-Q labels) and the
``svpo`` stage write checkpoints with SVPO's value head (linear + tanh on the final hidden state).
:class:`MegatronValuePRM` loads one at any TP/PP layout and reads V(s_t) for every step of every
query through the same ``score_batch`` interface as the Hugging Face PRMs, as ``(v + 1) / 2``.

Batching: each query is the token rows of its states (:func:`~sppd_megatron.training.data.state_row`,
the rows stage prm trains on), and the rows of all queries with the same prompt share one token trie
(:mod:`.packing`, ``trees`` layout), so a tree's prompt and each of its steps go through the model
once however many trajectories pass through them. Tries are packed into bins of ``pack_length``
tokens and run as one forward-only pipeline schedule; data-parallel replicas split the bins.

Several processes (``torchrun ... -m sppd_megatron score``): rank 0 runs the stage and every
``score_batch`` call hands its queries to the other ranks (``torch.distributed.broadcast_object_list``),
which wait in :meth:`MegatronValuePRM.serve` until :meth:`close`. Values are gathered from the last
pipeline stage to every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from sppd_megatron.parallel.state import ParallelConfig
from sppd_megatron.scoring.prm import BatchedPRM, StepQuery, check_scores


@dataclass
class ValueHeadPRMConfig:
    """A checkpoint with a value head, and how to run it."""

    path: str = ""
    """An sppd-megatron checkpoint written by ``train`` stage ``prm`` or ``svpo``: an ``iter_XXXXXXX``
    directory, or a training output directory (its newest checkpoint)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (launch that many processes with torchrun); any layout loads any
    checkpoint. More processes than TP x PP are data-parallel replicas, each scoring a share of the bins."""
    pack_length: int = 4096
    """Tokens per packed bin (one micro-batch); a query whose rows do not fit one bin is an error."""
    params_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Weights' dtype (auto: the checkpoint's)."""

    def __post_init__(self) -> None:
        if self.pack_length < 2:
            raise ValueError("value_head.pack_length must be >= 2")


def resolve_checkpoint(path: str | Path) -> Path:
    """An iteration directory from an iteration directory, a ``checkpoints`` root or a training output dir."""
    from sppd_megatron.conversion.mcore_checkpoint import META_FILE
    from sppd_megatron.training.checkpoint import iter_dir, latest_step

    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        step = latest_step(root)
        if step is not None:
            return iter_dir(root, step)
    raise FileNotFoundError(f"{path}: no sppd-megatron checkpoint ({META_FILE}) and no complete checkpoints/latest "
                            "under it (train one with stage prm or svpo)")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class MegatronValuePRM(BatchedPRM):
    """``score_batch(queries)`` -> per query, the value head's (v + 1) / 2 after each step."""

    name = "value_head"

    def __init__(self, config: ValueHeadPRMConfig):
        from megatron.core import parallel_state

        from sppd_megatron.conversion.errors import ConversionError
        from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

        from sppd_megatron.conversion.mcore_checkpoint import (
            MODEL_SUBDIR,
            checkpoint_tokenizer_spec,
            load_model_checkpoint,
            read_checkpoint_meta,
            read_checkpoint_model_config,
        )
        from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
        from sppd_megatron.parallel import state as pstate
        from sppd_megatron.tokenization import CHAR_TOKENIZER_SPEC, load_tokenizer

        self.config = config
        self.checkpoint = resolve_checkpoint(config.path)
        pstate.initialize(config.parallel, seed=0)
        meta = read_checkpoint_meta(self.checkpoint)
        self.model_cfg = read_checkpoint_model_config(self.checkpoint)
        self.tokenizer = load_tokenizer(checkpoint_tokenizer_spec(self.checkpoint) or CHAR_TOKENIZER_SPEC)
        dtype = meta.get("dtype", "fp32") if config.params_dtype == "auto" else config.params_dtype
        self.model = build_gpt_model(self.model_cfg, PrecisionConfig(params_dtype=dtype), with_value_head=True,
                                     tree_masks=True, parallel=config.parallel)
        if not any(key.startswith("value_head.") for key in load_sharded_metadata(str(self.checkpoint / MODEL_SUBDIR))):
            raise ConversionError(f"{self.checkpoint}: the checkpoint has no value head (train it with stage prm or svpo)")
        load_model_checkpoint(self.model, self.checkpoint, self.model_cfg, missing_ok_prefixes=())
        self.model.eval()
        self.model.config.calculate_per_token_loss = True  # the value step hands Megatron (sum, count, report)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.world = torch.distributed.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.reports_values = (parallel_state.is_pipeline_last_stage()
                               and parallel_state.get_tensor_model_parallel_rank() == 0)
        self._closed = False

    # --- the interface ------------------------------------------------------------------------------
    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]:
        if self.world > 1:
            if _rank() != 0:
                raise RuntimeError("MegatronValuePRM.score_batch is called on rank 0; other ranks run serve()")
            torch.distributed.broadcast_object_list([list(queries)], src=0)
        return self._score(list(queries))

    def serve(self) -> None:
        """Ranks other than 0: score what rank 0 hands over until it calls :meth:`close`."""
        while True:
            box = [None]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self._score(box[0])

    def close(self) -> None:
        """Rank 0: release the serving ranks (once); every rank: leave torch.distributed."""
        if self._closed:
            return
        self._closed = True
        if self.world > 1 and _rank() == 0:
            torch.distributed.broadcast_object_list([None], src=0)

    # --- scoring ------------------------------------------------------------------------------------
    def _examples(self, queries: list[StepQuery]) -> list:
        from sppd_megatron.training.data import Example, state_row

        examples = []
        for i, q in enumerate(queries):
            prompt = q.prompt if q.prompt is not None else q.question
            rows = [state_row(self.tokenizer, prompt, "".join(q.steps[:t]), q.steps[t]) for t in range(len(q.steps))]
            longest = max((len(r.ids) for r in rows), default=0)
            if longest > self.model_cfg.max_position_embeddings:
                raise ValueError(f"value-head PRM: query {i} ({q.question[:60]!r}) has {longest} tokens, more than the "
                                 f"model's max_position_embeddings={self.model_cfg.max_position_embeddings}")
            examples.append(Example(rows=rows, values=[None] * len(rows), ref_logps=[None] * len(rows),
                                    where=f"query {i} ({q.question[:60]!r})", tree=prompt))
        return examples

    def _score(self, queries: list[StepQuery]) -> list[list[float]]:
        from sppd_megatron.training import packing
        from sppd_megatron.training.batching import run_forward_backward
        from sppd_megatron.training.forward import make_value_step

        examples = [ex for ex in self._examples(queries) if ex.rows]
        owner = [(i, t) for i, q in enumerate(queries) for t in range(len(q.steps))]
        found: list[tuple[int, float]] = []
        if examples:
            try:
                bins = packing.pack(examples, "trees", self.config.pack_length, self.pad_id,
                                    [ex.tree for ex in examples])
            except ValueError as exc:
                raise ValueError(f"value-head PRM: {exc} (raise value_head.pack_length)") from None
            mine = bins[self.dp_rank::self.dp_size]
            if mine:
                with torch.no_grad():
                    reports = run_forward_backward(self.model, make_value_step(), mine, None, forward_only=True)
                if self.reports_values:
                    for batch, report in zip(mine, reports):
                        found += zip(batch["row_source"].tolist(), report["values"].float().tolist())
        if self.world > 1:
            parts: list = [None] * self.world
            torch.distributed.all_gather_object(parts, found)
            found = [item for part in parts for item in part]
        values = [[0.0] * len(q.steps) for q in queries]
        for source, v in found:
            i, t = owner[source]
            values[i][t] = min(1.0, max(0.0, (v + 1.0) / 2.0))
        return [check_scores(self.name, q, vs) for q, vs in zip(queries, values)]


def follow(build) -> bool:
    """Under torchrun, a rank other than 0 builds the PRM (``build()``) and serves rank 0's calls until
    rank 0 closes it, then returns True; rank 0 (and a single process) returns False at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or int(os.environ.get("RANK", "0")) == 0:
        return False
    prm = build()
    prm.serve()
    prm.close()
    return True

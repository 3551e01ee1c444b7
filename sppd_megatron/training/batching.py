"""Which examples each optimizer step takes, this rank's share of them as micro-batches, and Megatron's schedule.

The step's examples depend only on (examples, step, global batch, seed, grouping), never on the
parallel layout or the packing, so every layout trains on the same examples in the same steps.
Each data-parallel rank takes a contiguous share; its micro-batches are padded rows
(``micro_batch_size`` examples each) or packed bins (``micro_batch_size`` bins of
``data.pack_length`` tokens each, whole pairs only: a pair never straddles two micro-batches). Megatron divides the gradient by the
summed weights of every micro-batch on every rank, so the step's loss is the same mean whatever the
micro-batches and ranks.
"""

from __future__ import annotations

import numpy as np

from sppd_megatron.training import packing
from sppd_megatron.training.config import TrainConfig


def dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def group_keys(examples: list, group_by: str) -> list | None:
    """The key that ties examples together under ``data.group_by`` (None: every example on its own)."""
    if group_by == "tree":
        return [ex.tree for ex in examples]
    if group_by == "state":
        return [(ex.tree, ex.state) for ex in examples]
    return None


class ExampleOrder:
    """The order examples are visited in: shuffled once per epoch, whole groups at a time when grouped.

    Groups keep their examples together (in file order) so that pairs sharing a prefix land in the
    same step and can share one packed tree; the permutation is over groups. Ungrouped, it is the
    permutation of the examples themselves.
    """

    def __init__(self, keys: list | None, n: int, seed: int, shuffle: bool):
        if keys is None:
            self.groups = [[i] for i in range(n)]
        else:
            first: dict = {}
            for i, key in enumerate(keys):
                first.setdefault(key, []).append(i)
            self.groups = list(first.values())
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epochs: dict[int, np.ndarray] = {}

    def epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) > 1:
                self._epochs.pop(min(self._epochs))
            perm = (np.random.default_rng([self.seed, epoch]).permutation(len(self.groups)) if self.shuffle
                    else np.arange(len(self.groups)))
            self._epochs[epoch] = np.fromiter((i for g in perm for i in self.groups[g]), dtype=np.int64, count=self.n)
        return self._epochs[epoch]

    def step(self, step: int, global_batch: int) -> list[int]:
        """The examples of optimizer step ``step`` (0-based): the next ``global_batch`` of the walk over epochs."""
        out = []
        for pos in range(step * global_batch, (step + 1) * global_batch):
            epoch, i = divmod(pos, self.n)
            out.append(int(self.epoch(epoch)[i]))
        return out


def microbatches_of(examples: list, cfg: TrainConfig, pad_id: int) -> list[dict]:
    """``examples`` (in order) as micro-batches under the run's packing."""
    if cfg.data.packing == "none":
        mbs = cfg.schedule.micro_batch_size
        batches, first_row = [], 0
        for j in range(0, len(examples), mbs):
            batches.append(packing.pad(examples[j: j + mbs], cfg.data.max_length, pad_id, first_row))
            first_row += batches[-1]["values"].numel()
        return batches
    keys = group_keys(examples, cfg.data.group_by)
    bins = packing.pack(examples, cfg.data.packing, cfg.data.pack_length, pad_id, keys)
    mbs = cfg.schedule.micro_batch_size
    if mbs == 1:
        return bins
    return [packing.stack_bins(bins[j: j + mbs], mbs, pad_id) for j in range(0, len(bins), mbs)]


def microbatches(examples: list, indices: list[int], cfg: TrainConfig, pad_id: int) -> list[dict]:
    """This data-parallel rank's contiguous share of the step's ``indices``, as micro-batches."""
    dp_rank, dp_size = dp_rank_and_size()
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    return microbatches_of([examples[i] for i in mine], cfg, pad_id)


def run_forward_backward(model, step_fn, batches: list[dict], cfg: TrainConfig, forward_only: bool) -> list[dict]:
    """Megatron's schedule over ``batches``; their reports in order (on the last pipeline stage).

    Pipeline stages exchange activations of one shape [seq, micro-batch rows, hidden] per call, so
    a forward-only pass whose last micro-batch is short runs it in a call of its own. A training
    step must be one call (its gradients accumulate there); its micro-batches always share a shape:
    packed bins all have ``pack_length`` tokens, and padded micro-batches are full because the
    global batch is a multiple of micro-batch size x data-parallel size.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    runs: list[list[dict]] = []
    for batch in batches:
        if runs and runs[-1][0]["tokens"].shape == batch["tokens"].shape:
            runs[-1].append(batch)
        else:
            runs.append([batch])
    if len(runs) > 1 and not forward_only:
        raise ValueError(f"micro-batches of one training step differ in shape: {[tuple(r[0]['tokens'].shape) for r in runs]}")
    reports: list[dict] = []
    for run in runs:
        reports += get_forward_backward_func()(
            forward_step_func=step_fn,
            data_iterator=iter(run),
            model=[model],
            num_microbatches=len(run),
            seq_length=run[0]["tokens"].shape[1],
            micro_batch_size=run[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    return reports


def computed_tokens(batches: list[dict]) -> int:
    """Token positions the model runs over for these micro-batches (padding included)."""
    return sum(b["tokens"].numel() for b in batches)

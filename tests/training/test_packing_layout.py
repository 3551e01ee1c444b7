"""The packed layouts in isolation: every row sees exactly its own context at its own positions.

For random pairs with shared contexts, whatever the mode (sequences, pairs, trees) and bin size:
each continuation token's allowed keys under the tree mask are exactly the positions of the tokens
before it in its own row, its position id is its index in the row, the loss entries name the right
label, and shared modes store each shared prefix once.
"""

import random

import pytest
import torch

from sppd_megatron.training.data import Example, Row
from sppd_megatron.training.packing import attention_mask, pack, pad, stack_bins


def _pairs(seed: int, n_groups: int = 5):
    rng = random.Random(seed)
    examples, keys = [], []
    for g in range(n_groups):
        question = [rng.randrange(3, 50) for _ in range(rng.randrange(4, 12))]
        for _ in range(rng.randrange(1, 4)):  # pairs of one tree: deeper states extend the question
            prefix = question + [rng.randrange(3, 50) for _ in range(rng.randrange(0, 6))]
            chosen = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 5))]
            rejected = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 5))]
            rows = [Row(ids=prefix + chosen, context_len=len(prefix), ends_with_eos=False),
                    Row(ids=prefix + rejected, context_len=len(prefix), ends_with_eos=rng.random() < 0.5)]
            examples.append(Example(rows=rows, values=[0.9, 0.1], ref_logps=[-1.0, -2.0], where=f"g{g}"))
            keys.append(g)
    return examples, keys


def _check(batches, examples):
    rows = [r for ex in examples for r in ex.rows]
    seen_rows = 0
    for batch in batches:
        mask = attention_mask(batch)
        b, s = batch["tokens"].shape
        allowed = ~mask[:, 0] if mask is not None else torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
        tokens = batch["tokens"].reshape(-1)
        positions = batch["position_ids"].reshape(-1)
        n_rows = batch["values"].numel()
        for r in range(n_rows):
            entries = (batch["loss_row"] == r).nonzero().squeeze(-1)
            row = rows[seen_rows + r]
            assert [int(batch["loss_label"][e]) for e in entries] == row.ids[row.context_len:]
            for k, e in enumerate(entries.tolist()):
                at = int(batch["loss_index"][e])  # the token predicting row.ids[context_len + k]
                b, q = divmod(at, s)
                keys = allowed[b, q].nonzero().squeeze(-1).tolist()
                assert [int(tokens[b * s + j]) for j in keys] == row.ids[: row.context_len + k]
                assert [int(positions[b * s + j]) for j in keys] == list(range(row.context_len + k))
        seen_rows += n_rows
    assert seen_rows == len(rows)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("packing", ["sequences", "pairs", "trees"])
def test_every_row_sees_its_own_context(seed, packing):
    examples, keys = _pairs(seed)
    _check_bins(pack(examples, packing, pack_length=96, pad_id=0, group_keys=keys), examples)


def _check_bins(batches, examples):
    """Each bin's rows, matched to their examples by content (bins hold whole pairs, in any order)."""
    remaining = list(examples)
    for batch in batches:
        n_pairs = batch["values"].numel() // 2
        s = batch["tokens"].shape[1]
        labels = {}
        for r in range(2 * n_pairs):
            idx = (batch["loss_row"] == r).nonzero().squeeze(-1)
            labels[r] = [int(batch["loss_label"][e]) for e in idx]
        mine = []
        for p in range(n_pairs):
            ex = next(e for e in remaining if [r.ids[r.context_len:] for r in e.rows] == [labels[2 * p], labels[2 * p + 1]])
            remaining.remove(ex)
            mine.append(ex)
        _check([batch], mine)
    assert not remaining
    assert all(b["tokens"].shape[1] == s for b in batches)


@pytest.mark.parametrize("per_micro_batch", [2, 3])
def test_bins_stacked_into_micro_batches(per_micro_batch):
    examples, keys = _pairs(3, n_groups=8)
    bins = pack(examples, "trees", pack_length=64, pad_id=0, group_keys=keys)
    stacked = [stack_bins(bins[j: j + per_micro_batch], per_micro_batch, pad_id=0)
               for j in range(0, len(bins), per_micro_batch)]
    assert all(b["tokens"].shape == (per_micro_batch, 64) for b in stacked)
    _check_bins(stacked, examples)


def test_padded_layout_is_the_reference():
    examples, _ = _pairs(0)
    _check([pad(examples, max_length=40, pad_id=0)], examples)


def test_sharing_stores_each_shared_prefix_once():
    examples, keys = _pairs(1, n_groups=3)
    def unique(mode):  # tokens laid out, padding (the last node, attending to padding only) excluded
        return sum(int((b["attention_nodes"] != b["node_ancestors"].shape[-1] - 1).sum())
                   for b in pack(examples, mode, pack_length=512, pad_id=0, group_keys=keys))
    total = sum(len(r.ids) for ex in examples for r in ex.rows)
    trie_tokens = set()
    for ex, key in zip(examples, keys):
        for r in ex.rows:
            for k in range(1, len(r.ids) + 1):
                trie_tokens.add((key, tuple(r.ids[:k])))
    assert unique("sequences") == total
    assert unique("trees") == len(trie_tokens) < unique("pairs") < total


def test_a_pair_that_cannot_fit_is_refused_with_its_place():
    examples, keys = _pairs(2)
    with pytest.raises(ValueError, match="do not fit data.pack_length"):
        pack(examples, "pairs", pack_length=8, pad_id=0)

"""Examples -> micro-batches: padded rows, or bins of tokens where every shared prefix is computed once.

One layout serves every mode. The rows of a *unit* (one sequence, one pair, or the pairs of one
group) are inserted into a token trie: a token whose path from the root is already there is not
added again, so a pair's question and earlier steps appear once and each continuation hangs off the
end of what it shares. The trie is laid out depth first; each token attends to its ancestors and
itself (the *tree mask*) and its position id is its depth, so every row sees exactly the context,
at exactly the positions, it would see alone. Units are then packed first-fit-decreasing into bins
of ``pack_length`` tokens; unused positions of a bin are padding that attends only to padding.

``packing``:

- ``none``: one padded row per sequence (rows of ``max_length``), plain causal attention; the
  reference layout every other mode must reproduce;
- ``sequences``: each sequence whole in a bin, nothing shared (SFT's default);
- ``pairs``: a pair's shared context once, its chosen and rejected continuations after it;
- ``trees``: consecutive pairs of one group (``data.group_by``: siblings of one state, or every
  pair of one tree) share one trie: the question and each step computed once per group.

A micro-batch is a dict of host tensors (moved to the model's device by the forward step):

- ``tokens``, ``position_ids`` [B, S];
- ``attention_nodes`` [B, S] and ``node_ancestors`` [B, N, N] (packed modes only): token i may attend
  to token j <= i iff ``node_ancestors[b, node(i), node(j)]``. A node is a run of tokens of the trie
  with no branch inside, so N is small;
- ``loss_index`` [T] (flat b * S + position of the token that predicts), ``loss_label`` [T],
  ``loss_row`` [T] (which row the predicted token belongs to): one entry per continuation token;
- ``row_end_index`` [R]: flat position of each row's last non-EOS token (the value head reads it);
- ``values``, ``ref_logps`` [R], NaN where unknown;
- ``row_source`` [R]: each row's index among all rows of the examples given (bins may reorder pairs);
- ``row_example`` [R]: which example of the micro-batch each row belongs to (0, 1, ... in row order; the
  prm stage's margin term pairs siblings, the rows of one example).

Within a micro-batch rows keep the order of their examples: row 2i is a chosen, 2i+1 its rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

Packing = Literal["none", "sequences", "pairs", "trees"]
PACKINGS = ("none", "sequences", "pairs", "trees")


@dataclass
class _Unit:
    """A laid-out trie: tokens in depth-first order, each with its depth and node."""

    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    node: list[int] = field(default_factory=list)
    node_parent: list[int] = field(default_factory=list)  # -1 for a root node
    row_positions: list[list[int]] = field(default_factory=list)  # each row's token positions in the unit
    rows: list = field(default_factory=list)
    examples: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def lay_out(rows: Sequence) -> _Unit:
    """The token trie of ``rows`` (objects with ``ids``), laid out depth first."""
    token_of: list[int] = []
    parent_of: list[int] = []
    children: dict[int, dict[int, int]] = {-1: {}}  # trie index -> {token id: child index}; -1 the root
    paths: list[list[int]] = []
    for row in rows:
        at, path = -1, []
        for tok in row.ids:
            nxt = children[at].get(tok)
            if nxt is None:
                nxt = len(token_of)
                token_of.append(tok)
                parent_of.append(at)
                children[nxt] = {}
                children[at][tok] = nxt
            path.append(nxt)
            at = nxt
        paths.append(path)

    unit = _Unit(rows=list(rows))
    position = [0] * len(token_of)
    node_of = [0] * len(token_of)
    stack = [(c, 0) for c in reversed(list(children[-1].values()))]
    while stack:
        t, depth = stack.pop()
        parent = parent_of[t]
        # A token continues its parent's node when it is the parent's only child.
        if parent >= 0 and len(children[parent]) == 1:
            node_of[t] = node_of[parent]
        else:
            node_of[t] = len(unit.node_parent)
            unit.node_parent.append(node_of[parent] if parent >= 0 else -1)
        position[t] = len(unit.tokens)
        unit.tokens.append(token_of[t])
        unit.depth.append(depth)
        unit.node.append(node_of[t])
        stack.extend((c, depth + 1) for c in reversed(list(children[t].values())))
    unit.row_positions = [[position[t] for t in path] for path in paths]
    return unit


def _side_by_side(units: list[_Unit]) -> _Unit:
    """Tries next to each other in one unit, sharing nothing (a pair's rows under ``sequences``)."""
    out = _Unit()
    for u in units:
        at, nodes = len(out.tokens), len(out.node_parent)
        out.tokens += u.tokens
        out.depth += u.depth
        out.node += [n + nodes for n in u.node]
        out.node_parent += [p + nodes if p >= 0 else -1 for p in u.node_parent]
        out.row_positions += [[p + at for p in ps] for ps in u.row_positions]
    return out


def _units(examples: list, packing: Packing, group_keys: list | None) -> list[_Unit]:
    if packing == "sequences":  # a pair stays one unit, so its rows share a micro-batch
        return [_with(_side_by_side([lay_out([row]) for row in ex.rows]), ex.rows, [ex]) for ex in examples]
    if packing == "pairs" or group_keys is None:
        return [_with(lay_out(ex.rows), ex.rows, [ex]) for ex in examples]
    units, start = [], 0
    for i in range(1, len(examples) + 1):
        if i == len(examples) or group_keys[i] != group_keys[start]:
            group = examples[start:i]
            units.append(_with(lay_out([r for ex in group for r in ex.rows]),
                               [r for ex in group for r in ex.rows], group))
            start = i
    return units


def _with(unit: _Unit, rows, examples) -> _Unit:
    unit.rows, unit.examples = list(rows), list(examples)
    return unit


def _split_to_fit(unit: _Unit, pack_length: int) -> list[_Unit]:
    """A group trie larger than a bin, as tries of as many whole pairs as fit, in order."""
    if len(unit) <= pack_length or len(unit.examples) == 1:
        return [unit]
    out, current = [], []
    for ex in unit.examples:
        trial = lay_out([r for e in current + [ex] for r in e.rows])
        if current and len(trial) > pack_length:
            out.append(_with(lay_out([r for e in current for r in e.rows]),
                             [r for e in current for r in e.rows], current))
            current = [ex]
        else:
            current.append(ex)
    out.append(_with(lay_out([r for e in current for r in e.rows]), [r for e in current for r in e.rows],
                     current))
    return out


def oversized(examples: list, packing: Packing, pack_length: int) -> list[str]:
    """``file:line: reason`` for each example that cannot fit one bin under ``packing`` (checked at load)."""
    if packing == "none":
        return []
    bounds = (examples.example_tokens() if hasattr(examples, "example_tokens")
              else [sum(len(r.ids) for r in ex.rows) for ex in examples])
    out = []
    for i in np.nonzero(np.asarray(bounds) > pack_length)[0]:  # the rest fit even without sharing
        ex = examples[int(i)]
        size = (sum(len(r.ids) for r in ex.rows) if packing == "sequences" else len(lay_out(ex.rows)))
        if size > pack_length:
            out.append(f"{ex.where}: {size} tokens under data.packing={packing} do not fit "
                       f"data.pack_length={pack_length} (raise it)")
    return out


def pack(examples: list, packing: Packing, pack_length: int, pad_id: int,
         group_keys: list | None = None) -> list[dict[str, torch.Tensor]]:
    """One bin per dict for a packed ``packing`` (see :func:`stack_bins` for micro-batches of several).

    ``group_keys`` (one per example) decide which consecutive pairs share a trie under ``trees``.
    Raises ValueError when a single sequence or pair cannot fit ``pack_length``.
    """
    if packing not in PACKINGS[1:]:
        raise ValueError(f"pack() takes a packed layout, not {packing!r}")
    units = [u for unit in _units(examples, packing, group_keys) for u in _split_to_fit(unit, pack_length)]
    for u in units:
        if len(u) > pack_length:
            where = u.examples[0].where
            raise ValueError(f"{where}: {len(u)} tokens do not fit data.pack_length={pack_length}")
    # First fit, longest first (stable), so bins fill up whatever the order of the examples.
    order = sorted(range(len(units)), key=lambda i: -len(units[i]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if room >= len(units[i]):
                bins[b].append(i)
                free[b] -= len(units[i])
                break
        else:
            bins.append([i])
            free.append(pack_length - len(units[i]))
    row_index = _row_numbers(examples)
    return [_bin_tensors([units[i] for i in sorted(b)], pack_length, pad_id, row_index) for b in bins]


def _row_numbers(examples: list) -> dict[int, tuple[int, int]]:
    """id(row) -> (its index among all rows of ``examples``, its example's index); row 2i chosen, 2i+1 rejected."""
    out, n = {}, 0
    for e, ex in enumerate(examples):
        for row in ex.rows:
            out[id(row)] = (n, e)
            n += 1
    return out


def _bin_tensors(units: list[_Unit], pack_length: int, pad_id: int, row_index: dict[int, tuple[int, int]]) -> dict:
    tokens = torch.full((pack_length,), pad_id, dtype=torch.long)
    positions = torch.zeros(pack_length, dtype=torch.long)
    nodes = torch.zeros(pack_length, dtype=torch.long)
    parents: list[int] = []
    loss_index, loss_label, loss_row, row_ids, end_index, row_ex = [], [], [], [], [], []
    values, refs = [], []
    at = 0
    for unit in units:
        n, base = len(unit), len(parents)
        tokens[at:at + n] = torch.tensor(unit.tokens)
        positions[at:at + n] = torch.tensor(unit.depth)
        nodes[at:at + n] = torch.tensor(unit.node) + base
        parents += [p + base if p >= 0 else -1 for p in unit.node_parent]
        for row, where in zip(unit.rows, unit.row_positions):
            r, e = row_index[id(row)]
            row_ids.append(r)
            row_ex.append(e)
            for k in range(row.context_len, len(row.ids)):
                loss_index.append(at + where[k - 1])
                loss_label.append(row.ids[k])
                loss_row.append(r)
            end_index.append(at + where[len(row.ids) - 1 - (1 if row.ends_with_eos else 0)])
        for ex in unit.examples:
            values += ex.values
            refs += ex.ref_logps
        at += n
    pad_node = len(parents)
    nodes[at:] = pad_node
    parents.append(-1)
    ancestors = torch.eye(len(parents), dtype=torch.bool)
    for child, parent in enumerate(parents):  # parents come before children in a depth-first layout
        if parent >= 0:
            ancestors[child] |= ancestors[parent]
    # Rows of this bin renumbered 0..R-1 in example order (bins hold whole examples).
    local = {r: i for i, r in enumerate(sorted(row_ids))}
    by_row = sorted(range(len(row_ids)), key=lambda i: row_ids[i])
    local_example = {e: i for i, e in enumerate(sorted(set(row_ex)))}
    return {
        "row_source": torch.tensor(sorted(row_ids), dtype=torch.long),
        "row_example": torch.tensor([local_example[row_ex[i]] for i in by_row], dtype=torch.long),
        "tokens": tokens[None],
        "position_ids": positions[None],
        "attention_nodes": nodes[None],
        "node_ancestors": ancestors[None],
        "loss_index": torch.tensor(loss_index, dtype=torch.long),
        "loss_label": torch.tensor(loss_label, dtype=torch.long),
        "loss_row": torch.tensor([local[r] for r in loss_row], dtype=torch.long),
        "row_end_index": torch.tensor([end_index[i] for i in by_row], dtype=torch.long),
        "values": _floats([values[i] for i in by_row]),
        "ref_logps": _floats([refs[i] for i in by_row]),
    }


def _floats(xs: list) -> torch.Tensor:
    return torch.tensor([math.nan if x is None else float(x) for x in xs], dtype=torch.float32)


def pad(examples: list, max_length: int, pad_id: int, first_row: int = 0) -> dict[str, torch.Tensor]:
    """The ``none`` layout: one row per sequence padded to ``max_length``, causal attention.

    ``first_row``: the index of the first row among all rows of a longer list these examples belong to
    (their ``row_source`` counts from it)."""
    rows = [r for ex in examples for r in ex.rows]
    n = len(rows)
    tokens = torch.full((n, max_length), pad_id, dtype=torch.long)
    loss_index, loss_label, loss_row, end_index = [], [], [], []
    for i, r in enumerate(rows):
        tokens[i, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        for k in range(r.context_len, len(r.ids)):
            loss_index.append(i * max_length + k - 1)
            loss_label.append(r.ids[k])
            loss_row.append(i)
        end_index.append(i * max_length + len(r.ids) - 1 - (1 if r.ends_with_eos else 0))
    return {
        "row_source": torch.arange(first_row, first_row + n),
        "row_example": torch.tensor([e for e, ex in enumerate(examples) for _ in ex.rows], dtype=torch.long),
        "tokens": tokens,
        "position_ids": torch.arange(max_length).unsqueeze(0).expand(n, max_length).contiguous(),
        "loss_index": torch.tensor(loss_index, dtype=torch.long),
        "loss_label": torch.tensor(loss_label, dtype=torch.long),
        "loss_row": torch.tensor(loss_row, dtype=torch.long),
        "row_end_index": torch.tensor(end_index, dtype=torch.long),
        "values": _floats([v for ex in examples for v in ex.values]),
        "ref_logps": _floats([v for ex in examples for v in ex.ref_logps]),
    }


def stack_bins(bins: list[dict[str, torch.Tensor]], count: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``count`` bins as one micro-batch [count, S]; missing bins are padding with no rows (so every
    micro-batch of a step has one shape, as pipeline stages need)."""
    s = bins[0]["tokens"].shape[1]
    nodes = max(b["node_ancestors"].shape[-1] for b in bins)
    out: dict[str, list] = {k: [] for k in bins[0]}
    rows = examples = 0
    for i in range(count):
        if i < len(bins):
            b = bins[i]
        else:  # an empty bin: one padding node
            b = {"tokens": torch.full((1, s), pad_id, dtype=torch.long), "position_ids": torch.zeros(1, s, dtype=torch.long),
                 "attention_nodes": torch.zeros(1, s, dtype=torch.long), "node_ancestors": torch.ones(1, 1, 1, dtype=torch.bool)}
            b.update({k: bins[0][k][:0] for k in bins[0] if k not in b})
        n = b["node_ancestors"].shape[-1]
        ancestors = torch.zeros(1, nodes, nodes, dtype=torch.bool)
        ancestors[:, :n, :n] = b["node_ancestors"]
        out["node_ancestors"].append(ancestors)
        for k in ("tokens", "position_ids", "attention_nodes", "values", "ref_logps", "row_source", "loss_label"):
            out[k].append(b[k])
        out["loss_index"].append(b["loss_index"] + i * s)
        out["row_end_index"].append(b["row_end_index"] + i * s)
        out["loss_row"].append(b["loss_row"] + rows)
        out["row_example"].append(b["row_example"] + examples)
        rows += b["values"].numel()
        examples += int(b["row_example"].max()) + 1 if b["row_example"].numel() else 0
    return {k: torch.cat(v) for k, v in out.items()}


def attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Megatron's mask (True = masked) [B, 1, S, S] for a packed batch; None for padded rows (causal)."""
    if "attention_nodes" not in batch:
        return None
    nodes, ancestors = batch["attention_nodes"], batch["node_ancestors"]
    b, s = nodes.shape
    allowed = ancestors[torch.arange(b, device=nodes.device)[:, None, None], nodes[:, :, None], nodes[:, None, :]]
    allowed &= torch.ones(s, s, dtype=torch.bool, device=nodes.device).tril()
    return ~allowed[:, None]

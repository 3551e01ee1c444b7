"""Preference data from scored trees: pure functions ``Tree -> records``.

- :func:`step_pairs` (SPPD D_step): siblings under one parent (so the prefix is shared) whose
  values differ by *more than* ``threshold`` (paper: "exceeding 0.5"); chosen = the higher.
- :func:`sft_prm` (SPPD SFT-PRM): the correct trajectory with the largest minimum step value.
- :func:`dpo_prm` (SPPD DPO-PRM): that trajectory against the incorrect trajectory with the
  smallest minimum step value.
- :func:`svpo_pairs` (SVPO appendix, Algorithm 1): sibling, cousin (same depth, other parent) and
  terminal (a terminal step at another depth) preferences, top-down, with a count per type.

V(node) is ``node.values[value_name]``: the value of the state *after* the node's step. Every
function is deterministic: ties are broken by node ids, never by set or dict order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sppd_megatron.records import PreferencePair, RecordError, SFTExample, Tree, TreeNode


class TreeNotUsable(ValueError):
    """A tree this stage cannot build from (missing values, ungraded leaves); the reason says why."""


def check_tree(tree: Tree, value_name: str) -> None:
    """Raise :class:`TreeNotUsable` unless every step has a value and every terminal step a verdict."""
    for node in tree.nodes[1:]:
        if value_name not in node.values:
            have = sorted(node.values) or "none"
            raise TreeNotUsable(f"tree {tree.id}: node {node.node_id} has no value '{value_name}' (values: {have})")
        if node.terminal and node.correct is None:
            raise TreeNotUsable(f"tree {tree.id}: terminal node {node.node_id} is not graded (run sppd-megatron score)")


def _v(node: TreeNode, value_name: str) -> float:
    return node.values[value_name]


def _step_pair(tree: Tree, chosen: TreeNode, rejected: TreeNode, value_name: str, pair_type: str,
               rejected_prefix: str | None = None) -> PreferencePair:
    return PreferencePair(
        prompt=tree.prompt,
        prefix=tree.state_text(chosen.parent),
        chosen=chosen.text,
        rejected=rejected.text,
        rejected_prefix=rejected_prefix,
        chosen_value=_v(chosen, value_name),
        rejected_value=_v(rejected, value_name),
        chosen_ends=chosen.terminal,
        rejected_ends=rejected.terminal,
        level="step",
        pair_type=pair_type,
        question_id=tree.id,
        depth=chosen.depth,
    )


def gap(pair: PreferencePair) -> float:
    return (pair.chosen_value or 0.0) - (pair.rejected_value or 0.0)


def _children_by_parent(tree: Tree) -> dict[int, list[TreeNode]]:
    children: dict[int, list[TreeNode]] = {}
    for node in tree.nodes[1:]:
        children.setdefault(node.parent, []).append(node)
    return children


def step_pairs(tree: Tree, value_name: str, threshold: float = 0.5) -> list[PreferencePair]:
    """Every sibling pair with V(chosen) - V(rejected) > ``threshold``, largest gap first.

    ``prefix`` is the parent state's text (the shared steps); ``depth`` is the depth of the two
    steps (1 = first step). Equal-valued siblings never pair, whatever the threshold.
    """
    pairs = []
    for parent, kids in sorted(_children_by_parent(tree).items()):
        for a in kids:
            for b in kids:
                if _v(a, value_name) - _v(b, value_name) > threshold:
                    pairs.append(_step_pair(tree, a, b, value_name, "sibling"))
    return _by_gap(pairs)


def _by_gap(pairs: list[PreferencePair]) -> list[PreferencePair]:
    # Stable sort: equal gaps keep the (parent, chosen, rejected) node-id order they were built in.
    return sorted(pairs, key=lambda p: -gap(p))


def _min_value(path: list[TreeNode], value_name: str) -> float:
    return min(_v(n, value_name) for n in path)


def _mean_value(path: list[TreeNode], value_name: str) -> float:
    return sum(_v(n, value_name) for n in path) / len(path)


@dataclass
class _Scored:
    leaf: TreeNode
    path: list[TreeNode]
    min_value: float
    mean_value: float


def _trajectories(tree: Tree, value_name: str, correct: bool) -> list[_Scored]:
    out = []
    for leaf in tree.leaves():
        if leaf.terminal and (leaf.correct is True) == correct:
            path = tree.path(leaf.node_id)
            out.append(_Scored(leaf, path, _min_value(path, value_name), _mean_value(path, value_name)))
    return out


def best_correct_trajectory(tree: Tree, value_name: str) -> _Scored | None:
    """argmax over correct trajectories of the minimum step value (ties: higher mean, then lower id)."""
    found = _trajectories(tree, value_name, correct=True)
    return min(found, key=lambda s: (-s.min_value, -s.mean_value, s.leaf.node_id), default=None)


def worst_incorrect_trajectory(tree: Tree, value_name: str) -> _Scored | None:
    """argmin over incorrect trajectories of the minimum step value (ties: lower mean, then lower id)."""
    found = _trajectories(tree, value_name, correct=False)
    return min(found, key=lambda s: (s.min_value, s.mean_value, s.leaf.node_id), default=None)


def sft_prm(tree: Tree, value_name: str) -> SFTExample | None:
    """SPPD SFT-PRM: the correct trajectory maximising its minimum step value (None if none is correct)."""
    best = best_correct_trajectory(tree, value_name)
    if best is None:
        return None
    return SFTExample(prompt=tree.prompt, response=tree.state_text(best.leaf.node_id), question_id=tree.id,
                      value=best.min_value, ends=True)


def dpo_prm(tree: Tree, value_name: str) -> PreferencePair | None:
    """SPPD DPO-PRM: the SFT-PRM trajectory vs the incorrect one minimising its minimum step value."""
    best = best_correct_trajectory(tree, value_name)
    worst = worst_incorrect_trajectory(tree, value_name)
    if best is None or worst is None:
        return None
    return PreferencePair(
        prompt=tree.prompt,
        prefix="",
        chosen=tree.state_text(best.leaf.node_id),
        rejected=tree.state_text(worst.leaf.node_id),
        chosen_value=best.min_value,
        rejected_value=worst.min_value,
        level="sentence",
        pair_type="trajectory",
        question_id=tree.id,
        depth=0,
    )


@dataclass
class SVPOCounts:
    """How many rejected steps each chosen step is paired with, per preference type (SVPO: 2, 1, 1)."""

    sibling: int = 2
    """Same parent (same prefix)."""
    cousin: int = 1
    """Same depth, different parent: the rejected step continues its own prefix (``rejected_prefix``)."""
    terminal: int = 1
    """A terminal step at a different depth, continuing its own prefix."""

    def __post_init__(self) -> None:
        if min(self.sibling, self.cousin, self.terminal) < 0:
            raise ValueError("SVPO counts must be >= 0")


def svpo_pairs(tree: Tree, value_name: str, counts: SVPOCounts | None = None,
               threshold: float = 0.5) -> list[PreferencePair]:
    """SVPO step-level preferences, built top-down (shallow chosen steps first).

    For each chosen step c (by depth, then value high to low, then id) and each type, the
    ``counts`` lowest-valued candidates r with V(c) - V(r) > ``threshold`` are taken:
    siblings of c; cousins (same depth, another parent); terminal steps at another depth.
    """
    counts = counts or SVPOCounts()
    steps = tree.nodes[1:]
    pairs = []
    for c in sorted(steps, key=lambda n: (n.depth, -_v(n, value_name), n.node_id)):
        vc = _v(c, value_name)
        below = [r for r in steps if vc - _v(r, value_name) > threshold]
        below.sort(key=lambda r: (_v(r, value_name), r.node_id))
        kinds = (
            ("sibling", counts.sibling, lambda r: r.parent == c.parent),
            ("cousin", counts.cousin, lambda r: r.depth == c.depth and r.parent != c.parent),
            ("terminal", counts.terminal, lambda r: r.terminal and r.depth != c.depth),
        )
        for pair_type, limit, matches in kinds:
            for r in [r for r in below if matches(r)][:limit]:
                prefix = None if pair_type == "sibling" else tree.state_text(r.parent)
                pairs.append(_step_pair(tree, c, r, value_name, pair_type, rejected_prefix=prefix))
    return pairs


def pair_key(record: PreferencePair | SFTExample) -> tuple:
    """What makes two records the same training example."""
    if isinstance(record, SFTExample):
        return (record.prompt, record.response)
    return (record.prompt, record.prefix, record.rejected_context, record.chosen, record.rejected)


def dedup_and_cap(pairs: Iterable, cap: int | None, seen: set | None = None) -> tuple[list, int]:
    """Drop pairs already in ``seen`` (updated), then keep at most ``cap``; returns (kept, duplicates)."""
    seen = set() if seen is None else seen
    kept, duplicates = [], 0
    for pair in pairs:
        key = pair_key(pair)
        if key in seen:
            duplicates += 1
            continue
        if cap is not None and len(kept) >= cap:
            continue
        seen.add(key)
        kept.append(pair)
    return kept, duplicates


def invalid_reason(record: PreferencePair | SFTExample) -> str | None:
    """Why a built record cannot be trained on, or None: schema errors and no-signal pairs."""
    try:
        record.validate()
    except RecordError as exc:
        return f"invalid {record.kind} record: {exc.reason}"
    if isinstance(record, PreferencePair) and record.chosen == record.rejected \
            and record.prefix == record.rejected_context:
        return "chosen and rejected are identical (same context and text): no preference signal"
    return None

"""Grading and scoring whole trees: pure functions over ``records.Tree`` (they update nodes in place).

A text PRM scores each root-to-leaf trajectory; the value of step t depends only on the steps up
to t, so every node gets its value from any trajectory through it (the first one is kept).
"""

from __future__ import annotations

from typing import Sequence

from sppd_megatron.records import Tree
from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS, extract_answer, grade
from sppd_megatron.scoring.prm import ProcessRewardModel, StepQuery
from sppd_megatron.scoring.tree_value import tree_values


def verdict(state_text: str, gold_answer: str,
            timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS) -> tuple[str | None, bool]:
    """``(answer, correct)`` of a complete solution: the answer it states, and whether that is the gold one."""
    answer = extract_answer(state_text)
    return answer, answer is not None and grade(state_text, gold_answer, timeout_seconds)


def grade_tree(tree: Tree, timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS, regrade: bool = False) -> None:
    """Set ``answer`` and ``correct`` on every terminal node from its whole state text.

    Nodes already graded (MCTS grades its terminals while it searches) keep their verdict unless ``regrade``.
    """
    for node in tree.nodes[1:]:
        if not node.terminal or (node.correct is not None and not regrade):
            continue
        node.answer, node.correct = verdict(tree.state_text(node.node_id), tree.gold_answer, timeout_seconds)


def leaf_queries(tree: Tree) -> list[tuple[list[int], StepQuery]]:
    """``(node ids on the path, query)`` for every leaf of ``tree``."""
    out = []
    for leaf in tree.leaves():
        path = tree.path(leaf.node_id)
        query = StepQuery(
            question=tree.question,
            steps=tuple(n.text for n in path),
            gold_answer=tree.gold_answer,
            prompt=tree.prompt,
        )
        out.append(([n.node_id for n in path], query))
    return out


def score_trees_with_prm(trees: Sequence[Tree], prm: ProcessRewardModel, value_name: str) -> None:
    """``node.values[value_name]`` for every non-root node, all trees' trajectories in one batch."""
    owners, queries = [], []
    for tree in trees:
        for node in tree.nodes:  # a re-score replaces, never mixes with, old values of this name
            node.values.pop(value_name, None)
        for node_ids, query in leaf_queries(tree):
            owners.append((tree, node_ids))
            queries.append(query)
    scores = prm.score_batch(queries) if queries else []
    for (tree, node_ids), values in zip(owners, scores):
        for node_id, value in zip(node_ids, values):
            tree.nodes[node_id].values.setdefault(value_name, float(value))


def score_trees_with_tree_values(trees: Sequence[Tree], value_name: str = "tree") -> None:
    """``node.values[value_name]`` = share of correct leaves below (grade the trees first)."""
    for tree in trees:
        for node_id, value in tree_values(tree).items():
            tree.nodes[node_id].values[value_name] = value

"""The tree's own value estimate: V(node) = share of correct leaves below it (free, no model).

With K sampled leaves under a node this is a Monte-Carlo estimate of the node's success chance
under the sampling policy, biased only by how the tree chose where to branch.
"""

from __future__ import annotations

from sppd_megatron.records import Tree


def tree_values(tree: Tree) -> dict[int, float]:
    """``{node_id: share of correct leaves in the subtree}`` for every non-root node.

    A leaf counts as correct only when ``correct is True``: unfinished leaves (cut at the depth
    or token limit) and ungraded ones count as failures, since they never reached the answer.
    Grade the tree first (:func:`sppd_megatron.scoring.tree_scoring.grade_tree`).
    """
    correct = [0] * len(tree.nodes)
    total = [0] * len(tree.nodes)
    has_child = [False] * len(tree.nodes)
    for node in tree.nodes[1:]:
        has_child[node.parent] = True
    # Parents always come before children (records.Tree.validate), so one reverse pass sums subtrees.
    for node in reversed(tree.nodes):
        if not has_child[node.node_id] and node.node_id != 0:
            total[node.node_id] += 1
            correct[node.node_id] += node.correct is True
        if node.parent is not None:
            total[node.parent] += total[node.node_id]
            correct[node.parent] += correct[node.node_id]
    return {n.node_id: correct[n.node_id] / total[n.node_id] for n in tree.nodes[1:] if total[n.node_id]}

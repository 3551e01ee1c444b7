"""How well one step value predicts another used as its label: Brier score and AUC over tree states.

Labels are values in [0, 1], typically Monte-Carlo estimates (the share of N rollouts from the state
that reach the gold answer). A soft label y counts as y of a positive ("leads to a correct answer")
and 1 - y of a negative, which is what its rollouts are; with 0/1 labels both measures are the
textbook ones.

- ``brier``: mean of (v - y)^2 over states (the squared error against the label);
- ``auc``: the probability that a positive state is valued above a negative one, ties counting one
  half, each pair weighted by y_i (1 - y_j) (the Mann-Whitney statistic of the rollout outcomes).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from sppd_megatron.records import Tree


def brier(values: Sequence[float], labels: Sequence[float]) -> float:
    if not values or len(values) != len(labels):
        raise ValueError("brier needs equally many values and labels, at least one")
    return sum((v - y) ** 2 for v, y in zip(values, labels)) / len(values)


def auc(values: Sequence[float], labels: Sequence[float]) -> float | None:
    """Weighted AUC (see the module docstring); None when there is no positive or no negative weight."""
    if len(values) != len(labels):
        raise ValueError("auc needs equally many values and labels")
    groups: dict[float, list[float]] = {}
    for v, y in zip(values, labels):
        g = groups.setdefault(v, [0.0, 0.0])
        g[0] += y
        g[1] += 1.0 - y
    positives = sum(g[0] for g in groups.values())
    negatives = sum(g[1] for g in groups.values())
    if positives <= 0 or negatives <= 0:
        return None
    below = 0.0  # negative weight of the states valued lower than the current group
    wins = 0.0
    for v in sorted(groups):
        pos, neg = groups[v]
        wins += pos * (below + 0.5 * neg)
        below += neg
    return wins / (positives * negatives)


def value_calibration(trees: Iterable[Tree], value_name: str, label_name: str) -> dict:
    """Brier and AUC of ``values[value_name]`` against ``values[label_name]`` over every step that has both."""
    pairs = [(n.values[value_name], n.values[label_name]) for t in trees for n in t.nodes[1:]
             if value_name in n.values and label_name in n.values]
    if not pairs:
        return {"states": 0, "brier": None, "auc": None}
    values, labels = [v for v, _ in pairs], [y for _, y in pairs]
    return {"states": len(pairs), "brier": round(brier(values, labels), 6),
            "auc": None if (a := auc(values, labels)) is None else round(a, 6),
            "mean_value": round(sum(values) / len(values), 6), "mean_label": round(sum(labels) / len(labels), 6)}

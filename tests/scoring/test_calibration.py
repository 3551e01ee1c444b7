"""Brier score and AUC of a step value against labels (scoring.calibration), against their definitions."""

import itertools

import pytest

from sppd_megatron.pairs.handmade import handmade_tree, step
from sppd_megatron.scoring.calibration import auc, brier, value_calibration


def _rollout_auc(values, labels, n=20):
    """The definition spelled out: each soft label as n rollouts (round(y n) reach the answer), then the
    share of (positive, negative) rollout pairs whose state is valued higher, ties one half."""
    outcomes = [(v, o) for v, y in zip(values, labels) for o in [1] * round(y * n) + [0] * (n - round(y * n))]
    pos = [v for v, o in outcomes if o]
    neg = [v for v, o in outcomes if not o]
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_and_brier_follow_their_definitions():
    values = [0.9, 0.2, 0.6, 0.6, 0.35, 0.1, 0.8]
    labels = [1.0, 0.0, 0.75, 0.25, 0.5, 0.05, 0.6]
    assert auc(values, labels) == pytest.approx(_rollout_auc(values, labels))
    assert brier(values, labels) == pytest.approx(sum((v - y) ** 2 for v, y in zip(values, labels)) / 7)
    assert auc([0.1, 0.9], [0, 1]) == 1.0 and auc([0.9, 0.1], [0, 1]) == 0.0 and auc([0.5, 0.5], [0, 1]) == 0.5
    assert auc([0.3, 0.4], [1, 1]) is None


def test_value_calibration_over_tree_states():
    tree = handmade_tree("q", "What is 2+3?", "5", [
        step("2+3=5.\n", v=0.9, children=[step("\\boxed{5}", v=1.0)]),
        step("2+3=6.\n", v=0.3, children=[step("\\boxed{6}", v=0.2)]),
    ], value_name="learned")
    for node, mc in zip(tree.nodes[1:], [0.75, 1.0, 0.0, 0.0]):
        node.values["mc"] = mc
    out = value_calibration([tree], "learned", "mc")
    assert out["states"] == 4
    assert out["brier"] == pytest.approx((0.15 ** 2 + 0 + 0.3 ** 2 + 0.2 ** 2) / 4)
    assert out["auc"] == pytest.approx(_rollout_auc([0.9, 1.0, 0.3, 0.2], [0.75, 1.0, 0.0, 0.0]))

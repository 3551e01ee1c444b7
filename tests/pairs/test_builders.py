"""Pair builders on hand-built trees whose right answers are worked out by hand in the comments.

Values are exact binary fractions, so "difference exactly at the threshold" really is a tie.
"""

from __future__ import annotations

import pytest

from sppd_megatron.pairs.builders import (
    SVPOCounts,
    TreeNotUsable,
    check_tree,
    dedup_and_cap,
    dpo_prm,
    invalid_reason,
    sft_prm,
    step_pairs,
    svpo_pairs,
)
from sppd_megatron.pairs.handmade import handmade_tree, step


def tree_a():
    """Gold 5. Node ids (depth-first) and values:

    1 "Let x = 2+3.\\n" .75 ── 2 "So x = 5.\\n" .875 ── 3 "\\boxed{5}" 1.0  (correct)
                          └─ 4 "So x = 6.\\n" .25  ── 5 "\\boxed{6}" 0.0  (wrong)
    6 "Let x = 2*3.\\n" .25 ── 7 "\\boxed{6}" 0.0                         (wrong)
    8 "x is 5, \\boxed{5}" .625                                          (correct, depth 1)
    """
    return handmade_tree("qa", "What is 2+3?", "5", [
        step("Let x = 2+3.\n", v=0.75, children=[
            step("So x = 5.\n", v=0.875, children=[step("\\boxed{5}", v=1.0)]),
            step("So x = 6.\n", v=0.25, children=[step("\\boxed{6}", v=0.0)]),
        ]),
        step("Let x = 2*3.\n", v=0.25, children=[step("\\boxed{6}", v=0.0)]),
        step("x is 5, \\boxed{5}", v=0.625),
    ])


def ids(tree, pair):
    """(chosen node id, rejected node id) of a step pair, found by prefix + text."""
    def find(prefix, text):
        return next(n.node_id for n in tree.nodes[1:] if n.text == text and tree.state_text(n.parent) == prefix)
    return find(pair.prefix, pair.chosen), find(pair.rejected_context, pair.rejected)


def test_grading_of_the_hand_tree():
    t = tree_a()
    assert [n.node_id for n in t.nodes if n.correct] == [3, 8]
    assert [n.node_id for n in t.nodes if n.correct is False] == [5, 7]


def test_step_pairs_threshold_is_strict():
    t = tree_a()
    pairs = step_pairs(t, "prm", threshold=0.5)
    # root children .75/.25/.625: .75-.25 = .5 exactly, not > .5; node 1's children: .875-.25 = .625 > .5
    assert [ids(t, p) for p in pairs] == [(2, 4)]
    p = pairs[0]
    assert (p.prompt, p.prefix, p.chosen, p.rejected) == (t.prompt, "Let x = 2+3.\n", "So x = 5.\n", "So x = 6.\n")
    assert (p.chosen_value, p.rejected_value, p.depth, p.question_id) == (0.875, 0.25, 2, "qa")
    assert (p.level, p.pair_type, p.rejected_prefix, p.chosen_ends, p.rejected_ends) == \
        ("step", "sibling", None, False, False)


def test_step_pairs_lower_threshold_and_gap_order():
    t = tree_a()
    pairs = step_pairs(t, "prm", threshold=0.3)
    # gaps: (2,4) .625, (1,6) .5, (8,6) .375; (1,8) .125 and the rest are below .3
    assert [ids(t, p) for p in pairs] == [(2, 4), (1, 6), (8, 6)]
    assert pairs[2].chosen_ends is True and pairs[2].prefix == ""
    assert step_pairs(t, "prm", threshold=0.0) == step_pairs(t, "prm", threshold=0.0)  # deterministic
    assert len(step_pairs(t, "prm", threshold=0.0)) == 4  # plus (1,8); equal values never pair


def test_equal_values_never_pair_even_at_threshold_zero():
    t = handmade_tree("qt", "q?", "1", [step("a\n", v=0.5, children=[step("\\boxed{1}", v=1.0)]),
                                        step("b\n", v=0.5, children=[step("\\boxed{2}", v=0.0)])])
    assert [ids(t, p) for p in step_pairs(t, "prm", threshold=0.0)] == []


def test_sft_and_dpo_prm():
    t = tree_a()
    sft = sft_prm(t, "prm")
    # correct trajectories: 1-2-3 (min .75) and 8 (min .625): the max-min one is 1-2-3
    assert sft.response == "Let x = 2+3.\nSo x = 5.\n\\boxed{5}"
    assert (sft.prompt, sft.value, sft.question_id, sft.ends) == (t.prompt, 0.75, "qa", True)
    dpo = dpo_prm(t, "prm")
    # incorrect: 1-4-5 (min 0, mean .333) and 6-7 (min 0, mean .125): tie on min, lower mean wins
    assert dpo.chosen == sft.response
    assert dpo.rejected == "Let x = 2*3.\n\\boxed{6}"
    assert (dpo.level, dpo.pair_type, dpo.prefix, dpo.chosen_value, dpo.rejected_value) == \
        ("sentence", "trajectory", "", 0.75, 0.0)


def test_sft_ties_break_by_mean_then_node_id():
    # two correct trajectories, same min (.5) and same mean (.75): the lower leaf id wins
    t = handmade_tree("qs", "q?", "3", [
        step("a\n", v=1.0, children=[step("\\boxed{3}", v=0.5)]),
        step("b\n", v=0.5, children=[step("\\boxed{3}", v=1.0)]),
    ])
    assert sft_prm(t, "prm").response == "a\n\\boxed{3}"
    # lower the first trajectory's min below .5: the other one wins
    t.nodes[1].values["prm"] = 0.25
    assert sft_prm(t, "prm").response == "b\n\\boxed{3}"


def test_no_correct_or_no_incorrect_trajectory():
    all_wrong = handmade_tree("qw", "q?", "3", [step("\\boxed{4}", v=0.1)])
    assert sft_prm(all_wrong, "prm") is None and dpo_prm(all_wrong, "prm") is None
    all_right = handmade_tree("qr", "q?", "3", [step("\\boxed{3}", v=0.9)])
    assert sft_prm(all_right, "prm") is not None and dpo_prm(all_right, "prm") is None
    # an unfinished leaf (cut at the depth limit) is neither correct nor incorrect
    cut = handmade_tree("qc", "q?", "3", [step("\\boxed{3}", v=0.9), step("thinking\n", v=0.2, terminal=False)])
    assert dpo_prm(cut, "prm") is None


def test_svpo_sibling_cousin_terminal():
    t = tree_a()
    pairs = svpo_pairs(t, "prm", SVPOCounts(sibling=2, cousin=1, terminal=1), threshold=0.5)
    got = [(p.pair_type, *ids(t, p)) for p in pairs]
    # top-down: chosen 1 (.75), 8 (.625), 2 (.875), 3 (1.0); see the module doc for the values
    assert got == [
        ("terminal", 1, 5),
        ("terminal", 8, 5),
        ("sibling", 2, 4), ("cousin", 2, 7), ("terminal", 2, 5),
        ("cousin", 3, 5), ("terminal", 3, 7),
    ]
    cousin = pairs[3]
    assert cousin.prefix == "Let x = 2+3.\n" and cousin.rejected_prefix == "Let x = 2*3.\n"
    assert pairs[2].rejected_prefix is None and pairs[2].rejected_context == pairs[2].prefix
    assert all(p.chosen_value - p.rejected_value > 0.5 for p in pairs)


def test_svpo_counts_limit_each_type():
    t = tree_a()
    only_siblings = svpo_pairs(t, "prm", SVPOCounts(sibling=2, cousin=0, terminal=0), threshold=0.5)
    assert [(p.pair_type, *ids(t, p)) for p in only_siblings] == [("sibling", 2, 4)]
    loose = svpo_pairs(t, "prm", SVPOCounts(sibling=1, cousin=1, terminal=5), threshold=0.3)
    terminal_for_3 = [ids(t, p) for p in loose if p.pair_type == "terminal" and ids(t, p)[0] == 3]
    # below 1.0 - .3: terminal steps at depth != 3 are 7 (0.0) and 8 (.625), lowest value first
    assert terminal_for_3 == [(3, 7), (3, 8)]
    with pytest.raises(ValueError):
        SVPOCounts(sibling=-1)


def test_dedup_caps_and_no_signal_pairs():
    # two identical "A" steps (different subtrees) beat "B": the two pairs are the same example
    t = handmade_tree("qd", "q?", "1", [
        step("A\n", v=1.0, children=[step("\\boxed{1}", v=1.0)]),
        step("A\n", v=0.875, children=[step("so \\boxed{1}", v=1.0)]),
        step("B\n", v=0.125, children=[step("\\boxed{2}", v=0.0)]),
        step("A\n", v=0.25, children=[step("\\boxed{3}", v=0.0)]),
    ])
    pairs = step_pairs(t, "prm", threshold=0.5)
    assert len(pairs) == 4  # A1>B, A1>A4, A2>B, A2>A4
    reasons = [invalid_reason(p) for p in pairs]
    assert sum(r is not None and "identical" in r for r in reasons) == 2  # "A" vs "A": no signal
    valid = [p for p, r in zip(pairs, reasons) if r is None]
    kept, duplicates = dedup_and_cap(valid, cap=None)
    assert (len(kept), duplicates) == (1, 1)
    kept, duplicates = dedup_and_cap(step_pairs(tree_a(), "prm", 0.0), cap=2)
    assert len(kept) == 2 and duplicates == 0
    assert [p.chosen_value - p.rejected_value for p in kept] == [0.625, 0.5]  # largest gaps kept


def test_check_tree_requires_values_and_grades():
    t = tree_a()
    check_tree(t, "prm")
    with pytest.raises(TreeNotUsable, match="no value 'mc'"):
        check_tree(t, "mc")
    ungraded = handmade_tree("qu", "q?", "1", [step("\\boxed{1}", v=1.0)], grade_leaves=False)
    with pytest.raises(TreeNotUsable, match="not graded"):
        check_tree(ungraded, "prm")

"""SVPO's MCTS (``sample`` with ``algorithm: mcts``): visit counts, Q, convergence, reproducibility.

Kill and resume of an MCTS ``sample`` run is ``test_cli.py``'s kill test, parametrised over the algorithm.
"""

from __future__ import annotations

import math
import random

import pytest

from sppd_megatron.pairs.builders import step_pairs
from sppd_megatron.records import Prompt, PromptTemplate, Tree
from sppd_megatron.sampling.config import MCTSConfig
from sppd_megatron.sampling.engines.base import Generation
from sppd_megatron.sampling.mcts import MCTSTree
from sppd_megatron.sampling.prompts import resolve_template
from sppd_megatron.sampling.tree_sampler import TreeSampler

from .helpers import small_config

PLAIN = PromptTemplate(system_prompt="", use_chat_template=False, plain_format="Q: {question}\nA: ")


class TablePolicy:
    """A model-free engine whose next steps are a fixed table: state text -> [(step, log-prob), ...].

    The j-th request of one call for a state gets the state's step j (mod the table's length), so
    an expansion with C = len(table[state]) creates every possible step exactly once, and a step
    whose state is not in the table is drawn by the request seed from ``fallback``.
    """

    name = "table"

    def __init__(self, tokenizer, table: dict[str, list[tuple[str, float]]], fallback=None):
        self.tokenizer, self.table, self.fallback = tokenizer, table, fallback or []
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        seen: dict[str, int] = {}
        out = []
        for r in requests:
            state = self.tokenizer.decode(r.context_ids, skip_special_tokens=True).split("A: ", 1)[1]
            j = seen.get(state, 0)
            seen[state] = j + 1
            options = self.table.get(state)
            if options is None:
                options = [random.Random(r.seed).choice(self.fallback)]
                j = 0
            text, logprob = options[j % len(options)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: r.max_new_tokens]
            out.append(Generation(token_ids=ids, token_logprobs=[logprob / len(ids)] * len(ids),
                                  text=self.tokenizer.decode(ids), finish_reason="stop"))
        return out

    def close(self):
        pass


# Gold answer 2. The policy prefers the path that cannot reach it (R), and under L prefers a wrong answer.
TOY = {
    "": [("L\n\n", -3.0), ("R\n\n", -0.2)],
    "L\n\n": [("so \\boxed{1}\n\n", -0.1), ("x\n\n", -2.5)],
    "L\n\nx\n\n": [("so \\boxed{3}\n\n", -0.3), ("so \\boxed{2}\n\n", -1.5)],
    "R\n\n": [("so \\boxed{3}\n\n", -0.5), ("so \\boxed{4}\n\n", -0.6)],
}
# The exact values of those states: transitions are deterministic and MCTS's search policy settles on
# the best step, so Q(s) tends to V*(s) = max over next steps (UCT's consistency, Kocsis & Szepesvari 2006).
TOY_VALUES = {"L\n\n": 1.0, "L\n\nx\n\n": 1.0, "R\n\n": -1.0, "L\n\nso \\boxed{1}\n\n": -1.0}


def mcts_config(**overrides):
    base = dict(algorithm="mcts", C=2, max_depth=6, max_step_tokens=24, max_total_tokens=120,
                mcts=MCTSConfig(max_trees=1))
    base.update(overrides)
    return small_config(**base)


def sample_mcts(tokenizer, engine, cfg, prompts, keep_backups: dict | None = None) -> list[Tree]:
    if keep_backups is not None:
        original = MCTSTree.to_tree

        def to_tree(self, *args):
            keep_backups[self.prompt.id] = list(self.backups)
            return original(self, *args)

        MCTSTree.to_tree = to_tree
    try:
        return TreeSampler(engine, tokenizer, cfg, resolve_template(PLAIN, tokenizer)).sample(prompts)
    finally:
        if keep_backups is not None:
            MCTSTree.to_tree = original


def _ancestors(tree: Tree, node_id: int) -> list[int]:
    out = []
    while node_id is not None:
        out.append(node_id)
        node_id = tree.nodes[node_id].parent
    return out


def test_visit_counts_and_q_are_the_backed_up_evaluations(tokenizer):
    """N(s) = evaluations at s + sum of its children's N; Q(s) = mean of the rewards backed up through s."""
    steps = [("a\n\n", -0.4), ("b\n\n", -1.2), ("so \\boxed{7}\n\n", -0.9), ("so \\boxed{5}\n\n", -0.7),
             ("so \\boxed{7}", -2.0)]
    engine = TablePolicy(tokenizer, {}, fallback=steps)
    prompts = [Prompt(id=f"q{i}", question=f"question {i}?", gold_answer="7") for i in range(3)]
    cfg = mcts_config(K=12, C=3, max_depth=4, mcts=MCTSConfig(max_trees=3, stop_correct=2))
    backups: dict[str, list] = {}
    trees = sample_mcts(tokenizer, engine, cfg, prompts, backups)
    verdicts = [n.correct for t in trees for n in t.nodes if n.terminal]
    assert True in verdicts and False in verdicts
    for tree in trees:
        log = backups[tree.id]
        through: dict[int, list[float]] = {n.node_id: [] for n in tree.nodes}
        evaluations = dict.fromkeys(through, 0)
        for node_id, reward in log:
            evaluations[node_id] += 1
            for a in _ancestors(tree, node_id):
                through[a].append(reward)
        for n in tree.nodes:
            kids = tree.children(n.node_id)
            assert n.visits == evaluations[n.node_id] + sum(k.visits for k in kids) == len(through[n.node_id])
            assert math.isclose(n.q, sum(through[n.node_id]) / n.visits if n.visits else 0.0, abs_tol=1e-12)
            if n.node_id:
                assert n.values["mcts_q"] == pytest.approx((n.q + 1) / 2)
            if n.terminal:  # graded while searching: every evaluation of a terminal is its verdict
                assert n.q == (1.0 if n.correct else -1.0) and n.visits >= 1
            elif n.node_id:  # a non-terminal step is evaluated (worth 0) once, when it is expanded
                assert evaluations[n.node_id] == (1 if kids else 0)
        searches = tree.sampling["mcts_searches"]
        assert evaluations[0] == len(searches) and sum(s["root_visits"] for s in searches) == tree.nodes[0].visits
        assert all(s["simulations"] == cfg.K for s in searches)
        correct = sum(n.terminal and n.correct is True for n in tree.nodes)
        assert correct >= 2 or len(searches) == 3  # stop at stop_correct solutions, or at max_trees
        assert correct < 2 or len(searches) == 1 or \
            sum(n.terminal and n.correct is True for n in tree.nodes if n.node_id < searches[-1]["root_children"][0]) < 2


def test_q_converges_to_the_exact_values_of_an_enumerable_policy(tokenizer):
    errors = []
    for simulations in (20, 200, 2000, 10000):
        engine = TablePolicy(tokenizer, TOY)
        (tree,) = sample_mcts(tokenizer, engine, mcts_config(K=simulations), [Prompt("toy", "t?", "2")])
        q = {tree.state_text(n.node_id): n.q for n in tree.nodes[1:]}
        assert set(TOY_VALUES) <= set(q)
        errors.append(max(abs(q[s] - v) for s, v in TOY_VALUES.items()))
        assert tree.nodes[0].visits == 1 + sum(k.visits for k in tree.children(0))
    print("\nMCTS Q vs the exact values, max abs error after 20/200/2000/10000 simulations: "
          + ", ".join(f"{e:.3f}" for e in errors))
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.03, errors


def test_trees_do_not_depend_on_the_batch_and_q_feeds_the_pair_builders(tokenizer):
    steps = [("a\n\n", -0.4), ("b\n\n", -1.2), ("so \\boxed{7}\n\n", -0.9), ("so \\boxed{5}\n\n", -0.7)]
    prompts = [Prompt(id=f"q{i}", question=f"question {i}?", gold_answer="7") for i in range(3)]
    together = sample_mcts(tokenizer, TablePolicy(tokenizer, {}, steps), mcts_config(K=8, C=3), prompts)
    alone = [sample_mcts(tokenizer, TablePolicy(tokenizer, {}, steps), mcts_config(K=8, C=3), [p])[0]
             for p in prompts]
    assert [t.to_dict() for t in together] == [t.to_dict() for t in alone]
    pairs = [p for t in together for p in step_pairs(t, "mcts_q")]
    assert pairs and all(p.chosen_value - p.rejected_value > 0.5 for p in pairs)

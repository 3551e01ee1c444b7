"""SVPO's step-level MCTS (Chen et al. 2024, section 3.1, appendix A.1) over any RolloutEngine.

One *simulation* is:

- **selection**: from the root, descend by PUCT until a node without children,
  ``argmax_a Q(s,a) + c_puct P(a|s) sqrt(N(s)) / (1 + N(s,a))``, where the prior P(a|s) is the
  policy's probability of step a normalised over its siblings, softmax(mean token log-prob) (the
  geometric mean of the step's token probabilities, as AlphaMath reads pi(a|s) for a step of
  several tokens), and an unvisited step has Q = 0;
- **expansion**: a non-terminal leaf gets C children, generated in one engine call with the same
  requests (shared prefix, per-child seeds) as tree sampling;
- **evaluation** (one-step rollout): each new terminal child is graded, +1 when its answer is
  correct, -1 otherwise (no answer, depth or token limit); the leaf itself is worth 0, or
  lambda * V(s) with a value model's estimate V in [-1, 1] (AlphaMath's mix, ``mcts.value_weight``);
  a selection that ends on a terminal node evaluates that node again;
- **backup**: every evaluation adds one visit and its reward to the node it was made at and to each
  ancestor, so N(s) = (evaluations at s) + sum of N over s's children, and Q(s) is the mean reward
  of the evaluations below and at s.

A search runs K simulations. A question gets up to ``mcts.max_trees`` searches, each starting with a
fresh expansion of the root, until its record holds ``mcts.stop_correct`` correct complete solutions.
The searches share the record's root (node 0), so one Tree per question holds all of them; selection
in a search only ever enters that search's own first steps. The finished record carries ``visits``,
``q`` and ``values["mcts_q"] = (Q + 1) / 2`` on every node, so score and pairs read Q like any value.

Everything is deterministic given (seed, question id): the request seeds derive from the node (and,
for the root, the search), and PUCT ties go to the earlier child.
"""

from __future__ import annotations

import math

from sppd_megatron.records import PromptTemplate, Tree
from sppd_megatron.sampling.tree_sampler import GrowingTree, derive_seed, selection_probabilities

VALUE_NAME = "mcts_q"
"""The ``values`` key MCTS writes: Q mapped from [-1, 1] to [0, 1]."""


def q_to_value(q: float) -> float:
    return min(1.0, max(0.0, (q + 1.0) / 2.0))


class MCTSTree(GrowingTree):
    """One question's MCTS record while it is searched (the sampler's rounds drive it)."""

    def __init__(self, *args, grade_timeout: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS

        self.grade_timeout = DEFAULT_TIMEOUT_SECONDS if grade_timeout is None else grade_timeout
        self.visits: list[int] = [0]
        self.value_sum: list[float] = [0.0]
        self.search_children: list[list[int]] = []  # the root's children of each search
        self.search_visits: list[int] = []  # N(root) counted within each search
        self.search_simulations: list[int] = []
        self.backups: list[tuple[int, float]] = []  # (node evaluated, reward), in order: for tests and stats
        self.finished = False

    # --- statistics -------------------------------------------------------------------------------
    def q(self, node_id: int) -> float:
        n = self.visits[node_id]
        return self.value_sum[node_id] / n if n else 0.0

    def _backup(self, node_id: int, reward: float) -> None:
        self.backups.append((node_id, reward))
        self.search_visits[-1] += 1
        while node_id is not None:
            self.visits[node_id] += 1
            self.value_sum[node_id] += reward
            node_id = self.nodes[node_id].parent

    def correct_solutions(self) -> int:
        return sum(n.terminal and n.correct is True for n in self.nodes)

    # --- selection ----------------------------------------------------------------------------------
    def _kids(self, node_id: int) -> list[int]:
        return self.search_children[-1] if node_id == 0 else self.children[node_id]

    def _parent_visits(self, node_id: int) -> int:
        return self.search_visits[-1] if node_id == 0 else self.visits[node_id]

    def _select(self) -> int:
        c_puct = self.cfg.mcts.c_puct
        node_id = 0
        while self._kids(node_id):
            kids = self._kids(node_id)
            priors = selection_probabilities([self.nodes[k].mean_logprob for k in kids], 1.0)
            explore = c_puct * math.sqrt(self._parent_visits(node_id))
            scores = [self.q(k) + explore * p / (1 + self.visits[k]) for k, p in zip(kids, priors)]
            node_id = kids[max(range(len(kids)), key=lambda i: (scores[i], -i))]
        return node_id

    def _start_search(self) -> None:
        self.search_children.append([])
        self.search_visits.append(0)
        self.search_simulations.append(0)

    def next_expansion(self) -> int | None:
        """Run simulations until one needs an expansion (its leaf is returned) or the question is done."""
        mcts = self.cfg.mcts
        while not self.finished:
            if not self.search_simulations or self.search_simulations[-1] >= self.cfg.K:
                done = len(self.search_simulations)
                if done and (done >= mcts.max_trees or self.correct_solutions() >= mcts.stop_correct):
                    self.finished = True
                    return None
                self._start_search()
            self.search_simulations[-1] += 1
            self.iterations += 1
            leaf = self._select()
            if leaf != 0 and self.nodes[leaf].terminal:
                self._backup(leaf, 1.0 if self.nodes[leaf].correct else -1.0)
                continue
            return leaf
        return None

    # --- expansion, evaluation, backup --------------------------------------------------------------
    def request_seed(self, leaf: int, child: int) -> int:
        if leaf == 0 and len(self.search_children) > 1:  # each search expands the root afresh
            return derive_seed(self.question_seed, 0, child, "search", len(self.search_children) - 1)
        return super().request_seed(leaf, child)

    def needs_leaf_value(self, leaf: int) -> bool:
        return leaf != 0 and self.cfg.mcts.value_weight > 0

    def expanded(self, leaf: int, leaf_value: float | None) -> None:
        from sppd_megatron.scoring.tree_scoring import verdict

        new = [n for n in self.children[leaf] if n >= len(self.visits)]
        self.visits += [0] * len(new)
        self.value_sum += [0.0] * len(new)
        if leaf == 0:
            self.search_children[-1] = new
        estimate = 0.0
        if leaf_value is not None:  # a PRM value in [0, 1], read as V in [-1, 1]
            estimate = self.cfg.mcts.value_weight * (2.0 * leaf_value - 1.0)
        self._backup(leaf, estimate)
        for node_id in new:
            node = self.nodes[node_id]
            if node.terminal:
                node.answer, node.correct = verdict("".join(n.text for n in self._path(node_id)),
                                                    self.prompt.gold_answer, self.grade_timeout)
                self._backup(node_id, 1.0 if node.correct else -1.0)

    # --- the record ---------------------------------------------------------------------------------
    def to_tree(self, template: PromptTemplate, policy: str, settings: dict) -> Tree:
        for node in self.nodes:
            q = self.q(node.node_id)
            node.visits = self.visits[node.node_id]
            node.q = q
            if node.node_id:
                node.values[VALUE_NAME] = q_to_value(q)
        tree = super().to_tree(template, policy, settings)
        tree.sampling["mcts_searches"] = [
            {"simulations": sims, "root_children": kids, "root_visits": visits}
            for sims, kids, visits in zip(self.search_simulations, self.search_children, self.search_visits)]
        tree.sampling["correct_solutions"] = self.correct_solutions()
        return tree

"""Tree-based self-sampling (SPPD section 4.2): Selection, Expansion, Collection over any RolloutEngine.

Per question, K iterations each start at the root and descend by sampling a child with probability
softmax(mean token log-prob / selection_temperature); a non-terminal leaf reached this way is
expanded into C children (one generated step each); a terminal leaf ends the iteration with no
expansion. The finished tree holds every trajectory; Collection is ``Tree.trajectories()``.

Questions are sampled together in rounds: a round advances every unfinished question to its next
expansion and sends all C x (questions) requests to the engine in one call. Each question's
selection RNG and each request's sampling seed derive from (seed, question id, node), so a tree
does not depend on which other questions share its rounds or on where a run was resumed.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from sppd_megatron.records import Prompt, PromptTemplate, Tree, TreeNode
from sppd_megatron.sampling.config import SampleConfig
from sppd_megatron.sampling.engines.base import Generation, GenerationRequest, RolloutEngine
from sppd_megatron.sampling.prompts import render_prompt
from sppd_megatron.sampling.steps import StepDelimiter, TerminalRules
from sppd_megatron.tokenization import BoundaryMergeError, encode_continuation


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` is salted per process, so not that)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def selection_probabilities(mean_logprobs: list[float], temperature: float) -> list[float]:
    """softmax(mean_logprob / temperature) over siblings, computed stably."""
    scaled = [m / temperature for m in mean_logprobs]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class RoundStats:
    """Token accounting of the engine calls so far (for the progress bar and the benchmark)."""

    requests: int = 0
    context_tokens: int = 0
    cached_prefix_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    """Sampled steps with at least one token, each re-tokenised as training will (prompt + prefix + step)."""
    steps_retokenised_differently: int = 0
    """Steps whose text, re-tokenised in context, gives other ids than the sampled ones (a BPE tokenizer
    can sample "\\n" "\\n" where it would encode "\\n\\n"). Training uses its own ids, the log-probs of the
    recomputation then score those, not the sampled ones."""
    steps_merging_with_context: int = 0
    """Steps whose first token merges with the end of their context when re-tokenised: training cannot
    take them as a continuation, so ``sppd-megatron pairs`` drops every record built on one."""

    @property
    def computed_tokens(self) -> int:
        """Tokens the engine actually ran through the model: uncached context plus generated."""
        return self.context_tokens - self.cached_prefix_tokens + self.generated_tokens

    @property
    def cache_hit_rate(self) -> float:
        """Share of context tokens served by the engine's prefix cache (SGLang: ``cached_tokens``)."""
        return self.cached_prefix_tokens / self.context_tokens if self.context_tokens else 0.0

    def add(self, requests: list[GenerationRequest], generations: list[Generation]) -> None:
        self.requests += len(requests)
        self.context_tokens += sum(len(r.context_ids) for r in requests)
        self.cached_prefix_tokens += sum(g.cached_prefix_tokens for g in generations)
        self.generated_tokens += sum(len(g.token_ids) for g in generations)


class GrowingTree:
    """One question's tree while it is sampled (SPPD's selection; :class:`.mcts.MCTSTree` overrides it)."""

    def __init__(self, prompt: Prompt, prompt_text: str, prompt_ids: list[int], seed: int, cfg: SampleConfig):
        self.prompt = prompt
        self.prompt_text = prompt_text
        self.cfg = cfg
        self.question_seed = derive_seed(seed, prompt.id)
        self.rng = random.Random(self.question_seed)
        self.nodes = [TreeNode(node_id=0, parent=None, depth=0, text="", token_ids=list(prompt_ids))]
        self.children: dict[int, list[int]] = {0: []}
        self.generated = {0: 0}  # generated tokens from the root to each node
        self.iterations = 0
        self.expansions = 0

    # --- selection ----------------------------------------------------------------------------
    def _has_open_leaf(self, node_id: int) -> bool:
        kids = self.children[node_id]
        if not kids:
            return not self.nodes[node_id].terminal
        return any(self._has_open_leaf(k) for k in kids)

    def _select_leaf(self) -> int:
        node_id = 0
        while self.children[node_id]:
            kids = self.children[node_id]
            if self.cfg.skip_exhausted:
                kids = [k for k in kids if self._has_open_leaf(k)]
            probs = selection_probabilities([self.nodes[k].mean_logprob for k in kids],
                                            self.cfg.selection_temperature)
            node_id = self.rng.choices(kids, weights=probs)[0]
        return node_id

    def next_expansion(self) -> int | None:
        """Run iterations until one reaches an expandable leaf (returned) or the K are used up (None)."""
        while self.iterations < self.cfg.K and self._has_open_leaf(0):
            self.iterations += 1
            leaf = self._select_leaf()
            if not self.nodes[leaf].terminal:
                return leaf
        return None

    # --- expansion ----------------------------------------------------------------------------
    def context_ids(self, node_id: int) -> list[int]:
        ids = list(self.nodes[0].token_ids)
        for n in self._path(node_id):
            ids += n.token_ids
        return ids

    def _path(self, node_id: int) -> list[TreeNode]:
        out = []
        while node_id != 0:
            out.append(self.nodes[node_id])
            node_id = self.nodes[node_id].parent
        return out[::-1]

    def request_seed(self, leaf: int, child: int) -> int:
        return derive_seed(self.question_seed, leaf, child)

    def requests(self, leaf: int, temperature: float, top_p: float, stop: list[str]) -> list[GenerationRequest]:
        budget = min(self.cfg.max_step_tokens, self.cfg.max_total_tokens - self.generated[leaf])
        context = self.context_ids(leaf)
        return [
            GenerationRequest(context_ids=context, max_new_tokens=budget, temperature=temperature,
                              top_p=top_p, stop=list(stop), seed=self.request_seed(leaf, j),
                              affinity=self.prompt.id)
            for j in range(self.cfg.C)
        ]

    def add_children(self, leaf: int, generations: list[Generation], delimiter: StepDelimiter,
                     rules: TerminalRules, decode) -> None:
        parent = self.nodes[leaf]
        parent_state = "".join(n.text for n in self._path(leaf))
        self.expansions += 1
        for gen in generations:
            kept = delimiter.kept_token_count(gen.token_ids, decode)
            token_ids = list(gen.token_ids[:kept])
            logprobs = [float(x) for x in gen.token_logprobs[:kept]]
            text = gen.text if kept == len(gen.token_ids) else decode(token_ids)
            node_id = len(self.nodes)
            depth = parent.depth + 1
            self.generated[node_id] = self.generated[leaf] + len(token_ids)
            reason, answer = rules.classify(
                ended_with_eos=gen.finish_reason == "eos" and kept == len(gen.token_ids),
                state_text=parent_state + text, depth=depth, total_tokens=self.generated[node_id])
            self.nodes.append(TreeNode(
                node_id=node_id, parent=leaf, depth=depth, text=text, token_ids=token_ids,
                token_logprobs=logprobs, mean_logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
                terminal=reason is not None, finish_reason=reason, answer=answer))
            self.children[node_id] = []
            self.children[leaf].append(node_id)

    def needs_leaf_value(self, leaf: int) -> bool:
        """Whether :meth:`expanded` wants the value model's estimate of ``leaf`` (MCTS with lambda > 0)."""
        return False

    def expanded(self, leaf: int, leaf_value: float | None) -> None:
        """Called once ``leaf``'s children are added (MCTS evaluates and backs up here)."""

    def to_tree(self, template: PromptTemplate, policy: str, settings: dict) -> Tree:
        sampling = {**settings, "question_seed": self.question_seed, "iterations": self.iterations,
                    "expansions": self.expansions}
        tree = Tree(id=self.prompt.id, question=self.prompt.question, gold_answer=self.prompt.gold_answer,
                    source=self.prompt.source, template=template, prompt=self.prompt_text, policy=policy,
                    sampling=sampling, nodes=self.nodes)
        tree.validate()
        return tree


class TreeSampler:
    """Samples one tree per prompt with a RolloutEngine; knows nothing of files or training.

    ``cfg.algorithm`` picks SPPD's tree sampling or SVPO's MCTS (:mod:`.mcts`); both expand C children
    per engine request and write the same Tree records. ``value_prm`` (any ProcessRewardModel) gives
    MCTS's leaf estimate when ``mcts.value_weight`` > 0.
    """

    def __init__(self, engine: RolloutEngine, tokenizer, cfg: SampleConfig, template: PromptTemplate,
                 policy: str | None = None, value_prm=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.template = template
        self.policy = policy or cfg.policy or cfg.model
        self.delimiter = StepDelimiter.from_mode(cfg.step_delimiter, cfg.stop_string)
        self.rules = TerminalRules(max_depth=cfg.max_depth, max_total_tokens=cfg.max_total_tokens)
        self.stats = RoundStats()
        self.value_prm = value_prm
        if cfg.algorithm == "mcts" and cfg.mcts.value_weight > 0 and value_prm is None:
            raise ValueError("mcts.value_weight > 0 needs a value model (mcts.value_model)")

    def _grow(self, prompt: Prompt) -> GrowingTree:
        text, ids = render_prompt(self.template, self.tokenizer, prompt.question)
        if self.cfg.algorithm == "mcts":
            from sppd_megatron.sampling.mcts import MCTSTree

            return MCTSTree(prompt, text, ids, self.cfg.seed, self.cfg)
        return GrowingTree(prompt, text, ids, self.cfg.seed, self.cfg)

    def _leaf_values(self, batch: list[tuple[GrowingTree, int]]) -> list[float | None]:
        """The value model's estimate of each leaf that needs one (one batched call), else None."""
        from sppd_megatron.scoring.prm import StepQuery

        wanted = [i for i, (t, leaf) in enumerate(batch) if t.needs_leaf_value(leaf)]
        out: list[float | None] = [None] * len(batch)
        if not wanted:
            return out
        queries = []
        for i in wanted:
            t, leaf = batch[i]
            queries.append(StepQuery(t.prompt.question, tuple(n.text for n in t._path(leaf)),
                                     t.prompt.gold_answer, t.prompt_text))
        for i, values in zip(wanted, self.value_prm.score_batch(queries)):
            out[i] = values[-1]
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_retokenisation(self, tree: GrowingTree, leaf: int, first_new: int) -> None:
        """Count the new children of ``leaf`` whose tokens training would not reproduce (see RoundStats)."""
        context = tree.prompt_text + "".join(n.text for n in tree._path(leaf))
        for node in tree.nodes[first_new:]:
            if not node.token_ids:
                continue
            self.stats.steps += 1
            try:
                ids, context_len = encode_continuation(self.tokenizer, context, node.text)
            except BoundaryMergeError:
                self.stats.steps_merging_with_context += 1
                continue
            if ids[context_len:] != node.token_ids:
                self.stats.steps_retokenised_differently += 1

    def sample(self, prompts: list[Prompt], on_round=None) -> list[Tree]:
        """Trees for ``prompts`` (same order). ``on_round(stats)`` is called after each engine call."""
        # Engines that keep KV across calls start each batch empty: a batch's float arithmetic (and
        # so its trees, byte for byte) must not depend on which batches ran before it.
        reset = getattr(self.engine, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        trees = [self._grow(p) for p in prompts]
        while True:
            batch: list[tuple[GrowingTree, int]] = []
            for t in trees:
                leaf = t.next_expansion()
                if leaf is not None:
                    batch.append((t, leaf))
            if not batch:
                break
            requests = [r for t, leaf in batch
                        for r in t.requests(leaf, self.cfg.temperature, self.cfg.top_p, [self.delimiter.stop])]
            generations = self.engine.generate(requests)
            if len(generations) != len(requests):
                raise RuntimeError(f"engine {self.engine.name} returned {len(generations)} generations "
                                   f"for {len(requests)} requests")
            self.stats.add(requests, generations)
            C = self.cfg.C
            for i, (t, leaf) in enumerate(batch):
                first_new = len(t.nodes)
                t.add_children(leaf, generations[i * C:(i + 1) * C], self.delimiter, self.rules, self._decode)
                self._check_retokenisation(t, leaf, first_new)
            for (t, leaf), value in zip(batch, self._leaf_values(batch)):
                t.expanded(leaf, value)
            if on_round is not None:
                on_round(self.stats)
        settings = self.cfg.sampling_settings()
        return [t.to_tree(self.template, self.policy, settings) for t in trees]

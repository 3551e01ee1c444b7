from __future__ import annotations

import math

import pytest

from sppd_megatron.records import Prompt, Tree, read_jsonl, write_jsonl
from sppd_megatron.sampling.engines.base import Generation
from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine
from sppd_megatron.sampling.logprobs import fill_trainer_logprobs
from sppd_megatron.sampling.prompts import load_prompts
from sppd_megatron.sampling.tree_sampler import TreeSampler, selection_probabilities

from .helpers import ScriptedEngine, small_config


class RecordingEngine:
    """Wraps an engine and keeps every (request, generation) pair in call order."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def generate(self, requests):
        gens = self.inner.generate(requests)
        self.seen.append(list(zip(requests, gens)))
        return gens

    def close(self):
        pass


def assert_tree_invariants(tree: Tree, K: int, C: int) -> None:
    nodes = tree.nodes
    iterations, expansions = tree.sampling["iterations"], tree.sampling["expansions"]
    # Counts: K iterations (fewer only when no open leaf is left), C children per expansion.
    assert expansions <= iterations <= K
    assert len(nodes) == 1 + C * expansions
    open_leaves = [n for n in tree.leaves() if not n.terminal]
    assert iterations == K or not open_leaves
    for n in nodes:
        kids = tree.children(n.node_id)
        assert len(kids) in (0, C)
        assert not (n.terminal and kids)
        if n.node_id:
            assert n.finish_reason is not None if n.terminal else n.finish_reason is None
            assert len(n.token_logprobs) == len(n.token_ids) >= 1
            assert math.isclose(n.mean_logprob, sum(n.token_logprobs) / len(n.token_ids), abs_tol=1e-9)
            assert n.depth <= tree.sampling["max_depth"]
    # Every collected trajectory runs from the root's child to a terminal node, non-terminal in between.
    trajectories = tree.trajectories()
    assert len(trajectories) == sum(n.terminal for n in tree.leaves())
    for traj in trajectories:
        assert traj[0].parent == 0 and traj[-1].terminal
        assert all(not n.terminal for n in traj[:-1])
        assert all(b.parent == a.node_id and b.depth == a.depth + 1 for a, b in zip(traj, traj[1:]))
        assert sum(len(n.token_ids) for n in traj) <= tree.sampling["max_total_tokens"]


def context_of(tree: Tree, node_id: int) -> list[int]:
    return tree.nodes[0].token_ids + [t for n in tree.path(node_id) for t in n.token_ids]


@pytest.fixture
def prompts(prompts_file):
    return load_prompts(prompts_file)


def test_selection_probabilities():
    p = selection_probabilities([-1.0, -2.0], 1.0)
    assert math.isclose(p[0], 1 / (1 + math.exp(-1.0)))
    assert selection_probabilities([-1.0, -2.0], 1e-3)[0] > 0.999  # low temperature: greedy on mean log-prob
    assert math.isclose(sum(selection_probabilities([-500.0, -1.0, 0.0], 0.5)), 1.0)


@pytest.mark.parametrize("skip_exhausted", [False, True])
def test_scripted_trees_keep_invariants_and_k_c_counts(tokenizer, template, prompts, skip_exhausted):
    cfg = small_config(K=12, C=3, max_depth=5, max_step_tokens=30, max_total_tokens=80, skip_exhausted=skip_exhausted)
    engine = ScriptedEngine(tokenizer)
    trees = TreeSampler(engine, tokenizer, cfg, template).sample(prompts)
    assert [t.id for t in trees] == [p.id for p in prompts]
    for tree in trees:
        assert_tree_invariants(tree, K=12, C=3)
        assert {n.finish_reason for n in tree.nodes if n.terminal} <= {"eos", "answer", "max_depth", "max_tokens"}
    reasons = {n.finish_reason for t in trees for n in t.nodes if n.terminal}
    assert "answer" in reasons and "eos" in reasons
    assert any(n.answer == "7" for t in trees for n in t.nodes if n.finish_reason == "answer")
    # One engine call per round, carrying every question's expansion (C requests each).
    assert len(engine.calls[0]) == 3 * len(prompts)
    assert all(len(call) % 3 == 0 for call in engine.calls)


def test_trees_do_not_depend_on_batch_composition(tokenizer, template, prompts):
    cfg = small_config(K=10, max_step_tokens=30, max_total_tokens=80)
    together = TreeSampler(ScriptedEngine(tokenizer), tokenizer, cfg, template).sample(prompts)
    alone = [TreeSampler(ScriptedEngine(tokenizer), tokenizer, cfg, template).sample([p])[0] for p in prompts]
    reordered = TreeSampler(ScriptedEngine(tokenizer), tokenizer, cfg, template).sample(prompts[::-1])[::-1]
    as_dicts = lambda ts: [t.to_dict() for t in ts]  # noqa: E731
    assert as_dicts(together) == as_dicts(alone) == as_dicts(reordered)
    other_seed = TreeSampler(ScriptedEngine(tokenizer), tokenizer, small_config(K=10, max_step_tokens=30,
                             max_total_tokens=80, seed=8), template).sample(prompts)
    assert as_dicts(other_seed) != as_dicts(together)


def test_tiny_model_trees(tokenizer, tiny_model, template, prompts, tmp_path):
    """Real model: invariants, siblings continue their parent's exact tokens, log-probs match teacher forcing."""
    cfg = small_config()
    engine = RecordingEngine(TransformersEngine(tiny_model, tokenizer))
    trees = TreeSampler(engine, tokenizer, cfg, template).sample(prompts)
    for tree in trees:
        assert_tree_invariants(tree, K=cfg.K, C=cfg.C)
        assert tree.prompt.endswith("<|assistant|>\n") and tokenizer.decode(tree.nodes[0].token_ids) == tree.prompt
        assert tree.template.chat_template == tokenizer.chat_template
        assert tree.trajectories(), "the tiny model's trees end at EOS / max_depth / max_tokens"

    # Each node was generated from exactly its parent's token context, shared by all C siblings.
    for tree in trees:
        pairs = [(r, g) for call in engine.seen for r, g in call
                 if r.context_ids[:len(tree.nodes[0].token_ids)] == tree.nodes[0].token_ids]
        assert len(pairs) == len(tree.nodes) - 1
        for node, (req, gen) in zip(tree.nodes[1:], pairs):
            assert req.context_ids == context_of(tree, node.parent)
            assert gen.token_ids[:len(node.token_ids)] == node.token_ids
        for n in tree.nodes:
            kids = tree.children(n.node_id)
            contexts = {tuple(pairs[k.node_id - 1][0].context_ids) for k in kids}
            assert len(contexts) <= 1

    # Stored (engine) log-probs equal a teacher-forced recomputation by the same model to 1e-4.
    worst = 0.0
    for tree in trees:
        fill_trainer_logprobs(tiny_model, tree)
        for traj in tree.trajectories():
            for n in traj:
                worst = max(worst, max(abs(a - b) for a, b in zip(n.token_logprobs, n.trainer_logprobs)))
    assert worst < 1e-4

    # JSONL round trip: one tree per line, schema version, same objects back.
    path = tmp_path / "trees.jsonl"
    write_jsonl(path, trees)
    lines = path.read_text().splitlines()
    assert len(lines) == len(trees) and all('"schema_version": 1' in line for line in lines)
    assert [t.to_dict() for t in read_jsonl(path, Tree)] == [t.to_dict() for t in trees]


def test_tiny_model_is_deterministic_under_seed(tokenizer, tiny_model, template, prompts):
    cfg = small_config(K=4)
    prompt = [Prompt(id="q", question="1+1?", gold_answer="2")]
    run = lambda: TreeSampler(TransformersEngine(tiny_model, tokenizer), tokenizer, cfg, template).sample(prompt)  # noqa: E731
    assert run()[0].to_dict() == run()[0].to_dict()


def test_step_prefix_delimiter_keeps_the_newline(tokenizer, template, prompts):
    """'Step k:' convention: the engine stops at '\\nStep ', the node keeps text up to the newline."""

    class StepEngine(ScriptedEngine):
        def _one(self, req):
            text = "Step 1: add.\nStep "
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: req.max_new_tokens]
            return Generation(token_ids=ids, token_logprobs=[-0.5] * len(ids), text=tokenizer.decode(ids),
                              finish_reason="stop")

    cfg = small_config(K=3, C=2, step_delimiter="step_prefix", max_step_tokens=40, max_total_tokens=200)
    engine = StepEngine(tokenizer)
    [tree] = TreeSampler(engine, tokenizer, cfg, template).sample(prompts[:1])
    assert engine.calls[0][0].stop == ["\nStep "]
    steps = tree.nodes[1:]
    assert steps and all(n.text == "Step 1: add.\n" for n in steps)
    assert all(tokenizer.decode(n.token_ids) == n.text for n in steps)
    assert_tree_invariants(tree, K=3, C=2)

from __future__ import annotations

import importlib.util
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from sppd_megatron.sampling.config import EngineConfig
from sppd_megatron.sampling.engines import RolloutEngine, build_engine
from sppd_megatron.sampling.engines.base import GenerationRequest
from sppd_megatron.sampling.engines import sglang_engine
from sppd_megatron.sampling.engines.sglang_engine import SGLangEngine, generation_from_sglang, sglang_sampling_params
from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine, _sample_rows
from sppd_megatron.sampling.engines.vllm_engine import (
    VLLMEngine,
    VLLMGenerator,
    generation_from_vllm,
    vllm_sampling_params,
)
from sppd_megatron.sampling.logprobs import teacher_forced_logprobs

from .fake_engines import FakeSGLangEngineOldName, fake_sglang, fake_vllm_generator


def _requests(tokenizer, **kw):
    contexts = ["Question: 2+3?\nAnswer:", "Hi", "A much longer question about apples and pears?\n"]
    return [GenerationRequest(context_ids=tokenizer(c, add_special_tokens=False)["input_ids"], seed=10 * i + j,
                              **{"max_new_tokens": 12, **kw})
            for i, c in enumerate(contexts) for j in range(3)]


def test_transformers_engine_matches_teacher_forcing_with_and_without_prefix_reuse(tokenizer, tiny_model):
    reqs = _requests(tokenizer, stop=["\n"])
    shared = TransformersEngine(tiny_model, tokenizer).generate(reqs)
    separate = TransformersEngine(tiny_model, tokenizer, reuse_prefix=False).generate(reqs)
    assert isinstance(TransformersEngine(tiny_model, tokenizer), RolloutEngine)
    for req, a, b in zip(reqs, shared, separate):
        assert a.token_ids == b.token_ids
        assert 1 <= len(a.token_ids) <= req.max_new_tokens
        ref = teacher_forced_logprobs(tiny_model, req.context_ids, a.token_ids)
        assert max(abs(x - y) for x, y in zip(ref, a.token_logprobs)) < 1e-4
        assert a.finish_reason in ("stop", "eos", "length")
        if a.finish_reason == "stop":
            assert "\n" in a.text
        if a.finish_reason == "eos":
            assert a.token_ids[-1] == tokenizer.eos_token_id
    # Each context was prefilled once: the 2nd and 3rd branch of each group reused it.
    branch = [0, 1, 2] * 3
    assert [g.cached_prefix_tokens for g in shared] == [
        0 if j == 0 else len(r.context_ids) - 1 for r, j in zip(reqs, branch)]
    assert all(g.cached_prefix_tokens == 0 for g in separate)


def test_transformers_engine_seeds_and_greedy(tokenizer, tiny_model):
    engine = TransformersEngine(tiny_model, tokenizer)
    reqs = _requests(tokenizer)
    full = engine.generate(reqs)
    alone = engine.generate([reqs[4]])[0]
    assert alone.token_ids == full[4].token_ids  # a request's tokens depend on its seed, not the batch
    assert full[3].token_ids != full[4].token_ids
    greedy = engine.generate([GenerationRequest(reqs[0].context_ids, 6, temperature=0.0, seed=s) for s in (1, 2)])
    assert greedy[0].token_ids == greedy[1].token_ids
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([reqs[0].context_ids])).logits[0, -1]
    assert greedy[0].token_ids[0] == int(logits.argmax())
    assert engine.generate([]) == []


def test_inverse_cdf_sampling_respects_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    u = torch.tensor([0.0, 0.99, 0.7])
    out = _sample_rows(logits, torch.ones(3), torch.tensor([1.0, 0.75, 0.75]), u)
    # top_p 0.75 keeps {0.5, 0.3}: u=0.99 lands on token 1, never 2 or 3.
    assert out.tolist() == [0, 1, 1]


def test_sglang_translation():
    req = GenerationRequest([1, 2, 3], max_new_tokens=5, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=11)
    params = sglang_sampling_params(req, seeded=True)
    assert params == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "no_stop_trim": True,
                      "skip_special_tokens": True, "sampling_seed": 11}
    # SGLang ignores the seed without deterministic inference: then it is not sent.
    assert "sampling_seed" not in sglang_sampling_params(req, seeded=False)
    # Our seeds are 63-bit; SGLang keeps seeds in an int32 tensor.
    big = GenerationRequest([1], 5, seed=2**62 + 2**31 + 5)
    assert sglang_sampling_params(big, seeded=True)["sampling_seed"] == 5
    out = {"text": "ab\n\n", "output_ids": [5, 6, 7],
           "meta_info": {"output_token_logprobs": [(-0.1, 5, "a"), (-0.2, 6, "b"), (-0.3, 7, "\n\n")],
                         "finish_reason": {"type": "stop", "matched": "\n\n"}, "cached_tokens": 3}}
    g = generation_from_sglang(out)
    assert (g.token_ids, g.token_logprobs, g.text, g.finish_reason, g.cached_prefix_tokens) == (
        [5, 6, 7], [-0.1, -0.2, -0.3], "ab\n\n", "stop", 3)
    out["meta_info"]["finish_reason"] = {"type": "stop", "matched": 2}
    assert generation_from_sglang(out).finish_reason == "eos"
    out["meta_info"]["finish_reason"] = {"type": "length", "length": 5}
    assert generation_from_sglang(out).finish_reason == "length"
    out["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(RuntimeError, match="abort"):
        generation_from_sglang(out)


@pytest.fixture
def sglang_module(monkeypatch):
    """``sglang`` replaced by the fake; SGLangEngine's environment variable restored afterwards."""
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    module = fake_sglang()
    monkeypatch.setattr(sglang_engine, "_import_sglang", lambda: module)
    return module


def _sample_with(engine, tokenizer, template, n_questions=8, **cfg):
    from sppd_megatron.records import Prompt
    from sppd_megatron.sampling.tree_sampler import TreeSampler

    from .helpers import small_config

    prompts = [Prompt(id=f"q{i}", question=f"What is {i}+{i}?", gold_answer=str(2 * i)) for i in range(n_questions)]
    sampler = TreeSampler(engine, tokenizer, small_config(questions_per_round=n_questions, **cfg), template)
    return sampler, sampler.sample(prompts)


def test_sglang_sends_every_request_of_a_question_to_one_replica(sglang_module, tokenizer, template, monkeypatch):
    cfg = EngineConfig(name="sglang", dp_size=4)
    engine = build_engine(cfg, "/models/policy", tokenizer, tokenizer_path="builtin:char")
    fake = sglang_module.built[0]
    assert fake.server_args["dp_size"] == 4 and fake.server_args["enable_deterministic_inference"] is True
    sampler, trees = _sample_with(engine, tokenizer, template)

    def by_question(routed):
        out: dict[str, list[tuple[int, list[int], int]]] = {}
        for replica, ids, cached in routed:
            question = next(t.id for t in trees if ids[:len(t.nodes[0].token_ids)] == t.nodes[0].token_ids)
            out.setdefault(question, []).append((replica, ids, cached))
        return out

    routed = by_question(fake.routed)
    assert sorted(routed) == [t.id for t in trees]
    assert all(len({replica for replica, _, _ in reqs}) == 1 for reqs in routed.values())
    # Replicas are dealt out in order of first appearance: 8 questions, 2 on each of the 4.
    assert sorted(reqs[0][0] for reqs in routed.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # So after a question's first request, its replica's radix cache holds every context but the last token.
    assert all(cached == len(ids) - 1 for reqs in routed.values() for _, ids, cached in reqs[1:])
    # The sampling stats report the radix cache's hits (meta_info cached_tokens) as a rate.
    stats = sampler.stats
    assert stats.context_tokens == sum(len(ids) for _, ids, _ in fake.routed)
    assert stats.cached_prefix_tokens == sum(cached for _, _, cached in fake.routed)
    assert stats.cache_hit_rate == stats.cached_prefix_tokens / stats.context_tokens
    engine.close()
    assert fake.shut_down

    # SGLang's own round-robin (no routing) scatters a question's rounds over the replicas: the same
    # trees, and more than twice the context tokens computed again.
    scattered = build_engine(cfg, "/models/policy", tokenizer, tokenizer_path="builtin:char")
    monkeypatch.setattr(scattered._engine, "_replica", lambda affinity: None)  # the server engine inside the retries
    baseline, baseline_trees = _sample_with(scattered, tokenizer, template)
    assert [t.nodes for t in baseline_trees] == [t.nodes for t in trees]
    assert any(cached < len(ids) - 1 for reqs in by_question(sglang_module.built[1].routed).values()
               for _, ids, cached in reqs[1:])
    missed = stats.context_tokens - stats.cached_prefix_tokens
    assert baseline.stats.context_tokens - baseline.stats.cached_prefix_tokens > 2 * missed


def test_sglang_routing_with_the_older_argument_name(monkeypatch, tokenizer):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    module = fake_sglang(FakeSGLangEngineOldName)
    monkeypatch.setattr(sglang_engine, "_import_sglang", lambda: module)
    engine = SGLangEngine("/models/policy", "builtin:char", dp_size=2)
    reqs = [GenerationRequest([5, 6, 7, 10 + i], 4, seed=i, affinity=f"q{i % 3}") for i in range(6)]
    gens = engine.generate(reqs)
    assert len(gens) == 6 and all(g.token_ids for g in gens)
    # q0 -> replica 0, q1 -> 1, q2 -> 0 (first come, round-robin).
    replica_of = {ids[-1] - 10: replica for replica, ids, _ in module.built[0].routed}
    assert [replica_of[i] for i in range(6)] == [0, 1, 0, 0, 1, 0]
    # Results come back in request order: a request alone gets what it got in the batch (same seed).
    assert engine.generate([reqs[4]])[0].token_ids == gens[4].token_ids


def test_sglang_seeds_take_effect_only_with_deterministic_inference(sglang_module, tokenizer, template):
    def trees(deterministic: bool):
        cfg = EngineConfig(name="sglang", dp_size=2, deterministic=deterministic)
        engine = build_engine(cfg, "/models/policy", tokenizer, tokenizer_path="builtin:char")
        _, out = _sample_with(engine, tokenizer, template, n_questions=4)
        engine.close()
        return [[n.token_ids for n in t.nodes] for t in out]

    assert trees(True) == trees(True)
    assert trees(False) != trees(False)
    seeded, _, unseeded, _ = sglang_module.built
    assert "enable_deterministic_inference" not in unseeded.server_args
    with pytest.raises(ValueError, match="enable_deterministic_inference comes from engine.deterministic"):
        EngineConfig(name="sglang", extra={"enable_deterministic_inference": True})


def test_vllm_translation():
    req = GenerationRequest([1, 2, 3], max_new_tokens=5, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=11)
    params = vllm_sampling_params(req, lambda **kw: kw)
    assert params == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "stop": ["\n\n"],
                      "include_stop_str_in_output": True, "seed": 11, "logprobs": 0, "skip_special_tokens": True}
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731
    completion = SimpleNamespace(token_ids=[5, 2], logprobs=[{5: lp(-0.5), 9: lp(-1.0)}, {2: lp(-0.25)}],
                                 text="a", finish_reason="stop", stop_reason=None)
    output = SimpleNamespace(outputs=[completion], num_cached_tokens=2)
    g = generation_from_vllm(output)
    assert (g.token_ids, g.token_logprobs, g.finish_reason, g.cached_prefix_tokens) == ([5, 2], [-0.5, -0.25], "eos", 2)
    completion.stop_reason = "\n\n"
    assert generation_from_vllm(output).finish_reason == "stop"
    completion.logprobs = None
    with pytest.raises(RuntimeError, match="logprobs"):
        generation_from_vllm(output)

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            assert prompts == [{"prompt_token_ids": [1, 2, 3]}] and sampling_params == [params]
            completion.logprobs = [{5: lp(-0.5)}, {2: lp(-0.25)}]
            return [output]

    generator = VLLMGenerator(FakeLLM(), lambda **kw: kw, lambda **kw: kw)
    assert generator.generate([req])[0].token_ids == [5, 2]


def test_vllm_runs_in_a_child_process_that_close_ends():
    reqs = [GenerationRequest([5, 6, 7], 4, seed=s) for s in (1, 2, 1)]
    engine = VLLMEngine("/models/policy", backend=fake_vllm_generator)
    child = engine.process
    gens = engine.generate(reqs)
    assert gens[0].token_ids == gens[2].token_ids != gens[1].token_ids
    assert [g.cached_prefix_tokens for g in gens] == [0, 3, 3]
    engine.close()
    # The child has exited (that is what returns vLLM's GPU memory), cleanly, and close() can be repeated.
    assert not child.is_alive() and child.exitcode == 0
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(reqs)
    # The next engine starts in the same process, as run's next stage does.
    again = VLLMEngine("/models/next", backend=fake_vllm_generator)
    assert again.generate(reqs[:1])[0].token_ids == gens[0].token_ids
    again.close()


def test_vllm_child_failures_raise_instead_of_hanging():
    with pytest.raises(RuntimeError, match="not a valid model identifier"):
        VLLMEngine("missing", backend=fake_vllm_generator)
    engine = VLLMEngine("/models/policy", backend=fake_vllm_generator)
    child = engine.process
    os.kill(child.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
    with pytest.raises(RuntimeError, match="died"):
        engine.generate([GenerationRequest([5], 2, seed=1)])
    assert not child.is_alive() and engine.process is None


def _absent(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is not None,
                              reason=f"{package} is installed here; this checks the error when it is missing")


@pytest.mark.parametrize("name,package", [pytest.param("sglang", "sglang", marks=_absent("sglang")),
                                          pytest.param("vllm", "vllm", marks=_absent("vllm"))])
def test_gpu_engines_fail_clearly_without_their_package(tokenizer, name, package):
    with pytest.raises(RuntimeError, match=f"engine '{name}' needs"):
        build_engine(EngineConfig(name=name), "/some/hf/dir", tokenizer)
    with pytest.raises(ValueError, match="needs a model directory"):
        build_engine(EngineConfig(name=name), "tiny:llama", tokenizer)


def test_prefix_cache_reuses_earlier_calls_without_changing_results(tokenizer, tiny_model):
    cached_engine = TransformersEngine(tiny_model, tokenizer)
    fresh_engine = TransformersEngine(tiny_model, tokenizer, reuse_prefix=False)
    first = _requests(tokenizer, max_new_tokens=6)[:2]
    gens = cached_engine.generate(first)
    # Round 2 continues round 1's outputs, as a tree expansion does.
    second = [GenerationRequest(r.context_ids + g.token_ids, max_new_tokens=6, seed=100 + j)
              for j, (r, g) in enumerate(zip(first, gens))]
    again = cached_engine.generate(second)
    reference = fresh_engine.generate(second)
    for req, a, b in zip(second, again, reference):
        assert a.cached_prefix_tokens == len(req.context_ids) - 1  # the whole context came from the cache
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-5
    cached_engine.reset_prefix_cache()
    assert cached_engine.generate(second[:1])[0].cached_prefix_tokens == 0


def test_prefix_kv_cache_trie():
    from sppd_megatron.sampling.engines.prefix_cache import PrefixKVCache

    def kv(values):  # one layer, one head, head_dim 1: the "KV" of a position is its token id
        t = torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1)
        return [(t, -t)]

    cache = PrefixKVCache(max_tokens=8)
    hit, root = cache.lookup([1, 2, 3])
    assert hit == 0 and cache.kv(root) is None
    node = cache.insert(root, [1, 2, 3], kv([1, 2, 3]))
    cache.insert(node, [4, 5], kv([4, 5]))
    cache.insert(cache.lookup([1, 2])[1], [9], kv([9]))  # a branch after the shared prefix [1, 2]
    hit, node = cache.lookup([1, 2, 3, 4, 7])
    assert hit == 4 and cache.kv(node)[0][0].flatten().tolist() == [1, 2, 3, 4]
    hit, node = cache.lookup([1, 2, 9, 9])
    assert hit == 3 and cache.kv(node)[0][1].flatten().tolist() == [-1, -2, -9]
    assert cache.stored_tokens == 6
    cache.insert(node, [5, 6, 7], kv([5, 6, 7]))  # 9 > 8 positions: the cache starts over
    assert cache.stored_tokens == 0 and cache.lookup([1])[0] == 0

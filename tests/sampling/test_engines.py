from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from sppd_megatron.sampling.config import EngineConfig
from sppd_megatron.sampling.engines import RolloutEngine, build_engine
from sppd_megatron.sampling.engines.base import GenerationRequest
from sppd_megatron.sampling.engines.sglang_engine import SGLangEngine, generation_from_sglang, sglang_sampling_params
from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine, _sample_rows
from sppd_megatron.sampling.engines.vllm_engine import VLLMEngine, generation_from_vllm, vllm_sampling_params
from sppd_megatron.sampling.logprobs import teacher_forced_logprobs


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
    params = sglang_sampling_params(req)
    assert params == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "no_stop_trim": True,
                      "skip_special_tokens": True, "sampling_seed": 11}
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

    class FakeEngine:
        def generate(self, input_ids, sampling_params, return_logprob):
            assert return_logprob and input_ids == [[1, 2, 3]] and sampling_params == [params]
            out["meta_info"]["finish_reason"] = {"type": "length"}
            return [out]

    assert SGLangEngine("m", engine=FakeEngine()).generate([req])[0].finish_reason == "length"


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

    engine = VLLMEngine("m", llm=FakeLLM(), sampling_params_cls=lambda **kw: kw, tokens_prompt_cls=lambda **kw: kw)
    assert engine.generate([req])[0].token_ids == [5, 2]


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

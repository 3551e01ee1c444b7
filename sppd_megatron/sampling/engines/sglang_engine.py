"""SGLang rollouts for GPU clusters: ``sglang.Engine`` with its radix cache sharing every common prefix.

SGLang cannot run on the CPU machine this project is tested on (docs/platform-notes.md): only the
request/response translation below is unit-tested, with fakes. The radix cache keeps prefixes
across calls too, so a question's prompt and upper steps are computed about once per tree.
Data parallelism is SGLang's own (``dp_size`` replicas behind one Engine, each ``tp_size`` GPUs).
"""

from __future__ import annotations

import os
from typing import Any

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest


def _import_sglang():
    try:
        import sglang
    except Exception as exc:  # a broken CUDA stack raises more than ImportError
        raise RuntimeError(
            "engine 'sglang' needs the sglang package on a CUDA machine (pip install 'sppd-megatron[gpu]'); "
            f"importing it failed: {exc}. On CPU use engine.name=transformers."
        ) from exc
    return sglang


def sglang_sampling_params(req: GenerationRequest) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one request (the stop string stays in the text, as ours does)."""
    params: dict[str, Any] = {
        "max_new_tokens": req.max_new_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": list(req.stop),
        "no_stop_trim": True,
        "skip_special_tokens": True,
    }
    if req.seed is not None:
        params["sampling_seed"] = req.seed
    return params


def generation_from_sglang(output: dict[str, Any]) -> Generation:
    """One ``Engine.generate`` result -> Generation.

    ``meta_info.output_token_logprobs`` holds ``(logprob, token_id, text)`` triples; token ids are
    taken from them so ids and log-probs always line up. ``finish_reason.matched`` is the EOS id
    (an int) or the stop string that ended the request.
    """
    meta = output["meta_info"]
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise RuntimeError("SGLang returned no output_token_logprobs (was return_logprob=True passed?)")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind == "length":
        reason = "length"
    elif kind == "stop":
        reason = "eos" if isinstance(finish.get("matched"), int) else "stop"
    else:
        raise RuntimeError(f"SGLang request did not finish normally: {finish!r}")
    return Generation(
        token_ids=[int(t[1]) for t in triples],
        token_logprobs=[float(t[0]) for t in triples],
        text=output["text"],
        finish_reason=reason,
        cached_prefix_tokens=int(meta.get("cached_tokens", 0) or 0),
    )


class SGLangEngine:
    """RolloutEngine over ``sglang.Engine`` (offline, in-process; one call per round)."""

    name = "sglang"

    def __init__(self, model_path: str, tokenizer_path: str | None = None, tp_size: int = 1, dp_size: int = 1,
                 mem_fraction: float = 0.85, extra: dict[str, Any] | None = None, engine: Any = None):
        self._kwargs = dict(model_path=model_path, tokenizer_path=tokenizer_path or model_path, tp_size=tp_size,
                            dp_size=dp_size, mem_fraction_static=mem_fraction, **(extra or {}))
        if engine is None:
            sglang = _import_sglang()
            # SGLang returns temperature-scaled log-probs unless asked for the model's own (temperature 1),
            # which are the ones the trainer's recomputation must match.
            os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
            engine = sglang.Engine(**self._kwargs)
        self._engine = engine

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        outputs = self._engine.generate(
            input_ids=[list(r.context_ids) for r in requests],
            sampling_params=[sglang_sampling_params(r) for r in requests],
            return_logprob=True,
        )
        return [generation_from_sglang(o) for o in outputs]

    def update_weights_from_hf(self, hf_dir: str) -> None:
        self._engine.update_weights_from_disk(hf_dir)

    def close(self) -> None:
        self._engine.shutdown()

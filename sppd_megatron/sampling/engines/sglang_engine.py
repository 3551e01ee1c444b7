"""SGLang rollouts for GPU clusters: ``sglang.Engine`` with its radix cache sharing every common prefix.

SGLang cannot run on the CPU machine this project is tested on (docs/platform-notes.md): the code below is
tested against a fake written from SGLang's sources (``Engine.async_generate``, the data-parallel
controller's routing, ``meta_info``), not against SGLang itself.

Prefix reuse across replicas: with ``dp_size`` replicas behind one Engine, SGLang's data-parallel
controller deals requests out round-robin, so the next round of a tree would mostly land on replicas
that never saw its prompt. Requests carry an ``affinity`` (their question); every request of one
question is sent to one replica with ``data_parallel_rank``, so that replica's radix cache holds the
question's prompt and upper steps for all of its rounds. Replicas are given to questions in order of
first appearance, round-robin, which balances a round of new questions exactly.

Reproducibility: SGLang uses ``sampling_seed`` only with ``enable_deterministic_inference``
(``EngineConfig.deterministic``, on by default); without it the seed is not sent and trees differ
from run to run.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest

# Questions whose replica is remembered; the oldest are forgotten first (they finished long ago).
MAX_REMEMBERED_AFFINITIES = 65536


def _import_sglang():
    try:
        import sglang
    except Exception as exc:  # a broken CUDA stack raises more than ImportError
        raise RuntimeError(
            "engine 'sglang' needs the sglang package on a CUDA machine (pip install 'sppd-megatron[gpu]'); "
            f"importing it failed: {exc}. On CPU use engine.name=transformers."
        ) from exc
    return sglang


def sglang_sampling_params(req: GenerationRequest, seeded: bool) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one request (the stop string stays in the text, as ours does).

    ``seeded``: send the request's seed, which SGLang only uses under deterministic inference. It
    goes into an int32 tensor there (``SamplingBatchInfo``), so our 63-bit seeds are cut to 31 bits.
    """
    params: dict[str, Any] = {
        "max_new_tokens": req.max_new_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": list(req.stop),
        "no_stop_trim": True,
        "skip_special_tokens": True,
    }
    if seeded and req.seed is not None:
        params["sampling_seed"] = req.seed & 0x7FFFFFFF
    return params


def generation_from_sglang(output: dict[str, Any]) -> Generation:
    """One ``Engine.generate`` result -> Generation.

    ``meta_info.output_token_logprobs`` holds ``(logprob, token_id, text)`` triples; token ids are
    taken from them so ids and log-probs always line up. ``finish_reason.matched`` is the EOS id
    (an int) or the stop string that ended the request. ``cached_tokens`` counts the prompt tokens
    the radix cache served.
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


def _dp_rank_keyword(engine: Any) -> str:
    """The routing argument of this SGLang's ``Engine.async_generate``.

    Releases up to 0.5.x call it ``data_parallel_rank``; later ones ``routed_dp_rank`` and keep the old
    name as a deprecated alias.
    """
    params = inspect.signature(engine.async_generate).parameters
    for name in ("routed_dp_rank", "data_parallel_rank"):
        if name in params:
            return name
    raise RuntimeError("this SGLang's Engine.async_generate takes no data_parallel_rank, so dp_size > 1 would "
                       "scatter each question over the replicas; upgrade sglang or use engine.dp_size=1")


class SGLangEngine:
    """RolloutEngine over ``sglang.Engine`` (offline, in-process; one call per round)."""

    name = "sglang"

    def __init__(self, model_path: str, tokenizer_path: str | None = None, tp_size: int = 1, dp_size: int = 1,
                 mem_fraction: float = 0.85, dtype: str = "auto", deterministic: bool = True,
                 extra: dict[str, Any] | None = None, request_timeout_s: float | None = None):
        sglang = _import_sglang()
        kwargs = dict(model_path=model_path, tokenizer_path=tokenizer_path or model_path, tp_size=tp_size,
                      dp_size=dp_size, mem_fraction_static=mem_fraction, dtype=dtype, **(extra or {}))
        if deterministic:  # only then: releases without deterministic inference reject the argument
            kwargs["enable_deterministic_inference"] = True
        # SGLang returns temperature-scaled log-probs unless asked for the model's own (temperature 1),
        # which are the ones the trainer's recomputation must match.
        os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        self._engine = sglang.Engine(**kwargs)
        self.dp_size = dp_size
        self.deterministic = deterministic
        self.request_timeout_s = request_timeout_s
        self._rank_keyword = _dp_rank_keyword(self._engine) if dp_size > 1 else None
        self._replica_of: dict[str, int] = {}
        self._next_replica = 0

    def _replica(self, affinity: str | None) -> int | None:
        """The replica of ``affinity``'s question (None: let SGLang place the request)."""
        if self._rank_keyword is None or affinity is None:
            return None
        rank = self._replica_of.get(affinity)
        if rank is None:
            rank = self._replica_of[affinity] = self._next_replica
            self._next_replica = (self._next_replica + 1) % self.dp_size
            if len(self._replica_of) > MAX_REMEMBERED_AFFINITIES:
                del self._replica_of[next(iter(self._replica_of))]
        return rank

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        batches: dict[int | None, list[int]] = {}
        for i, r in enumerate(requests):
            batches.setdefault(self._replica(r.affinity), []).append(i)

        async def dispatch():
            # One batch per replica, all in flight together (Engine.generate would serve them one after another).
            return await asyncio.gather(*(
                self._engine.async_generate(
                    input_ids=[list(requests[i].context_ids) for i in indices],
                    sampling_params=[sglang_sampling_params(requests[i], self.deterministic) for i in indices],
                    return_logprob=True,
                    **({} if rank is None else {self._rank_keyword: rank}),
                )
                for rank, indices in batches.items()
            ))

        async def dispatch_in_time():
            # A hung scheduler never answers; cancelling the calls aborts their requests in SGLang.
            try:
                return await asyncio.wait_for(dispatch(), self.request_timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"SGLang did not answer within engine.request_timeout_s="
                                   f"{self.request_timeout_s:g} s") from None

        results: list[Generation | None] = [None] * len(requests)
        for indices, outputs in zip(batches.values(), self._engine.loop.run_until_complete(dispatch_in_time())):
            for i, output in zip(indices, outputs):
                results[i] = generation_from_sglang(output)
        return results

    def update_weights_from_hf(self, hf_dir: str) -> None:
        self._engine.update_weights_from_disk(hf_dir)

    def close(self) -> None:
        self._engine.shutdown()

"""Rollout servers that die, hang or answer garbage: each call retried with backoff, then one line.

SGLang and vLLM run as servers of their own (scheduler processes, a child process) that can die
under a job (a GPU fault, the OOM killer), stop answering, or answer something that is not a
generation. :class:`RetryingEngine` wraps them: every answer is checked
(:func:`generation_problem`), a failed, timed-out (``engine.request_timeout_s``, enforced by the
engine itself) or garbage answer discards the engine, waits ``engine.retry_backoff_s`` (doubling)
and asks a freshly built one the same requests, up to ``engine.max_retries`` times; then
:class:`EngineFailed` ends the command with one line. Requests carry their own seeds, so a retried
call answers what the first would have, and nothing of a failed call has been written: the
resumed run continues from the last finished group.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

from sppd_megatron.config import RunStopped
from sppd_megatron.sampling.engines.base import Generation, GenerationRequest, RolloutEngine

FINISH_REASONS = ("stop", "eos", "length")
LOGPROB_SLACK = 1e-3
"""Log-probs are <= 0; engines round, so a hair above 0 is not garbage."""


class EngineFailed(RunStopped):
    """A rollout engine gave no valid answer after every retry."""


def generation_problem(request: GenerationRequest, gen) -> str | None:
    """Why ``gen`` is not a valid answer to ``request`` (None when it is)."""
    if not isinstance(gen, Generation):
        return f"a {type(gen).__name__} instead of a generation"
    ids, logprobs = gen.token_ids, gen.token_logprobs
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        return "token ids that are not non-negative integers"
    if len(ids) > request.max_new_tokens:
        return f"{len(ids)} tokens for max_new_tokens={request.max_new_tokens}"
    if not isinstance(logprobs, list) or len(logprobs) != len(ids):
        return "log-probs not one per token"
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= LOGPROB_SLACK for x in logprobs):
        return "log-probs that are not finite numbers <= 0"
    if not isinstance(gen.text, str):
        return "no text"
    if gen.finish_reason not in FINISH_REASONS:
        return f"finish reason {gen.finish_reason!r}"
    cached = gen.cached_prefix_tokens
    if not isinstance(cached, int) or not 0 <= cached <= len(request.context_ids):
        return f"cached_prefix_tokens={cached!r} for a context of {len(request.context_ids)}"
    return None


class RetryingEngine:
    """A RolloutEngine that rebuilds and re-asks its server engine until it answers properly."""

    def __init__(self, build: Callable[[str], RolloutEngine], model: str, name: str, max_retries: int,
                 backoff_s: float):
        self._build = build
        self._model = model
        self.name = name
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._engine: RolloutEngine | None = build(model)

    def _discard(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception:  # a dead server may fail to shut down; it is gone either way
                pass

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            try:
                if self._engine is None:
                    self._engine = self._build(self._model)
                generations = self._engine.generate(requests)
                if not isinstance(generations, list) or len(generations) != len(requests):
                    reason = (f"answered {len(generations) if isinstance(generations, list) else 'no list'} "
                              f"for {len(requests)} requests")
                else:
                    problems = [(i, p) for i, (r, g) in enumerate(zip(requests, generations))
                                if (p := generation_problem(r, g)) is not None]
                    if not problems:
                        return generations
                    reason = f"answered garbage (request {problems[0][0]}: {problems[0][1]})"
            except Exception as exc:  # any failure of the server is retried; the last one is reported
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self._discard()
            if attempt + 1 < attempts:
                wait = self.backoff_s * 2**attempt
                print(f"engine {self.name}: attempt {attempt + 1} of {attempts} failed ({reason}); "
                      f"retrying in {wait:g} s", file=sys.stderr, flush=True)
                time.sleep(wait)
        raise EngineFailed(f"engine {self.name}: no valid answer after {attempts} attempts (last: {reason}); "
                           "everything finished before is kept: run the same command again to resume")

    def update_weights_from_hf(self, hf_dir: str) -> None:
        self._model = hf_dir  # a rebuilt engine serves the new weights too
        if self._engine is None:
            self._engine = self._build(hf_dir)
        else:
            self._engine.update_weights_from_hf(hf_dir)

    def close(self) -> None:
        self._discard()

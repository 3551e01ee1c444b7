"""The rollout-engine interface shared by the tree sampler, the Monte-Carlo PRM and evaluation.

Engines know nothing of trees, rewards or training: they continue token contexts. Every call takes
all requests of a round at once so an engine can batch them and share common prefixes (KV reuse in
the embedded engine, the radix cache in SGLang, prefix caching in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass
class GenerationRequest:
    """Continue ``context_ids`` (prompt + steps so far, already tokenised) by at most ``max_new_tokens``.

    Generation stops after the first occurrence of any ``stop`` string (kept in the output), at
    EOS, or at the token limit. ``seed`` makes the request's sampling reproducible on its own,
    whatever else is in the batch; ``temperature`` 0 means greedy. ``affinity`` names the group of
    requests that share a long prefix (one question): an engine with several replicas serves a
    group from one replica, whose prefix cache then holds the group's prompt and upper steps.
    """

    context_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    affinity: str | None = None


@dataclass
class Generation:
    """What an engine produced for one request.

    ``token_logprobs[i]`` is log pi(token_i | context, tokens_<i) under the model's raw
    distribution (temperature 1, no top-p), so it equals a teacher-forced recomputation.
    """

    token_ids: list[int]
    token_logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "eos", "length"]
    cached_prefix_tokens: int = 0  # context tokens served from the engine's prefix cache, not recomputed


@runtime_checkable
class RolloutEngine(Protocol):
    """A text-generation backend. Implementations: transformers (CPU/GPU), SGLang, vLLM, scripted."""

    name: str

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    def update_weights_from_hf(self, hf_dir: str) -> None:
        """Load new policy weights (stage 2 re-sampling) from a Hugging Face directory."""
        ...

    def close(self) -> None: ...

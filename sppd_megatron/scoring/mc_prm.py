"""Monte-Carlo PRM: V(s_t) = share of N policy rollouts from s_t that reach the gold answer.

Needs no reward model, only the policy behind a rollout engine (the tree sampler's engines) and
the grader (Math-Shepherd's "soft" estimate). All states of a ``score_batch`` call, with their N
rollouts each, go to the engine in one ``generate`` call (chunked by ``max_requests_per_call``),
so the engine can batch them and share each state's prefix across its N rollouts. Identical
states (the shared prefixes of a tree's trajectories) are rolled out once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

from sppd_megatron.sampling.engines.base import GenerationRequest, RolloutEngine
from sppd_megatron.scoring.grading import extract_answer, grade
from sppd_megatron.scoring.prm import BatchedPRM, StepQuery, check_scores
from sppd_megatron.tokenization import encode


@dataclass
class MonteCarloPRMConfig:
    """How rollouts are drawn from each state."""

    num_rollouts: int = 8
    """N: rollouts per state; the value's standard error is at most 0.5 / sqrt(N)."""
    max_new_tokens: int = 512
    """Token budget for finishing a solution from a state; a rollout cut off here counts as wrong."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the policy's own distribution at 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling mass of the rollouts."""
    seed: int = 0
    """Base seed; each rollout's seed is derived from it, the state text and the rollout index."""
    max_requests_per_call: int = 4096
    """Upper bound on requests in one ``engine.generate`` call (memory of the engine's batch)."""

    def __post_init__(self) -> None:
        if self.num_rollouts < 1:
            raise ValueError("num_rollouts must be >= 1")
        if self.max_new_tokens < 1 or self.max_requests_per_call < 1:
            raise ValueError("max_new_tokens and max_requests_per_call must be >= 1")


class MonteCarloPRM(BatchedPRM):
    """``score_batch`` needs each query's ``gold_answer``; ``prompt`` defaults to the question."""

    name = "mc"

    def __init__(self, engine: RolloutEngine, tokenizer, config: MonteCarloPRMConfig | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config or MonteCarloPRMConfig()

    def _seed(self, context: str, index: int) -> int:
        # crc32, not hash(): Python salts str hashes per process and runs must be reproducible.
        return (self.config.seed * 1_000_003 + zlib.crc32(context.encode()) * 131 + index) % (2**31 - 1)

    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]:
        cfg = self.config
        # state key -> (context text, gold); values filled below
        states: dict[tuple[str, str], str] = {}
        values: dict[tuple[str, str], float] = {}
        # A question's rollouts all extend its prompt: engines with replicas keep them on one (prefix cache).
        affinity: dict[tuple[str, str], str] = {}
        for q in queries:
            if q.gold_answer is None:
                raise ValueError(f"the Monte-Carlo PRM needs the gold answer (question {q.question[:60]!r})")
            context = q.prompt if q.prompt is not None else q.question
            for t in range(1, len(q.steps) + 1):
                state_text = "".join(q.steps[:t])
                key = (context + state_text, q.gold_answer)
                if key in states or key in values:
                    continue
                if extract_answer(state_text) is not None:
                    # The state already states its answer: its value is the verdict, no rollout needed.
                    values[key] = float(grade(state_text, q.gold_answer))
                else:
                    states[key] = state_text
                    affinity[key] = f"{zlib.crc32(context.encode()):08x}"
        requests, owners = [], []
        for key in states:
            context_ids = encode(self.tokenizer, key[0])
            for i in range(cfg.num_rollouts):
                requests.append(
                    GenerationRequest(
                        context_ids=list(context_ids),
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        seed=self._seed(key[0], i),
                        affinity=affinity[key],
                    )
                )
                owners.append(key)
        successes = dict.fromkeys(states, 0)
        for start in range(0, len(requests), cfg.max_requests_per_call):
            chunk = requests[start : start + cfg.max_requests_per_call]
            generations = self.engine.generate(chunk)
            if len(generations) != len(chunk):
                raise RuntimeError(f"engine {self.engine.name!r} returned {len(generations)} for {len(chunk)} requests")
            for key, gen in zip(owners[start : start + len(chunk)], generations):
                if grade(states[key] + gen.text, key[1]):
                    successes[key] += 1
        values.update({key: n / cfg.num_rollouts for key, n in successes.items()})
        out = []
        for q in queries:
            context = q.prompt if q.prompt is not None else q.question
            v = [values[(context + "".join(q.steps[:t]), q.gold_answer)] for t in range(1, len(q.steps) + 1)]
            out.append(check_scores(self.name, q, v))
        return out

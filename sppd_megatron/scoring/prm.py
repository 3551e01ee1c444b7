"""The process-reward-model interface: ``score(question, steps) -> [v_1 .. v_T]`` in [0, 1].

``v_t`` estimates V(s_t), the chance that a solution continuing the state after step t reaches
the right answer. Implementations:

- :class:`~sppd_megatron.scoring.hf_prm.ValueHeadPRM` (Skywork-o1-Open-PRM style linear head) and
  :class:`~sppd_megatron.scoring.hf_prm.StepTagPRM` (Math-Shepherd style '+' probability) through
  transformers; :class:`~sppd_megatron.scoring.hf_prm.SGLangRewardPRM` through a reward server;
- :class:`~sppd_megatron.scoring.mc_prm.MonteCarloPRM`: share of policy rollouts that succeed;
- :func:`~sppd_megatron.scoring.tree_value.tree_values`: share of correct leaves below a node,
  read off the sampled tree itself (not a text PRM: it needs the tree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class StepQuery:
    """One trajectory to score.

    ``prompt`` is the exact text the policy was conditioned on (template applied); PRMs that read
    the question their own way ignore it, as they ignore ``gold_answer``, which only the
    Monte-Carlo PRM needs (to grade its rollouts).
    """

    question: str
    steps: tuple[str, ...]
    gold_answer: str | None = None
    prompt: str | None = None


@runtime_checkable
class ProcessRewardModel(Protocol):
    """Anything that turns (question, steps) into one value in [0, 1] per step."""

    name: str

    def score(self, question: str, steps: Sequence[str]) -> list[float]: ...

    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]: ...


class BatchedPRM:
    """Mixin: ``score`` is ``score_batch`` of one; subclasses implement ``score_batch`` only."""

    name: str = "prm"

    def score(self, question: str, steps: Sequence[str]) -> list[float]:
        return self.score_batch([StepQuery(question, tuple(steps))])[0]

    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]:
        raise NotImplementedError


def check_scores(name: str, query: StepQuery, values: Sequence[float]) -> list[float]:
    """A PRM's output for one query, checked: one finite value per step, all in [0, 1]."""
    values = [float(v) for v in values]
    if len(values) != len(query.steps):
        raise ValueError(f"PRM {name!r} returned {len(values)} values for {len(query.steps)} steps")
    bad = [v for v in values if not (0.0 <= v <= 1.0)]  # NaN fails this test too
    if bad:
        raise ValueError(f"PRM {name!r} returned values outside [0, 1]: {bad[:3]}")
    return values

"""Step-level beam search (SBS; AlphaMath, Chen et al. 2024a; SVPO section 3.3) over any RolloutEngine.

Each round every active beam is expanded by C candidate steps in one engine call (the beams of all
questions of a group together). Candidate 0 of a beam is its greedy step (temperature 0); the others
are sampled at the evaluation temperature, each with a seed of its own. A step ends at the step
delimiter, at EOS or at the solution's token budget. Identical candidates of one beam count once.
Every candidate state is scored by a process reward model (the value head of an SVPO model, or any
PRM) in one ``score_batch`` call, and the ``width - finished`` best-valued candidates of the question
are kept (ties: earlier beam, then earlier candidate). A kept candidate that ended at EOS or at the
budget is a finished solution; the others are the next round's beams. The search ends when
``width`` solutions are finished or no beam is left.

``sbs@B`` answers with the best-valued finished solution that states an answer; ``sbs_vote@B``
sums the values of the finished solutions per answer class, as ``orm_vote`` does.

With B = 1 and C = 1 every round keeps the one greedy step, so the solution is the greedy one,
token for token: the step delimiter only pauses decoding, and the next step continues from the same
token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from sppd_megatron.sampling.engines.base import GenerationRequest, RolloutEngine
from sppd_megatron.scoring.prm import StepQuery


@dataclass
class Beam:
    """A partial (or finished) solution: its steps' token ids and texts, and the value of its last state."""

    ids: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    value: float = 0.0
    done: bool = False


@dataclass
class SearchQuestion:
    """What the search needs of one question: its rendered prompt (text and ids), and seeds for its candidates."""

    question: str
    prompt_text: str
    prompt_ids: list[int]
    seed: Callable[[int, int, int], int]
    """(round, beam rank, candidate) -> request seed."""
    affinity: str | None = None
    """The question's requests share its prompt: engines with replicas keep them on one (prefix cache)."""


def step_beam_search(engine: RolloutEngine, prm, questions: Sequence[SearchQuestion], width: int, expansions: int,
                     max_new_tokens: int, temperature: float, top_p: float, stop: str) -> list[list[Beam]]:
    """Per question, its finished solutions best value first (at most ``width``)."""
    if width < 1 or expansions < 1:
        raise ValueError("step-level beam search needs a width and an expansion count >= 1")
    beams: list[list[Beam]] = [[Beam()] for _ in questions]
    finished: list[list[Beam]] = [[] for _ in questions]
    rnd = 0
    while any(beams):
        requests, owners = [], []
        for qi, q in enumerate(questions):
            for b, beam in enumerate(beams[qi]):
                budget = max_new_tokens - len(beam.ids)
                for j in range(expansions):
                    requests.append(GenerationRequest(
                        context_ids=q.prompt_ids + beam.ids, max_new_tokens=budget,
                        temperature=0.0 if j == 0 else temperature, top_p=top_p, stop=[stop],
                        seed=q.seed(rnd, b, j), affinity=q.affinity))
                    owners.append((qi, b))
        generations = engine.generate(requests)
        if len(generations) != len(requests):
            raise RuntimeError(f"engine {engine.name} returned {len(generations)} generations for {len(requests)} requests")
        candidates: list[list[Beam]] = [[] for _ in questions]
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        for (qi, b), gen in zip(owners, generations):
            key = (qi, b, tuple(gen.token_ids))
            if key in seen:
                continue
            seen.add(key)
            parent = beams[qi][b]
            ids = parent.ids + list(gen.token_ids)
            done = gen.finish_reason in ("eos", "length") or len(ids) >= max_new_tokens or not gen.token_ids
            candidates[qi].append(Beam(ids=ids, steps=parent.steps + [gen.text], done=done))
        queries = [StepQuery(questions[qi].question, tuple(c.steps), prompt=questions[qi].prompt_text)
                   for qi in range(len(questions)) for c in candidates[qi]]
        scores = prm.score_batch(queries) if queries else []
        flat = iter(scores)
        for qi in range(len(questions)):
            for c in candidates[qi]:
                c.value = next(flat)[-1]
            room = width - len(finished[qi])
            # sorted() is stable: equal values keep beam order, then candidate order.
            kept = sorted(candidates[qi], key=lambda c: -c.value)[:room]
            finished[qi] += [c for c in kept if c.done]
            beams[qi] = [c for c in kept if not c.done]
        rnd += 1
    return [sorted(f, key=lambda c: -c.value) for f in finished]

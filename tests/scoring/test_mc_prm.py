"""Monte-Carlo PRM against exact values on a synthetic task with known success probabilities.

The task: a "policy" writes L coin flips, one per step ("H\n" with probability q, else "T\n"),
then states the number of heads in \\boxed{}. The gold answer is G heads. After t steps with h
heads the exact value is V = P(Binomial(L - t, q) = G - h). A fake engine plays that policy,
seeded per request, so the Monte-Carlo PRM's estimate must land within binomial noise of V.
"""

from __future__ import annotations

import math
import random

import pytest

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest
from sppd_megatron.scoring.mc_prm import MonteCarloPRM, MonteCarloPRMConfig
from sppd_megatron.scoring.prm import ProcessRewardModel, StepQuery
from sppd_megatron.tokenization import build_char_tokenizer

L, Q, G = 6, 0.6, 4
PROMPT = "Flip a coin 6 times; how many heads?\n"


class CoinFlipEngine:
    """Continues a coin-flip state to the end, sampling each flip with the request's seed."""

    name = "coin-flip"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0
        self.requests = 0

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        self.calls += 1
        self.requests += len(requests)
        out = []
        for req in requests:
            context = self.tokenizer.decode(req.context_ids)
            assert context.startswith(PROMPT)
            flips = context[len(PROMPT) :].split()
            rng = random.Random(req.seed)
            rest = ["H" if rng.random() < Q else "T" for _ in range(L - len(flips))]
            heads = (flips + rest).count("H")
            text = "".join(f"{f}\n" for f in rest) + f"\\boxed{{{heads}}}"
            out.append(Generation(token_ids=[], token_logprobs=[], text=text, finish_reason="eos"))
        return out

    def update_weights_from_hf(self, hf_dir: str) -> None:
        pass

    def close(self) -> None:
        pass


def exact_value(flips: list[str]) -> float:
    need, left = G - flips.count("H"), L - len(flips)
    if not 0 <= need <= left:
        return 0.0
    return math.comb(left, need) * Q**need * (1 - Q) ** (left - need)


def test_mc_values_match_exact_success_probabilities():
    tok = build_char_tokenizer()
    engine = CoinFlipEngine(tok)
    n = 400
    prm = MonteCarloPRM(engine, tok, MonteCarloPRMConfig(num_rollouts=n, seed=7, max_requests_per_call=100_000))
    assert isinstance(prm, ProcessRewardModel)
    rng = random.Random(0)
    trajectories = [["H" if rng.random() < 0.5 else "T" for _ in range(L)] for _ in range(12)]
    queries = [StepQuery(PROMPT, tuple(f"{f}\n" for f in flips[:5]), gold_answer=str(G), prompt=PROMPT)
               for flips in trajectories]
    values = prm.score_batch(queries)
    assert engine.calls == 1  # every state's rollouts in one generate call
    unique_states = {"".join(q.steps[:t]) for q in queries for t in range(1, 6)}
    assert engine.requests == n * len(unique_states)  # shared prefixes rolled out once
    errors = []
    for flips, v in zip(trajectories, values):
        assert len(v) == 5 and all(0.0 <= x <= 1.0 for x in v)
        for t in range(1, 6):
            p = exact_value(flips[:t])
            tolerance = 4 * math.sqrt(p * (1 - p) / n) + 1e-9
            assert abs(v[t - 1] - p) <= tolerance, (flips[:t], v[t - 1], p)
            errors.append(abs(v[t - 1] - p))
    assert sum(errors) / len(errors) < 0.03


def test_states_with_an_answer_are_graded_not_rolled_out():
    tok = build_char_tokenizer()
    engine = CoinFlipEngine(tok)
    prm = MonteCarloPRM(engine, tok, MonteCarloPRMConfig(num_rollouts=4))
    steps = tuple(["H\n"] * 4 + ["T\n", "T\n", "\\boxed{4}"])
    v = prm.score_batch([StepQuery(PROMPT, steps, gold_answer="4", prompt=PROMPT),
                         StepQuery(PROMPT, steps[:6] + ("\\boxed{5}",), gold_answer="4", prompt=PROMPT)])
    assert v[0][-1] == 1.0 and v[1][-1] == 0.0
    assert v[0][:-1] == v[1][:-1]
    assert engine.requests == 4 * 6


def test_rollouts_are_reproducible_and_gold_is_required():
    tok = build_char_tokenizer()
    q = StepQuery(PROMPT, ("H\n", "T\n"), gold_answer="4", prompt=PROMPT)
    a = MonteCarloPRM(CoinFlipEngine(tok), tok, MonteCarloPRMConfig(num_rollouts=16, seed=3)).score_batch([q])
    b = MonteCarloPRM(CoinFlipEngine(tok), tok, MonteCarloPRMConfig(num_rollouts=16, seed=3)).score_batch([q])
    assert a == b
    with pytest.raises(ValueError, match="gold answer"):
        MonteCarloPRM(CoinFlipEngine(tok), tok).score(PROMPT, ["H\n"])

"""Test helpers: light sampling settings and a model-free scripted engine."""

from __future__ import annotations

import random

from sppd_megatron.sampling.config import SampleConfig
from sppd_megatron.sampling.engines.base import Generation, GenerationRequest

QUESTIONS = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "Tom has 4 apples and eats 1. How many are left?", "answer": "4-1=3\n#### 3"},
    {"question": "What is 6*7?", "answer": "#### 42"},
]


def small_config(**overrides) -> SampleConfig:
    """Light settings for the tiny model: short steps, few iterations, trees that finish quickly."""
    base = dict(input="unused.jsonl", output_dir="unused", K=6, C=2, max_depth=4, max_step_tokens=8,
                max_total_tokens=24, questions_per_round=3, seed=7, progress=False)
    base.update(overrides)
    return SampleConfig(**base)


class ScriptedEngine:
    """A model-free engine: each request's tokens and log-probs are a pure function of its seed.

    Steps end at the stop string, at EOS (token 2, with probability ~1/8 per step) or at the limit;
    a step may write ``\\boxed{7}`` so answer terminals happen too.
    """

    name = "scripted"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        self.calls.append(requests)
        return [self._one(r) for r in requests]

    def _one(self, req: GenerationRequest) -> Generation:
        rng = random.Random(req.seed)
        pieces = rng.choice(["abc\n\n", "x=1\n\n", "so \\boxed{7}\n\n", "long step without end", "eos"])
        if pieces == "eos":
            ids = self.tokenizer("ok", add_special_tokens=False)["input_ids"] + [2]
        else:
            ids = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        ids = ids[: req.max_new_tokens]
        reason = "eos" if ids and ids[-1] == 2 else "stop" if "\n\n" in self.tokenizer.decode(ids) else "length"
        return Generation(token_ids=ids, token_logprobs=[-rng.random() for _ in ids],
                          text=self.tokenizer.decode(ids, skip_special_tokens=True), finish_reason=reason)

    def update_weights_from_hf(self, hf_dir: str) -> None:
        pass

    def close(self) -> None:
        pass

"""Model-free stand-ins for the evaluation tests: an engine that writes fixed texts, a fixed-score ORM."""

from __future__ import annotations

from sppd_megatron.records import Prediction, Prompt
from sppd_megatron.sampling.engines.base import Generation, GenerationRequest


class ScriptedEngine:
    """Answers each question with fixed texts: ``script[question] = (greedy_text, [sample_0, sample_1, ...])``.

    The question is found in the decoded context; a temperature-0 request gets the greedy text and the
    k-th sampled request of a context (in request order) gets sample k.
    """

    name = "scripted"

    def __init__(self, tokenizer, script: dict[str, tuple[str, list[str]]]):
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        self.calls.append(requests)
        sampled_so_far: dict[tuple[int, ...], int] = {}
        out = []
        for req in requests:
            context = self.tokenizer.decode(req.context_ids)
            question = next(q for q in self.script if q in context)
            greedy, samples = self.script[question]
            if req.temperature == 0:
                text = greedy
            else:
                k = sampled_so_far.get(tuple(req.context_ids), 0)
                sampled_so_far[tuple(req.context_ids)] = k + 1
                text = samples[k]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Generation(token_ids=ids, token_logprobs=[0.0] * len(ids), text=text, finish_reason="eos"))
        return out

    def update_weights_from_hf(self, hf_dir: str) -> None:
        pass

    def close(self) -> None:
        pass


class FixedScorePRM:
    """A ProcessRewardModel whose value for every step of a solution is ``scores[solution]`` (default 0.5)."""

    name = "fixed"

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.queries = []

    def score(self, question, steps):
        return self.score_batch([(question, steps)])[0]

    def score_batch(self, queries):
        self.queries += list(queries)
        return [[self.scores.get("".join(q.steps), 0.5)] * len(q.steps) for q in queries]


def prompts(*pairs: tuple[str, str]) -> list[Prompt]:
    return [Prompt(id=f"q{i}", question=q, gold_answer=g) for i, (q, g) in enumerate(pairs)]


def prediction(answers: list[str | None], correct: list[bool], scores: list[float] | None = None,
               greedy: tuple[str | None, bool] | None = None, benchmark: str = "b", qid: str = "q") -> Prediction:
    """A record with the given sampled answers (generations are just the answers boxed)."""
    gens = [f"\\boxed{{{a}}}" if a is not None else "no answer" for a in answers]
    fields = {}
    if greedy is not None:
        fields = {"greedy_generation": f"\\boxed{{{greedy[0]}}}", "greedy_answer": greedy[0], "greedy_correct": greedy[1]}
    return Prediction(id=qid, benchmark=benchmark, prompt="p", gold_answer="g", generations=gens, answers=answers,
                      correct=correct, scores=scores, **fields)

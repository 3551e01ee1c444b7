"""Where a reasoning step ends and when a trajectory is complete.

A step is what one expansion generates: the engine stops at a delimiter (kept in the step's text)
and the sampler decides whether the new node is terminal (EOS, a final answer, max depth, max
tokens). Answer extraction is one function, :func:`extract_final_answer`, so the sampler and the
grader agree on what counts as an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DelimiterMode = Literal["blank_line", "step_prefix", "newline", "stop_string"]


@dataclass(frozen=True)
class StepDelimiter:
    """How the engine is told to stop a step, and how much of the stop match the step keeps.

    ``stop`` goes to the engine (which keeps the whole match); ``keep`` is the part of the match
    that belongs to this step. For the ``"Step k:"`` convention the engine stops at
    ``"\\nStep "`` but the step keeps only ``"\\n"``: the next step then begins with its own
    ``"Step k+1:"`` header, generated afresh from the shorter context.
    """

    stop: str
    keep: str

    @classmethod
    def from_mode(cls, mode: DelimiterMode, stop_string: str | None = None) -> "StepDelimiter":
        if mode == "blank_line":
            return cls(stop="\n\n", keep="\n\n")
        if mode == "step_prefix":
            return cls(stop="\nStep ", keep="\n")
        if mode == "newline":
            return cls(stop="\n", keep="\n")
        if mode == "stop_string":
            if not stop_string:
                raise ValueError("step delimiter mode 'stop_string' needs a non-empty stop_string")
            return cls(stop=stop_string, keep=stop_string)
        raise ValueError(f"unknown step delimiter mode {mode!r}")

    def kept_token_count(self, token_ids: list[int], decode) -> int:
        """How many leading tokens of a generated step to keep (all of them unless ``keep`` is shorter).

        ``decode(ids) -> str`` is the tokenizer's decode. When the cut falls inside a token (the
        delimiter merged with what follows), the whole generation is kept: the step is then a
        little longer than the convention wants, but its tokens stay exactly the sampled ones.
        """
        if self.keep == self.stop:
            return len(token_ids)
        text = decode(token_ids)
        at = text.find(self.stop)
        if at < 0:
            return len(token_ids)
        want = text[: at + len(self.keep)]
        for n in range(len(token_ids), 0, -1):
            got = decode(token_ids[:n])
            if got == want:
                return n
            if len(got) < len(want):
                break
        return len(token_ids)


def extract_final_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (last ``\\boxed{}``, ``#### N``, "The answer is"), else None.

    Delegates to the grader so sampling and scoring share one definition.
    """
    from sppd_megatron.scoring.grading import extract_answer

    return extract_answer(text)


FinishReason = Literal["eos", "answer", "max_depth", "max_tokens"]


@dataclass(frozen=True)
class TerminalRules:
    """When a node ends its trajectory. ``max_total_tokens`` counts generated tokens, not the prompt."""

    max_depth: int
    max_total_tokens: int

    def classify(self, *, ended_with_eos: bool, state_text: str, depth: int,
                 total_tokens: int) -> tuple[FinishReason | None, str | None]:
        """``(finish_reason, answer)`` for a new node; ``(None, None)`` when it can still grow.

        ``state_text`` is every step from the first to this one: an answer split across two
        steps (a length cut inside ``\\boxed{...}``) is still found.
        """
        answer = extract_final_answer(state_text)
        if ended_with_eos:
            return "eos", answer
        if answer is not None:
            return "answer", answer
        if depth >= self.max_depth:
            return "max_depth", None
        if total_tokens >= self.max_total_tokens:
            return "max_tokens", None
        return None, None

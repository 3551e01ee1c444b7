"""An outcome reward model (ORM) from any process reward model: one score per whole solution.

SPPD section 6.1 uses Skywork-o1-Open-PRM as the ORM of ORM_VOTE@N / ORM_MAX@N; appendix B reads
"ORM score" as the PRM's value of the final step and compares it with the mean and the minimum
over steps. So an ORM here is a :class:`~sppd_megatron.scoring.prm.ProcessRewardModel` (any of
the rewards interface: value head, step tag, SGLang endpoint, Monte-Carlo rollouts) plus a
reduction over its step values, ``last`` by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from sppd_megatron.scoring.hf_prm import HFPRMConfig, SGLangPRMConfig
from sppd_megatron.scoring.prm import ProcessRewardModel, StepQuery
from sppd_megatron.training.value_prm import ValueHeadPRMConfig

Reduction = Literal["last", "min", "mean"]
REDUCTIONS: dict[str, object] = {
    "last": lambda values: values[-1],
    "min": min,
    "mean": lambda values: sum(values) / len(values),
}


@dataclass
class OrmConfig:
    """The reward model behind the ``orm_vote@N`` / ``orm_max@N`` modes."""

    kind: Literal["none", "hf", "sglang", "value_head"] = "none"
    """``hf``: a PRM checkpoint through transformers (``hf.*``); ``sglang``: a reward endpoint (``sglang.*``);
    ``value_head``: the value head of an sppd-megatron checkpoint, stage prm or svpo (``value_head.*``)."""
    hf: HFPRMConfig = field(default_factory=HFPRMConfig)
    """The transformers PRM (kind ``hf``): ``path``, ``style`` (value_head / step_tag), ..."""
    sglang: SGLangPRMConfig = field(default_factory=SGLangPRMConfig)
    """The SGLang reward endpoint (kind ``sglang``)."""
    value_head: ValueHeadPRMConfig = field(default_factory=ValueHeadPRMConfig)
    """The learned value head (kind ``value_head``): ``path``, ``parallel``, ``pack_length``."""
    reduction: Reduction = "last"
    """Step values -> one score: ``last`` (the ORM reading, paper appendix B), ``min`` or ``mean``."""
    split_on: str = "\n\n"
    """Solutions are cut into steps after each occurrence of this string (kept with its step)."""

    def __post_init__(self) -> None:
        if self.kind == "hf" and not self.hf.path:
            raise ValueError("orm.kind hf needs orm.hf.path (a PRM checkpoint directory)")
        if self.kind == "value_head" and not self.value_head.path:
            raise ValueError("orm.kind value_head needs orm.value_head.path (a checkpoint of train stage prm or svpo)")
        if not self.split_on:
            raise ValueError("orm.split_on must be a non-empty string")


def split_steps(text: str, split_on: str = "\n\n") -> tuple[str, ...]:
    """``text`` cut after each ``split_on`` (kept), so ``"".join(steps) == text``; at least one step."""
    pieces = [p for p in re.split(f"(?<={re.escape(split_on)})", text) if p]
    return tuple(pieces) or (text,)


class OutcomeRewardModel:
    """Scores whole solutions: a PRM's step values of the solution, reduced to one number."""

    def __init__(self, prm: ProcessRewardModel, reduction: Reduction = "last", split_on: str = "\n\n"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown ORM reduction {reduction!r}; one of {sorted(REDUCTIONS)}")
        self.prm = prm
        self.reduction = reduction
        self.split_on = split_on
        self.name = f"{getattr(prm, 'name', type(prm).__name__)}:{reduction}"

    def score_solutions(self, questions: Sequence[str], solutions: Sequence[str],
                        prompts: Sequence[str] | None = None) -> list[float]:
        """One score per (question, solution), in one PRM batch."""
        prompts = prompts or [None] * len(questions)
        queries = [StepQuery(q, split_steps(s, self.split_on), prompt=p) for q, s, p in zip(questions, solutions, prompts)]
        reduce = REDUCTIONS[self.reduction]
        return [float(reduce(values)) for values in self.prm.score_batch(queries)]


def as_outcome_model(orm) -> OutcomeRewardModel | None:
    """Accept an OutcomeRewardModel, or any ProcessRewardModel (then read with the ``last`` reduction)."""
    if orm is None or isinstance(orm, OutcomeRewardModel):
        return orm
    if isinstance(orm, ProcessRewardModel):
        return OutcomeRewardModel(orm)
    raise TypeError(f"orm must be a ProcessRewardModel or OutcomeRewardModel, got {type(orm).__name__}")


def build_orm(cfg: OrmConfig) -> OutcomeRewardModel | None:
    """The configured ORM, or None for kind ``none`` (heavy packages are imported only here)."""
    if cfg.kind == "none":
        return None
    from sppd_megatron.scoring.cli import build_text_prm

    prm = build_text_prm(cfg.kind, cfg)  # reads cfg.hf / cfg.sglang / cfg.value_head, as `sppd-megatron score` does
    return OutcomeRewardModel(prm, cfg.reduction, cfg.split_on)

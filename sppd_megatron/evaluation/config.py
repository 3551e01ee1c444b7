"""``EvalConfig``: everything ``sppd-megatron eval`` needs, checked when the config loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from sppd_megatron.evaluation.benchmarks import resolve_benchmark
from sppd_megatron.evaluation.modes import parse_modes
from sppd_megatron.evaluation.orm import OrmConfig
from sppd_megatron.records import PromptTemplate
from sppd_megatron.sampling.config import EngineConfig
from sppd_megatron.sampling.prompts import PromptFields
from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS


@dataclass
class EvalConfig:
    """Greedy-CoT, MAJ@N, ORM_VOTE@N and ORM_MAX@N of one policy on several benchmarks (SPPD 6.1)."""

    model: str
    """Hugging Face directory, sppd-megatron (Megatron) checkpoint directory (exported to HF on the
    fly into ``output_dir/hf_export``), or ``tiny:llama`` / ``tiny:qwen2`` built in code."""
    tokenizer: str | None = None
    """Tokenizer directory or ``builtin:char``; None: the model's (``builtin:char`` for tiny models)."""
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "math500", "gaokao2023en"])
    """``gsm8k``, ``math500``, ``gaokao2023en`` (shipped in the package), ``hf:DATASET[:SPLIT]``, a ``.jsonl``
    path, or ``NAME=`` any of these (NAME labels it in the tables)."""
    fields: PromptFields = field(default_factory=PromptFields)
    """Question / answer / id field names of the benchmarks other than the named ones."""
    modes: list[str] = field(default_factory=lambda: ["greedy"])
    """``greedy``, ``maj@N``, ``orm_vote@N``, ``orm_max@N``, ``sbs@B``, ``sbs_vote@B``; sampling modes share
    one set of max-N samples; each beam width gets one step-level beam search guided by ``orm``'s step values."""
    limit: int | None = None
    """Evaluate only the first N questions of each benchmark."""
    output_dir: str = "runs/eval"
    """``predictions.jsonl``, ``summary.json``, ``summary.md``, ``eval_manifest.json``; re-running resumes."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """Prompt: the paper's system prompt (appendix C.1) in the tokenizer's chat template by default."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine, as in ``sppd-megatron sample`` (transformers, sglang, vllm)."""
    max_new_tokens: int = 2048
    """Generation limit per solution (paper: 2048)."""
    temperature: float = 0.7
    """Sampling temperature of the maj/orm samples (greedy always uses 0)."""
    top_p: float = 1.0
    """Nucleus sampling of the maj/orm samples."""
    seed: int = 0
    """Sample k of a question uses a seed derived from (seed, benchmark, question id, k)."""
    questions_per_batch: int = 8
    """Questions whose greedy + N samples go to the engine in one call (fixed groups, for resuming)."""
    orm: OrmConfig = field(default_factory=OrmConfig)
    """The reward model of the ORM modes (any PRM, reduced to one score per solution) and of the sbs modes
    (its step values; e.g. an SVPO model's own value head, ``orm.kind: value_head``)."""
    sbs_expansions: int = 5
    """sbs modes: C, candidate steps per beam and round (the first greedy, the others sampled at ``temperature``)."""
    step_delimiter: str = "\n\n"
    """sbs modes: where a step ends (as ``orm.split_on`` cuts solutions)."""
    grade_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    """Per-answer limit on math-verify."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        modes = parse_modes(self.modes)  # an unknown mode fails here, not after generating
        if any(m.needs_orm or m.beam_width is not None for m in modes) and self.orm.kind == "none":
            raise ValueError("orm_vote / orm_max / sbs modes need an ORM (a reward model): set orm.kind (or pass --orm DIR "
                             "or --value-model CKPT)")
        if self.sbs_expansions < 1 or not self.step_delimiter:
            raise ValueError("sbs_expansions must be >= 1 and step_delimiter non-empty")
        if not self.benchmarks:
            raise ValueError("benchmarks: give at least one")
        for spec in self.benchmarks:
            resolve_benchmark(spec)
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 when set")
        if self.max_new_tokens < 1 or self.questions_per_batch < 1:
            raise ValueError("max_new_tokens and questions_per_batch must be >= 1")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")

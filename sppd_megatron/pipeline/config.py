"""``RunConfig``: one YAML for the whole self-training loop (``sppd-megatron run CONFIG [k=v ...]``).

The stage sections reuse the stage verbs' own configs: ``sample``, ``score`` and ``pairs`` hold
keys of ``SampleConfig``, ``ScoreConfig`` and ``PairsConfig`` (the run fills in the paths, the
policy and the seed); each training stage names a ``train`` recipe YAML and overrides on top of
it (the run fills in ``output_dir``, ``init`` and ``data.train_file``). Every section is checked
against its stage's dataclass when the run config loads, so a typo fails before any sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sppd_megatron.config import config_from_dict, load_config
from sppd_megatron.records import PromptTemplate
from sppd_megatron.sampling.config import EngineConfig
from sppd_megatron.sampling.prompts import PromptFields

StageName = Literal["sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "prm", "prm_score", "prm_pairs",
                    "step_dpo_prm", "svpo", "eval"]
ALL_STAGES: list[str] = ["sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "prm", "prm_score",
                         "prm_pairs", "step_dpo_prm", "svpo", "eval"]
TRAIN_STAGES = {"sft_prm": ("sft", "sft"), "dpo_prm": ("dpo", "dpo"), "step_dpo": ("step_dpo", "step"),
                "svpo": ("svpo", "svpo"), "prm": ("prm", None), "step_dpo_prm": ("step_dpo", "step")}
"""Run stage -> (trainer stage, pairs dataset it trains on; prm trains on the scored trees)."""
RECIPES = {"step_dpo_prm": "step_dpo"}
"""Run stages that train with another stage's recipe (``train.<that stage>``)."""
DEFAULT_STAGES = ["sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "eval"]
"""SPPD's loop; the learned-PRM and SVPO stages are listed explicitly."""
VALUE_HEAD_MODELS = ("prm", "svpo")
"""Run models whose checkpoints carry a value head (they can guide the sbs modes)."""
MarginMode = Literal["dynamic", "fixed", "none"]


@dataclass
class PromptsConfig:
    """The questions the policy samples trees for."""

    path: str
    """Prompt source: ``gsm8k`` / ``math500`` / ``gaokao2023en``, ``hf:DATASET[:SPLIT]`` or a JSONL path
    (as ``sppd-megatron sample``'s ``input``)."""
    fields: PromptFields = field(default_factory=PromptFields)
    """Field names when the layout is not detected."""
    limit: int | None = None
    """Use only the first N prompts."""


@dataclass
class BenchmarkConfig:
    """One evaluation set."""

    path: str
    """Prompt source, as ``prompts.path``: ``gsm8k``, ``hf:DATASET[:SPLIT]``, a JSONL path..."""
    fields: PromptFields = field(default_factory=PromptFields)
    """Field names when the layout is not detected."""
    limit: int | None = None
    """Evaluate only the first N questions."""


@dataclass
class EvalConfig:
    """How every trained checkpoint (and the starting policy) is evaluated (issue 6's harness)."""

    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    """Name -> benchmark; the first is the one ``next_policy: best`` ranks by."""
    modes: list[str] = field(default_factory=lambda: ["greedy"])
    """Harness modes, e.g. ``greedy``, ``maj@8``."""
    max_new_tokens: int = 2048
    temperature: float = 0.7
    """Sampling temperature of the N-sample modes (greedy ignores it)."""
    seed: int = 0
    questions_per_batch: int = 32
    """Questions whose generations go to the engine in one call (the harness resumes by these groups)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine serving each checkpoint's HF export."""
    models: list[str] = field(default_factory=lambda: ["base", "sft_prm", "dpo_prm", "step_dpo"])
    """Which models of an iteration to evaluate: ``base`` (its starting policy), trained stages, and
    ablation runs (``step_dpo_none``, ``step_dpo_fixed``, ``step_dpo_prm_none``...)."""
    value_heads: dict[str, str] = field(default_factory=dict)
    """Model -> the run model whose value head guides its ``sbs_modes`` (``prm`` or ``svpo``), e.g.
    ``{svpo: svpo}``: SVPO's step-level beam search with its own value head (SVPO section 3.3)."""
    sbs_modes: list[str] = field(default_factory=list)
    """Modes (``sbs@B``, ``sbs_vote@B``) added for the models of ``value_heads``."""
    sbs_expansions: int = 5
    """C of the sbs modes: candidate steps per beam and round."""


@dataclass
class TrainStageConfig:
    """A training stage: a ``sppd-megatron train`` recipe plus overrides."""

    config: str
    """TrainConfig YAML (e.g. configs/tiny-cpu/sft.yaml); its stage must match the run stage."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested TrainConfig keys replacing the recipe's (``{optim: {lr: 1e-5}}``)."""


@dataclass
class TrainStagesConfig:
    """The training chain SFT-PRM -> DPO-PRM -> step-DPO; each starts from the previous one's checkpoint."""

    sft_prm: TrainStageConfig | None = None
    dpo_prm: TrainStageConfig | None = None
    step_dpo: TrainStageConfig | None = None
    prm: TrainStageConfig | None = None
    """The learned process reward (stage ``prm``): value-head regression on the scored trees' labels
    (its recipe's ``data.value_name``), from the iteration's policy. ``prm_score`` then scores the trees
    with it (value ``value_head``), ``prm_pairs`` builds pairs from that value and ``step_dpo_prm``
    trains step-DPO on them (``train.step_dpo``'s recipe, from the DPO-PRM checkpoint)."""
    svpo: TrainStageConfig | None = None
    """SVPO (stage ``svpo``) on the pairs stage's ``svpo_pairs.jsonl`` (``pairs.svpo.enabled``), from the
    SFT-PRM checkpoint when that stage runs, else the policy."""
    margin_ablation: list[MarginMode] = field(default_factory=list)
    """Extra step-DPO runs from the same initial checkpoint with these ``loss.margin_mode`` values
    (stages ``step_dpo_<mode>``, and ``step_dpo_prm_<mode>`` on the learned reward's pairs): the paper's
    margin ablation. Not chained into the next iteration."""
    launcher: list[str] = field(default_factory=list)
    """Command prefix replacing ``python -m sppd_megatron`` for training, e.g.
    ``[torchrun, --nproc-per-node=2, -m, sppd_megatron]``."""
    threads: int = 1
    """OMP/torch threads of each training process (CPU)."""


@dataclass
class RunConfig:
    """The self-training loop: sample -> score -> pairs -> SFT-PRM -> DPO-PRM -> step-DPO -> eval."""

    run_dir: str
    """Stage directories go to ``run_dir/iter<k>/<stage>/`` with a ``manifest.json`` each."""
    policy: str
    """The starting policy: a Hugging Face directory, or ``tiny`` / ``tiny:llama[:SEED]`` / ``tiny:qwen2``
    (built in code with the character tokenizer)."""
    prompts: PromptsConfig
    seed: int = 0
    """Seed of sampling, scoring rollouts and training (each stage derives its own from it)."""
    stages: list[StageName] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages to run in each iteration, in the fixed order of ALL_STAGES (default: SPPD's loop, without
    the learned-PRM stages ``prm prm_score prm_pairs step_dpo_prm`` and ``svpo``)."""
    iterations: int = 1
    """1: stage 1 only; 2+: re-sample with ``next_policy`` of the previous iteration and repeat."""
    next_policy: Literal["last", "best"] = "last"
    """The next iteration's policy: the last trained stage, or the evaluated model best on the first
    benchmark's first mode (needs the eval stage)."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """Prompt layout used for sampling and evaluation (the paper's system prompt by default)."""
    sample: dict[str, Any] = field(default_factory=dict)
    """SampleConfig keys (K, C, temperature, engine, max_depth, ...)."""
    score: dict[str, Any] = field(default_factory=dict)
    """ScoreConfig keys (scorers, mc.rollouts, ...); ``mc.model`` is set to the iteration's policy."""
    pairs: dict[str, Any] = field(default_factory=dict)
    """PairsConfig keys (value_name, step.threshold, ...). ``trainable`` is the run's: the policy's
    tokenizer and the ``data`` settings of each training stage, so no dataset holds a record its
    stage would refuse."""
    prm_score: dict[str, Any] = field(default_factory=dict)
    """ScoreConfig keys of ``prm_score`` (``value_head.pack_length``, ``trees_per_batch``,
    ``calibration_label``); its input, output, scorer and checkpoint are the run's. Its ``value_head``
    settings also serve the value heads that guide ``eval.sbs_modes``."""
    prm_pairs: dict[str, Any] = field(default_factory=dict)
    """PairsConfig keys of ``prm_pairs`` on top of ``pairs`` (e.g. ``step.threshold``: a learned value's
    sibling gaps can be smaller than the tree value's 0 / 1 jumps); ``value_name`` is ``value_head``."""
    train: TrainStagesConfig = field(default_factory=TrainStagesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True
    """Progress bars on every long stage."""
    tensorboard: bool = True
    """Evaluation accuracies to ``run_dir/tensorboard`` (training stages log their own)."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; valid: {ALL_STAGES}")
        self.stages = [s for s in ALL_STAGES if s in self.stages]
        for name in TRAIN_STAGES:
            recipe = RECIPES.get(name, name)
            if name in self.stages and getattr(self.train, recipe) is None:
                raise ValueError(f"stage {name} is listed but train.{recipe}.config is not set")
        needs = {"prm_score": "prm", "prm_pairs": "prm_score", "step_dpo_prm": "prm_pairs"}
        for stage, before in needs.items():
            if stage in self.stages and before not in self.stages:
                raise ValueError(f"stage {stage} needs stage {before}")
        if "step_dpo_prm" in self.stages and "dpo_prm" not in self.stages:
            raise ValueError("stage step_dpo_prm starts from the DPO-PRM checkpoint: it needs stage dpo_prm")
        if self.train.margin_ablation and "step_dpo" not in self.stages:
            raise ValueError("train.margin_ablation needs the step_dpo stage")
        if "svpo" in self.stages and not self.pairs.get("svpo", {}).get("enabled", True):
            raise ValueError("stage svpo trains on svpo_pairs.jsonl: set pairs.svpo.enabled true")
        for model, guide in self.eval.value_heads.items():
            if model not in self.eval.models:
                raise ValueError(f"eval.value_heads: {model!r} is not in eval.models {self.eval.models}")
            if guide not in VALUE_HEAD_MODELS or guide not in self.stages:
                raise ValueError(f"eval.value_heads.{model}: {guide!r} is not a value-head stage of this run "
                                 f"({[s for s in VALUE_HEAD_MODELS if s in self.stages]})")
        if self.eval.value_heads and not self.eval.sbs_modes:
            raise ValueError("eval.value_heads needs eval.sbs_modes (e.g. [sbs@3])")
        from sppd_megatron.evaluation.modes import parse_modes

        if any(m.beam_width is None for m in parse_modes(self.eval.sbs_modes or ["sbs@1"])):
            raise ValueError(f"eval.sbs_modes: {self.eval.sbs_modes} holds modes other than sbs@B / sbs_vote@B")
        if "eval" in self.stages and not self.eval.benchmarks:
            raise ValueError("the eval stage needs eval.benchmarks")
        if self.next_policy == "best" and self.iterations > 1 and "eval" not in self.stages:
            raise ValueError("next_policy: best needs the eval stage")
        # Each section must build its stage's config: typos fail now, not after an hour of sampling.
        self.sample_config("<policy>", "<out>")
        self.score_config("<in>", "<out>", "<policy>")
        self.pairs_config("<in>", "<out>", "<policy>")
        for name in TRAIN_STAGES:
            if name in self.stages:
                self.train_config(name, "<out>", "hf", "<policy>", "<data>")
        if "prm_score" in self.stages or self.eval.value_heads or self.prm_score:
            self.value_score_config("<in>", "<out>", "<checkpoint>")
        if "prm_pairs" in self.stages or self.prm_pairs:
            self.pairs_config("<in>", "<out>", "<policy>", "value_head")

    # --- stage configs ----------------------------------------------------------------------------
    def sample_config(self, policy: str, output_dir: str | Path):
        from sppd_megatron.sampling.config import SampleConfig

        data = copy.deepcopy(self.sample)
        data.update(input=self.prompts.path, output_dir=str(output_dir), model=policy,
                    fields=self.prompts.fields.__dict__, num_questions=self.prompts.limit,
                    template=self.template.__dict__, seed=self.seed, progress=self.progress)
        return config_from_dict(SampleConfig, data, "run config, section sample")

    def score_config(self, input_dir: str | Path, output_dir: str | Path, policy: str):
        from sppd_megatron.scoring.cli import ScoreConfig

        data = copy.deepcopy(self.score)
        data.update(input_dir=str(input_dir), output_dir=str(output_dir), progress=self.progress)
        mc = data.setdefault("mc", {})
        mc["model"] = policy
        mc.setdefault("rollouts", {})["seed"] = self.seed
        return config_from_dict(ScoreConfig, data, "run config, section score")

    def value_score_config(self, input_dir: str | Path, output_dir: str | Path, checkpoint: str):
        """``prm_score``: the scored trees again, with the learned value head (value ``value_head``)."""
        from sppd_megatron.scoring.cli import ScoreConfig

        data = copy.deepcopy(self.prm_score)
        data.update(input_dir=str(input_dir), output_dir=str(output_dir), scorers=["value_head"],
                    progress=self.progress)
        data["value_head"] = {**data.get("value_head", {}), "path": str(checkpoint)}
        return config_from_dict(ScoreConfig, data, "run config, section prm_score")

    def pairs_config(self, input_dir: str | Path, output_dir: str | Path, policy: str, value_name: str | None = None):
        """The pairs stage's config; records are checked against the training stages that read them
        (tokenizer: ``policy``'s, which every training stage of the iteration uses). With ``value_name``
        it is ``prm_pairs``'s: the ``prm_pairs`` keys on top, built from that value."""
        from sppd_megatron.pairs.cli import PairsConfig

        if "trainable" in self.pairs:
            raise ValueError("pairs.trainable is set by the run (the policy's tokenizer and the training "
                             "recipes' data settings); remove it from the run config")
        data = copy.deepcopy(self.pairs)
        datasets = {}
        for name, (_, dataset) in TRAIN_STAGES.items():
            if name in self.stages and dataset is not None:
                train_data = self.train_config(name, "<out>", "hf", policy, "<data>")["data"]
                datasets[dataset] = {k: train_data[k] for k in ("max_length", "append_eos", "overlong")}
        data.update(input_dir=str(input_dir), output_dir=str(output_dir), progress=self.progress,
                    trainable={"tokenizer": policy if datasets else None, "datasets": datasets})
        if value_name is not None:
            data = _deep_merge(data, copy.deepcopy(self.prm_pairs))
            data["value_name"] = value_name
        return config_from_dict(PairsConfig, data, "run config, section pairs")

    def train_config(self, stage: str, output_dir: str | Path, init_source: str, init_path: str | None,
                     train_file: str | Path, margin_mode: str | None = None) -> dict:
        """The full TrainConfig of a run stage (``sft_prm``, ``dpo_prm``, ``step_dpo``, ``prm``, ``svpo``,
        ``step_dpo_prm``) as a plain dict: the recipe, its overrides, then what the run decides (paths,
        init, seeds, progress)."""
        from sppd_megatron.config import ConfigError, config_to_dict
        from sppd_megatron.training.config import TrainConfig

        section: TrainStageConfig = getattr(self.train, RECIPES.get(stage, stage))
        try:
            data = yaml.safe_load(Path(section.config).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"train.{stage}.config: cannot read {section.config} ({exc.strerror})") from None
        data = _deep_merge(data, copy.deepcopy(section.overrides))
        trainer_stage = TRAIN_STAGES[stage][0]
        if data.get("stage", "sft") != trainer_stage:
            raise ValueError(f"train.{stage}: {section.config} is a '{data.get('stage', 'sft')}' recipe, "
                             f"this stage trains '{trainer_stage}'")
        data["output_dir"] = str(output_dir)
        data["init"] = {**data.get("init", {}), "source": init_source, "path": init_path}
        data.setdefault("data", {})["train_file"] = str(train_file)
        if init_source != "random":  # architecture and tokenizer come from the checkpoint
            data["model"] = None
            data["data"]["tokenizer"] = None
        schedule = data.setdefault("schedule", {})
        schedule["seed"] = schedule.get("seed", 1234) + self.seed
        data.setdefault("logging", {})["progress"] = self.progress
        if margin_mode is not None:
            data.setdefault("loss", {})["margin_mode"] = margin_mode
        return config_to_dict(config_from_dict(TrainConfig, data, f"run config, train.{stage} ({section.config})"))


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML + dotted overrides (``sample.K=8``, ``train.step_dpo.overrides.loss.gamma=2``)."""
    return load_config(RunConfig, path, overrides)


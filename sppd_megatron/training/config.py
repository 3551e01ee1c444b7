"""``sppd-megatron train`` configuration: one dataclass per concern, checked when the YAML loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sppd_megatron.losses import SVPOWeights
from sppd_megatron.models.builder import PrecisionConfig
from sppd_megatron.models.config import ModelConfig
from sppd_megatron.parallel.state import ParallelConfig

Stage = Literal["sft", "dpo", "step_dpo", "svpo", "prm"]
Overlong = Literal["error", "drop", "truncate"]
"""``data.overlong``: what a record longer than ``data.max_length`` does (see DataConfig)."""


@dataclass
class InitConfig:
    """Where the policy's starting weights come from (also the reference model's)."""

    source: Literal["random", "hf", "mcore"] = "random"
    """random: a transformers model of ``model``'s architecture initialised under ``seed`` (tests, the
    demo); hf: a Hugging Face directory (architecture read from its config.json); mcore: a Megatron
    checkpoint written by ``convert hf-to-mcore`` or by ``train`` (any TP/PP, resharded on load)."""
    path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source != "random" and not self.path:
            raise ValueError(f"init.source={self.source} needs init.path")


@dataclass
class DataConfig:
    """Training records and how they become token sequences."""

    train_file: str = ""
    """JSONL of SFTExample (stage sft) or PreferencePair records (dpo, step_dpo, svpo); for stage prm,
    scored trees (a ``trees-*.jsonl`` directory written by ``sppd-megatron score``, or one such file)."""
    value_name: str = "tree"
    """Stage prm: the ``values`` entry of the trees that labels each state (``tree``, ``mc``, ``mcts_q``...)."""
    tokenizer: str | None = None
    """Tokenizer directory or ``builtin:char``; defaults to the init checkpoint's tokenizer."""
    max_length: int = 512
    """Longest sequence (context + continuation + EOS); what a longer record does is ``overlong``'s."""
    overlong: Overlong = "error"
    """A record longer than ``max_length``: ``error`` stops before training with file:line (default);
    ``drop`` leaves it out, listed in OUTPUT_DIR/rejects.jsonl and counted; ``truncate`` cuts its
    context from the left, prompt side first (TRL's keep_end), never the continuation being scored.
    ``sppd-megatron run`` never needs it: its pairs stage rejects what this setting would not take."""
    packing: Literal["none", "sequences", "pairs", "trees"] = "trees"
    """How examples become micro-batches (sppd_megatron/training/packing.py): ``none`` pads every
    sequence to ``max_length`` (``micro_batch_size`` examples per micro-batch); the others pack whole
    examples into bins of ``pack_length`` tokens with no padding per row (``micro_batch_size`` bins
    per micro-batch):
    ``sequences`` shares nothing, ``pairs`` computes a pair's context once, ``trees`` computes every
    prefix shared by the consecutive pairs of one ``group_by`` group once (for SFT all three pack
    sequences). Every layout gives the same per-pair log-probs and loss."""
    pack_length: int | None = None
    """Tokens per packed bin; default ``max_length`` for SFT and ``2 * max_length`` for pairs (room for
    any example without sharing)."""
    group_by: Literal["none", "state", "tree"] = "tree"
    """Which examples are kept together in the epoch order (shuffled as groups), so that ``trees``
    packing can share their prefixes: ``state``, the sibling pairs of one state; ``tree``, every pair
    of one question's tree; ``none``, examples shuffled one by one."""
    shuffle: bool = True
    append_eos: bool = True
    """Append EOS to continuations that end the solution (``ends``/``*_ends`` true); steps that do not end it never get EOS."""

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError("data.max_length must be at least 4")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(f"data.pack_length={self.pack_length} must be at least data.max_length={self.max_length}")


@dataclass
class LossConfig:
    """The objective of the stage (see sppd_megatron/losses.py for the formulas)."""

    beta: float = 0.1
    """KL strength of DPO-family losses (SPPD: 0.1)."""
    gamma: float = 1.0
    """step_dpo margin scale: dynamic margin gamma * (V_w - V_l), or the constant for fixed (SPPD: 0.1-5)."""
    margin_mode: Literal["dynamic", "fixed", "none"] = "dynamic"
    dpo_variant: Literal["sigmoid", "ipo", "conservative"] = "sigmoid"
    label_smoothing: float = 0.0
    """Flip probability for dpo_variant=conservative."""
    sft_reduction: Literal["token", "sequence"] = "token"
    """sft: token, the mean NLL over every response token of the global batch (Megatron's and TRL's
    SFT loss); sequence, the mean over responses of each one's mean NLL (every response weighs the same)."""
    rpo_alpha: float = 0.0
    """dpo and step_dpo: weight of the NLL on the chosen continuation (RPO, Pang et al. 2024; TRL's
    ``loss_type=["sigmoid", "sft"]``). 0 is the paper's loss. svpo has its own ``svpo_weights.sft``."""
    svpo_rank_margin: float = 0.5
    """delta of the value margin-ranking term relu(delta - (v_w - v_l)) (svpo; prm with value_rank_weight > 0)."""
    svpo_weights: SVPOWeights = field(default_factory=SVPOWeights)
    value_rank_weight: float = 0.0
    """prm: weight of SVPO eq. 10's margin term over sibling states (0: the MSE of eq. 7 alone)."""
    value_rank_threshold: float = 0.5
    """prm: siblings whose labels differ by more than this form the margin term's pairs (SPPD's D_step threshold)."""
    reference: Literal["precomputed", "co_resident"] = "precomputed"
    """precomputed: one forward pass of the initial policy stores reference log-probs with the
    dataset before training (one model in memory); co_resident: a frozen copy computes them each step."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("loss.beta must be > 0")
        if self.rpo_alpha < 0:
            raise ValueError("loss.rpo_alpha must be >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("loss.label_smoothing must be in [0, 0.5)")
        if self.value_rank_weight < 0:
            raise ValueError("loss.value_rank_weight must be >= 0")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (Megatron optimizer + OptimizerParamScheduler)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    """SPPD: Adam 5e-6 for SFT, SGD 1e-5 for the DPO stages."""
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    """Warm-up as a fraction of train steps (used when warmup_steps is 0)."""


@dataclass
class ScheduleConfig:
    """How long and in what batches."""

    global_batch_size: int = 8
    """Examples (SFT records or pairs) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Examples per forward pass with ``data.packing=none``; bins of ``data.pack_length`` tokens per
    forward pass when packed. A pair's chosen and rejected always share a micro-batch."""
    train_steps: int | None = None
    """Optimizer steps; unset means ``epochs`` passes over the data."""
    epochs: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("schedule.global_batch_size and micro_batch_size must be >= 1")


@dataclass
class CheckpointConfig:
    """Megatron dist checkpoints under OUTPUT_DIR/checkpoints/iter_XXXXXXX."""

    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    save_final: bool = True
    resume: bool = True
    """Resume from the newest complete checkpoint in OUTPUT_DIR/checkpoints when there is one."""
    keep_last: int = 2
    """How many checkpoints to keep (0 keeps all)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    """A training run: ``sppd-megatron train CONFIG.yaml [dotted.key=value ...]``."""

    stage: Stage = "sft"
    output_dir: str = "outputs/train"
    model: ModelConfig | None = None
    """Architecture (init.source random); read from the checkpoint otherwise."""
    init: InitConfig = field(default_factory=InitConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or any gradient is NaN/inf on any rank (found before the optimizer step, on
    every rank): ``stop`` ends the run with one line naming the step and the quantity (no weight is
    changed; resume from the last checkpoint); ``skip`` leaves the weights and the learning-rate
    schedule as they were, uses up the step's data and counts it (``skipped_steps`` in metrics.jsonl).
    May change between a run and its resumption. A checkpoint never holds a non-finite weight."""

    def __post_init__(self) -> None:
        if not self.data.train_file:
            raise ValueError("data.train_file is required")
        if self.data.pack_length is None:
            self.data.pack_length = self.data.max_length * (1 if self.stage == "sft" else 2)
        if self.data.packing == "none" and self.schedule.global_batch_size % self.schedule.micro_batch_size:
            raise ValueError("schedule.global_batch_size must be a multiple of schedule.micro_batch_size")
        if self.stage == "prm" and self.data.packing == "none":
            raise ValueError("stage prm needs a packed layout (data.packing sequences, pairs or trees): its examples "
                             "are sibling groups of any size, which padded micro-batches cannot hold in one shape")
        if self.init.source == "random" and self.model is None:
            raise ValueError("init.source=random needs a model: section")
        if self.model is not None:
            self.model.check_parallel(
                self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
            )
        if self.parallel.use_distributed_optimizer and self.optim.optimizer == "sgd":
            raise ValueError("the distributed optimizer is tested with adam/adamw only; use optim.optimizer=adamw")

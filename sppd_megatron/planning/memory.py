"""Per-GPU memory of a training recipe on a layout, before any GPU is involved.

Four parts are exact counts of the tensors Megatron allocates (checked against a tiny CPU run by
tests/planning/test_memory_vs_run.py):

- weights: this pipeline stage's parameters on one tensor-parallel rank, in ``precision.params_dtype``;
- grads: Megatron DDP keeps fp32 ``main_grad`` for every parameter (``grad_reduce_in_fp32``);
- optimizer: Adam keeps two fp32 moments, SGD one momentum buffer when ``sgd_momentum > 0``; bf16
  weights add an fp32 master copy; the distributed optimizer shards all of it over data-parallel ranks;
- reference: a co-resident frozen reference model's weights (``loss.reference: co_resident``).

Two are estimates (saved-for-backward tensors, fitted on the local layer spec and checked loosely):

- activations per micro-batch and layer, per token: ``n * 4h + b * (4.2h + 4 kv d + 5 f) / TP`` (``b``
  bytes per activation, ``n`` per norm element: 4 for torch's RMSNorm on the local spec, which keeps
  fp32 copies, ``b`` with TransformerEngine) plus, for megatron's unfused core attention (the local spec, also under
  packed batches' dense tree masks), the ``heads / TP x seq`` probabilities (fp32 softmax output
  plus the ``b``-byte copy multiplied with V); flash attention (TransformerEngine) and FlexAttention
  keep none; packed bins add their boolean tree mask (``rows x seq x seq`` bytes) to the unfused
  attention. 1F1B keeps ``min(PP - stage, micro-batches)`` micro-batches in flight on each stage.
- logits (last stage): the loss gathers the logits of the continuation tokens (at most every token
  of the micro-batch, the bound used here) and takes their fp32 softmax, a 1024-token chunk at a
  time beyond one chunk (the gathered logits then stay in ``b`` bytes; sppd_megatron/training/logprobs.py).

A micro-batch is ``rows`` sequences of ``seq`` tokens: padded, ``micro_batch_size`` examples of
``rows_per_example`` rows (2 for preference pairs) of ``max_length``; packed, ``micro_batch_size``
bins of ``pack_length`` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sppd_megatron.models.config import ModelConfig

GIB = 1024**3
LOSS_CHUNK_TOKENS = 1024
"""sppd_megatron.training.logprobs.token_logprobs' default chunk_size."""

# Activation coefficients (elements per token per layer), fitted on the local spec with
# sppd_megatron.planning.measure (saved-for-backward tensors of tiny runs varying layers, hidden, FFN,
# KV heads and vocabulary in fp32; tests/planning/test_memory_vs_run.py holds bf16 and TP=2 x PP=2 to 5%).
_REPLICATED_HIDDEN = 4.0  # both RMSNorms' inputs and outputs: not split without sequence parallelism
_SPLIT_HIDDEN = 4.2  # q, rotated q, expanded k and v, attention context: split over TP heads
_KV = 4.0  # k, v (and rotated k) per query group
_FFN = 5.0  # fc1 output (gate + up), silu(gate), product: split over TP columns
_FINAL_HIDDEN = 3.0  # final norm input/output and the output layer's input on the last stage


@dataclass
class MemoryInputs:
    """Everything the estimate depends on, resolved from a recipe and a layout."""

    model: ModelConfig
    tp: int = 1
    pp: int = 1
    dp: int = 1
    params_dtype: str = "bf16"
    """fp32 or bf16 (weights and activations)."""
    optimizer: str = "adam"
    """adam, adamw or sgd."""
    sgd_momentum: float = 0.0
    distributed_optimizer: bool = False
    seq_length: int = 2048
    micro_batch_size: int = 1
    rows_per_example: int = 1
    """1 for SFT and for packed bins, 2 for padded preference pairs (chosen and rejected share a micro-batch)."""
    num_microbatches: int = 1
    """Per data-parallel rank and optimizer step: global_batch / (micro_batch x DP) padded; packed, the
    bins the step's examples need (bounded by :func:`packed_microbatches`)."""
    transformer_engine: bool = True
    """TransformerEngine layers (GPU recipes): flash attention. False: the local spec (CPU)."""
    flex_attention: bool = False
    """FlexAttention core attention (packed batches on GPUs): no attention probabilities kept."""
    tree_masks: bool = False
    """Packed bins: megatron's unfused attention keeps their [rows, 1, seq, seq] boolean mask once."""
    co_resident_reference: bool = False
    value_head: bool = False


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage (every tensor-parallel rank holds the same)."""

    stage: int
    parameters: int
    weights: int
    grads: int
    optimizer: int
    reference: int
    activations: int
    logits: int
    microbatches_in_flight: int

    @property
    def exact(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def total(self) -> int:
        return self.exact + self.activations + self.logits


@dataclass
class MemoryPlan:
    inputs: MemoryInputs
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def as_dict(self) -> dict:
        return {"inputs": asdict(self.inputs), "stages": [asdict(s) | {"total": s.total} for s in self.stages]}


def layer_parameters(m: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one TP rank (norms are replicated)."""
    d = m.kv_channels
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d // tp
    qkv = qkv_rows * m.hidden_size + (qkv_rows if m.qkv_bias else 0)
    proj = m.hidden_size * m.num_attention_heads * d // tp
    mlp = 3 * m.ffn_hidden_size // tp * m.hidden_size  # fc1 (gate + up) and fc2
    return 2 * m.hidden_size + qkv + proj + mlp


def stage_parameters(m: ModelConfig, tp: int, pp: int, stage: int, value_head: bool = False) -> int:
    """Parameters of pipeline stage ``stage`` on one TP rank, as Megatron's GPTModel allocates them."""
    vocab_rows = m.padded_vocab_size // tp * m.hidden_size
    first, last = stage == 0, stage == pp - 1
    count = m.num_layers // pp * layer_parameters(m, tp)
    if first:
        count += vocab_rows  # word embeddings
    if last:
        count += m.hidden_size  # final norm
        # An untied output layer, or with PP > 1 the last stage's copy of the tied embedding.
        if not m.tie_word_embeddings or not first:
            count += vocab_rows
        if value_head:
            count += m.hidden_size + 1
    return count


def total_parameters(m: ModelConfig) -> int:
    """Unpadded parameter count of the model (what a model card reports)."""
    padded = stage_parameters(m, 1, 1, 0)
    vocab_pad = (m.padded_vocab_size - m.vocab_size) * m.hidden_size
    return padded - vocab_pad * (1 if m.tie_word_embeddings else 2)


def _optimizer_bytes_per_param(inp: MemoryInputs) -> int:
    if inp.optimizer in ("adam", "adamw"):
        states = 2
    elif inp.optimizer == "sgd":
        states = 1 if inp.sgd_momentum > 0 else 0
    else:
        raise ValueError(f"unknown optimizer {inp.optimizer!r}")
    master = 1 if inp.params_dtype == "bf16" else 0  # fp32 main params of bf16 weights
    return 4 * (states + master)


def _norm_bytes(inp: MemoryInputs) -> int:
    """Bytes per element a norm keeps for backward: torch's RMSNorm (the local spec) computes in fp32
    and keeps fp32 copies whatever the weights' dtype; TransformerEngine's keeps the activation dtype."""
    return 2 if inp.params_dtype == "bf16" and inp.transformer_engine else 4


def _activation_bytes_per_token_layer(inp: MemoryInputs) -> float:
    m, tp = inp.model, inp.tp
    b = 2 if inp.params_dtype == "bf16" else 4
    h, f, kvd = m.hidden_size, m.ffn_hidden_size, m.num_query_groups * m.kv_channels
    split_h = m.num_attention_heads * m.kv_channels
    per_token = _norm_bytes(inp) * _REPLICATED_HIDDEN * h + b * (_SPLIT_HIDDEN * split_h + _KV * kvd + _FFN * f) / tp
    if not inp.transformer_engine and not inp.flex_attention:
        # fp32 softmax output; bf16 adds the down-cast copy that multiplies V.
        probs_bytes = 4 + (b if b < 4 else 0)
        per_token += probs_bytes * m.num_attention_heads / tp * inp.seq_length
    return per_token


def plan_memory(inp: MemoryInputs) -> MemoryPlan:
    """Per-stage bytes on one GPU for ``inp`` (see the module docstring for what each part is)."""
    m = inp.model
    m.check_parallel(inp.tp, inp.pp)
    b = 2 if inp.params_dtype == "bf16" else 4
    tokens = inp.seq_length * inp.micro_batch_size * inp.rows_per_example
    per_layer_token = _activation_bytes_per_token_layer(inp)
    plan = MemoryPlan(inputs=inp)
    for stage in range(inp.pp):
        params = stage_parameters(m, inp.tp, inp.pp, stage, inp.value_head)
        weights = params * b
        optimizer = params * _optimizer_bytes_per_param(inp)
        if inp.distributed_optimizer:
            optimizer = -(-optimizer // inp.dp)
        in_flight = min(inp.pp - stage, inp.num_microbatches)
        activations = tokens * per_layer_token * (m.num_layers // inp.pp)
        logits = 0
        if stage == inp.pp - 1:
            activations += tokens * _norm_bytes(inp) * _FINAL_HIDDEN * m.hidden_size
            vocab_slice = m.padded_vocab_size // inp.tp
            if tokens <= LOSS_CHUNK_TOKENS:
                logits = tokens * vocab_slice * 4
            else:
                logits = tokens * vocab_slice * b + LOSS_CHUNK_TOKENS * vocab_slice * 4 * 2
        if inp.tree_masks and not inp.flex_attention and not inp.transformer_engine:
            activations += inp.micro_batch_size * inp.seq_length**2  # one mask shared by every layer
        if inp.pp > 1:
            # 1F1B keeps each in-flight micro-batch's stage input and output tensors.
            activations += 2 * tokens * m.hidden_size * b
        plan.stages.append(
            StageMemory(
                stage=stage,
                parameters=params,
                weights=weights,
                grads=params * 4,
                optimizer=optimizer,
                reference=weights if inp.co_resident_reference else 0,
                activations=int(activations * in_flight),
                logits=int(logits),
                microbatches_in_flight=in_flight,
            )
        )
    return plan


def format_plan(plan: MemoryPlan, gpu_memory_gib: float | None = None, overhead_gib: float = 0.0) -> str:
    """A table of GiB per stage, with headroom against the GPU when given."""
    inp = plan.inputs
    lines = [
        f"layout: TP={inp.tp} PP={inp.pp} DP={inp.dp}  {inp.params_dtype}  optimizer={inp.optimizer}"
        f"{' (distributed)' if inp.distributed_optimizer else ''}  seq={inp.seq_length} "
        f"micro_batch={inp.micro_batch_size}x{inp.rows_per_example} rows  micro-batches/step={inp.num_microbatches}"
        f"  layers={'TransformerEngine' if inp.transformer_engine else 'local spec'}",
        f"{'stage':>5} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} {'ref':>7} {'activ':>8} "
        f"{'logits':>8} {'in-flight':>9} {'total GiB':>10}",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.stage:>5} {s.parameters:>14,} {s.weights / GIB:>8.2f} {s.grads / GIB:>8.2f} "
            f"{s.optimizer / GIB:>8.2f} {s.reference / GIB:>7.2f} {s.activations / GIB:>8.2f} "
            f"{s.logits / GIB:>8.2f} {s.microbatches_in_flight:>9} {s.total / GIB:>10.2f}"
        )
    if gpu_memory_gib is not None:
        peak = plan.peak.total / GIB + overhead_gib
        lines.append(
            f"peak stage {plan.peak.stage}: {peak:.2f} GiB incl. {overhead_gib:.1f} GiB runtime overhead "
            f"of {gpu_memory_gib:.0f} GiB ({'fits' if peak <= gpu_memory_gib else 'DOES NOT FIT'})"
        )
    return "\n".join(lines)


def packed_microbatches(cfg, dp: int) -> int:
    """Micro-batches a packed step needs on one data-parallel rank, at most: every row of its pairs at
    ``max_length`` tokens with nothing shared (shared prefixes and shorter rows need fewer bins)."""
    from sppd_megatron.training.trainer import PREFERENCE_STAGES

    rows = cfg.schedule.global_batch_size // dp * (2 if cfg.stage in PREFERENCE_STAGES else 1)
    per_bin = max(1, cfg.data.pack_length // cfg.data.max_length)
    return -(-rows // (per_bin * cfg.schedule.micro_batch_size))


def inputs_for_recipe(cfg, model: ModelConfig, dp: int, num_microbatches: int,
                      transformer_engine: bool | None = None) -> MemoryInputs:
    """MemoryInputs of a TrainConfig on a validated layout.

    ``transformer_engine`` defaults to the recipe's layer implementation: ``local`` is the local spec
    (CPU), ``auto`` / ``transformer_engine`` mean TransformerEngine on the GPUs the recipe targets.
    Packed recipes use FlexAttention where the recipe runs on GPUs (``precision.attention`` auto).
    """
    from sppd_megatron.training.model import VALUE_HEAD_STAGES
    from sppd_megatron.training.trainer import PREFERENCE_STAGES

    if transformer_engine is None:
        transformer_engine = cfg.precision.transformer_impl != "local"
    packed = cfg.data.packing != "none"
    flex = packed and (cfg.precision.attention == "flex" or (cfg.precision.attention == "auto" and transformer_engine))
    return MemoryInputs(
        model=model,
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        dp=dp,
        params_dtype=cfg.precision.params_dtype,
        optimizer=cfg.optim.optimizer,
        sgd_momentum=cfg.optim.sgd_momentum,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        seq_length=cfg.data.pack_length if packed else cfg.data.max_length,
        micro_batch_size=cfg.schedule.micro_batch_size,
        rows_per_example=2 if cfg.stage in PREFERENCE_STAGES and not packed else 1,
        num_microbatches=num_microbatches,
        transformer_engine=transformer_engine,
        flex_attention=flex,
        tree_masks=packed,
        co_resident_reference=cfg.stage in PREFERENCE_STAGES and cfg.loss.reference == "co_resident",
        value_head=cfg.stage in VALUE_HEAD_STAGES,
    )

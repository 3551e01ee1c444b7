"""The training loop for every stage (sft, dpo, step_dpo, svpo), read top to bottom.

    config -> validate data -> build model -> reference log-probs -> resume -> loop -> save

One process or ``torchrun --nproc-per-node N``; tensor/pipeline parallel sizes come from the config
and data parallel is the rest. Per optimizer step rank 0 appends one JSON line to
``OUTPUT_DIR/metrics.jsonl`` (step, loss, grad_norm, lr, and pair accuracy / margins for preference
stages) and writes the same scalars to TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from sppd_megatron.config import ConfigError, config_to_dict
from sppd_megatron.models.config import ModelConfig, model_config_from_hf
from sppd_megatron.parallel import state as pstate
from sppd_megatron.tokenization import CHAR_TOKENIZER_SPEC, load_tokenizer
from sppd_megatron.training import checkpoint as ckpt
from sppd_megatron.training import data as tdata
from sppd_megatron.training.config import TrainConfig
from sppd_megatron.training.forward import make_forward_step, make_logp_step, unwrap

PREFERENCE_STAGES = ("dpo", "step_dpo", "svpo")


# --- model ----------------------------------------------------------------------------------------


def resolve_model_and_tokenizer(cfg: TrainConfig) -> tuple[ModelConfig, str]:
    """The architecture and tokenizer the run uses, from the config or the init checkpoint.

    A tokenizer directory is returned as an absolute path: checkpoints record it, and a path relative
    to the working directory would be read relative to the checkpoint later.
    """
    model_cfg, spec = _model_and_tokenizer_spec(cfg)
    if not str(spec).startswith("builtin:") and Path(spec).exists():
        spec = str(Path(spec).resolve())
    return model_cfg, spec


def _model_and_tokenizer_spec(cfg: TrainConfig) -> tuple[ModelConfig, str]:
    init = cfg.init
    if init.source == "random":
        return cfg.model, cfg.data.tokenizer or CHAR_TOKENIZER_SPEC
    if init.source == "hf":
        model_cfg = model_config_from_hf(init.path)
        return model_cfg, cfg.data.tokenizer or init.path
    from sppd_megatron.conversion.mcore_checkpoint import checkpoint_tokenizer_spec, read_checkpoint_model_config

    model_cfg = read_checkpoint_model_config(init.path)
    return model_cfg, cfg.data.tokenizer or checkpoint_tokenizer_spec(init.path) or CHAR_TOKENIZER_SPEC


def random_hf_state(model_cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A transformers model of this architecture initialised under ``seed`` (same weights for any layout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = model_cfg.to_hf_config_dict()
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()


def build_policy(cfg: TrainConfig, model_cfg: ModelConfig):
    """This rank's stage of the policy with the init weights loaded (not yet wrapped in DDP)."""
    from sppd_megatron.conversion.mapping import load_hf_into_model
    from sppd_megatron.models.builder import build_gpt_model

    model = build_gpt_model(model_cfg, cfg.precision, with_value_head=cfg.stage == "svpo", seed=cfg.init.seed)
    model.config.calculate_per_token_loss = True
    if cfg.init.source == "random":
        hf_state = random_hf_state(model_cfg, cfg.init.seed)
        load_hf_into_model(model, hf_state.__getitem__, model_cfg)
    elif cfg.init.source == "hf":
        from sppd_megatron.conversion.hf_io import HFTensorReader

        with HFTensorReader(cfg.init.path) as reader:
            load_hf_into_model(model, reader.get, model_cfg)
    else:
        from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint

        load_model_checkpoint(model, cfg.init.path, model_cfg)
    return model


def wrap_ddp(model, cfg: TrainConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def build_optimizer(ddp_model, cfg: TrainConfig, train_steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="sgd" if o.optimizer == "sgd" else "adam",
        decoupled_weight_decay=o.optimizer != "adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.params_dtype == "bf16",
        params_dtype=cfg.precision.torch_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp_model])
    warmup = o.warmup_steps or int(round(o.warmup_fraction * train_steps))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train_steps, warmup + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# --- data -----------------------------------------------------------------------------------------


def dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def microbatches(examples: list, indices: list[int], cfg: TrainConfig, pad_id: int) -> list[dict]:
    """This data-parallel rank's share of ``indices``, cut into collated micro-batches."""
    dp_rank, dp_size = dp_rank_and_size()
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    mbs = cfg.schedule.micro_batch_size
    return [
        tdata.collate([examples[i] for i in mine[j : j + mbs]], cfg.data.max_length, pad_id)
        for j in range(0, len(mine), mbs)
    ]


def run_forward_backward(model, step_fn, batches: list[dict], cfg: TrainConfig, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows = batches[0]["tokens"].shape[0]
    return get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=cfg.data.max_length,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


# --- reference log-probs --------------------------------------------------------------------------


def _gather_to_all(items: list) -> list:
    if not torch.distributed.is_initialized():
        return items
    out: list[list] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def reference_logps(model, examples: list, cfg: TrainConfig, pad_id: int, vocab_size: int) -> list[list[float]]:
    """Each example's continuation log-prob sums under ``model`` (forward only, any layout)."""
    from megatron.core import parallel_state

    step_fn = make_logp_step(vocab_size)
    dp_rank, dp_size = dp_rank_and_size()
    mbs = cfg.schedule.micro_batch_size
    mine = list(range(dp_rank, len(examples), dp_size))
    results = []
    model.eval()
    with torch.no_grad():
        for j in range(0, len(mine), mbs * 8):
            chunk = mine[j : j + mbs * 8]
            batches = [tdata.collate([examples[i] for i in chunk[k : k + mbs]], cfg.data.max_length, pad_id)
                       for k in range(0, len(chunk), mbs)]
            reports = run_forward_backward(model, step_fn, batches, cfg, forward_only=True)
            if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
                flat = torch.cat([r["seq_logps"] for r in reports]).tolist()
                pos = 0
                for i in chunk:
                    n = len(examples[i].rows)
                    results.append((i, flat[pos : pos + n]))
                    pos += n
    model.train()
    by_index = dict(_gather_to_all(results))
    return [by_index[i] for i in range(len(examples))]


def precomputed_reference_file(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "reference_logps.jsonl"


def attach_reference(model, examples: list, cfg: TrainConfig, pad_id: int, vocab_size: int) -> None:
    """Fill missing reference log-probs from a stored pass of the initial policy, computing it once.

    The pass runs before any checkpoint is loaded, so on resume the stored values (from the initial
    weights) are reused, never recomputed from trained weights.
    """
    if all(v is not None for ex in examples for v in ex.ref_logps):
        return
    path = precomputed_reference_file(cfg)
    fingerprint = _data_fingerprint(cfg)
    stored = _read_reference_file(path, fingerprint, len(examples))
    if stored is None:
        stored = reference_logps(model, examples, cfg, pad_id, vocab_size)
        if pstate.is_rank0():
            tmp = path.with_suffix(".tmp")
            with tmp.open("w") as fh:
                fh.write(json.dumps({"fingerprint": fingerprint, "count": len(stored)}) + "\n")
                for i, v in enumerate(stored):
                    fh.write(json.dumps({"index": i, "where": examples[i].where, "ref_logps": v}) + "\n")
            os.replace(tmp, path)
        _barrier()
    for ex, v in zip(examples, stored):
        ex.ref_logps = [r if r is not None else s for r, s in zip(ex.ref_logps, v)]


def _read_reference_file(path: Path, fingerprint: str, count: int) -> list[list[float]] | None:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    if head.get("fingerprint") != fingerprint or head.get("count") != count or len(lines) != count + 1:
        return None
    return [json.loads(line)["ref_logps"] for line in lines[1:]]


def _data_fingerprint(cfg: TrainConfig) -> str:
    h = hashlib.sha256(Path(cfg.data.train_file).read_bytes())
    h.update(json.dumps(config_to_dict(cfg.init), sort_keys=True).encode())
    h.update(json.dumps(config_to_dict(cfg.data), sort_keys=True).encode())
    return h.hexdigest()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --- metrics --------------------------------------------------------------------------------------


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sum (sum, count) pairs over micro-batches and data-parallel ranks; mean per name on rank 0."""
    from megatron.core import parallel_state

    names = sorted(reports[0]) if reports else []
    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage() and names:
        stacked = torch.stack([torch.stack([r[n] for n in names]) for r in reports]).sum(0)  # [names, 2]
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
        result = {n: (stacked[i, 0] / stacked[i, 1].clamp(min=1)).item() for i, n in enumerate(names)}
    if torch.distributed.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [result]
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast_object_list(holder, src=src, group=parallel_state.get_pipeline_model_parallel_group())
        result = holder[0]
    return result


class MetricsWriter:
    """metrics.jsonl (append, one line per step, resumable) + TensorBoard, on rank 0 only."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int):
        self.enabled = pstate.is_rank0()
        self.tb = None
        if not self.enabled:
            return
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop lines past the checkpoint we resume from
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.fh = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row, sort_keys=True) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


# --- the loop -------------------------------------------------------------------------------------


def config_fingerprint(cfg: TrainConfig) -> str:
    d = config_to_dict(cfg)
    d.pop("parallel", None)  # a run may resume on another layout
    d.pop("logging", None)
    d["checkpoint"] = {k: v for k, v in d["checkpoint"].items() if k not in ("save_interval", "keep_last")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training stage; returns the last step's metrics (on rank 0)."""
    from megatron.core.distributed import finalize_model_grads

    out_dir = Path(cfg.output_dir)
    pstate.initialize(cfg.parallel, seed=cfg.schedule.seed)
    model_cfg, tokenizer_spec = resolve_model_and_tokenizer(cfg)
    model_cfg.check_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    tokenizer = load_tokenizer(tokenizer_spec)
    examples = tdata.load_examples(
        cfg.data.train_file, cfg.stage, tokenizer, cfg.data.max_length, model_cfg.vocab_size,
        append_eos=cfg.data.append_eos,
        need_values=cfg.stage == "svpo" or (cfg.stage == "step_dpo" and cfg.loss.margin_mode == "dynamic"),
        overlong=cfg.data.overlong, rejects=out_dir / "rejects.jsonl" if pstate.is_rank0() else None,
    )
    dp_size = dp_rank_and_size()[1]
    gbs, mbs = cfg.schedule.global_batch_size, cfg.schedule.micro_batch_size
    if gbs % (mbs * dp_size):
        raise ValueError(
            f"schedule.global_batch_size={gbs} is not a multiple of micro_batch_size x data-parallel size "
            f"({mbs} x {dp_size})"
        )
    train_steps = cfg.schedule.train_steps or max(1, math.ceil(cfg.schedule.epochs * len(examples) / gbs))
    if pstate.is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1, sort_keys=True))
    _barrier()

    model = build_policy(cfg, model_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ref_model = None
    if cfg.stage in PREFERENCE_STAGES:
        if cfg.loss.reference == "precomputed":
            attach_reference(model, examples, cfg, pad_id, model_cfg.vocab_size)
        else:
            ref_model = build_policy(cfg, model_cfg).eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)

    ddp_model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(ddp_model, cfg, train_steps)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = ddp_model.no_sync

    ckpt_root = out_dir / "checkpoints"
    fingerprint = config_fingerprint(cfg)
    start_step = 0
    resume = ckpt.latest_step(ckpt_root) if cfg.checkpoint.resume else None
    if resume is not None:
        if ckpt.read_trainer_state(ckpt_root, resume).get("config_fingerprint") != fingerprint:
            raise ConfigError(
                f"{ckpt_root}: checkpoint iter {resume} was written by a different config; use a new output_dir "
                "or checkpoint.resume=false"
            )
        state = ckpt.load(ckpt_root, resume, unwrap(ddp_model), optimizer, model_cfg)
        scheduler.load_state_dict(state["scheduler"])
        start_step = resume
    writer = MetricsWriter(out_dir, cfg.logging.tensorboard, start_step)
    step_fn = make_forward_step(cfg.stage, cfg.loss, model_cfg.vocab_size)
    logp_fn = make_logp_step(model_cfg.vocab_size)
    progress = _progress(cfg, train_steps, start_step)
    last: dict = {}
    step = start_step
    for step in range(start_step + 1, train_steps + 1):
        t0 = time.time()
        indices = tdata.step_example_indices(len(examples), step - 1, gbs, cfg.schedule.seed, cfg.data.shuffle)
        batches = microbatches(examples, indices, cfg, pad_id)
        if ref_model is not None:
            _fill_reference(ref_model, logp_fn, batches, cfg)
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = run_forward_backward(ddp_model, step_fn, batches, cfg, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"step {step}: optimizer step failed (non-finite gradients)")
        scheduler.step(increment=1)
        metrics = reduce_reports(reports)
        last = {
            "step": step,
            "loss": metrics.pop("loss", float("nan")),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": optimizer.param_groups[0]["lr"],
            "examples": step * gbs,
            "step_time_s": round(time.time() - t0, 4),
            **{k: v for k, v in metrics.items() if k not in ("tokens",)},
        }
        writer.write(last)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.4f}")
        interval = cfg.checkpoint.save_interval
        if (interval and step % interval == 0) or (step == train_steps and cfg.checkpoint.save_final):
            ckpt.save(ckpt_root, step, unwrap(ddp_model), optimizer, model_cfg, str(tokenizer_spec),
                      {"scheduler": scheduler.state_dict(), "config_fingerprint": fingerprint},
                      keep_last=cfg.checkpoint.keep_last)
        if os.environ.get("SPPD_KILL_AFTER_STEP") == str(step):
            # Test hook: die like a node failure (SIGKILL: no cleanup, no flush beyond what was fsynced).
            os.kill(os.getpid(), signal.SIGKILL)
    if progress is not None:
        progress.close()
    writer.close()
    return last


def _fill_reference(ref_model, logp_fn, batches: list[dict], cfg: TrainConfig) -> None:
    from megatron.core import parallel_state

    with torch.no_grad():
        reports = run_forward_backward(ref_model, logp_fn, batches, cfg, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        for batch, report in zip(batches, reports):
            batch["ref_logps"] = report["seq_logps"].float()


def _progress(cfg: TrainConfig, total: int, start: int):
    if not (cfg.logging.progress and pstate.is_rank0()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train[{cfg.stage}]", unit="step", dynamic_ncols=True)

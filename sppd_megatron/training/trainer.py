"""The training loop for every stage (sft, dpo, step_dpo, svpo, prm), read top to bottom.

    config -> validate data -> build model -> reference log-probs -> resume -> loop -> save

One process or ``torchrun --nproc-per-node N``; tensor/pipeline parallel sizes come from the config
and data parallel is the rest. The parts live beside this file: the policy, DDP and optimizer in
:mod:`.model`, the steps' examples and micro-batches in :mod:`.batching` (packing in
:mod:`.packing`), reference log-probs in :mod:`.reference`, the forward step and losses in
:mod:`.forward`, metrics in :mod:`.metrics`, checkpoints in :mod:`.checkpoint`. Per optimizer step
rank 0 appends one JSON line to ``OUTPUT_DIR/metrics.jsonl`` (step, loss, grad_norm, lr, and pair
accuracy / margins for preference stages) and writes the same scalars to TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from sppd_megatron import faults
from sppd_megatron.config import ConfigError, config_to_dict
from sppd_megatron.parallel import state as pstate
from sppd_megatron.tokenization import load_tokenizer
from sppd_megatron.training import checkpoint as ckpt
from sppd_megatron.training import data as tdata
from sppd_megatron.training import guards
from sppd_megatron.training.batching import ExampleOrder, dp_rank_and_size, microbatches, run_forward_backward
from sppd_megatron.training.config import TrainConfig
from sppd_megatron.training.dataset import training_dataset
from sppd_megatron.training.forward import make_forward_step, make_logp_step, unwrap
from sppd_megatron.training.metrics import MetricsWriter, reduce_reports
from sppd_megatron.training.packing import oversized
from sppd_megatron.training.model import build_optimizer, build_policy, resolve_model_and_tokenizer, wrap_ddp
from sppd_megatron.training.reference import attach_reference, fill_reference

PREFERENCE_STAGES = ("dpo", "step_dpo", "svpo")


def config_fingerprint(cfg: TrainConfig) -> str:
    d = config_to_dict(cfg)
    d.pop("parallel", None)  # a run may resume on another layout
    d.pop("output_dir", None)  # or from a directory that was moved
    d.pop("logging", None)
    d.pop("on_nonfinite", None)  # a run stopped by a NaN may resume with skip
    d["checkpoint"] = {k: v for k, v in d["checkpoint"].items() if k not in ("save_interval", "keep_last")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training stage; returns the last step's metrics (on rank 0)."""
    from megatron.core.distributed import finalize_model_grads

    out_dir = Path(cfg.output_dir)
    faults.set_label(cfg.stage)
    pstate.initialize(cfg.parallel, seed=cfg.schedule.seed)
    model_cfg, tokenizer_spec = resolve_model_and_tokenizer(cfg)
    model_cfg.check_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    tokenizer = load_tokenizer(tokenizer_spec)
    need_values = cfg.stage == "svpo" or (cfg.stage == "step_dpo" and cfg.loss.margin_mode == "dynamic")
    examples = training_dataset(cfg, tokenizer, model_cfg.vocab_size, need_values)
    too_big = oversized(examples, cfg.data.packing, cfg.data.pack_length)
    if too_big:
        raise tdata.DataError(f"bad training data in {cfg.data.train_file}: " + "; ".join(too_big[:10]))
    dp_size = dp_rank_and_size()[1]
    gbs = cfg.schedule.global_batch_size
    per_rank = cfg.schedule.micro_batch_size if cfg.data.packing == "none" else 1
    if gbs % (per_rank * dp_size):
        raise ValueError(
            f"schedule.global_batch_size={gbs} is not a multiple of "
            + (f"micro_batch_size x data-parallel size ({per_rank} x {dp_size})" if per_rank > 1
               else f"the data-parallel size {dp_size}")
        )
    train_steps = cfg.schedule.train_steps or max(1, math.ceil(cfg.schedule.epochs * len(examples) / gbs))
    if pstate.is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1, sort_keys=True))
    pstate.barrier()

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

    _write_runtime(out_dir, model, cfg)
    ddp_model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(ddp_model, cfg, train_steps)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = ddp_model.no_sync
    if cfg.parallel.overlap_grad_reduce:  # as Megatron-LM: the last micro-batch's backward starts the reduce
        model.config.grad_sync_func = ddp_model.start_grad_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.pipeline_model_parallel_size > 1:
        model.config.param_sync_func = ddp_model.start_param_sync

    ckpt_root = out_dir / "checkpoints"
    fingerprint = config_fingerprint(cfg)
    start_step = skipped = 0
    resume = ckpt.latest_step(ckpt_root) if cfg.checkpoint.resume else None
    if resume is not None:
        if ckpt.read_trainer_state(ckpt_root, resume).get("config_fingerprint") != fingerprint:
            raise ConfigError(
                f"{ckpt_root}: checkpoint iter {resume} was written by a different config; use a new output_dir "
                "or checkpoint.resume=false"
            )
        state = ckpt.load(ckpt_root, resume, unwrap(ddp_model), optimizer, model_cfg)
        scheduler.load_state_dict(state["scheduler"])
        start_step, skipped = resume, state.get("skipped_steps", 0)
    writer = MetricsWriter(out_dir, cfg.logging.tensorboard, start_step)
    step_fn = make_forward_step(cfg.stage, cfg.loss, model_cfg.vocab_size)
    logp_fn = make_logp_step(model_cfg.vocab_size)
    order = ExampleOrder(examples.group_keys(cfg.data.group_by), len(examples), cfg.schedule.seed, cfg.data.shuffle)
    progress = _progress(cfg, train_steps, start_step)
    last: dict = {}
    step = start_step
    for step in range(start_step + 1, train_steps + 1):
        t0 = time.time()
        batches = microbatches(examples, order.step(step - 1, gbs), cfg, pad_id)
        if ref_model is not None:
            fill_reference(ref_model, logp_fn, batches, cfg)
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = run_forward_backward(ddp_model, step_fn, batches, cfg, forward_only=False)
        if faults.hit("train.grad") == "nan":
            guards.poison_gradient(ddp_model)
        problem = guards.nonfinite_quantity(ddp_model, reports)
        if problem is not None and cfg.on_nonfinite == "stop":
            raise guards.NonFiniteStep(guards.stop_message(step, problem, _last_checkpoint(ckpt_root)))
        grad_norm = None
        if problem is None:
            ok, grad_norm, _ = optimizer.step()
            if not ok:
                raise guards.NonFiniteStep(guards.stop_message(step, "the optimizer found non-finite gradients",
                                                               _last_checkpoint(ckpt_root)))
            scheduler.step(increment=1)
        else:  # on_nonfinite=skip: no update, no schedule step; the step's data is used up all the same
            skipped += 1
        metrics = reduce_reports(reports)
        last = {
            "step": step,
            "loss": metrics.pop("loss", float("nan")),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": optimizer.param_groups[0]["lr"],
            "examples": step * gbs,
            "step_time_s": round(time.time() - t0, 4),
            **{k: v for k, v in metrics.items() if k not in ("tokens",)},
            "skipped_steps": skipped,
            **({"skipped": problem} if problem is not None else {}),
        }
        if torch.cuda.is_available():
            last["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        faults.hit("train.metrics", writer.path if writer.enabled else None)
        writer.write(last)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.4f}")
        interval = cfg.checkpoint.save_interval
        if (interval and step % interval == 0) or (step == train_steps and cfg.checkpoint.save_final):
            _sync_params(ddp_model, cfg, resume_overlap=step < train_steps)
            guards.check_weights(unwrap(ddp_model), step, _last_checkpoint(ckpt_root))
            ckpt.save(ckpt_root, step, unwrap(ddp_model), optimizer, model_cfg, str(tokenizer_spec),
                      {"scheduler": scheduler.state_dict(), "config_fingerprint": fingerprint,
                       "skipped_steps": skipped},
                      keep_last=cfg.checkpoint.keep_last)
        faults.hit("train.step")
    if progress is not None:
        progress.close()
    writer.close()
    _sync_params(ddp_model, cfg, resume_overlap=False)
    return last


def _last_checkpoint(root: Path) -> str:
    step = ckpt.latest_step(root)
    return f"the last checkpoint is {ckpt.iter_dir(root, step)}" if step is not None else "no checkpoint was written yet"


def _sync_params(ddp_model, cfg: TrainConfig, resume_overlap: bool) -> None:
    """Weights complete on every rank (with overlap_param_gather they arrive during the next forward)."""
    if cfg.parallel.overlap_param_gather and ddp_model.remove_forward_pre_hook_handles:
        ddp_model.disable_forward_pre_hook(param_sync=True)
        if resume_overlap:
            ddp_model.enable_forward_pre_hook()


def _write_runtime(out_dir: Path, model, cfg: TrainConfig) -> None:
    """OUTPUT_DIR/runtime.json: where and how this run computes (device, layer implementation, layout)."""
    if not pstate.is_rank0():
        return
    from megatron.core import parallel_state

    from sppd_megatron.training.forward import model_device

    info = {
        "device": str(model_device(model)),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "transformer_impl": model.config.transformer_impl,
        "params_dtype": str(model.config.params_dtype).replace("torch.", ""),
        "fp8": cfg.precision.fp8,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "torch": torch.__version__,
    }
    (out_dir / "runtime.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def _progress(cfg: TrainConfig, total: int, start: int):
    if not (cfg.logging.progress and pstate.is_rank0()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train[{cfg.stage}]", unit="step", dynamic_ncols=True)

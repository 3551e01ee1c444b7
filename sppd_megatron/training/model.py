"""The policy of a training run: architecture and tokenizer, weights loaded, DDP and the optimizer."""

from __future__ import annotations

from pathlib import Path

import torch

from sppd_megatron.models.config import ModelConfig
from sppd_megatron.tokenization import CHAR_TOKENIZER_SPEC
from sppd_megatron.training.config import TrainConfig

VALUE_HEAD_STAGES = ("svpo", "prm")
"""Stages whose policy carries SVPO's value head (and whose checkpoints do)."""


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
        from sppd_megatron.conversion.hf_io import check_hf_weights, read_hf_config

        _, model_cfg = read_hf_config(init.path)
        check_hf_weights(init.path, model_cfg)  # before any rank allocates a model of config.json's size
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

    model = build_gpt_model(model_cfg, cfg.precision, with_value_head=cfg.stage in VALUE_HEAD_STAGES, seed=cfg.init.seed,
                            tree_masks=cfg.data.packing != "none", parallel=cfg.parallel)
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
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # training.guards checks loss and gradients on every rank, before the step
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

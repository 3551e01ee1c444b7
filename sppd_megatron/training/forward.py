"""The Megatron forward step: a micro-batch in, per-sequence log-prob sums out, one loss applied.

This is the only place that turns model outputs into the tensors :mod:`sppd_megatron.losses` takes.
It adapts to megatron-core's loss contract once: the loss function returns
``(sum of per-example losses, their total weight, report)`` with ``calculate_per_token_loss`` on, so
Megatron divides gradients by the global weight over all micro-batches and data-parallel ranks.
The weight is the number of examples, or of response tokens for token-level SFT. A step's
gradient is therefore the same mean whatever the TP/PP/DP layout.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from sppd_megatron import losses
from sppd_megatron.training.config import LossConfig
from sppd_megatron.training.logprobs import token_logprobs
from sppd_megatron.training.packing import attention_mask


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def model_device(model) -> torch.device:
    """The device this rank's stage lives on (the accelerator; see parallel.state.accelerator_device)."""
    return next(unwrap(model).parameters()).device


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch collated on the host, moved where the model is (Megatron-LM's get_batch)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sequence_logps(output: torch.Tensor, batch: dict, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed continuation log-prob [R], each row's continuation token count [R]).

    Works on every layout (:mod:`.packing`): the logits that predict each continuation token are
    gathered from wherever that token's predecessor sits, so a prefix shared by several rows is
    computed once and read by each of them.
    """
    flat = output.reshape(-1, output.shape[-1])
    picked = flat.index_select(0, batch["loss_index"])  # [T, vocab / TP]
    token_lp = token_logprobs(picked[None], batch["loss_label"][None], vocab_size)[0]
    rows = batch["values"].numel()
    seq_lp = token_lp.new_zeros(rows).index_add(0, batch["loss_row"], token_lp)
    counts = token_lp.new_zeros(rows).index_add(0, batch["loss_row"], torch.ones_like(token_lp))
    return seq_lp, counts


def _value_predictions(model, batch: dict) -> torch.Tensor:
    inner = unwrap(model)
    hidden = inner.last_hidden_states  # [S, B, H]
    picked = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, batch["row_end_index"])
    return inner.value_head(picked).float()


def compute_losses(stage: str, cfg: LossConfig, model, output: torch.Tensor, batch: dict,
                   vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses, their weights in the global mean, and metrics of one micro-batch.

    Pairs are rows 2i (chosen) and 2i+1 (rejected) and weigh one each; prm states weigh one each.
    """
    if stage == "prm":
        v = _value_predictions(model, batch)
        per_state, metrics = losses.value_loss(v, batch["values"].to(v.dtype), batch["row_example"],
                                               cfg.value_rank_weight, cfg.svpo_rank_margin, cfg.value_rank_threshold)
        return per_state, torch.ones_like(per_state), metrics
    seq_lp, counts = sequence_logps(output, batch, vocab_size)
    if stage == "sft":
        return losses.sft_loss(seq_lp, counts, cfg.sft_reduction)
    per_pair, metrics = _preference_losses(stage, cfg, model, batch, seq_lp, counts)
    return per_pair, torch.ones_like(per_pair), metrics


def _preference_losses(stage: str, cfg: LossConfig, model, batch: dict, seq_lp: torch.Tensor,
                       counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pc, pr = seq_lp[0::2], seq_lp[1::2]
    ref = batch["ref_logps"].to(seq_lp.dtype)
    rc, rr = ref[0::2], ref[1::2]
    vals = batch["values"].to(seq_lp.dtype)
    vc, vr = vals[0::2], vals[1::2]
    chosen_nll = -pc / counts[0::2].clamp(min=1)
    if stage == "dpo":
        return losses.add_chosen_nll(*losses.dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.dpo_variant, cfg.label_smoothing),
                                     chosen_nll, cfg.rpo_alpha)
    if stage == "step_dpo":
        return losses.add_chosen_nll(*losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, cfg.beta, cfg.gamma, cfg.margin_mode),
                                     chosen_nll, cfg.rpo_alpha)
    if stage == "svpo":
        v = _value_predictions(model, batch)
        return losses.svpo_loss(
            pc, pr, rc, rr, v[0::2], v[1::2], chosen_nll, cfg.beta, cfg.svpo_rank_margin, cfg.svpo_weights,
            chosen_value_target=vc, rejected_value_target=vr,
        )
    raise ValueError(f"unknown stage {stage!r}")


def _loss_func(stage: str, cfg: LossConfig, model, batch: dict, vocab_size: int, output: torch.Tensor):
    per_example, weight, metrics = compute_losses(stage, cfg, model, output, batch, vocab_size)
    device = per_example.device
    # Megatron sums the counts of all micro-batches and data-parallel ranks and divides gradients by it.
    n = weight.sum().round().to(torch.int)
    total = per_example.sum()
    report = {"loss": torch.stack([total.detach().float(), n.float()])}
    for name, value in metrics.items():
        count = torch.tensor(float(value.numel()), device=device)
        report[name] = torch.stack([value.detach().float().sum(), count])
    return total, n, report


def make_forward_step(stage: str, cfg: LossConfig, vocab_size: int) -> Callable:
    """forward_step(data_iterator, model) for megatron's get_forward_backward_func."""

    def forward_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator), model_device(model))
        output = model(batch["tokens"], batch["position_ids"], attention_mask(batch))
        return output, partial(_loss_func, stage, cfg, model, batch, vocab_size)

    return forward_step


def make_value_step() -> Callable:
    """Forward-only step that reports the value head's output at each row's last token (value-head PRM)."""

    def value_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator), model_device(model))
        output = model(batch["tokens"], batch["position_ids"], attention_mask(batch))

        def loss_func(output_tensor):
            v = _value_predictions(model, batch)
            count = torch.tensor(v.numel(), dtype=torch.int, device=v.device)
            return v.sum(), count, {"values": v.detach()}

        return output, loss_func

    return value_step


def make_logp_step(vocab_size: int) -> Callable:
    """Forward-only step that reports each row's continuation log-prob sum (reference pass)."""

    def logp_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator), model_device(model))
        output = model(batch["tokens"], batch["position_ids"], attention_mask(batch))

        def loss_func(output_tensor):
            seq_lp, _ = sequence_logps(output_tensor, batch, vocab_size)
            count = torch.tensor(seq_lp.numel(), dtype=torch.int, device=seq_lp.device)
            return seq_lp.sum(), count, {"seq_logps": seq_lp.detach()}

        return output, loss_func

    return logp_step

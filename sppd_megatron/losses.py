"""The training objectives, each a pure function of per-sequence log-prob sums (and values).

Nothing here knows about Megatron, batches or parallelism: the trainer's forward step turns a
micro-batch into the tensors below, calls one of these, and reduces the per-example losses as
(sum, count) for Megatron. Every function returns ``(per_example_loss, metrics)`` where ``metrics``
maps a name to a per-example tensor (averaged by the trainer); ``sft_loss`` also returns each
sequence's weight in the global mean (its token count, or 1), since SFT is averaged over tokens.

Notation: for a pair (w = chosen, l = rejected) continuing the same context s,
``h = [log pi(w|s) - log ref(w|s)] - [log pi(l|s) - log ref(l|s)]`` (the log-ratio difference);
the implicit rewards are ``beta * (log pi - log ref)``.

| name       | formula                                                                 | paper |
|------------|--------------------------------------------------------------------------|-------|
| sft        | -sum_t log pi(y_t | x, y_<t) / #tokens, over the global batch (or per sequence) | SPPD 4.3 (SFT-PRM) |
| dpo/sigmoid| -(1-eps) log s(beta h) - eps log s(-beta h)  (eps = label_smoothing)     | DPO (Rafailov 2023) eq. 7; cDPO |
| dpo/ipo    | (h - 1/(2 beta))^2                                                        | IPO (Azar 2023) eq. 17 |
| step_dpo   | -log s(beta h - m),  m = gamma (V(s_w) - V(s_l)) | gamma | 0               | SPPD eq. 5 / eq. 4 (gamma=1) |
| + rpo      | any dpo/step_dpo loss + alpha * NLL(chosen tokens) / #tokens  (``rpo_alpha``)  | RPO (Pang 2024) eq. 1; TRL loss_type sft |
| svpo       | dpo + w_rank * relu(delta - (v_w - v_l)) + w_reg * (beta log-ratio - sg(v))^2 + w_sft * sft + w_v * (v - target)^2 | SVPO eq. 7-10 |
| prm        | (v - (2V - 1))^2 per state + w_rank * relu(delta - (v_w - v_l)) over sibling states with V_w - V_l > tau | SVPO eq. 7 (MSE), eq. 10 (margin) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

DPO_VARIANTS = ("sigmoid", "ipo", "conservative")
SFT_REDUCTIONS = ("token", "sequence")
MARGIN_MODES = ("dynamic", "fixed", "none")


def _log_ratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log pi/ref of chosen, of rejected, their difference h)."""
    chosen, rejected = pc - rc, pr - rr
    return chosen, rejected, chosen - rejected


def _preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    margin = chosen_rewards - rejected_rewards
    return {
        "accuracy": (margin > 0).float(),
        "margin": margin.detach(),
        "chosen_reward": chosen_rewards.detach(),
        "rejected_reward": rejected_rewards.detach(),
    }


def sft_loss(sum_logps: Tensor, num_tokens: Tensor,
             reduction: Literal["token", "sequence"] = "token") -> tuple[Tensor, Tensor, Metrics]:
    """Next-token NLL on response tokens: ``(per_sequence_loss, weight, metrics)``.

    ``sum_logps`` [batch] is each response's summed token log-prob, ``num_tokens`` [batch] its token
    count (prompt and context tokens are never counted). The batch's loss is
    ``sum(per_sequence_loss) / sum(weight)`` over the global batch (every micro-batch and
    data-parallel rank; the trainer hands both sums to Megatron):

    - ``token``: loss ``-sum_logps``, weight ``num_tokens``: the mean NLL over all response tokens
      of the batch, so a long response counts for more (Megatron's and TRL SFTTrainer's loss);
    - ``sequence``: loss ``-sum_logps / num_tokens``, weight 1: the mean over sequences of each
      one's mean NLL, every response counting the same.
    """
    if reduction not in SFT_REDUCTIONS:
        raise ValueError(f"unknown SFT reduction {reduction!r}; choose one of {SFT_REDUCTIONS}")
    tokens = num_tokens.to(sum_logps.dtype)
    if reduction == "token":
        return -sum_logps, tokens, {"tokens": tokens}
    return -sum_logps / tokens.clamp(min=1), torch.ones_like(tokens), {"tokens": tokens}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    variant: Literal["sigmoid", "ipo", "conservative"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Sentence-level DPO on sequence log-prob sums.

    - ``sigmoid``: ``-log sigmoid(beta * h)`` (DPO, Rafailov et al. 2023, eq. 7);
    - ``conservative``: label-smoothed cDPO, ``-(1-eps) log s(beta h) - eps log s(-beta h)``
      with ``eps = label_smoothing`` (Mitchell 2023; TRL's ``sigmoid`` with label_smoothing);
    - ``ipo``: ``(h - 1/(2 beta))^2`` (IPO, Azar et al. 2023, eq. 17). IPO is usually applied to
      length-normalised log-probs; pass per-token means to get that form.
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; choose one of {DPO_VARIANTS}")
    chosen_logratios, rejected_logratios, h = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if variant == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing if variant == "conservative" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, _preference_metrics(beta * chosen_logratios, beta * rejected_logratios)


def step_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_values: Tensor | None,
    rejected_values: Tensor | None,
    beta: float,
    gamma: float,
    margin_mode: Literal["dynamic", "fixed", "none"] = "dynamic",
) -> tuple[Tensor, Metrics]:
    """Step-level DPO with a value margin (SPPD, Theorem 4.2 / eq. 5).

    ``L = -log sigmoid(beta * h(w, l) - m)`` over sibling steps w, l of the same state s_t, where

    - ``dynamic``: ``m = gamma * (V(s_{t+1}^w) - V(s_{t+1}^l))`` (SPPD's dynamic value margin; the PRM
      score approximates V*), ``chosen_values``/``rejected_values`` are those V's;
    - ``fixed``: ``m = gamma`` (a constant margin, SPPD Table 4's fixed-margin baseline);
    - ``none``: ``m = 0`` (plain step-DPO, Lai et al. 2024; equals sentence DPO's sigmoid loss on
      the step log-probs).

    Log-probs are sums over the step's tokens only: the shared prefix is context, never loss.
    """
    if margin_mode not in MARGIN_MODES:
        raise ValueError(f"unknown margin mode {margin_mode!r}; choose one of {MARGIN_MODES}")
    chosen_logratios, rejected_logratios, h = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if margin_mode == "dynamic":
        if chosen_values is None or rejected_values is None:
            raise ValueError("margin_mode 'dynamic' needs chosen_values and rejected_values")
        margin = gamma * (chosen_values - rejected_values).to(h.dtype)
    elif margin_mode == "fixed":
        margin = torch.full_like(h, gamma)
    else:
        margin = torch.zeros_like(h)
    losses = -F.logsigmoid(beta * h - margin)
    metrics = _preference_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics["value_margin"] = margin.detach()
    return losses, metrics


def add_chosen_nll(losses: Tensor, metrics: Metrics, chosen_nll: Tensor, rpo_alpha: float) -> tuple[Tensor, Metrics]:
    """RPO: a preference loss plus ``rpo_alpha`` times the chosen continuation's per-token NLL.

    Iterative RPO (Pang et al. 2024, eq. 1) adds this term to DPO for math reasoning because plain
    DPO lowers the chosen log-probs together with the rejected ones and accuracy falls; TRL 1.16
    spells it ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``. ``chosen_nll`` is the
    per-token mean NLL of each chosen continuation (for step pairs: the chosen step's tokens only,
    never the shared prefix). TRL averages over all chosen tokens of the batch instead; the two
    agree when the chosen continuations of a batch have equal lengths.
    """
    metrics = {**metrics, "chosen_nll": chosen_nll.detach()}
    if rpo_alpha == 0:
        return losses, metrics
    return losses + rpo_alpha * chosen_nll, metrics


@dataclass
class SVPOWeights:
    """Weights of SVPO's terms (defaults: SVPO appendix A, 'margin and MSE 0.25, regulariser 0.001, SFT 5')."""

    rank: float = 0.25
    """Value margin-ranking term."""
    regulariser: float = 0.001
    """MSE between the implicit reward and the (detached) value prediction."""
    sft: float = 5.0
    """NLL on the chosen continuation (keeps the policy from degenerating)."""
    value_mse: float = 0.25
    """MSE of the value head against the pair's value labels (mapped to [-1, 1])."""


def svpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_value_pred: Tensor,
    rejected_value_pred: Tensor,
    chosen_nll: Tensor,
    beta: float,
    rank_margin: float,
    weights: SVPOWeights,
    chosen_value_target: Tensor | None = None,
    rejected_value_target: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Step-level Value Preference Optimization (SVPO, Chen et al. 2024, eq. 7-10).

    ``value_pred`` are the value head's outputs (tanh, in [-1, 1]) at the last token of each step;
    targets in [0, 1] (PRM/Q labels) are mapped to [-1, 1] as ``2v - 1``. Terms:

    - DPO: ``-log sigmoid(beta * h)`` (eq. 8);
    - margin ranking (eq. 9): ``relu(rank_margin - (v_w - v_l))``, values of the positive step must
      exceed the negative's by ``rank_margin``;
    - regulariser (eq. 10): ``((beta * logratio_w - sg(v_w))^2 + (beta * logratio_l - sg(v_l))^2) / 2``,
      pulling the implicit reward to the explicit value's scale (value detached);
    - SFT on the chosen continuation (``chosen_nll``, per-token mean) and value MSE against targets
      (eq. 7's pre-training terms, kept during preference learning as in SVPO appendix A).

    The equation images are missing from our copy of the paper; the forms above follow its text and
    are what this function computes.
    """
    chosen_logratios, rejected_logratios, h = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    dpo = -F.logsigmoid(beta * h)
    rank = torch.relu(rank_margin - (chosen_value_pred - rejected_value_pred))
    reg = 0.5 * (
        (beta * chosen_logratios - chosen_value_pred.detach()) ** 2
        + (beta * rejected_logratios - rejected_value_pred.detach()) ** 2
    )
    value_mse = torch.zeros_like(dpo)
    if chosen_value_target is not None and rejected_value_target is not None:
        value_mse = 0.5 * (
            (chosen_value_pred - (2 * chosen_value_target - 1)) ** 2
            + (rejected_value_pred - (2 * rejected_value_target - 1)) ** 2
        )
    losses = dpo + weights.rank * rank + weights.regulariser * reg + weights.sft * chosen_nll + weights.value_mse * value_mse
    metrics = _preference_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics.update(
        dpo=dpo.detach(),
        value_rank=rank.detach(),
        value_regulariser=reg.detach(),
        value_mse=value_mse.detach(),
        sft_nll=chosen_nll.detach(),
        value_accuracy=(chosen_value_pred > rejected_value_pred).float(),
    )
    return losses, metrics


def value_loss(
    value_pred: Tensor,
    value_target: Tensor,
    group: Tensor,
    rank_weight: float = 0.0,
    rank_margin: float = 0.5,
    rank_threshold: float = 0.5,
) -> tuple[Tensor, Metrics]:
    """Value-head regression, the learned process reward (the ``prm`` stage): ``(per_state_loss, metrics)``.

    ``value_pred`` [R] are the head's outputs (tanh, in [-1, 1]) at the last token of each state's
    step, ``value_target`` [R] the states' labels V in [0, 1] (Monte-Carlo, tree value or MCTS Q),
    ``group`` [R] which sibling group (children of one state) each row belongs to. Per state:

    - MSE ``(v - (2V - 1))^2``: SVPO eq. 7's value term, the pointwise part, over every node;
    - with ``rank_weight`` > 0, SVPO eq. 10's margin term ``relu(rank_margin - (v_w - v_l))`` for
      every pair of siblings w, l of one group with ``V_w - V_l > rank_threshold``, weighted by
      ``rank_weight`` and charged to the chosen state w (so the batch's loss is the sum of both terms
      divided by the number of states).

    The head reads the value on the [-1, 1] scale; a PRM reading is (v + 1) / 2.
    """
    target = 2.0 * value_target.to(value_pred.dtype) - 1.0
    mse = (value_pred - target) ** 2
    rank = torch.zeros_like(mse)
    pairs = torch.zeros_like(mse)
    if rank_weight > 0 and value_pred.numel() > 1:
        same = group[:, None] == group[None, :]
        chosen = same & ((value_target[:, None] - value_target[None, :]) > rank_threshold)
        hinge = torch.relu(rank_margin - (value_pred[:, None] - value_pred[None, :]))
        rank = (hinge * chosen).sum(dim=1)
        pairs = chosen.sum(dim=1).to(mse.dtype)
    return mse + rank_weight * rank, {
        "value_mse": mse.detach(),
        "value_rank": rank.detach(),
        "value_rank_pairs": pairs.detach(),
        "value_abs_error": (value_pred - target).abs().detach(),
    }


LOSS_NAMES = ("sft", "dpo", "step_dpo", "svpo", "prm")

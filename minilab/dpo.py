"""Direct Preference Optimization (Rafailov et al., 2023), written out by hand: the losses.

DPO trains a policy pi to prefer a chosen answer y_w over a rejected one y_l for the same prompt
x, while staying close to a frozen reference model pi_ref. With log-ratios

    logits = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]

the losses are (beta sets how far from the reference the policy may move):

    sigmoid  -log sigmoid(beta * logits)                              the DPO paper
             with label smoothing eps (conservative DPO, "cDPO"):
             -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits)
    ipo      (logits - 1 / (2 beta))^2                                IPO, Azar et al. 2023
    hinge    relu(1 - beta * logits)                                  SLiC, Zhao et al. 2023
    + RPO    alpha * NLL of the chosen answer per token               RPO, Pang et al. 2024

SimPO (Meng et al., 2024; `simpo_loss`) drops the reference model: its reward is the policy's
average log-probability per answer token, and the chosen reward must beat the rejected one by a
target margin gamma:

    simpo    -log sigmoid(beta * (log pi(y_w|x) / |y_w| - log pi(y_l|x) / |y_l|) - gamma)

No reference pass is run or cached for it.

The log-probabilities log pi(y|x) come from `minilab.scoring.answer_logps` (the prompt run once,
its answers beside it in the same call), for rows in [chosen, rejected, chosen, rejected, ...]
order (`pairs.dpo_batches`); `split_pairs` turns them into the (chosen, rejected) inputs here.
The reference is the same network with its LoRA adapters switched off
(`minilab.lora.disable_adapters`), and its log-probabilities are computed once, before
training (`reference_logps`), because they never change.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilab.lora import disable_adapters
from minilab.scoring import answer_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # with a reference; "simpo" (below) is reference-free


# ---------------------------------------------------------------------------------------------
# The reference model's log-probabilities, and the pair order
# ---------------------------------------------------------------------------------------------


def split_pairs(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*2,) logps in [chosen, rejected, chosen, rejected, ...] order -> (chosen (B,), rejected (B,))."""
    pairs = logps.view(-1, 2)  # (B, 2)
    return pairs[:, 0], pairs[:, 1]


@torch.no_grad()
def reference_logps(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], normalize: bool = False,
                    prefix_ids: torch.Tensor | None = None, logps_fn=None) -> list[torch.Tensor]:
    """Reference log-probs for every batch, computed once with the adapters OFF, before training.

    batches: the training batches, each a mapping with prompt_ids, prompt_mask, answer_ids,
        answer_mask as taken by `answer_logps`. Keep the batches fixed (build them once and
        shuffle their order, not their contents) so that result[i] stays aligned with batch i.
    Returns one (B*n,) float32 tensor per batch, on the batches' device. Use `split_pairs` on an
    element to get (ref_chosen, ref_rejected). The model is put in eval mode (no dropout) for
    this and then restored to the mode it was in. `logps_fn(model, batch)`, when given, replaces
    `answer_logps` (train_dpo.py's one-call form under FSDP).
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        with disable_adapters(model):
            for b in batches:
                if logps_fn is not None:
                    out.append(logps_fn(model, b).detach())
                else:
                    out.append(answer_logps(model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"],
                                            normalize=normalize, prefix_ids=prefix_ids).detach())
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                   policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logged metrics of a preference loss, from (B,) detached rewards and the policy's logps."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (mean over the batch) and its usual metrics; all inputs are (B,) logps.

    rpo_alpha > 0 adds alpha times the chosen answers' negative log-likelihood per token
    (-policy_chosen / chosen_lengths, averaged over the batch): "RPO" (Pang et al. 2024). DPO
    alone only widens the gap between chosen and rejected, and often does so by pushing BOTH
    down, until greedy generation says neither; the NLL term keeps the right answer likely.

    weights (B,): each pair's weight in the batch mean (e.g. inverse label frequency); None = all 1.

    For IPO this uses whatever logps it is given. TRL divides them by the answer length first;
    to match it, score with `answer_logps(..., normalize=True)` for both policy and reference.
    Metrics are detached 0-d tensors (call .item() when logging, not every step on a GPU):
    rewards/chosen and rewards/rejected are beta * (policy - reference) log-probs, averaged;
    rewards/accuracies is how often the chosen reward beats the rejected one; rewards/margins
    their mean difference; logps/chosen and logps/rejected the policy's mean log-probs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: choose one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing only applies to loss_type='sigmoid' (conservative DPO)")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"policy and reference logps must all have the same shape, got {sorted(map(tuple, shapes))}")

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * logits)

    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    metrics = reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    w = torch.ones_like(losses) if weights is None else weights.to(losses)
    loss = (w * losses).mean()
    metrics["loss/dpo"] = loss.detach()  # the preference part alone (ln 2 at the start)
    if rpo_alpha:
        if chosen_lengths is None:
            raise ValueError("rpo_alpha needs chosen_lengths (real tokens per chosen answer) for the per-token NLL")
        nll = -(w * policy_chosen / chosen_lengths.to(policy_chosen.dtype)).mean()
        metrics["nll/chosen"] = nll.detach()
        loss = loss + rpo_alpha * nll
    return loss, metrics


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO's loss (mean over the batch) and the DPO loss's metrics, from (B,) summed logps.

    The reward of an answer is beta times its mean log-probability per token (the lengths are its
    real tokens), so a long answer is not rewarded for being long, and no reference is needed. The
    margin gamma asks for more than a tie: at the start, with equal rewards, the loss is
    -log sigmoid(-gamma) (0.974 for gamma 0.5), not ln 2. Label smoothing mixes in the loss of the
    flipped pair, as conservative DPO does. rpo_alpha adds the chosen answers' NLL per token, as in
    `dpo_loss` (CPO-SimPO). The defaults are the paper's and TRL's (beta 2, gamma 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if policy_chosen.shape != policy_rejected.shape:
        raise ValueError(f"chosen and rejected logps must have the same shape, got {tuple(policy_chosen.shape)} "
                         f"and {tuple(policy_rejected.shape)}")
    chosen_rewards = beta * policy_chosen / chosen_lengths.to(policy_chosen.dtype)  # (B,)
    rejected_rewards = beta * policy_rejected / rejected_lengths.to(policy_rejected.dtype)
    logits = chosen_rewards - rejected_rewards - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    w = torch.ones_like(losses) if weights is None else weights.to(losses)
    loss = (w * losses).mean()
    metrics = reward_metrics(chosen_rewards.detach(), rejected_rewards.detach(), policy_chosen, policy_rejected)
    metrics["loss/dpo"] = loss.detach()
    if rpo_alpha:
        nll = -(w * policy_chosen / chosen_lengths.to(policy_chosen.dtype)).mean()
        metrics["nll/chosen"] = nll.detach()
        loss = loss + rpo_alpha * nll
    return loss, metrics


def sft_loss(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised answers: the cross-entropy of the right answer's tokens after the prompt, the mean
    over all answer tokens of the batch (sum of -log p / number of tokens, as TRL's SFT takes it).

    policy_chosen: (B,) summed log-probs of the right answers; chosen_lengths: (B,) their real
    tokens. weights (B,) scale each answer's tokens (inverse label frequency); None = all 1. No
    reference model and no rejected answer: this is the NLL term of `dpo_loss`'s RPO alone, per
    token of the batch instead of per answer.
    """
    w = torch.ones_like(policy_chosen) if weights is None else weights.to(policy_chosen)
    n = chosen_lengths.to(policy_chosen.dtype)
    loss = -(w * policy_chosen).sum() / (w * n).sum()
    metrics = {"logps/chosen": policy_chosen.detach().mean(), "loss/sft": loss.detach()}
    return loss, metrics

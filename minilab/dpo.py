"""Direct Preference Optimization (Rafailov et al., 2023), written out by hand.

DPO trains a policy pi to prefer a chosen answer y_w over a rejected one y_l for the same prompt
x, while staying close to a frozen reference model pi_ref. With log-ratios

    logits = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]

the losses are (beta sets how far from the reference the policy may move):

    sigmoid  -log sigmoid(beta * logits)                              the DPO paper
             with label smoothing eps (conservative DPO, "cDPO"):
             -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits)
    ipo      (logits - 1 / (2 beta))^2                                IPO, Azar et al. 2023
    hinge    relu(1 - beta * logits)                                  SLiC, Zhao et al. 2023

Here the reference is the same network with its LoRA adapters switched off
(`minilab.lora.disable_adapters`), and its log-probabilities are computed once, before
training (`reference_logps`), because they never change.

Scoring answers (`answer_logps`). A classification example is one prompt with several candidate
answers (chosen/rejected, or all K label words). Running "prompt + answer" once per answer would
redo the prompt's work n times, and the prompt is usually most of the tokens. Instead we
  1. prefill the (left-padded) prompts once into a KV cache,
  2. repeat each prompt's cache rows n times (`cache.repeat_interleave(n)`),
  3. run all the (right-padded) answers on top of it in one batch,
  4. apply the output head in fp32 only at the positions that predict answer tokens.
Step 4 matters as much as step 1: a full (B, T, V) logit tensor for a 49k-token vocabulary is
far bigger than the model's activations, and we only need a handful of its rows.
Step 1 is `prefill` (after `run_prefix`: the instruction every prompt shares, run once);
steps 2-4 are `score_answers`. They are separate functions so that evaluation
(`lmclassifier.classify`) can score the label answers AND decode greedily from a single prefill.
`answer_logps_separate` is the plain "concatenate and run" version, kept as the reference the
fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilab.lora import disable_adapters

if TYPE_CHECKING:
    from minilab.llama import KVCache

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ---------------------------------------------------------------------------------------------
# Scoring answers
# ---------------------------------------------------------------------------------------------


def _head_logps(model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of h (N, D), with the output head and softmax in fp32."""
    head = model.lm_head
    # autocast off: under torch.autocast(bf16) F.linear would quietly run in bf16 again.
    with torch.autocast(device_type=h.device.type, enabled=False):
        if isinstance(head, nn.Linear):
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(h.float(), head.weight.float(), bias)  # (N, V) fp32
        else:  # e.g. a LoRALinear head: run it in its own dtype, then upcast
            logits = head(h).float()
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    return logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def _sum_per_row(token_logps: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Scatter per-token logps (N,) back to rows of the (R, T) mask and sum (or average) them."""
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) row index of each answer token, same order as mask[mask]
    out = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    out = out.index_add(0, rows, token_logps)  # (R,)
    if normalize:
        out = out / mask.sum(1).clamp(min=1).to(out.dtype)
    return out


def _check_prompts(prompt_ids, prompt_mask) -> None:
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt ids and mask must have the same shape: {tuple(prompt_ids.shape)} vs {tuple(prompt_mask.shape)}")
    if (prompt_mask.sum(1) == 0).any():
        raise ValueError("every prompt needs at least one real token (prompt_mask row of zeros found)")


def _check_answers(answer_ids, answer_mask, B: int) -> int:
    """n, the number of answers per prompt, after checking the answers fit B prompts."""
    if answer_ids.shape != answer_mask.shape:
        raise ValueError(f"answer ids and mask must have the same shape: {tuple(answer_ids.shape)} vs {tuple(answer_mask.shape)}")
    R = answer_ids.shape[0]
    if R % B:
        raise ValueError(f"answer rows ({R}) must be a multiple of prompt rows ({B}): n answers per prompt, prompt-major order")
    if (answer_mask.sum(1) == 0).any():
        raise ValueError("every answer needs at least one real token (answer_mask row of zeros found)")
    return R // B


@dataclass
class Prefilled:
    """Prompts already run through the model: what answers (or a decoder) continue from.

    cache: the keys/values of prefix + prompt, one row per prompt (B rows).
    h_last: (B, D) final hidden state at each prompt's last token; it predicts the next token.
    mask: (B, P + Tp) attention mask over the cached columns (1 = real token; the prefix is all 1).
    next_pos: (B,) position of the token that follows each prompt: P + its real length.
    """

    cache: KVCache
    h_last: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor


def run_prefix(model: nn.Module, prefix_ids: torch.Tensor) -> KVCache:
    """The KV cache (batch 1) of a (1, P) prefix that every prompt shares, e.g. the instruction.

    Run it once and hand it to `prefill` for each batch: prefill repeats it per prompt into a new
    cache, so this one stays as it is and can be reused.
    """
    cache = model.new_cache()
    P = prefix_ids.shape[1]
    model.hidden_states(prefix_ids, position_ids=torch.arange(P, device=prefix_ids.device)[None], cache=cache)
    return cache


def prefill(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
            prefix: KVCache | None = None) -> Prefilled:
    """Run a batch of LEFT-padded prompts (B, Tp) once, after the shared `prefix` cache if given.

    Left padding makes every prompt end in column Tp - 1, so whatever follows (answers, generated
    tokens) starts in the same column for every row.
    """
    _check_prompts(prompt_ids, prompt_mask)
    prompt_mask = prompt_mask.long()
    B = prompt_ids.shape[0]
    P = 0 if prefix is None else prefix.seq_len
    cache = model.new_cache() if prefix is None else prefix.repeat_interleave(B)  # the prefix's rows, B times
    mask = torch.cat([prompt_mask.new_ones(B, P), prompt_mask], dim=1)  # (B, P + Tp)
    # Positions count real tokens only, so a prompt's first real token is at P whatever its padding.
    pos = P + (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, Tp)
    h = model.hidden_states(prompt_ids, attention_mask=mask, position_ids=pos, cache=cache)  # (B, Tp, D)
    return Prefilled(cache=cache, h_last=h[:, -1], mask=mask, next_pos=P + prompt_mask.sum(1))


def score_answers(model: nn.Module, prompts: Prefilled, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                  normalize: bool = False) -> torch.Tensor:
    """Summed log p(answer | prompt) for n RIGHT-padded answers (B * n, Ta) per prefilled prompt.

    Rows b*n .. b*n + n - 1 of the answers belong to prompt b. Returns (B * n,) float32.
    `prompts.cache` is not changed (its rows are copied n times into a new cache), so a decoder
    can still continue from it afterwards: `lmclassifier.classify` scores and generates from one prefill.
    """
    n = _check_answers(answer_ids, answer_mask, prompts.h_last.shape[0])
    answer_mask = answer_mask.long()
    # Share each prompt's cache with its n answers (a new cache: the prompts' own is left intact).
    cache = prompts.cache.repeat_interleave(n)
    # All answers at once, continuing the positions where each prompt stopped.
    Ta = answer_ids.shape[1]
    answer_pos = prompts.next_pos.repeat_interleave(n)[:, None] + torch.arange(Ta, device=answer_ids.device)  # (B*n, Ta)
    full_mask = torch.cat([prompts.mask.repeat_interleave(n, dim=0), answer_mask], dim=1)  # (B*n, P + Tp + Ta)
    h_answer = model.hidden_states(answer_ids, attention_mask=full_mask, position_ids=answer_pos, cache=cache)  # (B*n, Ta, D)
    # Token j of an answer is predicted by the state just before it: the prompt's last state for
    # j = 0, the answer's state j - 1 after that.
    h_last = prompts.h_last.repeat_interleave(n, dim=0)  # (B*n, D)
    h_pred = torch.cat([h_last[:, None], h_answer[:, :-1]], dim=1)  # (B*n, Ta, D)
    sel = answer_mask.bool()
    token_logps = _head_logps(model, h_pred[sel], answer_ids[sel])  # (N,) N = real answer tokens
    return _sum_per_row(token_logps, sel, normalize)


def answer_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    normalize: bool = False,
    prefix_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log p(answer | prompt) for n answers per prompt, running each prompt once.

    prompt_ids, prompt_mask: (B, Tp), LEFT-padded (mask 1 = real token), so every prompt ends
        at column Tp - 1 and its answers can all start at column Tp.
    answer_ids, answer_mask: (B * n, Ta), RIGHT-padded, prompt-major: rows b*n .. b*n + n - 1
        are the answers to prompt b (for DPO pairs: chosen, rejected, chosen, rejected, ...).
    normalize: divide by the answer length (mean log-prob per token, as TRL does for IPO).
    prefix_ids: (1, P) tokens that come before EVERY prompt (the instruction of a classification
        prompt). They are run once per call, not once per prompt, and their cache is shared by
        all B prompts: the same result as prepending them to each prompt, for a fraction of the work.
    Returns (B * n,) float32. Gradients flow through the prefix and prompt as well as the answers.
    """
    prefix = None if prefix_ids is None else run_prefix(model, prefix_ids)
    prompts = prefill(model, prompt_ids, prompt_mask, prefix)
    return score_answers(model, prompts, answer_ids, answer_mask, normalize)


def answer_logps_separate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    normalize: bool = False,
) -> torch.Tensor:
    """Same result as `answer_logps`, the plain way: one full "prompt + answer" sequence per answer.

    Each row is rebuilt as [real prompt tokens, real answer tokens, padding] (right-padded), run
    without a cache, and scored at the positions that predict the answer. Costs n prompt passes
    instead of one; kept as the reference for tests and as a fallback for models without a cache.
    Padding of the inputs may be left or right here.
    """
    _check_prompts(prompt_ids, prompt_mask)
    n = _check_answers(answer_ids, answer_mask, prompt_ids.shape[0])
    rows, pred_pos, targets = [], [], []
    for r in range(answer_ids.shape[0]):
        p = prompt_ids[r // n][prompt_mask[r // n].bool()]
        a = answer_ids[r][answer_mask[r].bool()]
        rows.append(torch.cat([p, a]))
        # answer token k sits at len(p) + k and is predicted from position len(p) + k - 1
        pred_pos.append(torch.arange(len(p) - 1, len(p) + len(a) - 1))
        targets.append(a)
    T = max(len(x) for x in rows)
    ids = torch.zeros(len(rows), T, dtype=answer_ids.dtype, device=answer_ids.device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=answer_ids.device)
    for r, x in enumerate(rows):
        ids[r, : len(x)] = x
        mask[r, : len(x)] = 1
    h = model.hidden_states(ids, attention_mask=mask)  # (R, T, D)
    row_idx = torch.cat([torch.full((len(p),), r) for r, p in enumerate(pred_pos)]).to(h.device)
    col_idx = torch.cat(pred_pos).to(h.device)
    token_logps = _head_logps(model, h[row_idx, col_idx], torch.cat(targets))  # (N,)
    sel = answer_mask.bool()  # same number of real tokens per row, same order
    return _sum_per_row(token_logps, sel, normalize)


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
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
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

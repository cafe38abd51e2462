"""log p(answer | prompt), with the prompt run once: how DPO and the classifier score answers.

A classification example is one prompt with several candidate answers (DPO's chosen and rejected,
or all K label words). Running "prompt + answer" once per answer would redo the prompt's work n
times, and the prompt is usually most of the tokens. Instead evaluation's path
(`lmclassifier.classify`) does this:
  1. prefill the (left-padded) prompts once into a KV cache,
  2. repeat each prompt's cache rows n times (`cache.repeat_interleave(n)`),
  3. run all the (right-padded) answers on top of it in one batch, but for their last column
     (a last token is only predicted, never predicts),
  4. apply the output head in fp32 only at the positions that predict answer tokens.
Step 4 matters as much as step 1: a full (B, T, V) logit tensor for a 49k-token vocabulary is
far bigger than the model's activations, and we only need a handful of its rows.

Step 1 is `prefill` (after `run_prefix`: the instruction every prompt shares, run once); steps
2-4 are `score_answers`. They are separate functions so that evaluation
(`lmclassifier.classify`) can score the label answers AND decode greedily
(`generate.greedy_continue`) from a single prefill. `answer_logps`, what DPO trains with, runs the
same computation in one call: each prompt with its answers side by side in one row, the answers
kept apart by the attention mask (`answer_tree_mask`). `answer_logps_separate` is the plain
"concatenate and run" version, kept as the reference the fast paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from minilab.llama import KVCache


# A frozen head's fp32 copy, kept between calls: {weight: ((version, device, data pointer, shape), fp32 copy)}.
_FP32_COPIES = WeakIdKeyDictionary()  # by identity: a tensor's `==` is elementwise


def fp32_weight(w: torch.Tensor) -> torch.Tensor:
    """w in float32, cast once for a frozen weight rather than at every call.

    The output head of a bf16 model is the biggest matrix in it (SmolLM2: 49152 x 576, tied to
    the embedding), and scoring upcasts it for every batch: a 28M-element copy, 46 of the 124 ms
    that the head's forward and backward took for 48 answer tokens on a 2-core CPU. A weight that
    does not train never changes, so its copy is kept and reused while the tensor's version
    counter (bumped by any in-place write, e.g. `LoRALinear.merge` or `load_state_dict`), device
    and storage are the ones it was made from. A trainable weight is cast afresh (its gradient
    must flow through the cast). Exact: the same cast, made fewer times. Every call held the copy
    anyway (training keeps it for the backward matmul), so the peak memory is unchanged; between
    calls it now stays (113 MB for SmolLM2).
    """
    if w.dtype == torch.float32:
        return w
    if w.requires_grad or type(w) not in (torch.Tensor, nn.Parameter):  # (a DTensor under FSDP: no cache)
        return w.float()
    key = (w._version, w.device, w.data_ptr(), tuple(w.shape))
    kept = _FP32_COPIES.get(w)
    if kept is None or kept[0] != key:
        kept = (key, w.detach().float())
        _FP32_COPIES[w] = kept
    return kept[1]


def _head_logps(model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of h (N, D), with the output head and softmax in fp32."""
    head = model.lm_head
    # autocast off: under torch.autocast(bf16) F.linear would quietly run in bf16 again.
    with torch.autocast(device_type=h.device.type, enabled=False):
        if isinstance(head, nn.Linear):
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(h.float(), fp32_weight(head.weight), bias)  # (N, V) fp32
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


def _prompt_positions(prompt_mask: torch.Tensor, P: int) -> torch.Tensor:
    """(B, Tp) positions of left-padded prompts after a P-token prefix. They count real tokens
    only, so a prompt's first real token is at P whatever its padding."""
    return P + (prompt_mask.cumsum(1) - 1).clamp(min=0)


def _answers_from_states(model: nn.Module, h_last: torch.Tensor, h_answer: torch.Tensor, answer_ids: torch.Tensor,
                         answer_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Summed log p of (B*n, Ta) answers from the states that predict their tokens: token 0 from
    its prompt's last state h_last (B, D), token j from the answer's own state j - 1 in
    h_answer (B*n, Ta - 1, D). So an answer's last column is only ever a target: the model runs
    the first Ta - 1 (a label word and its end-of-turn token: one column, not two)."""
    n = answer_ids.shape[0] // h_last.shape[0]
    h_pred = torch.cat([h_last.repeat_interleave(n, dim=0)[:, None], h_answer], dim=1)  # (B*n, Ta, D)
    sel = answer_mask.bool()
    token_logps = _head_logps(model, h_pred[sel], answer_ids[sel])  # (N,) N = real answer tokens
    return _sum_per_row(token_logps, sel, normalize)


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

    @staticmethod
    def concat(states: list["Prefilled"]) -> "Prefilled":
        """The rows of several prefilled batches as one batch: caches and masks left-padded to the
        longest with masked columns, so that every row still ends in the last column. Decoding
        a few big batches costs less than many small ones (`lmclassifier.classify`)."""
        from minilab.llama import KVCache

        S = max(s.mask.shape[1] for s in states)
        mask = torch.cat([F.pad(s.mask, (S - s.mask.shape[1], 0)) for s in states])  # (sum B, S)
        return Prefilled(cache=KVCache.concat([s.cache for s in states]), h_last=torch.cat([s.h_last for s in states]),
                         mask=mask, next_pos=torch.cat([s.next_pos for s in states]))


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
    pos = _prompt_positions(prompt_mask, P)  # (B, Tp)
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
    Ta = answer_ids.shape[1]
    h_answer = prompts.h_last.new_zeros(answer_ids.shape[0], 0, prompts.h_last.shape[-1])  # one-token answers: none
    if Ta > 1:  # the first Ta - 1 columns (`_answers_from_states`)
        inputs = answer_ids[:, :-1]  # (B*n, Ta - 1)
        # Share each prompt's cache with its n answers (a new cache: the prompts' own is left intact).
        cache = prompts.cache.repeat_interleave(n)
        # All answers at once, continuing the positions where each prompt stopped.
        answer_pos = prompts.next_pos.repeat_interleave(n)[:, None] + torch.arange(Ta - 1, device=answer_ids.device)
        full_mask = torch.cat([prompts.mask.repeat_interleave(n, dim=0), answer_mask[:, :-1]], dim=1)  # (B*n, S + Ta - 1)
        h_answer = model.hidden_states(inputs, attention_mask=full_mask, position_ids=answer_pos, cache=cache)  # (B*n, Ta - 1, D)
    return _answers_from_states(model, prompts.h_last, h_answer, answer_ids, answer_mask, normalize)


def answer_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    normalize: bool = False,
    prefix_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log p(answer | prompt) for n answers per prompt, running each prompt once, in one
    forward call: each prompt and its n answers side by side in one row,
    [prompt, answer 0, ..., answer n-1], where an answer attends to the prompt and to itself only
    (`answer_tree_mask`) and takes the positions that follow the prompt.

    prompt_ids, prompt_mask: (B, Tp), LEFT-padded (mask 1 = real token), so every prompt ends
        at column Tp - 1 and its answers can all start at column Tp.
    answer_ids, answer_mask: (B * n, Ta), RIGHT-padded, prompt-major: rows b*n .. b*n + n - 1
        are the answers to prompt b (for DPO pairs: chosen, rejected, chosen, rejected, ...).
    normalize: divide by the answer length (mean log-prob per token, as TRL does for IPO).
    prefix_ids: (1, P) tokens that come before EVERY prompt (the instruction of a classification
        prompt). They are run once per call, not once per prompt, and their cache is shared by
        all B prompts: the same result as prepending them to each prompt, for a fraction of the work.
    Returns (B * n,) float32. Gradients flow through the prefix and prompt as well as the answers.

    Why one call rather than `prefill` then `score_answers` (which evaluation uses, to decode from
    the prompts' cache afterwards): the answers are a few rows (a DPO step of 8 pairs: 16 answer
    rows beside about 300 prompt rows), and as a batch of their own they ran every projection of
    every layer, forward and backward, as matmuls of 16 rows, which the CPU runs at a fraction of
    its speed. Side by side with their prompts they join the prompts' matmuls instead.
    """
    _check_prompts(prompt_ids, prompt_mask)
    B, Tp = prompt_ids.shape
    n = _check_answers(answer_ids, answer_mask, B)
    prompt_mask, answer_mask = prompt_mask.long(), answer_mask.long()
    prefix = None if prefix_ids is None else run_prefix(model, prefix_ids)
    P = 0 if prefix is None else prefix.seq_len
    cache = model.new_cache() if prefix is None else prefix.repeat_interleave(B)
    A = answer_ids.shape[1] - 1  # columns an answer runs (its last token is only a target)
    ids = torch.cat([prompt_ids, answer_ids[:, :-1].reshape(B, n * A)], dim=1)  # (B, Tp + n*A)
    next_pos = P + prompt_mask.sum(1)  # (B,) position of each prompt's first answer token
    prompt_pos = _prompt_positions(prompt_mask, P)  # (B, Tp)
    answer_pos = (next_pos[:, None] + torch.arange(A, device=ids.device)).repeat(1, n)  # (B, n*A)
    mask = answer_tree_mask(prompt_mask, answer_mask[:, :-1].reshape(B, n * A), n, P)  # (B, 1, T, P + T)
    h = model.hidden_states(ids, attention_mask=mask, position_ids=torch.cat([prompt_pos, answer_pos], dim=1),
                            cache=cache)  # (B, Tp + n*A, D)
    h_answer = h[:, Tp:].reshape(B * n, A, h.shape[-1])  # (B*n, A, D)
    return _answers_from_states(model, h[:, Tp - 1], h_answer, answer_ids, answer_mask, normalize)


def answer_tree_mask(prompt_mask: torch.Tensor, answer_mask: torch.Tensor, n: int, P: int) -> torch.Tensor:
    """The attention mask of prompts followed by their n answers side by side, (B, 1, T, P + T).

    Row b of the batch is [P prefix columns (in the cache), Tp prompt columns, answer 0's A
    columns, ..., answer n-1's A columns], T = Tp + n*A. A query sees the prefix, the real prompt
    tokens before it and, if it belongs to an answer, the real tokens of that answer up to
    itself, never another answer: each answer continues the prompt as if it were alone. Every
    query sees itself, so a padding row stays finite (`llama.build_attention_mask`). The masked
    keys still cost work (every query meets all P + T columns), which is nothing beside the
    projections for label-word answers and grows with n*A for long ones.
    prompt_mask: (B, Tp); answer_mask: (B, n*A), answer j of prompt b in columns j*A .. j*A + A - 1.
    """
    B, Tp = prompt_mask.shape
    A = answer_mask.shape[1] // n
    T, dev = Tp + n * A, prompt_mask.device
    branch = torch.cat([torch.full((P + Tp,), -1, device=dev), torch.arange(n, device=dev).repeat_interleave(A)])  # (P + T,)
    key_pos = torch.arange(P + T, device=dev)[None, :]  # (1, P + T)
    query_pos = torch.arange(P, P + T, device=dev)[:, None]  # (T, 1)
    shared_or_own = (branch[None, :] == -1) | (branch[None, :] == branch[P:, None])  # (T, P + T)
    real = torch.cat([prompt_mask.new_ones(B, P), prompt_mask, answer_mask], dim=1).bool()  # (B, P + T)
    allowed = ((key_pos <= query_pos) & shared_or_own)[None] & real[:, None, :]  # (B, T, P + T)
    allowed = allowed | (key_pos == query_pos)[None]
    return allowed[:, None]  # (B, 1, T, P + T)


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

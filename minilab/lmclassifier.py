"""A chat language model used as a text classifier.

The model is asked a question about the text and should answer with one short word per label
(from the task registry: "negative"/"positive", "no"/"yes", ...). Two ways to read its answer:

* **label scoring** (the prediction): the label whose answer (the word and the end-of-turn token)
  has the highest log-likelihood after the prompt. The prompt is run once and its KV cache is
  shared by the K candidate answers, exactly as DPO scores its chosen and rejected answers, and
  by the greedy decoding below (one prefill per batch for both).
* **free generation**: greedy decoding of a few tokens, mapped back to a label when the answer
  starts with a label's word. A model can rank the right label first yet ramble when generating,
  so both accuracies are reported.

DPO pairs come from the labels: the chosen answer is the right label's, the rejected one a wrong
label's (every wrong label, or one sampled per example when there are many classes).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .dpo import Prefilled, prefill, run_prefix, score_answers
from .tasks import TaskSpec


@dataclass
class PromptFormat:
    """How a text becomes a prompt, and which answer stands for each label."""

    question: str
    answers: list[str]
    max_text_tokens: int = 256
    keep: str = "head"  # which part of a long text survives the cut: head, tail, or middle (= both ends)

    @classmethod
    def for_task(cls, spec: TaskSpec, label_names: list[str], keep: str | None = None, **kw) -> "PromptFormat":
        """The spec's answers and question; missing ones are made from the label names
        (answers = the names themselves; "Which of these labels fits the text: a or b?")."""
        answers = list(spec.answers) if spec and spec.answers else list(label_names)
        if len(answers) != len(label_names):
            raise ValueError(f"{len(answers)} answers ({', '.join(answers)}) for {len(label_names)} labels "
                             f"({', '.join(label_names)}): give one answer per label with --answers")
        options = ", ".join(answers[:-1]) + " or " + answers[-1]
        question = spec.question if spec and spec.question else f"Which of these labels fits the text: {options}?"
        return cls(question=question, answers=answers, keep=keep or (spec.truncate if spec else None) or "head", **kw)

    def options(self) -> str:
        return " or ".join(self.answers) if len(self.answers) == 2 else ", ".join(self.answers)

    def messages(self, text: str) -> list[dict]:
        """The instruction goes in the system turn and the text alone in the user turn, so that every
        prompt starts with the same tokens: that shared prefix is run once, not once per text."""
        return [{"role": "system", "content": f"{self.question} Answer with one word: {self.options()}."},
                {"role": "user", "content": text}]


MARKER = "\x00TEXT\x00"


def split_template(tokenizer, fmt: PromptFormat) -> tuple[list[int], str]:
    """(ids of the prefix every prompt shares, the template text that follows each text)."""
    rendered = tokenizer.apply_chat(fmt.messages(MARKER), add_generation_prompt=True)
    head, tail = rendered.split(MARKER)
    return tokenizer.encode(head), tail


def truncate_text(tokenizer, text: str, max_tokens: int, keep: str) -> list[int]:
    """The text's ids, cut to `max_tokens`: keeping its head, its tail, or both ends ("middle":
    two thirds from the start, one third from the end, so a review's closing metadata survives)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return ids
    if keep == "head":
        return ids[:max_tokens]
    if keep == "tail":
        return ids[-max_tokens:]
    tail = max_tokens // 3
    return ids[: max_tokens - tail] + ids[len(ids) - tail:]


class PromptBuilder:
    """Token ids of classification prompts: one shared prefix + (text, end of the template) per example."""

    def __init__(self, tokenizer, fmt: PromptFormat):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.prefix, tail = split_template(tokenizer, fmt)
        self.tail = tokenizer.encode(tail)

    def example(self, text: str) -> list[int]:
        return truncate_text(self.tokenizer, text, self.fmt.max_text_tokens, self.fmt.keep) + self.tail

    def full(self, text: str) -> list[int]:
        """The whole prompt (prefix included), e.g. for streaming generation."""
        return self.prefix + self.example(text)


def answer_token_ids(tokenizer, fmt: PromptFormat) -> list[list[int]]:
    """Each label's answer as the model should write it: the word, then the end-of-turn token."""
    eot = tokenizer.eot_ids[0]
    return [tokenizer.encode(a) + [eot] for a in fmt.answers]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, T): sequences end at the last column, so answers can follow at once."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def map_answer(text: str, answers: list[str]) -> int:
    """The label a generated answer names, or -1 (counted as wrong).

    An answer that starts with a label's word names it ("Positive."); so does a sentence in which
    exactly one label's word appears ("The sentiment of this review is negative"). Anything else,
    including a sentence naming two labels, is unparsed.
    """
    t = text.strip().strip(".!\"'*:").lower()
    hits = [i for i, a in enumerate(answers) if t.startswith(a.lower())]
    if hits:
        return max(hits, key=lambda i: len(answers[i]))
    words = set(re.findall(r"\w+", t))
    named = [i for i, a in enumerate(answers) if a.lower() in words]
    return named[0] if len(named) == 1 else -1


@torch.no_grad()
def classify(model, tokenizer, prefix: list[int], prompts: list[list[int]], answers: list[list[int]], device, amp_ctx,
             batch_size: int = 32, gen_tokens: int = 0) -> tuple[list[int], list[list[float]], list[str]]:
    """Label scores for every prompt, and (if gen_tokens) its greedy answer.

    Every batch of prompts is run through the model once (`dpo.prefill`). The K label answers
    are scored on copies of that cache (`dpo.score_answers`), and greedy decoding then continues
    from the cache itself: scoring and generation share one prefill instead of running the
    prompts twice. The instruction prefix that every prompt shares is run once per call.
    Returns (predicted label, per-label log-likelihoods, generated text) per prompt.
    """
    K = len(answers)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    preds, scores, texts = [0] * len(prompts), [None] * len(prompts), [""] * len(prompts)
    pad = tokenizer.pad_id
    ans_ids, ans_mask = (t.to(device) for t in right_pad(answers, pad))  # (K, Ta)
    with amp_ctx:
        shared = run_prefix(model, torch.tensor([prefix], device=device)) if prefix else None  # batch 1
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            p_ids, p_mask = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad))  # (B, Tp)
            B = len(idx)
            state = prefill(model, p_ids, p_mask, shared)
            # rows b*K .. b*K + K - 1: the K answers to prompt b
            logps = score_answers(model, state, ans_ids.repeat(B, 1), ans_mask.repeat(B, 1))  # (B*K,)
            logps = logps.view(B, K).float().cpu()
            for j, i in enumerate(idx):
                scores[i] = logps[j].tolist()
                preds[i] = int(logps[j].argmax())
            if gen_tokens:  # after scoring: decoding appends to state.cache
                gen = greedy_continue(model, state, gen_tokens, tokenizer.eot_ids)
                for j, i in enumerate(idx):
                    texts[i] = tokenizer.decode(gen[j], skip_special=True)
    return preds, scores, texts


@torch.no_grad()
def greedy_continue(model, state: Prefilled, max_new: int, stop_ids) -> list[list[int]]:
    """Greedy decoding from prefilled prompts (`dpo.prefill`), each row cut at its first stop id.

    The first new token comes from the prompts' last hidden state, so nothing is recomputed.
    Each step appends one column to `state.cache` (in place); decoding ends after `max_new`
    tokens or as soon as every row has said a stop id (short label answers usually do in 2).
    """
    B = state.h_last.shape[0]
    if max_new <= 0:
        return [[] for _ in range(B)]
    cache, mask, pos = state.cache, state.mask, state.next_pos[:, None]  # mask (B, S), pos (B, 1)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=mask.device)
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    logits = model.lm_head(state.h_last)  # (B, V): what the last prompt token predicts
    out = []
    for step in range(max_new):
        tok = logits.float().argmax(-1, keepdim=True)  # (B, 1)
        out.append(tok)
        done |= torch.isin(tok[:, 0], stops)
        if step == max_new - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)  # (B, S + 1)
        logits = model(tok, attention_mask=mask, position_ids=pos, cache=cache)[:, -1]  # (B, V)
        pos = pos + 1
    gen = torch.cat(out, dim=1).tolist()
    stop_set = set(stop_ids)
    return [row[: next((k for k, t in enumerate(row) if t in stop_set), len(row))] for row in gen]


@torch.no_grad()
def greedy_batch(model, prefix_ids: torch.Tensor | None, p_ids: torch.Tensor, p_mask: torch.Tensor, max_new: int,
                 stop_ids) -> list[list[int]]:
    """Greedy decoding for a left-padded batch after a shared (1, P) prefix, with a KV cache;
    each row is cut at its first stop id (`greedy_continue` after a fresh prefill)."""
    prefix = None if prefix_ids is None else run_prefix(model, prefix_ids)
    return greedy_continue(model, prefill(model, p_ids, p_mask, prefix), max_new, stop_ids)


def dpo_pairs(labels: list[int], num_labels: int, all_wrong: bool, seed: int) -> list[tuple[int, int, int]]:
    """(example, chosen label, rejected label) triples: each wrong label, or one sampled per example."""
    rng = random.Random(seed)
    pairs = []
    for i, y in enumerate(labels):
        wrong = [k for k in range(num_labels) if k != y]
        for r in (wrong if all_wrong else [rng.choice(wrong)]):
            pairs.append((i, y, r))
    return pairs


def balance_pairs(pairs: list[tuple[int, int, int]], num_labels: int, max_pairs: int | None, seed: int,
                  oversample: bool = True) -> list[tuple[int, int, int]]:
    """Pairs in which every chosen label is equally represented, in a shuffled order.

    Why: with 3/4 of the pairs saying "the answer is 1", DPO learns "say 1" first, and on a weak
    model that is where it stays (every test answer the majority label). Each label gets as many
    pairs as the largest label has (the others' pairs repeat, each once before any twice), or
    `max_pairs / K` each when that is smaller; then no label can win by numbers alone.
    `oversample=False` only samples across labels (for `--max-pairs`), keeping their proportions.
    """
    rng = random.Random(seed)
    by_label: dict[int, list] = {}
    for p in pairs:
        by_label.setdefault(p[1], []).append(p)
    for group in by_label.values():
        rng.shuffle(group)
    if oversample:
        per_label = max(map(len, by_label.values()))
        if max_pairs:
            per_label = min(per_label, max_pairs // len(by_label))
        chosen = [group[i % len(group)] for group in by_label.values() for i in range(per_label)]
    else:
        total = min(len(pairs), max_pairs or len(pairs))
        chosen = [p for group in by_label.values() for p in group[: round(total * len(group) / len(pairs))]]
    rng.shuffle(chosen)
    return chosen


def pair_weights(pairs: list[tuple[int, int, int]]) -> list[float]:
    """Inverse-frequency weight of each pair's chosen label, scaled to average 1 over the pairs
    (the alternative to `balance_pairs`: every label carries the same total weight per epoch)."""
    counts: dict[int, int] = {}
    for _, y, _ in pairs:
        counts[y] = counts.get(y, 0) + 1
    w = [1.0 / counts[y] for _, y, _ in pairs]
    scale = len(w) / sum(w)
    return [x * scale for x in w]


def dpo_batches(pairs, prompts: list[list[int]], answers: list[list[int]], pad_id: int, batch_size: int,
                seed: int, weights: list[float] | None = None) -> list[dict]:
    """Fixed training batches (their contents never change, so reference log-probs computed once
    stay aligned with them): pairs grouped by prompt length, each prompt with [chosen, rejected].
    A batch's "pairs" lists which of `pairs` it holds, in row order."""
    from .train import length_grouped_batches

    groups = length_grouped_batches([len(prompts[i]) for i, _, _ in pairs], batch_size, seed=seed)
    batches = []
    for g in groups:
        p_ids, p_mask = left_pad([prompts[pairs[k][0]] for k in g], pad_id)
        a_ids, a_mask = right_pad([answers[lab] for k in g for lab in pairs[k][1:]], pad_id)
        batches.append({"prompt_ids": p_ids, "prompt_mask": p_mask, "answer_ids": a_ids, "answer_mask": a_mask,
                        "n_pairs": len(g), "pairs": list(g),
                        "weights": torch.tensor([weights[k] for k in g]) if weights else None})
    return batches

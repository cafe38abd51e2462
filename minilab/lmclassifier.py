"""A chat language model used as a text classifier.

The model is asked a question about the text and should answer with one short word per label
(from the task registry: "negative"/"positive", "no"/"yes", ...). Two ways to read its answer:

* **label scoring** (the prediction): the label whose answer (the word and the end-of-turn token)
  has the highest log-likelihood after the prompt. The prompt is run once and its KV cache is
  shared by the K candidate answers, exactly as DPO scores its chosen and rejected answers.
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

from .dpo import answer_logps
from .tasks import TaskSpec


@dataclass
class PromptFormat:
    """How a text becomes a prompt, and which answer stands for each label."""

    question: str
    answers: list[str]
    max_text_tokens: int = 256
    truncate_side: str = "right"  # which end of a long text is cut: "right" keeps the beginning

    @classmethod
    def for_task(cls, spec: TaskSpec | None, label_names: list[str], **kw) -> "PromptFormat":
        if spec is not None and len(spec.answers) == len(label_names):
            return cls(question=spec.question, answers=list(spec.answers), **kw)
        options = ", ".join(label_names[:-1]) + " or " + label_names[-1]
        return cls(question=f"Which of these labels fits the text: {options}?", answers=list(label_names), **kw)

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


def truncate_text(tokenizer, text: str, max_tokens: int, side: str) -> list[int]:
    """The text's ids, cut to `max_tokens` from the stated side (so that every prompt fits)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return ids
    return ids[:max_tokens] if side == "right" else ids[-max_tokens:]


class PromptBuilder:
    """Token ids of classification prompts: one shared prefix + (text, end of the template) per example."""

    def __init__(self, tokenizer, fmt: PromptFormat):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.prefix, tail = split_template(tokenizer, fmt)
        self.tail = tokenizer.encode(tail)

    def example(self, text: str) -> list[int]:
        return truncate_text(self.tokenizer, text, self.fmt.max_text_tokens, self.fmt.truncate_side) + self.tail

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

    Returns (predicted label, per-label log-likelihoods, generated text) per prompt.
    """
    K = len(answers)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    preds, scores, texts = [0] * len(prompts), [None] * len(prompts), [""] * len(prompts)
    pad = tokenizer.pad_id
    ans_ids, ans_mask = right_pad(answers, pad)
    prefix_ids = torch.tensor([prefix], device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        p_ids, p_mask = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad))
        B = len(idx)
        with amp_ctx:
            logps = answer_logps(model, p_ids, p_mask, ans_ids.repeat(B, 1).to(device), ans_mask.repeat(B, 1).to(device),
                                 prefix_ids=prefix_ids)
        logps = logps.view(B, K).float().cpu()
        for j, i in enumerate(idx):
            scores[i] = logps[j].tolist()
            preds[i] = int(logps[j].argmax())
        if gen_tokens:
            with amp_ctx:
                gen = greedy_batch(model, prefix_ids, p_ids, p_mask, gen_tokens, tokenizer.eot_ids)
            for j, i in enumerate(idx):
                texts[i] = tokenizer.decode(gen[j], skip_special=True)
    return preds, scores, texts


@torch.no_grad()
def greedy_batch(model, prefix_ids: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor, max_new: int,
                 stop_ids) -> list[list[int]]:
    """Greedy decoding for a left-padded batch after a shared (1, P) prefix, with a KV cache;
    each row is cut at its first stop id."""
    B, P = p_ids.shape[0], prefix_ids.shape[1]
    cache = model.new_cache()
    model.hidden_states(prefix_ids, position_ids=torch.arange(P, device=p_ids.device)[None], cache=cache)
    cache = cache.repeat_interleave(B)
    mask = torch.cat([p_mask.new_ones(B, P), p_mask], dim=1)
    pos = P + (p_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(p_ids, attention_mask=mask, position_ids=pos, cache=cache)[:, -1]  # (B, V)
    next_pos = pos[:, -1:] + 1
    out = []
    for _ in range(max_new):
        tok = logits.float().argmax(-1, keepdim=True)  # (B, 1)
        out.append(tok)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        logits = model(tok, attention_mask=mask, position_ids=next_pos, cache=cache)[:, -1]
        next_pos = next_pos + 1
    gen = torch.cat(out, dim=1).tolist()
    stops = set(stop_ids)
    return [row[: next((k for k, t in enumerate(row) if t in stops), len(row))] for row in gen]


def dpo_pairs(labels: list[int], num_labels: int, all_wrong: bool, seed: int) -> list[tuple[int, int, int]]:
    """(example, chosen label, rejected label) triples: each wrong label, or one sampled per example."""
    rng = random.Random(seed)
    pairs = []
    for i, y in enumerate(labels):
        wrong = [k for k in range(num_labels) if k != y]
        for r in (wrong if all_wrong else [rng.choice(wrong)]):
            pairs.append((i, y, r))
    return pairs


def dpo_batches(pairs, prompts: list[list[int]], answers: list[list[int]], pad_id: int, batch_size: int,
                seed: int) -> list[dict]:
    """Fixed training batches (their contents never change, so reference log-probs computed once
    stay aligned with them): pairs grouped by prompt length, each prompt with [chosen, rejected]."""
    from .train import length_grouped_batches

    groups = length_grouped_batches([len(prompts[i]) for i, _, _ in pairs], batch_size, seed=seed)
    batches = []
    for g in groups:
        p_ids, p_mask = left_pad([prompts[pairs[k][0]] for k in g], pad_id)
        a_ids, a_mask = right_pad([answers[lab] for k in g for lab in pairs[k][1:]], pad_id)
        batches.append({"prompt_ids": p_ids, "prompt_mask": p_mask, "answer_ids": a_ids, "answer_mask": a_mask,
                        "n_pairs": len(g)})
    return batches

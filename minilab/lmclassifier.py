"""A chat language model used as a text classifier.

The model is asked a question about the text (`prompts.py`) and should answer with one short word
per label (from the task registry: "negative"/"positive", "no"/"yes", ...). Two ways to read its
answer:

* **label scoring** (the prediction): the label whose answer (the word and the end-of-turn token)
  has the highest log-likelihood after the prompt. The prompt is run once and its KV cache is
  shared by the K candidate answers, exactly as DPO scores its chosen and rejected answers
  (`scoring.py`), and by the greedy decoding below (one prefill per batch for both).
* **free generation**: greedy decoding of a few tokens (`generate.greedy_continue`), mapped back
  to a label by `map_answer` when the answer names one. A model can rank the right label first
  yet ramble when generating, so both accuracies are reported.
"""

from __future__ import annotations

import re

import torch

from .generate import greedy_continue
from .prompts import pad
from .scoring import Prefilled, prefill, run_prefix, score_answers


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
             batch_size: int = 32, gen_tokens: int = 0, gen_batch_size: int = 128
             ) -> tuple[list[int], list[list[float]], list[str]]:
    """Label scores for every prompt, and (if gen_tokens) its greedy answer.

    Every batch of prompts is run through the model once (`scoring.prefill`). The K label answers
    are scored on copies of that cache (`scoring.score_answers`), and greedy decoding
    (`generate.greedy_continue`) then continues from the cache itself (several batches' caches,
    merged): scoring and generation share one prefill instead of running the prompts twice. The
    instruction prefix that every prompt shares is run once per call.

    Decoding runs in bigger batches than the prefill: the prefilled rows of several batches, up to
    `gen_batch_size`, decode together (`Prefilled.concat`). A decoding step reads every weight of
    the model for a handful of rows, so its cost hardly depends on the rows (SmolLM2 in fp32 on 2
    cores: 66 ms for 1 row, 165 ms for 32, 240 ms for 64), and the rows that ramble on to the
    last token are fewer per batch than they are steps. Prefill batches stay small: their rows
    are alike in length, so little of them is padding.
    Returns (predicted label, per-label log-likelihoods, generated text) per prompt.
    """
    K = len(answers)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    preds, scores, texts = [0] * len(prompts), [None] * len(prompts), [""] * len(prompts)
    ans_ids, ans_mask = (t.to(device) for t in pad(answers, tokenizer.pad_id, side="right"))  # (K, Ta)
    held: list[tuple[list[int], Prefilled]] = []  # prefilled batches waiting to be decoded together
    with amp_ctx:
        shared = run_prefix(model, torch.tensor([prefix], device=device)) if prefix else None  # batch 1
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            p_ids, p_mask = (t.to(device) for t in pad([prompts[i] for i in idx], tokenizer.pad_id, side="left"))  # (B, Tp)
            B = len(idx)
            state = prefill(model, p_ids, p_mask, shared)
            # rows b*K .. b*K + K - 1: the K answers to prompt b
            logps = score_answers(model, state, ans_ids.repeat(B, 1), ans_mask.repeat(B, 1))  # (B*K,)
            logps = logps.view(B, K).float().cpu()
            for j, i in enumerate(idx):
                scores[i] = logps[j].tolist()
                preds[i] = int(logps[j].argmax())
            if not gen_tokens:
                continue
            held.append((idx, state))
            n_held = sum(len(ix) for ix, _ in held)
            if n_held + batch_size > gen_batch_size or start + batch_size >= len(order):
                rows = [i for ix, _ in held for i in ix]  # the prompts, in the merged batch's order
                # scoring left each cache as it was; decoding appends to the merged one
                states = [s for _, s in held]
                merged = states[0] if len(states) == 1 else Prefilled.concat(states)
                held, states, state = [], None, None  # the batches' own caches go once merged
                gen = greedy_continue(model, merged, gen_tokens, tokenizer.eot_ids)
                for j, i in enumerate(rows):
                    texts[i] = tokenizer.decode(gen[j], skip_special=True)
    return preds, scores, texts


@torch.no_grad()
def classify_with_head(model, prefix: list[int], prompts: list[list[int]], device, amp_ctx,
                       batch_size: int = 32) -> tuple[list[int], list[list[float]]]:
    """Predicted label and K-way probabilities per prompt from a classification head
    (`llama_cls.LlamaForSequenceClassification`): one forward pass per batch of prompts, after the
    shared prefix run once, and no answer words. Returns (predicted label, probabilities)."""
    pad_id = 0  # a left-padded column is masked out, so its id does not matter
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    preds, probs = [0] * len(prompts), [None] * len(prompts)
    with amp_ctx:
        shared = run_prefix(model, torch.tensor([prefix], device=device)) if prefix else None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            p_ids, p_mask = (t.to(device) for t in pad([prompts[i] for i in idx], pad_id, side="left"))  # (B, Tp)
            logits = model.head(prefill(model, p_ids, p_mask, shared).h_last).float().cpu()  # (B, K)
            for j, i in enumerate(idx):
                probs[i] = logits[j].softmax(-1).tolist()
                preds[i] = int(logits[j].argmax())
    return preds, probs

"""BERT inference: how a text becomes token ids, and how a list of them becomes logits.

`train_bert.py` evaluates with these two functions and `minilab.predict` classifies with them, so
a saved model predicts exactly what its training run's test evaluation said.
"""

from __future__ import annotations

import torch

from .batching import length_grouped_batches


def bert_encode(tokenizer, texts: list[str], max_length: int, keep_tail: int) -> list[list[int]]:
    """Token ids per text. A text longer than max_length keeps its beginning and its last
    `keep_tail` tokens (a steam review's metadata sits at its end)."""
    ids = tokenizer.encode(texts, max_length=1 << 20)
    return [x if len(x) <= max_length else x[: max_length - keep_tail] + x[len(x) - keep_tail:] for x in ids]


@torch.no_grad()
def bert_logits(model, tokenizer, ids: list[list[int]], device, amp_ctx, batch_size: int = 64) -> torch.Tensor:
    """(N, K) fp32 logits; batches sorted by length so that padding costs little."""
    out = torch.zeros(len(ids), model.config.num_labels)
    model.eval()
    with amp_ctx:
        for idx in length_grouped_batches([len(x) for x in ids], batch_size, seed=0, shuffle=False):
            batch = {k: v.to(device) for k, v in tokenizer.pad([ids[i] for i in idx]).items()}
            out[idx] = model(**batch).float().cpu()
    return out

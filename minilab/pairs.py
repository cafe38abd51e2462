"""DPO preference pairs from class labels, balanced across labels, in fixed batches.

A labelled example gives pairs for free: the chosen answer is its label's, the rejected one a
wrong label's (every wrong label, or one sampled per example when there are many classes). On
imbalanced labels DPO would first learn "say the majority label", so the pairs are balanced
(`balance_pairs`: every chosen label equally often) or weighted (`pair_weights`: inverse label
frequency). `dpo_batches` packs them into batches that never change, so that the reference
log-probabilities (`dpo.reference_logps`, computed once) stay aligned with them.
"""

from __future__ import annotations

import random

import torch

from .batching import length_grouped_batches
from .prompts import pad


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
    groups = length_grouped_batches([len(prompts[i]) for i, _, _ in pairs], batch_size, seed=seed)
    batches = []
    for g in groups:
        p_ids, p_mask = pad([prompts[pairs[k][0]] for k in g], pad_id, side="left")
        a_ids, a_mask = pad([answers[lab] for k in g for lab in pairs[k][1:]], pad_id, side="right")
        batches.append({"prompt_ids": p_ids, "prompt_mask": p_mask, "answer_ids": a_ids, "answer_mask": a_mask,
                        "n_pairs": len(g), "pairs": list(g),
                        "weights": torch.tensor([weights[k] for k in g]) if weights else None})
    return batches

"""Micro-batches of similar length, so that little compute goes to padding (training and inference)."""

from __future__ import annotations

import random


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                           group: int = 50) -> list[list[int]]:
    """Indices cut into batches of similar length, so that little compute goes to padding.

    Shuffle, then sort within windows of `group` batches by length and cut; the batch order is
    shuffled again so that training does not see short-to-long within each window. Without shuffle
    (evaluation), simply sort everything by length.
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches

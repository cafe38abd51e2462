"""Classification metrics, with the uncertainty that a small test split deserves.

The steam test split has 147 reviews: one review is 0.7 points of accuracy. So every accuracy
comes with a 95% Wilson score interval, which (unlike the normal approximation) stays inside
[0, 1] and behaves for accuracies near 0 or 1.
"""

from __future__ import annotations

import math


def confusion_matrix(y_true: list[int], y_pred: list[int], num_labels: int) -> list[list[int]]:
    """counts[true][pred]."""
    m = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        m[t][p] += 1
    return m


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion correct/n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(cm: list[list[int]]) -> float:
    """Unweighted mean of the per-class F1 scores (a class never predicted nor present scores 0)."""
    k = len(cm)
    f1s = []
    for c in range(k):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(k)) - tp
        fn = sum(cm[c]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / k


def evaluate_predictions(y_true: list[int], y_pred: list[int], num_labels: int) -> dict:
    """The metrics block every results file carries for a split."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    n = len(y_true)
    correct = sum(int(t == p) for t, p in zip(y_true, y_pred))
    cm = confusion_matrix(y_true, y_pred, num_labels)
    lo, hi = wilson_interval(correct, n)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "macro_f1": macro_f1(cm),
        "confusion": cm,
        "predicted_labels": len(set(y_pred)),  # 1 = the model answers one label for everything
    }


def one_label_warning(block: dict, label_names: list[str]) -> str | None:
    """A line saying so when every prediction in a metrics block is the same label (a collapsed model:
    its accuracy is just that label's share, however good it looks)."""
    cm = block.get("confusion") or []
    if block.get("n", 0) < 2 or len(cm) < 2:
        return None
    predicted = [c for c in range(len(cm)) if any(row[c] for row in cm)]
    if len(predicted) != 1:
        return None
    return (f"every test prediction is {label_names[predicted[0]]!r}: the model collapsed to one label "
            f"(accuracy {block['accuracy']:.3f} is that label's share; macro-F1 {block['macro_f1']:.3f})")

"""The report's pictures, drawn with matplotlib from the results files and metrics logs.

Each function takes plain Python data (lists of metric records, metrics blocks) and writes one PNG,
so a picture can be redrawn from the JSON files alone, long after the run. The Agg backend draws
without a display, which is what a server, a CI job or a notebook kernel without a screen has.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

# One colour per role, the same in every picture, so the eye learns them once.
COLORS = {"loss": "tab:blue", "eval": "tab:orange", "zero_shot": "tab:gray", "fine_tuned": "tab:blue",
          "baseline": "tab:red", "chosen": "tab:green", "rejected": "tab:red", "margins": "tab:purple"}
DPI = 120


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric from the records of one kind, in step order."""
    pts = sorted((r["step"], float(r[key])) for r in records
                 if r.get("kind") == kind and isinstance(r.get(key), (int, float)))
    return [s for s, _ in pts], [v for _, v in pts]


def training_curves(runs: list[tuple[str, str, list[dict], tuple[float, str] | None]], path: str | Path) -> Path:
    """Training loss against optimizer step, one panel per run, dev accuracy on a second y axis.

    `runs` holds (panel title, loss name, metrics records, (start loss, its name) or None). The loss is
    the mean over the micro-batches logged since the previous point; the start level (ln k for a
    k-way classifier that guesses uniformly, ln 2 for DPO before the policy moves) shows how far
    training got from knowing nothing. Dev accuracy is in percent so that it reads like the table.
    """
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.2), squeeze=False)
    for ax, (title, loss_name, records, start) in zip(axes[0], runs):
        steps, loss = _series(records, "train", "loss")
        d_steps, dpo_part = _series(records, "train", "loss/dpo")
        if d_steps and any(abs(a - b) > 1e-6 for a, b in zip(loss, dpo_part)):
            # DPO with a chosen-NLL (RPO) term: the preference part is what starts at ln 2
            ax.plot(steps, loss, color=COLORS["loss"], alpha=0.45, lw=1, label="training loss (DPO + NLL term)")
            steps, loss = d_steps, dpo_part
        ax.plot(steps, loss, color=COLORS["loss"], marker="o" if len(steps) < 30 else None, ms=3,
                label=f"training {loss_name}")
        if start is not None:
            ax.axhline(start[0], color="tab:gray", ls=":", lw=1, label=f"{start[1]}: {start[0]:.3f}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training {loss_name} (nats)", color=COLORS["loss"])
        ax.tick_params(axis="y", labelcolor=COLORS["loss"])
        ax.grid(alpha=0.3)
        ax.set_title(title)
        handles = ax.get_legend_handles_labels()
        e_steps, acc = _series(records, "eval", "accuracy")
        if e_steps:
            ax2 = ax.twinx()
            ax2.plot(e_steps, [100 * a for a in acc], color=COLORS["eval"], marker="s", ms=4, ls="--",
                     label="dev accuracy")
            ax2.set_ylabel("dev accuracy (%)", color=COLORS["eval"])
            ax2.tick_params(axis="y", labelcolor=COLORS["eval"])
            lo, hi = min(acc) * 100, max(acc) * 100
            ax2.set_ylim(max(0, lo - 10), min(100, hi + 10))
            h2 = ax2.get_legend_handles_labels()
            handles = (handles[0] + h2[0], handles[1] + h2[1])
        ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=9, frameon=False)
    fig.suptitle("Training loss and dev accuracy against step", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def dpo_rewards(records: list[dict], path: str | Path, title: str = "DPO implicit rewards") -> Path:
    """rewards/chosen, rewards/rejected and their margin against step.

    DPO's implicit reward of an answer is beta * (log pi(answer) - log pi_ref(answer)): how much
    more likely training made it, in nats scaled by beta. Training should push chosen up,
    rejected down, and the margin (their difference) above zero.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, name in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margins")):
        steps, values = _series(records, "train", key)
        if steps:
            ax.plot(steps, values, color=COLORS[name], marker="o" if len(steps) < 30 else None, ms=3,
                    lw=2.2 if name == "margins" else 1.6, label=f"{name} reward" if name != "margins" else "margin (chosen - rejected)")
    ax.axhline(0, color="black", lw=0.8)
    steps, accs = _series(records, "train", "rewards/accuracies")
    if steps:  # the share of pairs ranked right, on its own axis
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * a for a in accs], color="tab:gray", ls=":", lw=1.2, label="pairs ranked right")
        ax2.set_ylabel("pairs with chosen > rejected (%)", color="tab:gray")
        ax2.set_ylim(0, 105)
    handles, labels = [], []
    for a in fig.axes:
        h, l = a.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("implicit reward (β × log-ratio, nats)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def eval_metrics(rows: list[tuple[str, dict | None, dict]], path: str | Path, baseline: dict | None = None,
                 chance: float | None = None, title: str = "Test accuracy") -> Path:
    """Test accuracy with 95% intervals, zero-shot next to fine-tuned, one group per model.

    `rows` holds (model name, zero-shot block or None, fine-tuned block). The baseline's accuracy is
    a horizontal line with its interval as a band: a model whose error bar overlaps the band is
    not shown to differ from the baseline on a test split this small.
    """
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 * len(rows) + 2.5), 4.5))
    width = 0.38
    for i, (name, zero, tuned) in enumerate(rows):
        for offset, block, which, label in ((-width / 2, zero, "zero_shot", "zero-shot"),
                                            (width / 2, tuned, "fine_tuned", "after fine-tuning")):
            if not block:
                continue
            acc = 100 * block["accuracy"]
            lo, hi = (100 * x for x in block["accuracy_ci95"])
            ax.bar(i + offset, acc, width, color=COLORS[which], alpha=0.85, zorder=2,
                   yerr=[[acc - lo], [hi - acc]], capsize=5, label=None if _has_label(ax, label) else label)
            ax.text(i + offset, hi + 1.5, f"{acc:.1f}", ha="center", va="bottom", fontsize=9)
    if baseline:
        acc = 100 * baseline["accuracy"]
        lo, hi = (100 * x for x in baseline["accuracy_ci95"])
        ax.axhspan(lo, hi, color=COLORS["baseline"], alpha=0.08, zorder=0)
        ax.axhline(acc, color=COLORS["baseline"], ls="--", lw=1.5, zorder=3, label=f"baseline {acc:.1f}% (band: 95% interval)")
    if chance is not None:
        ax.axhline(100 * chance, color="black", ls=":", lw=1, zorder=3, label=f"majority class {100 * chance:.1f}%")
    ax.set_xticks(range(len(rows)), [name for name, _, _ in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%), error bars: 95% interval")
    ax.set_xlabel("model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=2, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _has_label(ax, label: str) -> bool:
    return label in ax.get_legend_handles_labels()[1]


def confusion(cm: list[list[int]], label_names: list[str], path: str | Path, title: str) -> Path:
    """Counts of (true label, predicted label) on test; the diagonal holds the right answers."""
    k = len(cm)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2.8, 1.2 * k + 2.2))
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    top = max(max(row) for row in cm) or 1
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(cm[t][p]), ha="center", va="center", fontsize=13,
                    color="white" if cm[t][p] > 0.6 * top else "black")
    ax.set_xticks(range(k), label_names, rotation=20 if max(map(len, label_names)) > 8 else 0, ha="right" if max(map(len, label_names)) > 8 else "center")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="test examples (count)")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def run_pictures(out_dir: str | Path, name: str, metrics_log: str | Path, label_names: list[str],
                 cm: list[list[int]], loss_name: str, start: tuple[float, str] | None) -> dict[str, Path]:
    """The pictures of ONE training run (its curve, its confusion matrix, and for DPO its rewards),
    drawn when the run ends so that its own W&B run carries them next to its curves."""
    import json

    records = [json.loads(line) for line in Path(metrics_log).read_text().splitlines() if line.strip()]
    out_dir = Path(out_dir)
    pics = {
        f"{name}/training_curve": training_curves([(name, loss_name, records, start)], out_dir / f"{name}_training_curve.png"),
        f"{name}/confusion": confusion(cm, label_names, out_dir / f"{name}_confusion.png", f"{name}: test confusion matrix"),
    }
    if any("rewards/chosen" in r for r in records):
        pics[f"{name}/dpo_rewards"] = dpo_rewards(records, out_dir / f"{name}_dpo_rewards.png", f"{name}: DPO implicit rewards")
    return pics

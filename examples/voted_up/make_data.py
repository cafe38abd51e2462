"""Make a new dataset from the raw steam reviews: does the author recommend the game (`voted_up`)?

A dataset the lab's code was not tuned on, and an imbalanced one (about 83% "True"): a test of
whether a model learns the task or just answers the majority label. The text is the review alone,
without the metadata the steam task appends (which includes "Voted Up" itself).

    python examples/voted_up/make_data.py                 # -> data/voted_up/{train,dev,test}.csv
    python train_dpo.py --data data/voted_up --task-file examples/voted_up/task.toml

The split is stratified by label and seeded (80/10/10), so every run sees the same files.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from minilab.data import SHARED_DATA, data_root


def main() -> None:
    shared = data_root() or SHARED_DATA
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", default=str(shared / "steam" / "reviews_1.5k.csv"))
    p.add_argument("--out", default="data/voted_up")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with open(args.raw, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()]
    rng = random.Random(args.seed)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for label in sorted({r["voted_up"] for r in rows}):
        group = [r for r in rows if r["voted_up"] == label]
        rng.shuffle(group)
        n_dev = n_test = round(0.1 * len(group))
        splits["dev"] += group[:n_dev]
        splits["test"] += group[n_dev : n_dev + n_test]
        splits["train"] += group[n_dev + n_test :]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        rng.shuffle(split)
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "voted_up"])
            w.writerows([r["review"], r["voted_up"]] for r in split)
        share = sum(r["voted_up"] == "True" for r in split) / len(split)
        print(f"{out / name}.csv: {len(split)} reviews, {share:.0%} voted up")


if __name__ == "__main__":
    main()

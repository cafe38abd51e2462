"""A short comparison table from the results files of one task (printed by `make lab`).

    python -m minilab.compare --task steam
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .results import fmt_score, read_results

ORDER = ("baseline", "bert", "llama")


def load_rows(task: str, root: str | Path = "results") -> list[tuple[str, dict]]:
    folder = Path(root) / task
    names = [n for n in ORDER if (folder / f"{n}.json").is_file()]
    names += sorted(p.stem for p in folder.glob("*.json") if p.stem not in ORDER)
    return [(n, read_results(folder / f"{n}.json")) for n in names]


def table(task: str, root: str | Path = "results") -> str:
    rows = load_rows(task, root)
    if not rows:
        raise ValueError(f"no results files in {Path(root) / task}: run `make lab TASK={task}` first")
    base = dict(rows).get("baseline")
    lines = [f"{task}: test accuracy [95% interval] and macro-F1",
             f"{'model':<9} {'zero-shot':<24} {'fine-tuned':<24} {'macro-F1':>8} {'vs baseline':>11} {'train s':>8}"]
    for name, r in rows:
        diff = r["fine_tuned"]["accuracy"] - base["fine_tuned"]["accuracy"] if base else float("nan")
        lines.append(f"{name:<9} {fmt_score(r['zero_shot']):<24} {fmt_score(r['fine_tuned']):<24} "
                     f"{r['fine_tuned']['macro_f1']:>8.3f} {diff:>+11.3f} {r['train_seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="print the comparison table of one task")
    p.add_argument("--task", default="steam")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    try:
        print(table(args.task, args.results))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

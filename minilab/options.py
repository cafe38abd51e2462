"""The training options every script shares, and how a run resolves them.

* `TrainConfig`: every setting of the training loop (`minilab/train.py`), and `check_config`;
  `TrainResult`, what the loop returns;
* `add_train_args`: the command-line options that fill it, each checked as it is parsed;
* `pick`: the one preset resolver: the option the user passed, else the script's preset value;
  `train_config_from_args` builds the TrainConfig with it;
* `RESUME_SAFE`: the options that do not change what a run computes, so that a resumed run may
  change them; `make_checkpointer` stores every other option in the run's checkpoints, and
  `checkpoint.config_differences` refuses a resume whose stored options differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import distributed


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (minilab/precision.py)
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    log_every: int = 10
    seed: int = 0
    metric: str = "accuracy"  # the dev metric that picks the best weights
    max_train_seconds: float | None = None  # a time budget: stop (and evaluate) once it is spent
    max_nonfinite: int = 3  # this many non-finite steps in a row stop the run
    progress: bool = True


@dataclass
class TrainResult:
    """What `train.train` returns: what the run did."""
    steps: int
    examples: int
    train_seconds: float
    examples_per_second: float
    best_step: int | None
    best_metric: float | None
    history: list[dict] = field(default_factory=list)
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    stopped_by: str | None = None  # e.g. the time budget, when it ended the run early
    checkpoints: int = 0  # checkpoints this process wrote, and the seconds they took
    checkpoint_seconds: float = 0.0
    resumed_from: int | None = None  # the step a resumed run started from
    eval_seconds: float = 0.0  # the dev evaluations (not in train_seconds, which times the steps alone)


def check_config(cfg: TrainConfig) -> None:
    """Refuse, with one line, the values that would crash the loop or quietly mean something else
    (the command line's validators catch them earlier; this guards a TrainConfig built in code)."""
    bad = [f"{name} {value!r}" for name, value, ok in (
        ("epochs", cfg.epochs, cfg.epochs > 0 and math.isfinite(cfg.epochs)),
        ("max_steps", cfg.max_steps, cfg.max_steps is None or cfg.max_steps >= 1),
        ("grad_accum", cfg.grad_accum, cfg.grad_accum >= 1),
        ("log_every", cfg.log_every, cfg.log_every >= 1),
        ("eval_every", cfg.eval_every, cfg.eval_every >= 0),
        ("max_nonfinite", cfg.max_nonfinite, cfg.max_nonfinite >= 1),
        ("warmup_ratio", cfg.warmup_ratio, 0 <= cfg.warmup_ratio < 1),
        ("max_grad_norm", cfg.max_grad_norm, cfg.max_grad_norm >= 0)) if not ok]
    if bad:
        raise ValueError(f"training config out of range: {', '.join(bad)} (counts are >= 1; eval_every 0 means once "
                         "per epoch; warmup_ratio is in [0, 1); max_grad_norm 0 means no clipping)")


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def add_train_args(parser, lr_note: str = "", **defaults) -> None:
    """Training options every script shares; `defaults` are the script's preset values (`lr_note`
    adds to --lr's help, for a script whose lr differs by mode). Every number is checked as it is
    parsed (`minilab.cli`'s validators): a count is >= 1 unless 0 has a meaning that its help names."""
    from .cli import fraction, nonneg_float, nonneg_int, positive_float, positive_int, seed_int

    d = TrainConfig(**{k: v for k, v in defaults.items() if k in TrainConfig.__dataclass_fields__})
    parser.add_argument("--epochs", type=positive_float, default=None, help=f"passes over train, > 0 (preset: {d.epochs})")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"optimizer steps, >= 1 (overrides --epochs; preset: {d.max_steps or 'set by --epochs'})")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"examples per micro-batch (preset: {d.batch_size})")
    parser.add_argument("--grad-accum", type=positive_int, default=None,
                        help=f"micro-batches per optimizer step (preset: {d.grad_accum})")
    parser.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (preset: {d.lr}{lr_note})")
    parser.add_argument("--warmup-ratio", type=fraction, default=None,
                        help=f"share of the steps spent warming up the learning rate, in [0, 1) (preset: {d.warmup_ratio})")
    parser.add_argument("--weight-decay", type=nonneg_float, default=None, help=f"AdamW weight decay, >= 0 (preset: {d.weight_decay})")
    parser.add_argument("--max-grad-norm", type=nonneg_float, default=None,
                        help=f"clip the gradient norm to this (0: no clipping; preset: {d.max_grad_norm})")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--eval-every", type=nonneg_int, default=None,
                        help=f"optimizer steps between dev evaluations (0: once per epoch; preset: {d.eval_every})")
    parser.add_argument("--log-every", type=positive_int, default=None, help=f"optimizer steps between training-log records (default {d.log_every})")
    parser.add_argument("--max-train-seconds", type=positive_float, default=None, help="stop training once this much time is spent")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--max-nonfinite", type=positive_int, default=None,
                        help="non-finite steps in a row that stop the run (default 3; 1: the first one stops it)")
    parser.add_argument("--save-every", type=nonneg_int, default=None,
                        help="optimizer steps between checkpoints (default, or 0: at each evaluation)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where checkpoints go (default: runs/<task>/<name>-checkpoint); a new run over an unfinished "
                             "run's checkpoints is refused (see --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --checkpoint-dir (an earlier one if it is damaged)")
    parser.add_argument("--dist-timeout", type=positive_float, default=distributed.DEFAULT_TIMEOUT,
                        help="several processes (torchrun): seconds to wait for a silent peer before giving up")


def pick(args, preset: dict, name: str, default=None):
    """The option `name` as the user passed it, else the preset's value, else `default`."""
    value = getattr(args, name, None)
    return preset.get(name, default) if value is None else value


def train_config_from_args(args, preset: dict) -> TrainConfig:
    """Preset values, overridden by whatever the user passed on the command line."""
    values = {name: pick(args, preset, name, f.default) for name, f in TrainConfig.__dataclass_fields__.items()}
    if getattr(args, "epochs", None) is not None and getattr(args, "max_steps", None) is None:
        values["max_steps"] = None  # --epochs given: it, not the preset's step count, sets the length
    values["progress"] = not getattr(args, "no_progress", False)
    return TrainConfig(**values)


# Options (command-line names, and TrainConfig fields) that do not change what a run computes: a
# resumed run may change them. They stay out of a checkpoint's stored config and out of its comparison.
RESUME_SAFE = ("resume", "checkpoint_dir", "save_every", "no_progress", "progress", "max_train_seconds", "log_every",
               "stream_examples", "out", "save_dir", "ref_cache", "dist_timeout")


def make_checkpointer(args, task: str, name: str, cfg: TrainConfig, **extra):
    """The run's Checkpointer; its config is every option (resolved) that changes what the run computes."""
    from .checkpoint import Checkpointer

    config = {k: v for k, v in vars(args).items() if k not in RESUME_SAFE}
    config.update({f"train.{k}": v for k, v in asdict(cfg).items() if k not in RESUME_SAFE}, **extra)
    if distributed.world().size > 1:  # N processes take N times the micro-batches per step
        config["world_size"] = distributed.world().size
    directory = args.checkpoint_dir or f"runs/{task}/{name}-checkpoint"
    return Checkpointer(directory, config, save_every=args.save_every, resume=args.resume)

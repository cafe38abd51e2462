"""The training loop shared by the BERT classifier and the DPO-trained LLaMA.

What a model-specific script supplies is small: a function that turns an epoch number into a list of
batches, a function that turns (model, batch) into a loss, and an evaluation function. Everything
that is the same for every model lives here, written once:

* AdamW with no weight decay on biases and norms (decaying a LayerNorm gain towards 0 only hurts),
* a linear warm-up then linear decay of the learning rate,
* gradient accumulation and clipping,
* mixed precision: bf16 autocast on CPU and CUDA, fp16 with a gradient scaler on CUDA cards
  without bf16 (fp16's narrow range underflows small gradients without the scaling), fp32 on request,
* evaluation every N steps, keeping the weights that scored best on dev,
* seeding, so that a run repeats exactly,
* a progress bar with loss and examples/s, and metrics to JSONL and Weights & Biases (`Tracker`),
* several processes under torchrun (`minilab.distributed`): each rank runs its share of every
  step's micro-batches and the gradients are summed across ranks, so N processes with
  `--grad-accum A` train like one process with `--grad-accum N*A`; or FSDP2 for a sharded model.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed
from .checkpoint import rng_state, set_rng_state
from .tracking import Tracker


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
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    log_every: int = 10
    seed: int = 0
    metric: str = "accuracy"  # the dev metric that picks the best weights
    max_train_seconds: float | None = None  # a time budget: stop (and evaluate) once it is spent
    max_nonfinite: int = 3  # this many non-finite steps in a row stop the run
    progress: bool = True


@dataclass
class TrainResult:
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


# --------------------------------------------------------------------------------------------
# Small building blocks, each usable alone


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for (one this machine has, else a ValueError saying what to pass: see
    `cli.check_device`), else CUDA when there is one; under torchrun, a bare "cuda" means this
    process's own GPU, cuda:LOCAL_RANK."""
    from .cli import check_device

    d = check_device(str(device)) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda" and d.index is None and distributed.env_world_size() > 1:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a gradient scaler is needed)."""
    if precision == "fp32":
        return None, False
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "fp16" or (precision == "auto" and not bf16_ok):
            return torch.float16, True
        if precision == "bf16" and not bf16_ok:
            raise ValueError("this GPU has no bf16: use --precision fp16 (or auto)")
        return torch.bfloat16, False
    if precision == "fp16":
        raise ValueError("fp16 autocast is for CUDA; on the CPU use --precision bf16 or fp32")
    return torch.bfloat16, False  # auto/bf16 on CPU: bf16 matmuls are ~4x faster than fp32 here


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast+scaler"}[dtype]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices decay, biases and norm gains (1-D) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass instead of a dozen elementwise foreach
    # passes; the update is the same AdamW. The update is memory-bound, so this is several times
    # faster on a CPU for a model with a large word embedding such as MiniLM (`make bench` measures
    # it). transformers' Trainer also defaults to it. Where it does not apply (another device,
    # integer parameters, FSDP's sharded DTensors) the foreach version is next best.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not hasattr(p, "device_mesh")
                for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None, foreach=None if fused else True)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning-rate factor rising linearly from 0 to 1 over warm-up, then falling linearly to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                           group: int = 50) -> list[list[int]]:
    """Indices cut into batches of similar length, so that little compute goes to padding.

    Shuffle, then sort within windows of `group` batches by length and cut; the batch order is
    shuffled again so that training does not see short-to-long within each window. Without shuffle
    (evaluation), simply sort everything by length.
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters that train (cheap for LoRA: only the adapters). FSDP's sharded
    parameters are gathered whole, so under FSDP every rank must call it."""
    return {n: distributed.full_tensor(p.detach()).to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `trainable_state` values back into the model (into the shards, under FSDP)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            distributed.copy_into(named[n], v)


# --------------------------------------------------------------------------------------------
# The loop


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


class NonFiniteError(RuntimeError):
    """Several optimizer steps in a row had a non-finite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the loop saved a checkpoint and stopped."""


def accumulation_groups(batches: list, grad_accum: int) -> list[list]:
    """An epoch's micro-batches cut into optimizer steps of `grad_accum` each; the leftover
    micro-batches form a last, smaller step (so every micro-batch is used exactly once, and
    `grad_accum` larger than an epoch still steps once per epoch)."""
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def rank_share(n: int, rank: int, size: int) -> list[int]:
    """Which of a step's n micro-batches rank `rank` of `size` runs: every size-th one, counted from
    the end, so that rank 0 always runs the step's last micro-batch (whose loss metrics one process
    would log) and, in a smaller leftover step, the high ranks are the ones left without any."""
    return [j for j in range(n) if (n - 1 - j) % size == rank]


class Progress:
    """A redrawn bar on a terminal; a plain line every `log_every` steps when the output is a file."""

    def __init__(self, total: int, start: int, enabled: bool):
        import sys

        self.total, self.t0, self.start = total, time.perf_counter(), start
        self.bar = None
        self.plain = enabled and not sys.stdout.isatty()
        if enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, record: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_second']:.1f}")
        elif self.plain and record:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(1, step - self.start) * (self.total - step)
            print(f"step {step}/{self.total} | loss {record['loss']:.4f} | {record['examples_per_second']:.1f} ex/s | "
                  f"{_clock(elapsed)} elapsed, {_clock(left)} left", flush=True)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class Trainer:
    """The training loop, in pieces: `step` (one optimizer step over a group of micro-batches),
    `evaluate` (dev score, best weights kept), `save` (a checkpoint), and `run` (epochs of steps).

    `make_batches(epoch)` returns that epoch's micro-batches (the same list for the same epoch, so a
    resumed run sees the same data); `loss_fn(model, batch)` returns (mean loss, dict of floats);
    `evaluate_fn(model)` returns a dict holding `cfg.metric`.

    Several processes (torchrun, after `distributed.init`): every rank builds the same epoch of
    micro-batches; a step takes `grad_accum` x world-size of them, and each rank runs its share
    (`rank_share`). Two ways to combine the gradients:

    * An unsharded model: the gradients are summed across ranks by hand, one all-reduce of all the
      trainable gradients after the step's last micro-batch, rather than by wrapping the model in
      DistributedDataParallel. Why: the model stays the model (same parameter names in checkpoints
      and saved folders, no `.module`), a rank with no micro-batch in a smaller leftover step
      simply contributes zeros, and it is correct for gradients that reach `.grad` any way at all
      (BERT's word embedding once wrote its own). The cost: the all-reduce does not overlap the
      backward pass as DDP's bucketed hooks make it, a few percent of a step on GPUs, and little on
      a CPU, whose cores do both the arithmetic and the communication anyway.
    * A model under FSDP2 (`distributed.shard_llama`): FSDP reduce-scatters the gradients itself
      at the step's last micro-batch (`set_requires_gradient_sync`), and every rank must run the
      same number of forward calls, so a rank short of micro-batches in a leftover step runs one
      again with its loss multiplied by 0.

    Either way each micro-batch's loss is divided by the step's *global* number of micro-batches, so
    the summed gradient is the mean over the step, leftover step included. Each micro-batch reseeds
    the random generators from (seed, epoch, micro-batch index), so its dropout is the same whichever
    rank runs it, and the runs match up to the order of the sums (about 1e-8 in fp32). The loss
    log, evaluation results and best-dev choice are the same on every rank; only rank 0 logs,
    shows progress and writes checkpoints. `evaluate_fn` is called on every rank (it may split the
    work with `distributed.shard`/`gather`, and must under FSDP)."""

    def __init__(self, model, make_batches, loss_fn, cfg: TrainConfig, device, evaluate_fn=None, tracker=None,
                 batch_examples: Callable[[Any], int] = len, checkpointer=None):
        self.model, self.make_batches, self.loss_fn, self.cfg = model, make_batches, loss_fn, cfg
        self.device, self.evaluate_fn, self.tracker, self.batch_examples = device, evaluate_fn, tracker, batch_examples
        self.checkpointer = checkpointer
        check_config(cfg)
        self.world = distributed.world()
        self.fsdp = distributed.is_sharded(model)
        self.accum = cfg.grad_accum * self.world.size  # micro-batches per optimizer step, all ranks together
        set_seed(cfg.seed)
        self.amp_dtype, use_scaler = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world.size > 1 and not self.fsdp:  # every replica starts from rank 0's weights
            with distributed.collective("the initial broadcast of the weights"), torch.no_grad():
                for p in self.params:
                    torch.distributed.broadcast(p, 0)
        # Steps per epoch and the schedule's length are counted exactly as `run` takes them.
        self.steps_per_epoch = len(accumulation_groups(make_batches(0), self.accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.scheduler = linear_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.save_every = (checkpointer.save_every if checkpointer and checkpointer.save_every else self.eval_every)
        # Where the loop stands: all of it goes into a checkpoint.
        self.step = self.epoch = self.position = self.examples = 0  # position: steps taken in this epoch
        self.train_seconds = 0.0
        self.best_metric, self.best_step, self.best_state = None, None, None
        self.nonfinite, self.nonfinite_in_row = 0, 0
        self.checkpoints, self.checkpoint_seconds = 0, 0.0  # written by this process, and the time they took
        self.history: list[dict] = []
        self.window = self._new_window()
        self.signal: str | None = None  # set by the signal handler
        self.agreed_signal: str | None = None  # several processes: a signal any rank saw, agreed on at each step
        self.resumed_from: int | None = None
        # Fault injection for the kill-and-resume tests: MINILAB_FAULT="SIGKILL:5" kills this process
        # right after optimizer step 5 (what a lost machine does); "SIGTERM:5" sends it a SIGTERM;
        # "SIGKILL:5:rank1" (or "SIGSTOP:5:rank1", a hung process) does it to rank 1 only.
        fault = os.environ.get("MINILAB_FAULT", "").split(":")
        self.fault = None
        if len(fault) >= 2 and (len(fault) == 2 or fault[2] == f"rank{self.world.rank}"):
            self.fault = (int(fault[1]), fault[0])
        self.stopped_by: str | None = None
        if checkpointer is not None and checkpointer.meta is not None:
            self._resume()

    # ---- one optimizer step -------------------------------------------------------------

    def train_step(self, group: list, first: int = 0) -> None:
        """Forward and backward over the group's micro-batches (this rank's share of them), each loss
        divided by the number of micro-batches the group really holds; gradients summed across
        ranks; then clip and step, unless the loss or the gradient norm is not finite, in which
        case the step is skipped and its gradients dropped. `first`: the index in the epoch of the
        group's first micro-batch (it seeds each micro-batch's random numbers)."""
        G = len(group)
        mine = [(j, group[j]) for j in rank_share(G, self.world.rank, self.world.size)]
        if self.fsdp:  # every rank runs as many forward calls (each is a collective): pad with zero-weight repeats
            mine += [(None, group[0])] * (math.ceil(G / self.world.size) - len(mine))
        total_loss, metrics, examples = 0.0, {}, 0
        for k, (j, batch) in enumerate(mine):
            torch.manual_seed(self._micro_seed(first + (j or 0)))  # the same dropout whichever rank runs it
            if self.fsdp:
                self.model.set_requires_gradient_sync(k == len(mine) - 1)  # reduce-scatter once, at the end
            with autocast(self.device, self.amp_dtype):
                loss, m = self.loss_fn(self.model, batch)
            loss = loss / G
            # FSDP averages the gradients over the ranks; the step needs their sum.
            scaled = loss * (self.world.size if self.fsdp else 1) * (0.0 if j is None else 1.0)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if j is not None:
                total_loss += loss.item()
                metrics = m
                examples += self.batch_examples(batch)
        if self.world.size > 1:
            total_loss, examples = self._sum_across_ranks(total_loss, examples)
        self.examples += examples
        self.window["examples"] += examples
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # max_norm inf: the total norm, nothing clipped
        grad_norm = float(distributed.full_tensor(
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or math.inf)))
        finite = math.isfinite(total_loss) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            if self.scaler:  # fp16: the scaler skips steps with inf/nan gradients itself, and shrinks its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_row = 0
            self.window["loss"] += total_loss
            self.window["n"] += 1
        else:
            self.nonfinite += 1
            self.nonfinite_in_row += 1
            self._log({"nonfinite_loss": total_loss, "nonfinite_grad_norm": grad_norm, "lr": self.lr}, kind="skipped")
            self.progress.write(f"step {self.step + 1}: loss {total_loss} / gradient norm {grad_norm} not finite: step skipped")
            if self.nonfinite_in_row >= self.cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} steps in a row (the last at step {self.step + 1}, learning rate {self.lr:.3g}) "
                    "had a non-finite loss or gradient: lower --lr, try --precision fp32, or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += 1
        self.last = {"grad_norm": grad_norm, **{k: float(v) for k, v in metrics.items()}}

    def _micro_seed(self, index: int) -> int:
        return ((self.cfg.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63

    def _sum_across_ranks(self, loss: float, examples: int) -> tuple[float, int]:
        """Sum the gradients (unless FSDP did), the losses and example counts over the ranks; and
        agree on a stop: a SIGINT/SIGTERM seen by any rank stops every rank after this step."""
        what = f"step {self.step + 1}"
        # One small all-reduce first: losses, example counts, stop signals, and which parameters got a
        # gradient on some rank (one that none did stays None, as with one process, so AdamW leaves it be).
        stats = torch.tensor([loss, examples, self.signal == "SIGINT", self.signal == "SIGTERM",
                              *(p.grad is not None for p in self.params)], dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum(stats, f"{what}'s loss all-reduce")
        loss, examples, sigint, sigterm, *has = stats.tolist()
        self.agreed_signal = "SIGINT" if sigint else "SIGTERM" if sigterm else None
        if not self.fsdp:
            somewhere = {id(p) for p, h in zip(self.params, has) if h > 0}
            by_dtype: dict[torch.dtype, list] = {}
            for p in self.params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for ps in by_dtype.values():  # one flat buffer per dtype, one all-reduce each
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
                distributed.all_reduce_sum(flat, f"{what}'s gradient all-reduce")
                offset = 0
                for p in ps:
                    g = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if id(p) not in somewhere:
                        p.grad = None
                    elif p.grad is None:
                        p.grad = g
                    else:
                        p.grad.copy_(g)
        return loss, int(examples)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _new_window(self) -> dict:
        return {"loss": 0.0, "n": 0, "examples": 0, "seconds": 0.0}

    def _log(self, record: dict, kind: str = "train") -> None:
        self.history.append({"kind": kind, "step": self.step, **record})
        if self.tracker and self.world.is_main:
            self.tracker.log(record, step=self.step, kind=kind)

    def log_train(self) -> dict | None:
        """Every `log_every` steps: mean loss, learning rate, examples/s since the last record."""
        if self.step % self.cfg.log_every and self.step != self.total_steps:
            return None
        w = self.window
        if not w["n"]:
            return None
        record = {"loss": w["loss"] / w["n"], "lr": self.lr, "examples_per_second": w["examples"] / max(1e-9, w["seconds"]),
                  "epoch": self.epoch + self.position / self.steps_per_epoch, **self.last}
        self._log(record)
        self.window = self._new_window()
        return record

    # ---- evaluation and checkpoints -----------------------------------------------------

    def evaluate(self) -> None:
        """Score dev; keep a CPU copy of the trainable weights when they are the best so far.
        Every rank evaluates (its share, if `evaluate_fn` splits the work) and keeps the copy, so
        that all replicas end with the same best weights."""
        if self.evaluate_fn is None:
            return
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate_fn(self.model)
        self.model.train()
        self._log(metrics, kind="eval")
        score = metrics[self.cfg.metric]
        if self.best_metric is None or score > self.best_metric:
            self.best_metric, self.best_step, self.best_state = score, self.step, trainable_state(self.model)
        self.progress.write(f"step {self.step}: dev {self.cfg.metric} {score:.4f} (best {self.best_metric:.4f} at step {self.best_step})")

    def save(self) -> None:
        """Write a checkpoint: rank 0 only (under FSDP every rank first helps gather the weights and
        the optimizer state). The replicas are identical, so rank 0's RNG and optimizer state are
        everyone's, and the per-micro-batch seeding leaves nothing rank-specific to save."""
        if self.checkpointer is None or not (self.world.is_main or self.fsdp):
            return
        trainable, optimizer = trainable_state(self.model), self._optimizer_state()
        if not self.world.is_main:
            return
        meta = {"step": self.step, "epoch": self.epoch, "position": self.position, "examples": self.examples,
                "train_seconds": self.train_seconds, "best_metric": self.best_metric, "best_step": self.best_step,
                "nonfinite": self.nonfinite, "nonfinite_in_row": self.nonfinite_in_row,
                "metrics_lines": self.tracker.lines if self.tracker else 0,
                "wandb_id": self.tracker.wandb_id if self.tracker else None}
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rng_state(), "history": self.history,
                 "window": self.window}  # the half-filled logging window, so the next record averages the same steps
        t0 = time.perf_counter()
        self.checkpointer.save(meta, trainable, self.best_state, state)
        self.checkpoint_seconds += time.perf_counter() - t0
        self.checkpoints += 1

    def _optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        with distributed.collective("gathering the optimizer state"):  # whole tensors, on rank 0
            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _resume(self) -> None:
        """Every rank reads the latest checkpoint (so it must be on storage they all see)."""
        meta, trainable, best, state = self.checkpointer.load()
        load_trainable(self.model, trainable)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.history, self.window = state["history"], state["window"]
        for k in ("step", "epoch", "position", "examples", "train_seconds", "best_metric", "best_step", "nonfinite",
                  "nonfinite_in_row"):
            setattr(self, k, meta[k])
        self.best_state = best
        self.resumed_from = self.step
        print(f"resumed from {self.checkpointer.folder}: step {self.step} of {self.total_steps}, "
              f"epoch {self.epoch}, {self.position} steps into it")

    def _on_signal(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name  # acted on after the current optimizer step

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.progress = Progress(self.total_steps, self.step, self.cfg.progress and self.world.is_main)
        handlers = {}
        if self.checkpointer is not None and threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        try:
            self._epochs()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.progress.close()
        if self.best_state is not None:  # the weights that scored best on dev
            load_trainable(self.model, self.best_state)
        return TrainResult(steps=self.step, examples=self.examples, train_seconds=self.train_seconds,
                           examples_per_second=self.examples / max(1e-9, self.train_seconds), best_step=self.best_step,
                           best_metric=self.best_metric, history=self.history, nonfinite_steps=self.nonfinite,
                           stopped_by=self.stopped_by, checkpoints=self.checkpoints,
                           checkpoint_seconds=self.checkpoint_seconds, resumed_from=self.resumed_from)

    def _epochs(self) -> None:
        while self.step < self.total_steps:
            groups = accumulation_groups(self.make_batches(self.epoch), self.accum)
            if not groups:
                raise ValueError("no training batches: the train split is empty")
            for g in range(self.position, len(groups)):
                t0 = time.perf_counter()
                with distributed.collective(f"step {self.step + 1}", any_error=False):  # FSDP's own collectives
                    self.train_step(groups[g], first=g * self.accum)
                seconds = time.perf_counter() - t0
                self.train_seconds += seconds
                self.window["seconds"] += seconds
                self.progress.update(self.step, self.log_train())
                if self.position == len(groups):  # the epoch is over: a checkpoint from here starts the next
                    self.epoch, self.position = self.epoch + 1, 0
                with distributed.collective(f"step {self.step}'s evaluation or checkpoint", any_error=False):
                    if self.after_step():
                        return

    def after_step(self) -> bool:
        """Evaluate, save and stop when it is time; True when the run is over."""
        budget = self.cfg.max_train_seconds
        over_time = budget is not None and self.train_seconds > budget and self.step < self.total_steps
        if budget is not None and self.world.size > 1:  # all ranks stop at the same step: rank 0's clock decides
            flag = torch.tensor([float(over_time and self.world.is_main)], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum(flag, f"step {self.step}'s time-budget check")
            over_time = bool(flag.item())
        done = self.step >= self.total_steps or over_time
        if over_time:
            self.stopped_by = f"time budget of {budget:.0f}s at step {self.step} of {self.total_steps}"
            self.progress.write(f"stopped by the {self.stopped_by}")
        if self.fault and self.fault[0] == self.step:  # a lost machine (SIGKILL) or a polite stop (SIGTERM)
            os.kill(os.getpid(), getattr(signal, self.fault[1]))
            time.sleep(0.1)  # let the handler run
        # One process acts on a signal at once; several act together, on the one they agreed on in
        # the step's all-reduce (a rank that stopped alone would leave the others waiting).
        stop = self.signal if self.world.size == 1 else self.agreed_signal
        if self.step % self.eval_every == 0 or done:
            self.evaluate()
        if self.step % self.save_every == 0 or done or stop:
            self.save()
        if stop:
            where = f"checkpoint saved in {self.checkpointer.dir}; rerun with --resume to continue"
            raise TrainingInterrupted(f"{stop} at step {self.step}: {where}")
        return done


def train(
    model: torch.nn.Module,
    make_batches: Callable[[int], list[Any]],
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    device: torch.device,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    tracker: Tracker | None = None,
    batch_examples: Callable[[Any], int] = len,
    checkpointer=None,
) -> TrainResult:
    """Train `model` in place; return timing, the best dev score, and the metric history.
    At the end the weights that scored best on dev are restored. See `Trainer`."""
    return Trainer(model, make_batches, loss_fn, cfg, device, evaluate, tracker, batch_examples, checkpointer).run()


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def add_train_args(parser, **defaults) -> None:
    """Training options every script shares; `defaults` are the script's preset values. Every number
    is checked as it is parsed (`minilab.cli`'s validators): a count is >= 1 unless 0 has a meaning
    that its help names."""
    from .cli import fraction, nonneg_float, nonneg_int, positive_float, positive_int, seed_int

    d = TrainConfig(**{k: v for k, v in defaults.items() if k in TrainConfig.__dataclass_fields__})
    parser.add_argument("--epochs", type=positive_float, default=None, help=f"passes over train, > 0 (preset: {d.epochs})")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"optimizer steps, >= 1 (overrides --epochs; preset: {d.max_steps or 'set by --epochs'})")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"examples per micro-batch (preset: {d.batch_size})")
    parser.add_argument("--grad-accum", type=positive_int, default=None,
                        help=f"micro-batches per optimizer step (preset: {d.grad_accum})")
    parser.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (preset: {d.lr})")
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


# Options that do not change what a run computes: a resumed run may change them.
NOT_CONFIG = ("resume", "checkpoint_dir", "save_every", "no_progress", "max_train_seconds", "stream_examples", "out",
              "save_dir", "ref_cache", "dist_timeout")


def make_checkpointer(args, task: str, name: str, cfg: TrainConfig, **extra):
    """The run's Checkpointer; its config is every option (resolved) that changes what the run computes."""
    from .checkpoint import Checkpointer

    config = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    config.update({f"train.{k}": v for k, v in asdict(cfg).items() if k not in ("progress", "max_train_seconds")}, **extra)
    if distributed.world().size > 1:  # N processes take N times the micro-batches per step
        config["world_size"] = distributed.world().size
    directory = args.checkpoint_dir or f"runs/{task}/{name}-checkpoint"
    return Checkpointer(directory, config, save_every=args.save_every, resume=args.resume)


def publish_log(src: str | Path, dst: str | Path) -> None:
    """Copy a finished run's metrics log beside its results (temp file + rename: never half a log)."""
    import os
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train_config_from_args(args, preset: dict) -> TrainConfig:
    """Preset values, overridden by whatever the user passed on the command line."""
    values = {k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__}
    for name in TrainConfig.__dataclass_fields__:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if getattr(args, "epochs", None) is not None and getattr(args, "max_steps", None) is None:
        values["max_steps"] = None  # --epochs given: it, not the preset's step count, sets the length
    values["progress"] = not getattr(args, "no_progress", False)
    return TrainConfig(**values)

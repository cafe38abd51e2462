"""The training loop every model here trains with: the BERT classifier and the DPO-trained LLaMA.

A script supplies `make_batches(epoch)` (the epoch's micro-batches, the same list for the same
epoch), `loss_fn(model, batch)` (mean loss, dict of floats to log) and `evaluate_fn(model)` (a dict
holding `cfg.metric`). Beneath the loop, each in its own file: `strategy.py` (how several processes
share a step; the loop calls the same methods with one process or many), `hooks.py` (checkpoints
and resume, SIGINT and SIGTERM, the time budget, the recovery tests' fault injection), `optim.py`
(seeds, AdamW, schedule), `options.py` (`TrainConfig`), `precision.py` (autocast), `tracking.py`
(the log), `progress.py` (the bar).
"""

from __future__ import annotations

import math
import time

import torch

from . import distributed, hooks, strategy
from .hooks import TrainingInterrupted
from .optim import clip_grad_norm, linear_schedule, make_optimizer, set_seed
from .options import TrainConfig, TrainResult, check_config
from .precision import autocast, resolve_precision
from .progress import Progress
from .strategy import load_trainable, trainable_state
from .tracking import TrainLog


class NonFiniteError(RuntimeError):
    """Several optimizer steps in a row had a non-finite loss or gradient."""


def accumulation_groups(batches: list, grad_accum: int) -> list[list]:
    """An epoch's micro-batches cut into optimizer steps of `grad_accum` each; the leftovers form a
    last, smaller step (every micro-batch is used once; a `grad_accum` over an epoch steps once)."""
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


class Trainer:
    """`run`: epochs of `train_step`s, each followed by `after_step` (evaluate, save, stop). From
    `step` on, the attributes are where the loop stands: a checkpoint holds them (`hooks.Checkpoints`)."""

    def __init__(self, model, make_batches, loss_fn, cfg: TrainConfig, device, evaluate_fn=None, tracker=None,
                 batch_examples=len, checkpointer=None):
        check_config(cfg)
        self.model, self.make_batches, self.loss_fn, self.cfg, self.device = model, make_batches, loss_fn, cfg, device
        self.evaluate_fn, self.batch_examples = evaluate_fn, batch_examples
        self.strategy = strategy.for_model(model, device)  # one process, an all-reduce by hand, or FSDP2
        self.accum = cfg.grad_accum * self.strategy.size  # micro-batches per step, all processes together
        set_seed(cfg.seed)
        self.amp_dtype, use_scaler = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # fp16: the loss scaled up for backward
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)  # AdamW, no decay on biases and norms
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.strategy.start(self.params)  # several processes: every replica starts from rank 0's weights
        self.steps_per_epoch = len(accumulation_groups(make_batches(0), self.accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        # The learning rate warms up linearly from 0, then decays linearly to 0 at the last step.
        self.scheduler = linear_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.log = TrainLog(tracker, cfg.log_every, writes=self.strategy.is_main)
        self.step = self.epoch = self.position = self.examples = 0  # position: steps taken in this epoch
        self.train_seconds, self.eval_seconds, self.nonfinite, self.nonfinite_in_row = 0.0, 0.0, 0, 0
        self.best_metric, self.best_step, self.best_state = None, None, None
        self.signals = hooks.StopSignals(self.strategy, catch=checkpointer is not None)
        self.budget = hooks.TimeBudget(cfg.max_train_seconds, self.strategy)
        self.checkpoints = hooks.Checkpoints(checkpointer, self)  # resumes from the latest one, if asked to

    def run(self) -> TrainResult:
        self.progress = Progress(self.total_steps, self.step, self.cfg.progress and self.strategy.is_main)
        with self.progress, self.signals.caught():
            self.model.train()
            done = False
            while not done and self.step < self.total_steps:
                groups = accumulation_groups(self.make_batches(self.epoch), self.accum)
                if not groups:
                    raise ValueError("no training batches: the train split is empty")
                for g in range(self.position, len(groups)):  # a resumed run starts mid-epoch
                    t0 = time.perf_counter()
                    with self.strategy.guard(f"step {self.step + 1}"):
                        loss, examples = self.train_step(groups[g], first=g * self.accum)
                    seconds = time.perf_counter() - t0
                    self.train_seconds += seconds
                    self.progress.update(self.step, self.log.step_done(self, loss, examples, seconds))
                    if self.position == len(groups):  # the epoch is over: a checkpoint from here starts the next
                        self.epoch, self.position = self.epoch + 1, 0
                    with self.strategy.guard(f"step {self.step}'s evaluation or checkpoint"):
                        done = self.after_step()
                    if done:
                        break
        if self.best_state is not None:  # the weights that scored best on dev
            load_trainable(self.model, self.best_state)
        return TrainResult(self.step, self.examples, self.train_seconds, self.examples / max(1e-9, self.train_seconds),
                           self.best_step, self.best_metric, self.log.history, self.nonfinite, self.budget.stopped_by,
                           self.checkpoints.written, self.checkpoints.seconds, self.checkpoints.resumed_from,
                           self.eval_seconds)

    def train_step(self, group: list, first: int = 0) -> tuple[float | None, int]:
        """One optimizer step over `group` (`first`: its first micro-batch's index in the epoch);
        returns (mean loss, None when the step was skipped; examples)."""
        loss_sum, metrics, examples = 0.0, {}, 0
        mine = self.strategy.share(group)  # [(index in the group, micro-batch)] this process runs
        for k, (j, batch) in enumerate(mine):
            # Seeded by (seed, epoch, index in the epoch): the same dropout whichever process runs it.
            torch.manual_seed(((self.cfg.seed * 1_000_003 + self.epoch) * 1_000_003 + first + (j or 0)) % 2**63)
            self.strategy.before_forward(last=k == len(mine) - 1)
            with autocast(self.device, self.amp_dtype):
                loss, m = self.loss_fn(self.model, batch)
            loss = loss / len(group)  # so that the gradients, summed over the group, are its mean
            scaled = self.strategy.scale(loss, j)
            self.scaler.scale(scaled).backward()  # adds this micro-batch's gradients to .grad
            if j is not None:
                loss_sum, metrics, examples = loss_sum + loss.item(), m, examples + self.batch_examples(batch)
        # Several processes: sums over all of them, gradients included; a stop signal rides along.
        loss_sum, examples = self.strategy.combine(loss_sum, examples, self.params, self.step + 1, self.signals.seen)
        self.examples += examples
        self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(self.model, self.params, self.cfg.max_grad_norm or math.inf)  # inf: no clipping
        grad_norm = float(distributed.full_tensor(norm))  # under FSDP a sharded tensor, gathered whole
        finite = math.isfinite(loss_sum) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:  # fp16: the scaler skips a step with inf/nan gradients itself, and shrinks its scale
            self.scaler.step(self.optimizer)  # without fp16: optimizer.step()
            self.scaler.update()
            self.scheduler.step()
            self.nonfinite_in_row = 0
        else:  # skipped: logged, counted, and its gradients dropped below
            if self.scaler.is_enabled():  # fp16: unscale_ above must be closed by an update (which lowers the scale),
                self.scaler.update()  # or the next step's unscale_ raises and the run cannot recover
            self.nonfinite, self.nonfinite_in_row = self.nonfinite + 1, self.nonfinite_in_row + 1
            self.log.add({"nonfinite_loss": loss_sum, "nonfinite_grad_norm": grad_norm, "lr": self.lr}, self.step, "skipped")
            self.progress.write(f"step {self.step + 1}: loss {loss_sum} / gradient norm {grad_norm} not finite: step skipped")
            if self.nonfinite_in_row >= self.cfg.max_nonfinite:
                raise NonFiniteError(f"{self.nonfinite_in_row} steps in a row (the last at step {self.step + 1}, learning "
                                     f"rate {self.lr:.3g}) had a non-finite loss or gradient: lower --lr, try "
                                     "--precision fp32, or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.position = self.step + 1, self.position + 1
        self.last = {"grad_norm": grad_norm, **{k: float(v) for k, v in metrics.items()}}
        return (loss_sum if finite else None), examples

    def after_step(self) -> bool:
        """Evaluate, save and stop when it is time; True when the run is over."""
        over_time = self.budget.spent(self)  # several processes: rank 0's clock decides for all
        done = self.step >= self.total_steps or over_time
        stop = self.signals.stop(self.step)  # SIGINT/SIGTERM (several processes: the one they agreed on)
        if self.step % self.eval_every == 0 or done:
            self.evaluate()
        if self.step % self.checkpoints.every == 0 or done or stop:
            self.checkpoints.save(self)
        if stop:
            raise TrainingInterrupted(f"{stop} at step {self.step}: checkpoint saved in {self.checkpoints.dir}; "
                                      "rerun with --resume to continue")
        return done

    def evaluate(self) -> None:
        """Score dev (every process: `evaluate_fn` may split the work); keep the best weights so far."""
        if self.evaluate_fn is None:
            return
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = self.evaluate_fn(self.model)
        self.eval_seconds += time.perf_counter() - t0
        self.model.train()
        self.log.add(metrics, self.step, "eval")
        score = metrics[self.cfg.metric]
        if self.best_metric is None or score > self.best_metric:
            self.best_metric, self.best_step, self.best_state = score, self.step, trainable_state(self.model)
        self.progress.write(f"step {self.step}: dev {self.cfg.metric} {score:.4f} (best {self.best_metric:.4f} at step {self.best_step})")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def train(model, make_batches, loss_fn, cfg: TrainConfig, device, evaluate=None, tracker=None, batch_examples=len,
          checkpointer=None) -> TrainResult:
    """Train `model` in place (see `Trainer`); at the end it holds the weights that scored best on dev."""
    return Trainer(model, make_batches, loss_fn, cfg, device, evaluate, tracker, batch_examples, checkpointer).run()

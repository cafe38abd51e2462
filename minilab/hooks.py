"""What happens around the training loop's steps, kept out of it (`minilab/train.py` calls each at
one place, after a step):

* `Checkpoints`: what goes into a checkpoint and back (the loop's position, counters, best score
  and weights, optimizer, schedule, gradient scaler, every random generator, the training log);
  `minilab/checkpoint.py` writes and finds the files. A run with a checkpointer that found one
  resumes from it here, before its first step.
* `StopSignals`: SIGINT (Ctrl-C) and SIGTERM are caught while the loop runs (when there is a
  checkpoint to save) and acted on after the current step: a checkpoint, then `TrainingInterrupted`.
  Several processes act together, on the signal they agreed on in the step's all-reduce.
* `TimeBudget`: `--max-train-seconds`; several processes stop at the same step (rank 0's clock decides).
* `Fault`: the recovery tests' fault injection, there only when MINILAB_FAULT is set:
  "SIGKILL:5" kills this process right after optimizer step 5 (what a lost machine does);
  "SIGTERM:5" sends it a SIGTERM; "SIGKILL:5:rank1" (or "SIGSTOP:5:rank1", a hung process) does it
  to rank 1 only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from .checkpoint import rng_state, set_rng_state
from .strategy import load_trainable, trainable_state


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the loop saved a checkpoint and stopped."""


class Checkpoints:
    """Saving the loop's state through a `checkpoint.Checkpointer` (None: no checkpoints), and resuming it."""

    def __init__(self, checkpointer, trainer):
        self.checkpointer, self.strategy = checkpointer, trainer.strategy
        self.every = checkpointer.save_every if checkpointer and checkpointer.save_every else trainer.eval_every
        self.dir = checkpointer.dir if checkpointer else None
        self.written, self.seconds = 0, 0.0  # by this process, and the time they took
        self.resumed_from: int | None = None
        if checkpointer is not None and checkpointer.meta is not None:
            self.resume(trainer)

    def save(self, t) -> None:
        """Write a checkpoint: rank 0 only (under FSDP every rank first helps gather the weights and
        the optimizer state). The replicas are identical, so rank 0's RNG and optimizer state are
        everyone's, and the per-micro-batch seeding leaves nothing rank-specific to save."""
        if self.checkpointer is None or not self.strategy.saves:
            return
        trainable, optimizer = trainable_state(t.model), self.strategy.optimizer_state(t.optimizer)
        if not self.strategy.is_main:
            return
        meta = {"step": t.step, "epoch": t.epoch, "position": t.position, "examples": t.examples,
                "train_seconds": t.train_seconds, "eval_seconds": t.eval_seconds,
                "best_metric": t.best_metric, "best_step": t.best_step,
                "nonfinite": t.nonfinite, "nonfinite_in_row": t.nonfinite_in_row,
                "metrics_lines": t.log.tracker.lines if t.log.tracker else 0,
                "wandb_id": t.log.tracker.wandb_id if t.log.tracker else None}
        state = {"optimizer": optimizer, "scheduler": t.scheduler.state_dict(),
                 "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None, "rng": rng_state(), "history": t.log.history,
                 "window": t.log.window}  # the half-filled logging window, so the next record averages the same steps
        t0 = time.perf_counter()
        self.checkpointer.save(meta, trainable, t.best_state, state)
        self.seconds += time.perf_counter() - t0
        self.written += 1

    def resume(self, t) -> None:
        """Every rank reads the latest checkpoint (so it must be on storage they all see)."""
        meta, trainable, best, state = self.checkpointer.load()
        load_trainable(t.model, trainable)
        self.strategy.load_optimizer_state(t.optimizer, state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        if t.scaler.is_enabled() and state["scaler"]:
            t.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        t.log.history, t.log.window = state["history"], state["window"]
        for k in ("step", "epoch", "position", "examples", "train_seconds", "best_metric", "best_step", "nonfinite",
                  "nonfinite_in_row"):
            setattr(t, k, meta[k])
        t.eval_seconds = meta.get("eval_seconds", 0.0)  # (checkpoints from before it was kept: 0)
        t.best_state = best
        self.resumed_from = t.step
        print(f"resumed from {self.checkpointer.folder}: step {t.step} of {t.total_steps}, "
              f"epoch {t.epoch}, {t.position} steps into it")


class StopSignals:
    """SIGINT/SIGTERM, caught inside `caught()` (when `catch`: a run without checkpoints stops at
    once, as usual), and acted on after the step in which they arrived (`stop`)."""

    def __init__(self, strategy, catch: bool):
        self.strategy, self.catch = strategy, catch
        self.seen: str | None = None  # set by the handler
        self.fault = Fault.from_env(strategy.world.rank)  # None unless MINILAB_FAULT is set

    @contextlib.contextmanager
    def caught(self):
        handlers = {}
        if self.catch and threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        self.seen = signal.Signals(signum).name  # acted on after the current optimizer step

    def stop(self, step: int) -> str | None:
        """The signal to stop on after `step`, or None (an injected fault fires first)."""
        if self.fault is not None:
            self.fault.after_step(step)
        return self.strategy.stop_signal(self.seen)


class Fault:
    """MINILAB_FAULT's signal, sent to this process after the given step (see the module docstring)."""

    def __init__(self, step: int, name: str):
        self.step, self.name = step, name

    @classmethod
    def from_env(cls, rank: int) -> Fault | None:
        fault = os.environ.get("MINILAB_FAULT", "").split(":")
        if len(fault) >= 2 and (len(fault) == 2 or fault[2] == f"rank{rank}"):
            return cls(int(fault[1]), fault[0])
        return None

    def after_step(self, step: int) -> None:
        if step == self.step:  # a lost machine (SIGKILL), a polite stop (SIGTERM) or a hung one (SIGSTOP)
            os.kill(os.getpid(), getattr(signal, self.name))
            time.sleep(0.1)  # let the handler run


class TimeBudget:
    """Stop (evaluate, save) once the training time passes `seconds` (None: no budget)."""

    def __init__(self, seconds: float | None, strategy):
        self.seconds, self.strategy = seconds, strategy
        self.stopped_by: str | None = None

    def spent(self, t) -> bool:
        if self.seconds is None:
            return False
        over = t.train_seconds > self.seconds and t.step < t.total_steps
        over = self.strategy.rank0_decides(over, f"step {t.step}'s time-budget check")
        if over:
            self.stopped_by = f"time budget of {self.seconds:.0f}s at step {t.step} of {t.total_steps}"
            t.progress.write(f"stopped by the {self.stopped_by}")
        return over

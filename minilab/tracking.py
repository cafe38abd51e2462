"""Where training metrics go: a local JSONL file always, and Weights & Biases when it is available.

`TrainLog` is what the training loop records (every record in `history`, and a train record every
`log_every` steps that averages the steps since the last one); `Tracker` writes the records out;
`publish_log` copies a finished run's log beside its results.

The JSONL file is what the report reads, so the lab works without a W&B account, without network
and without wandb installed at all. W&B runs offline unless the user has logged in (then `wandb
sync` can upload an offline run later); the WANDB_MODE variable, when set, always wins, and tests
set it to "disabled".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    """Log dicts of metrics against a step to `<jsonl_path>` and to one W&B run."""

    def __init__(self, jsonl_path: str | Path, project: str = "minilab", run_name: str | None = None,
                 config: dict | None = None, group: str | None = None, resume: dict | None = None):
        """`resume`: the checkpoint's {"metrics_lines", "wandb_id"}: the log keeps its first lines (those
        written up to the checkpoint) and is appended to, and the W&B run continues under the same id."""
        self.path = Path(jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = 0
        if resume:
            kept = self.path.read_text().splitlines(keepends=True)[: resume["metrics_lines"]] if self.path.exists() else []
            self.file = open(self.path, "w")
            self.file.writelines(kept)
            self.file.flush()
            self.lines = len(kept)
        else:
            self.file = open(self.path, "w")
        self.t0 = time.time()
        self.run = None
        self.mode = _wandb_mode()
        if self.mode != "disabled":
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                try:
                    wandb_id = (resume or {}).get("wandb_id")
                    self.run = wandb.init(project=project, name=run_name, group=group, config=config or {},
                                          mode=self.mode, dir=str(self.path.parent), reinit="finish_previous",
                                          **({"id": wandb_id, "resume": "allow"} if wandb_id else {}))
                except Exception as e:  # W&B trouble must never stop a training run
                    print(f"note: Weights & Biases disabled ({type(e).__name__}: {e})")
                    self.run = None
        if config is not None and not resume:
            self.log({"config": config}, step=0, kind="config")

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int, kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": round(time.time() - self.t0, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        if self.run is not None and kind not in ("config", "summary"):  # a summary goes to run.summary instead
            flat = {f"{kind}/{k}" if "/" not in k else k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.run.log(flat, step=step)

    def summary(self, metrics: dict) -> None:
        self.log(metrics, step=-1, kind="summary")
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v

    def log_images(self, images: dict[str, str | Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(v)) for k, v in images.items()})

    def finish(self) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


class TrainLog:
    """The training loop's records. `history` holds every record (the same on every process; it goes
    into checkpoints), and rank 0 alone (`writes`) passes them to the tracker. A train record comes
    every `log_every` steps (and at the last step): the mean loss of the steps since the previous
    record that were not skipped (`window`, which a checkpoint keeps half filled), examples/s, and
    what the trainer adds (learning rate, epoch, gradient norm, the last micro-batch's metrics)."""

    def __init__(self, tracker: Tracker | None, log_every: int, writes: bool):
        self.tracker, self.log_every, self.writes = tracker, log_every, writes
        self.history: list[dict] = []
        self.window = self.new_window()

    @staticmethod
    def new_window() -> dict:
        return {"loss": 0.0, "n": 0, "examples": 0, "seconds": 0.0}

    def add(self, record: dict, step: int, kind: str = "train") -> None:
        self.history.append({"kind": kind, "step": step, **record})
        if self.tracker and self.writes:
            self.tracker.log(record, step=step, kind=kind)

    def step_done(self, t, loss: float | None, examples: int, seconds: float) -> dict | None:
        """Trainer `t` took a step (`loss` None: skipped); the train record when it is time for one."""
        w = self.window
        w["examples"] += examples
        if loss is not None:
            w["loss"] += loss
            w["n"] += 1
        w["seconds"] += seconds
        if (t.step % self.log_every and t.step != t.total_steps) or not w["n"]:
            return None
        record = {"loss": w["loss"] / w["n"], "lr": t.lr, "examples_per_second": w["examples"] / max(1e-9, w["seconds"]),
                  "epoch": t.epoch + t.position / t.steps_per_epoch, **t.last}
        self.add(record, t.step)
        self.window = self.new_window()
        return record


def publish_log(src: str | Path, dst: str | Path) -> None:
    """Copy a finished run's metrics log beside its results (temp file + rename: never half a log)."""
    from .files import atomic_copy

    atomic_copy(src, dst)

"""Checkpoints that a killed run resumes from, exactly.

A checkpoint is everything the training loop would otherwise lose: the trainable weights (the LoRA
tensors for DPO, every weight for BERT), the optimizer, the schedule, the gradient scaler, every
random generator, where in which epoch the loop stood, the best-on-dev weights and score, and the
run's resolved config, so that a resumed run can refuse to continue a different one. Layout:

    <checkpoint-dir>/
        latest                    the name of the newest complete checkpoint, e.g. "step-000120"
        step-000120/
            trainer.json          step, epoch, position in the epoch, counters, best score and step,
                                  metrics-log length, W&B run id, and the run's resolved config
            trainable.safetensors the trainable weights
            best.safetensors      the best-on-dev trainable weights (once there has been an evaluation)
            state.pt              optimizer, scheduler and scaler state; RNG states (python, numpy,
                                  torch CPU and CUDA)
        metrics.jsonl             the run's metrics log while it trains (copied beside the results at the end)

A checkpoint is written into a temporary folder, then renamed into place, and only then named in
`latest` (itself replaced atomically), so a kill at any instant leaves the previous complete
checkpoint readable; leftover temporary folders are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Fields of a run's config that may change between a run and its resumption.
MAY_DIFFER = ("progress", "save_every", "max_train_seconds", "log_every")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for every config field that differs (fields in MAY_DIFFER aside)."""
    keys = sorted((set(saved) | set(current)) - set(MAY_DIFFER))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


class Checkpointer:
    """Writes and reads the checkpoints of one run in `directory`.

    `config` is the run's resolved config (JSON-able); with `resume`, the latest checkpoint is read
    at once (`self.meta`, None when there is none) and a config that differs is refused with one
    line naming the fields, before any expensive work starts."""

    def __init__(self, directory: str | Path, config: dict, save_every: int | None = None, resume: bool = False):
        self.dir = Path(directory)
        self.config = json.loads(json.dumps(config, default=str))  # exactly what a reload compares against
        self.save_every = save_every
        self.meta: dict | None = None
        if resume:
            self.meta = self.read_meta()
            if self.meta is None:
                print(f"note: --resume, but {self.dir} holds no checkpoint: starting from the beginning")
            else:
                diff = config_differences(self.meta["config"], self.config)
                if diff:
                    raise ValueError(f"the checkpoint in {self.dir} is from a different run ({'; '.join(diff)}): "
                                     "pass the same options, another --checkpoint-dir, or drop --resume to start over")

    @property
    def metrics_log(self) -> Path:
        return self.dir / "metrics.jsonl"

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        folder = self.dir / pointer.read_text().strip()
        return folder if (folder / "trainer.json").is_file() else None

    def read_meta(self) -> dict | None:
        folder = self.latest()
        if folder is None:
            return None
        try:
            return json.loads((folder / "trainer.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {folder} is corrupt ({e}): delete {self.dir} to start over") from e

    def save(self, meta: dict, trainable: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
             state: dict) -> Path:
        """Write one checkpoint atomically; older ones and leftover temporary folders are removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{meta['step']:06d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps({**meta, "config": self.config}, indent=1))
        final = self.dir / name
        if final.exists():  # the same step saved twice (e.g. by a signal right after a scheduled save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = self.dir / f".latest-{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.dir / "latest")
        for old in self.dir.iterdir():
            if old.is_dir() and old.name != name and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self) -> tuple[dict, dict, dict | None, dict]:
        """(meta, trainable weights, best weights or None, state) of the latest checkpoint."""
        folder = self.latest()
        if folder is None:
            raise ValueError(f"no checkpoint in {self.dir}")
        meta = json.loads((folder / "trainer.json").read_text())
        best_path = folder / "best.safetensors"
        best = load_file(str(best_path)) if best_path.is_file() else None
        state = torch.load(folder / "state.pt", weights_only=False)
        return meta, load_file(str(folder / "trainable.safetensors")), best, state

"""Checkpoints that a killed run resumes from, exactly, and that survive their own recovery.

A checkpoint is everything the training loop would otherwise lose: the trainable weights (the LoRA
tensors for DPO, every weight for BERT), the optimizer, the schedule, the gradient scaler, every
random generator, where in which epoch the loop stood, the best-on-dev weights and score, and the
run's resolved config (every option but `options.RESUME_SAFE`), so that a resumed run can refuse to
continue a different one. `hooks.Checkpoints` gathers that state from the loop and puts it back;
this module writes, checks and finds the files. Layout:

    <checkpoint-dir>/
        latest                    the name of the newest complete checkpoint, e.g. "step-000120"
        step-000100/              the one before it, kept until a newer one is complete
        step-000120/
            trainer.json          step, epoch, position in the epoch, counters, best score and step,
                                  metrics-log length, W&B run id, the run's resolved config, and the
                                  size and CRC-32 of each file below
            trainable.safetensors the trainable weights
            best.safetensors      the best-on-dev trainable weights (once there has been an evaluation)
            state.pt              optimizer, scheduler and scaler state; RNG states (python, numpy,
                                  torch CPU and CUDA)
        metrics.jsonl             the run's metrics log while it trains (copied beside the results at the end)
        finished                  written once the run's results are written (`finish`)

Writing. A checkpoint is written into a temporary folder, renamed into place, and only then named in
`latest` (itself replaced atomically); the checkpoint before it is kept too, so even a newest one
damaged later (a disk that lost its last writes, a truncated copy) leaves a complete one behind.
Older checkpoints, damaged ones and leftover temporary folders are removed by the next save.

Resuming (`resume=True`). The newest *complete* `step-*` folder is used: trainer.json reads and has
every field, and every file it lists has its recorded size and checksum (best.safetensors whenever
there was an evaluation); `latest` is only a hint, so a missing or stale pointer costs nothing. A
damaged newer folder is skipped with a `note:` line; when no folder is complete, the run stops with
one line naming the damaged file, and nothing is deleted.

A new run (no `--resume`) over a checkpoint folder. A folder holding an unfinished run's `step-*`
checkpoints (interrupted, killed, or still running) is refused at once, before any expensive work:
pass `--resume` to continue it, or another `--checkpoint-dir` (or delete the folder). A run that
completes marks its folder `finished` once its results and model are written (`finish`), and a new
run over a finished folder replaces it with a `note:` line: its model folder and results already hold
everything it made, and this is what a `make lab` rerun (FORCE=1, or a changed command) does.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .options import RESUME_SAFE

# What trainer.json must hold for the loop and the metrics log to resume from it.
META_FIELDS = ("step", "epoch", "position", "examples", "train_seconds", "best_metric", "best_step", "nonfinite",
               "nonfinite_in_row", "metrics_lines", "config")
STEP_FOLDER = re.compile(r"step-(\d+)")
FINISHED = "finished"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as asked; the message says which file and what to do."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Options added after checkpoints already existed, with the value every earlier run had: a
# checkpoint that does not record one of them was made with this value, not with "nothing".
ADDED_OPTIONS = {"objective": "dpo", "simpo_gamma": 0.5}


# `--precision` is compared by what it resolved to, "autocast": auto means bf16 on one CPU and fp32 on
# another, and a run may go on under a name that resolves to what it started in (--precision bf16).
PRECISION_KEYS = ("precision", "train.precision")


def _autocast_before(saved: dict, current: dict) -> str:
    """The autocast dtype of a checkpoint written before it was recorded. Its `--precision auto` meant
    bf16 on every CPU (now fp32 on a CPU without oneDNN bf16) and what it means now on CUDA (bf16,
    or fp16 on a card without bf16); any other value meant itself."""
    precision = saved.get("train.precision", "auto")
    if precision != "auto":
        return precision
    return current["autocast"] if current.get("autocast") in ("bf16", "fp16") else "bf16"


def config_differences(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for every config field that differs (`options.RESUME_SAFE` aside)."""
    skip = set(RESUME_SAFE) | (set(PRECISION_KEYS) if "autocast" in current else set())
    keys = sorted((set(saved) | set(current)) - skip)
    added = {**ADDED_OPTIONS, "autocast": _autocast_before(saved, current)}
    old = lambda k: saved.get(k, added.get(k))  # noqa: E731
    return [f"{k}: {old(k)!r} -> {current.get(k)!r}"
            + (f" (--precision {old(k)} goes on in the precision it started in)" if k == "autocast" else "")
            for k in keys if old(k) != current.get(k)]


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _check_file(path: Path, recorded: list | None) -> str | None:
    """What is wrong with one checkpoint file, or None. With a recorded [size, crc32], the file must
    match it; a checkpoint written before sizes were recorded gets a structural check instead."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if recorded is not None:
        if size != recorded[0]:
            return f"{path.name} is damaged ({size:,} bytes, written with {recorded[0]:,})"
        if crc32_of(path) != recorded[1]:
            return f"{path.name} is damaged (its checksum differs from the one written)"
        return None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # checks the header and that the data fills the file
                f.keys()
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as z:  # torch.save's zip: every member's CRC
                bad = z.testzip()
            if bad:
                return f"{path.name} is damaged (its member {bad} fails its checksum)"
    except Exception as e:  # noqa: BLE001 - any reader error means the file cannot be used
        return f"{path.name} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})"
    return None


def check_checkpoint(folder: Path) -> tuple[dict | None, str | None]:
    """(trainer.json's meta, None) when `folder` is a complete checkpoint, else (None, what is
    wrong, naming the file): trainer.json reads and holds every field, and trainable.safetensors,
    state.pt and (when there was an evaluation) best.safetensors are whole."""
    tj = folder / "trainer.json"
    if not tj.is_file():
        return None, "trainer.json is missing"
    try:
        meta = json.loads(tj.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"trainer.json is damaged ({type(e).__name__}: {e})"
    missing = [k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        return None, f"trainer.json is damaged (no {', '.join(missing)})"
    files = meta.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        return None, "trainer.json is damaged (its list of files does not read)"
    needed = ["trainable.safetensors", "state.pt"] + (["best.safetensors"] if meta["best_step"] is not None else [])
    for name in dict.fromkeys(needed + list(files)):
        problem = _check_file(folder / name, files.get(name))
        if problem:
            return None, problem
    return meta, None


class Checkpointer:
    """Writes and reads the checkpoints of one run in `directory` (see the module's docstring).

    `config` is the run's resolved config (JSON-able). With `resume`, the newest complete checkpoint
    is found at once (`self.folder`, `self.meta`; None when there is none) and a config that differs
    is refused with one line naming the fields, before any expensive work starts. Without it, a
    folder holding an unfinished run's checkpoints is refused, and a finished run's is cleared."""

    def __init__(self, directory: str | Path, config: dict, save_every: int | None = None, resume: bool = False):
        self.dir = Path(directory)
        self.config = json.loads(json.dumps(config, default=str))  # exactly what a reload compares against
        self.save_every = save_every
        self.meta: dict | None = None
        self.folder: Path | None = None  # the checkpoint resumed from, then the last one written
        self._before: Path | None = None  # the complete checkpoint before `folder`, kept beside it
        if resume:
            self.folder, self.meta = self._newest_complete()
            if self.meta is None:
                print(f"note: --resume, but {self.dir} holds no checkpoint: starting from the beginning")
            else:
                diff = config_differences(self.meta["config"], self.config)
                if diff:
                    raise CheckpointError(f"the checkpoint in {self.dir} is from a different run ({'; '.join(diff)}): "
                                          "pass the same options, another --checkpoint-dir, or drop --resume to start over")
        else:
            self._claim()

    @property
    def metrics_log(self) -> Path:
        return self.dir / "metrics.jsonl"

    def step_folders(self) -> list[Path]:
        """The `step-*` folders, newest (highest step) first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if p.is_dir() and (m := STEP_FOLDER.fullmatch(p.name))]
        return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]

    def latest(self) -> Path | None:
        """The folder the `latest` pointer names, when it exists (a hint: see `_newest_complete`)."""
        pointer = self.dir / "latest"
        try:
            folder = self.dir / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return folder if folder.name and folder.is_dir() else None

    def _newest_complete(self) -> tuple[Path | None, dict | None]:
        folders = self.step_folders()
        if not folders:
            return None, None
        pointed = self.latest()
        damaged = []
        for folder in folders:
            meta, problem = check_checkpoint(folder)
            if meta is None:
                damaged.append((folder, problem))
                continue
            for bad, why in damaged:
                print(f"note: {bad}/{why}: resuming from the earlier complete checkpoint {folder.name}")
            if not damaged and pointed != folder:
                pointer = self.dir / "latest"
                where = f"names {pointer.read_text(errors='replace').strip()!r}" if pointer.is_file() else "is missing"
                print(f"note: {pointer} {where}: resuming from the newest complete checkpoint, {folder.name}")
            return folder, meta
        (bad, why), more = damaged[0], len(damaged) - 1
        name = why.split(" ", 1)[0]
        raise CheckpointError(
            f"checkpoint file {bad / name} {why.split(' ', 1)[1]}"
            + ("" if not more else ", as is the older checkpoint beside it" if more == 1 else
               f", as are the {more} older checkpoints beside it")
            + f"; no complete checkpoint is left in {self.dir}: delete it (or pass another --checkpoint-dir) to start over")

    def _claim(self) -> None:
        """A new run: refuse an unfinished run's checkpoints; clear a finished run's (rank 0 does)."""
        from . import distributed

        folders = self.step_folders()
        if not folders:
            return
        if not (self.dir / FINISHED).is_file():
            raise CheckpointError(
                f"--checkpoint-dir {self.dir} holds the checkpoints of an unfinished run (newest: {folders[0].name}): "
                "pass --resume to continue it, or another --checkpoint-dir (or delete the folder) to start over")
        print(f"note: {self.dir} holds the checkpoints of a finished run (its results and model are written): "
              "replacing them")
        if distributed.world().is_main:  # the marker goes last, so another rank never sees steps without it
            for p in folders:
                shutil.rmtree(p)
            (self.dir / "latest").unlink(missing_ok=True)
            (self.dir / FINISHED).unlink()

    def finish(self) -> None:
        """Mark the run finished (call once its results and model are written): a later run without
        --resume may then replace these checkpoints."""
        if self.dir.is_dir():
            from .files import atomic_write

            atomic_write(self.dir / FINISHED, "the run that wrote these checkpoints finished and wrote its results\n")

    def save(self, meta: dict, trainable: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
             state: dict) -> Path:
        """Write one checkpoint atomically; then remove all but it and the previous complete one."""
        from .files import atomic_write

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / FINISHED).unlink(missing_ok=True)  # training again: no longer finished
        name = f"step-{meta['step']:06d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        torch.save(state, tmp / "state.pt")
        files = {f.name: [f.stat().st_size, crc32_of(f)] for f in sorted(tmp.iterdir())}
        (tmp / "trainer.json").write_text(json.dumps({**meta, "config": self.config, "files": files}, indent=1))
        final = self.dir / name
        if self.folder is not None and self.folder.name != name:
            self._before = self.folder
        if final.exists():  # the same step saved twice (e.g. by a signal right after a scheduled save)
            old = self.dir / f".tmp-old-{name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        atomic_write(self.dir / "latest", name)
        self.folder = final
        keep = {name} | ({self._before.name} if self._before is not None else set())
        for old in self.dir.iterdir():
            if old.is_dir() and old.name not in keep and (STEP_FOLDER.fullmatch(old.name) or old.name.startswith(".tmp-")):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self) -> tuple[dict, dict, dict | None, dict]:
        """(meta, trainable weights, best weights or None, state) of the checkpoint found at
        construction (`self.folder`)."""
        folder = self.folder
        if folder is None or self.meta is None:
            raise CheckpointError(f"no checkpoint in {self.dir}")

        def read(name, reader):
            path = folder / name
            try:
                return reader(path)
            except Exception as e:  # noqa: BLE001 - the file passed its checks, yet does not read
                raise CheckpointError(
                    f"checkpoint file {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                    f"move {folder} aside and rerun with --resume to fall back to an earlier checkpoint, "
                    f"or delete {self.dir} to start over") from e

        best = read("best.safetensors", lambda p: load_file(str(p))) if (folder / "best.safetensors").is_file() else None
        state = read("state.pt", lambda p: torch.load(p, weights_only=False))
        return self.meta, read("trainable.safetensors", lambda p: load_file(str(p))), best, state

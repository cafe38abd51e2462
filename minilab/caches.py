"""What a DPO run keeps on disk so that a repeated or resumed run does not compute it again.

* **The reference log-probs** (`reference_logps_kept`): the base model's log-probs of every DPO
  batch, in a safetensors file named by a hash of everything they depend on (`reference_key`), in
  `--ref-cache`. A repeated run with the same model, data, prompt and pairs reads them back.
* **The zero-shot scores** (`kept_json`): the untrained model's label scoring and free generation
  on test, computed with the adapters off. They depend on neither the seed nor the objective's
  training, so they are kept in `--ref-cache` too, by a hash of what they do depend on
  (`zero_shot_key`): the DPO, SFT and SimPO runs of a task, and its seeds, evaluate them once. A head's
  zero-shot depends on its random head, so it is kept in the run's checkpoint folder only, where a
  resumed run reads it back.

A damaged or mismatched file is never trusted: it is computed again, with one `note:` line.
Under torchrun rank 0 reads the reference file and decides, every rank follows, and the work is
split across the ranks (`distributed.shard`, then `gather`); rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from . import distributed
from .dpo import reference_logps
from .files import atomic_write
from .precision import autocast


# Bumped whenever the code that computes a kept result changes its rounding, so that what older code
# kept is not read back as this code's (2: scoring runs one answer column fewer, f1f3cee; decoding
# merges batches, 7907ba3; 3: `scoring.answer_logps` runs the answers beside their prompts).
KEPT_RESULTS_VERSION = 3


def _base_hash(model_id: str, model, amp_dtype, prefix: list[int]):
    """A sha256 started with what every kept result depends on: the base weights (their file or
    folder, its size and time), their dtype, the autocast dtype, the shared prefix and the code's
    `KEPT_RESULTS_VERSION`."""
    h = hashlib.sha256()
    src = Path(model_id)
    files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.gguf")) if src.is_dir() else [src]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    h.update(repr((KEPT_RESULTS_VERSION, model_id, stamp, str(next(model.parameters()).dtype), str(amp_dtype),
                   prefix)).encode())
    return h


def reference_key(model_id: str, model, amp_dtype, prefix: list[int], batches: list[dict]) -> str:
    """A hash of everything the reference log-probs depend on: the base (`_base_hash`) and every
    token of every batch (so the data, the prompt format, the pairs and their order all count)."""
    h = _base_hash(model_id, model, amp_dtype, prefix)
    for b in batches:
        for k in ("prompt_ids", "prompt_mask", "answer_ids", "answer_mask"):
            h.update(b[k].numpy().tobytes())
    return h.hexdigest()[:16]


def zero_shot_key(model_id: str, model, amp_dtype, prefix: list[int], prompts: list[list[int]], labels: list[int],
                  answers: list[list[int]], answer_words: list[str], max_new_tokens: int, device) -> str:
    """A hash of everything the zero-shot scores depend on: the base (`_base_hash`), every test
    prompt's tokens and label, each label's answer (its tokens, and its words, which free generation
    is matched against), how many tokens are generated, and where the math runs (the device type and
    the CPU threads: kernels round differently)."""
    h = _base_hash(model_id, model, amp_dtype, prefix)
    h.update(repr((prompts, list(labels), answers, list(answer_words), max_new_tokens, torch.device(device).type,
                   torch.get_num_threads())).encode())
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


def reference_logps_kept(path: Path, model, batches: list[dict], logps_fn, device, amp_dtype,
                         lockstep: bool = False) -> tuple[list[torch.Tensor], bool]:
    """(the reference log-probs of each of `batches`, fp32 on the CPU, whether they were read from
    `path`). When `path` does not hold them they are computed with the adapters off
    (`dpo.reference_logps` with `logps_fn`, under autocast to `amp_dtype`), each rank its share of
    the batches (`lockstep`: as many on every rank, as FSDP's collective forwards need), gathered,
    and kept in `path`."""
    def compute():
        amp = autocast(device, amp_dtype)
        with distributed.collective("the reference log-probs", any_error=False), amp, torch.no_grad():
            mine = [t.float().cpu() for t in
                    reference_logps(model, distributed.shard(batches, lockstep=lockstep), logps_fn=logps_fn)]
        return distributed.gather(mine, len(batches), "gathering the reference log-probs")

    return cached_tensor_list(path, [b["answer_ids"].shape[0] for b in batches], compute)


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


def kept_json(path: Path, compute, reuse: bool):
    """(`compute()`'s result (JSON values), False), kept in `path` by rank 0; with `reuse` the one
    kept there is read back instead, when there is one: (it, True). Under torchrun rank 0 reads the
    file and every rank takes what it read, so that all of them compute, or none."""
    world = distributed.world()
    kept = read_kept_json(path) if reuse and world.is_main else None
    kept = distributed.broadcast_object(kept, "agreeing on the kept scores")
    if kept is not None:
        return kept, True
    value = compute()
    if world.is_main:
        atomic_write(path, json.dumps(value))
    return value, False

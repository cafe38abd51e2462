"""Several processes training one model: torchrun's environment, the process group, and the few
collectives that the training loop and the scripts need.

    torchrun --standalone --nproc_per_node=2 train_bert.py ...          # 2 processes on this machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=host0:29500 train_dpo.py --fsdp ...   # on each node

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init` reads them and joins the process group (gloo on the CPU, nccl on CUDA, each process on GPU
LOCAL_RANK). Without them (a plain `python train_bert.py`) everything here is a no-op: one
process, rank 0, and the helpers return their input.

What the scripts and the loop do with it (`minilab/strategy.py` combines the gradients of a step):

* **Every rank runs every step of a script**; only rank 0 prints (the other ranks' stdout goes to
  /dev/null: their errors still reach stderr), shows progress, logs metrics (JSONL, W&B), writes
  checkpoints, models and results. A checkpoint is read by every rank on `--resume`, so on several
  nodes `--checkpoint-dir` must be on storage they share.
* **Evaluation is split across the ranks and gathered** (`shard` then `gather`), not run by rank 0
  alone: it is N times faster; the other ranks would otherwise sit in their next collective for
  the whole evaluation, which a short `--dist-timeout` would turn into a failure; and under FSDP
  every forward pass is a collective that all ranks must join.
* **A lost rank stops the others with one line.** A collective that fails (a peer's connection
  closed, or nothing heard from it within `--dist-timeout` seconds) raises `PeerLost`, which the
  scripts print as `error: ...` and exit; the process group is destroyed at the end of a run and
  on any error (`shutdown`, called by `cli.run_main`). torchrun also stops the remaining workers
  when one fails.

FSDP2 (`shard_llama`, `train_dpo.py --fsdp`): the base weights are sharded across the ranks
(`fully_shard` on each decoder layer and on the root), the LoRA tensors train as sharded DTensors,
and everything that reads whole weights (checkpoints, the best-on-dev copy, the adapter) gathers
them first. One limit, found by trying: the single-process DPO step runs the shared prefix once
and reuses its KV cache for the prompts and their answers (two forward calls, one backward). Under
per-layer FSDP2 the gradient then reaches a layer's first call through the cache rather than
through that call's output, where FSDP registers its pre-backward hook, so the layer's weights are
already resharded: "setStorage: ... out of bounds for storage of size 0". Under `--fsdp` the
policy and the reference log-probs are therefore computed in one forward call per micro-batch
(`full_sequence_logps`: the prefix joined to each prompt, its answers beside it in the same row):
the same numbers up to rounding, for more compute (the prefix runs once per prompt). Evaluation has
no backward and keeps the cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for a silent peer before giving up


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or stopped on an error."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    """This process's place: rank 0 of 1 unless `init` joined a process group."""
    return _WORLD


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for (one this machine has, else a ValueError saying what to pass: see
    `cli.check_device`), else CUDA when there is one; under torchrun, a bare "cuda" means this
    process's own GPU, cuda:LOCAL_RANK."""
    from .cli import check_device

    d = check_device(str(device)) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda" and d.index is None and env_world_size() > 1:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def init(timeout: float | None = None, device: torch.device | None = None) -> World:
    """Join the process group that torchrun's environment describes; a no-op for one process.

    The backend is nccl when `device` is a CUDA device (which must be cuda:LOCAL_RANK: see
    `pick_device`), gloo otherwise. `timeout` (seconds) bounds every collective: a rank that
    hears nothing from a peer for that long gives up with `PeerLost`.
    """
    global _WORLD
    if env_world_size() <= 1:
        return _WORLD
    if dist.is_initialized():
        return _WORLD
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout or DEFAULT_TIMEOUT),
                            **({"device_id": torch.device(device)} if cuda else {}))
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not _WORLD.is_main:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0's (stderr stays, for errors)
    return _WORLD


def shutdown() -> None:
    """Leave the process group (safe to call twice, or without one)."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def _lost(what: str, e: BaseException) -> PeerLost:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    why = why.split("] ", 1)[-1].split(". ")[0][:160]  # gloo's message without its "[file.cc:123]" and advice
    return PeerLost(f"rank {_WORLD.rank} of {_WORLD.size}: lost contact with the other processes during {what} "
                    f"({why}): another rank died, hung for --dist-timeout, or stopped on its own error (see its "
                    "output); the last checkpoint is kept: rerun with --resume")


_COMM_ERRORS = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Timed out", "timed out",
                "gloo", "NCCL", "ProcessGroup", "c10d")


@contextlib.contextmanager
def collective(what: str, any_error: bool = True):
    """Turn a failed collective into a one-line `PeerLost`. `any_error=False` for a block that also
    computes (e.g. FSDP's forward, whose all-gathers are collectives): only errors that look like
    communication failures are converted, a bug stays a bug."""
    if _WORLD.size == 1:
        yield
        return
    try:
        yield
    except PeerLost:
        raise
    except (RuntimeError, dist.DistError) as e:
        if any_error or isinstance(e, dist.DistError) or any(m in str(e) for m in _COMM_ERRORS):
            raise _lost(what, e) from e
        raise


def all_reduce_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    if _WORLD.size > 1:
        with collective(what):
            dist.all_reduce(t)
    return t


def barrier(what: str = "a barrier") -> None:
    if _WORLD.size > 1:
        with collective(what):
            dist.barrier()


def broadcast_object(obj, what: str, src: int = 0):
    """Rank `src`'s `obj` on every rank (e.g. a decision read from a file only rank 0 may write)."""
    if _WORLD.size == 1:
        return obj
    box = [obj]
    with collective(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: list, lockstep: bool = False) -> list:
    """This rank's share of `items`: every size-th item from position rank (`gather` undoes it).

    `lockstep`: every rank gets the same number (the short ones repeat their last item, or the
    first item overall), for work in which each forward call is a collective (FSDP)."""
    if _WORLD.size == 1:
        return list(items)
    mine = list(items[_WORLD.rank :: _WORLD.size])
    if lockstep and items:
        per_rank = math.ceil(len(items) / _WORLD.size)
        mine += [mine[-1] if mine else items[0]] * (per_rank - len(mine))
    return mine


def gather(mine: list, n: int, what: str = "gathering results") -> list:
    """The `n` results in their original order, on every rank, from each rank's `shard` results."""
    if _WORLD.size == 1:
        return list(mine)[:n]
    parts: list = [None] * _WORLD.size
    with collective(what):
        dist.all_gather_object(parts, list(mine))
    out = [None] * n
    for r, part in enumerate(parts):
        for i, x in enumerate(part):
            j = r + i * _WORLD.size
            if j < n:
                out[j] = x
    return out


# --------------------------------------------------------------------------------------------
# FSDP2


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) where param may be a sharded DTensor (then every rank calls it)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def shard_llama(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on a `minilab.llama.LlamaForCausalLM` (LoRA applied or not), in place.

    Each decoder layer is its own unit (its weights are gathered for its forward and backward, then
    freed), and the root holds the embeddings, the final norm and the (tied) output head, which stay
    gathered between forward and backward. `hidden_states` is registered as a forward method, as
    the DPO code calls it rather than `forward`. Frozen and trainable weights are both sharded; only
    the trainable ones (LoRA) get gradients, reduce-scattered at the last micro-batch of a step.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if _WORLD.size == 1:
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N (N > 1)")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """The whole model gathered on every rank (plain tensors) inside the block; e.g. to save it."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with collective("gathering the sharded weights"):
        for m in units:
            m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()


def full_sequence_logps(model, batch: dict, prefix_ids: torch.Tensor | None) -> torch.Tensor:
    """`scoring.answer_logps` in one forward call: the prefix joined to every prompt, each prompt with
    its answers side by side in one row (no KV cache shared between calls: see the module docstring
    on FSDP). As there, prompts are LEFT-padded and answers RIGHT-padded (`pairs.dpo_batches`)."""
    from .scoring import answer_logps

    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    if prefix_ids is not None:
        B = p_ids.shape[0]
        p_ids = torch.cat([prefix_ids.expand(B, -1), p_ids], dim=1)
        p_mask = torch.cat([torch.ones_like(prefix_ids).expand(B, -1).to(p_mask.dtype), p_mask], dim=1)
    return answer_logps(model, p_ids, p_mask, batch["answer_ids"], batch["answer_mask"])


def answer_logps_for(model, fsdp: bool, prefix_ids: torch.Tensor | None):
    """The function `logps(model, batch)` that DPO trains with and computes its reference with: the
    answers' log-probs of a batch of `pairs.dpo_batches`, after the shared prefix `prefix_ids`.
    With `fsdp` the model is first sharded across the ranks (`shard_llama`, in place) and the
    function is `full_sequence_logps`, one forward call per batch (see the module docstring);
    else `scoring.answer_logps` with the prefix run once for the batch."""
    if fsdp:
        shard_llama(model)
        return lambda model, b: full_sequence_logps(model, b, prefix_ids)
    from .scoring import answer_logps

    return lambda model, b: answer_logps(model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"],
                                         prefix_ids=prefix_ids)

"""How the processes of a run share one optimizer step: the decisions the training loop leaves to a
strategy object, so that `minilab/train.py` reads the same with one process or many.

The loop asks its strategy (`for_model`) the same questions whatever runs beneath:

    start(params)           once, before the first step: every replica starts from rank 0's weights
    share(group)            which of a step's micro-batches this process runs: [(index, batch)]
    before_forward(last)    FSDP: reduce-scatter the gradients only after the step's last forward
    scale(loss, index)      what backward runs on (FSDP: times the world size, as FSDP averages; a pad: times 0)
    combine(loss, examples, params, step, signal)
                            the step's sums over the processes (gradients too), and an agreed stop signal
    stop_signal(seen), rank0_decides(flag, what)   one decision for every process
    guard(what)             a lost peer during `what` becomes one line (`distributed.PeerLost`)

and, for checkpoints (`hooks.Checkpoints`), `saves` (whether this process takes part) and
`optimizer_state` / `load_optimizer_state` (gathered whole under FSDP); `trainable_state` and
`load_trainable` copy the trainable weights out and back, gathering FSDP's shards.

Three strategies:

* `OneProcess`: every micro-batch is run here; the gradients are the step's; nothing to agree on.
* `AllReduce`: several processes under torchrun (`distributed.init`), an unsharded model. Every
  rank builds the same epoch of micro-batches; a step takes `grad_accum` x world-size of them and
  each rank runs its share (`rank_share`). The gradients are summed across ranks by hand, one
  all-reduce of all the trainable gradients after the step's last micro-batch, rather than by
  wrapping the model in DistributedDataParallel. Why: the model stays the model (same parameter
  names in checkpoints and saved folders, no `.module`), a rank with no micro-batch in a smaller
  leftover step simply contributes zeros, and it is correct for gradients that reach `.grad` any
  way at all (BERT's word embedding once wrote its own). The cost: the all-reduce does not overlap
  the backward pass as DDP's bucketed hooks make it, a few percent of a step on GPUs, and little on
  a CPU, whose cores do both the arithmetic and the communication anyway.
* `FSDP`: a model under FSDP2 (`distributed.shard_llama`). FSDP reduce-scatters the gradients
  itself at the step's last micro-batch (`set_requires_gradient_sync`), and every rank must run
  the same number of forward calls, so a rank short of micro-batches in a leftover step runs one
  again with its loss multiplied by 0.

Either way each micro-batch's loss is divided by the step's *global* number of micro-batches, so
the summed gradient is the mean over the step, leftover step included, and N processes with
`--grad-accum A` train like one process with `--grad-accum N*A`. Each micro-batch reseeds the random
generators from (seed, epoch, micro-batch index), so its dropout is the same whichever rank runs
it, and the runs match up to the order of the sums (about 1e-8 in fp32). The loss log, evaluation
results and best-dev choice are the same on every rank; only rank 0 logs, shows progress and writes
checkpoints. The evaluation function is called on every rank (it may split the work with
`distributed.shard`/`gather`, and must under FSDP).
"""

from __future__ import annotations

import math

import torch

from . import distributed


def for_model(model: torch.nn.Module, device: torch.device) -> OneProcess:
    """The strategy for this process and this model (see the module docstring)."""
    world = distributed.world()
    if distributed.is_sharded(model):
        return FSDP(model, world, device)
    return AllReduce(model, world, device) if world.size > 1 else OneProcess(model, world, device)


def rank_share(n: int, rank: int, size: int) -> list[int]:
    """Which of a step's n micro-batches rank `rank` of `size` runs: every size-th one, counted from
    the end, so that rank 0 always runs the step's last micro-batch (whose loss metrics one process
    would log) and, in a smaller leftover step, the high ranks are the ones left without any."""
    return [j for j in range(n) if (n - 1 - j) % size == rank]


class OneProcess:
    """One process: it runs every micro-batch, its gradients are the step's, it decides alone."""

    def __init__(self, model: torch.nn.Module, world: distributed.World, device: torch.device):
        self.model, self.world, self.device = model, world, device
        self.size, self.is_main = world.size, world.is_main
        self.saves = True  # whether this process takes part in writing a checkpoint

    def start(self, params: list[torch.Tensor]) -> None:
        pass

    def share(self, group: list) -> list[tuple[int | None, object]]:
        """[(index in the group, micro-batch)] this process runs; index None: a zero-weight pad."""
        return list(enumerate(group))

    def before_forward(self, last: bool) -> None:
        pass

    def scale(self, loss: torch.Tensor, index: int | None) -> torch.Tensor:
        return loss

    def combine(self, loss: float, examples: int, params: list, step: int, signal: str | None) -> tuple[float, int]:
        """The step's loss and example count over every process (gradients summed too, where needed)."""
        return loss, examples

    def stop_signal(self, seen: str | None) -> str | None:
        """The signal to stop on after this step: one process acts on its own at once."""
        return seen

    def rank0_decides(self, flag: bool, what: str) -> bool:
        """Rank 0's `flag`, on every process (`what`: the collective's name in an error)."""
        return flag

    def guard(self, what: str):
        """A lost peer during `what` becomes one `PeerLost` line (with one process: nothing to lose). The
        block also computes (and FSDP's forward calls are collectives), so only communication errors are."""
        return distributed.collective(what, any_error=False)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class AllReduce(OneProcess):
    """Several processes, each with the whole model: gradients summed by hand, one all-reduce a step."""

    sums_gradients = True

    def __init__(self, model, world, device):
        super().__init__(model, world, device)
        self.saves = world.is_main  # the replicas are identical: rank 0's state is everyone's
        self.agreed: str | None = None  # a stop signal any rank saw, agreed on in each step's all-reduce

    def start(self, params):
        with distributed.collective("the initial broadcast of the weights"), torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p, 0)

    def share(self, group):
        return [(j, group[j]) for j in rank_share(len(group), self.world.rank, self.size)]

    def combine(self, loss, examples, params, step, signal):
        loss, examples, self.agreed = sum_across_ranks(params, loss, examples, signal, self.device, f"step {step}",
                                                       gradients=self.sums_gradients)
        return loss, examples

    def stop_signal(self, seen):
        # A rank that stopped alone would leave the others waiting: act on the signal agreed on.
        return self.agreed

    def rank0_decides(self, flag, what):
        t = torch.tensor([float(flag and self.is_main)], dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum(t, what)
        return bool(t.item())


class FSDP(AllReduce):
    """Several processes, the model sharded (FSDP2): FSDP reduce-scatters the gradients itself."""

    sums_gradients = False

    def __init__(self, model, world, device):
        super().__init__(model, world, device)
        self.saves = True  # every rank helps gather the weights and the optimizer state; rank 0 writes

    def start(self, params):
        pass  # the shards were cut from one model: nothing to broadcast

    def share(self, group):
        # Every rank runs as many forward calls (each is a collective): pad with zero-weight repeats.
        mine = super().share(group)
        return mine + [(None, group[0])] * (math.ceil(len(group) / self.size) - len(mine))

    def before_forward(self, last):
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once, at the end

    def scale(self, loss, index):
        # FSDP averages the gradients over the ranks; the step needs their sum. A pad counts 0.
        return loss * self.size * (0.0 if index is None else 1.0)

    def optimizer_state(self, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        with distributed.collective("gathering the optimizer state"):  # whole tensors, on rank 0
            return get_optimizer_state_dict(self.model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def sum_across_ranks(params: list, loss: float, examples: int, signal: str | None, device: torch.device, what: str,
                     gradients: bool = True) -> tuple[float, int, str | None]:
    """(loss, examples, agreed stop signal) summed over the ranks, and (with `gradients`) the
    gradients too: a SIGINT/SIGTERM seen by any rank stops every rank after this step."""
    # One small all-reduce first: losses, example counts, stop signals, and which parameters got a
    # gradient on some rank (one that none did stays None, as with one process, so AdamW leaves it be).
    stats = torch.tensor([loss, examples, signal == "SIGINT", signal == "SIGTERM",
                          *(p.grad is not None for p in params)], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(stats, f"{what}'s loss all-reduce")
    loss, examples, sigint, sigterm, *has = stats.tolist()
    agreed = "SIGINT" if sigint else "SIGTERM" if sigterm else None
    if gradients:
        somewhere = {id(p) for p, h in zip(params, has) if h > 0}
        by_dtype: dict[torch.dtype, list] = {}
        for p in params:
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
    return loss, int(examples), agreed


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

"""What the training loop sets up before its first step (the seeds, AdamW, the learning-rate
schedule) and the gradient clipping it does at every step."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed every random generator a run draws from (Python's, NumPy's, torch's), so that it repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices decay, biases and norm gains (1-D) do not
    (decaying a LayerNorm gain towards 0 only hurts)."""
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


def clip_grad_norm(model: torch.nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)`: the gradients' total 2-norm, and every
    gradient scaled by min(1, max_norm / (norm + 1e-6)). The same norms and the same scaling, but a
    module that knows which rows of its `weight`'s gradient can be non-zero (a `grad_rows()` method
    that returns them for `module.weight`, or None when it does not know) has only those rows read
    and scaled.

    Why: a word embedding's gradient is a dense (V, H) matrix of which a batch touches a few
    hundred rows (bert_fast's BufferedEmbedding keeps track of them). Zero rows add nothing to
    the norm and stay zero when scaled, so reading them is wasted: MiniLM's 30522 x 384 gradient
    cost 5 ms of a 135 ms CPU step to clip. The norms accumulate in double on the CPU, so the
    gathered rows give the full matrix's norm to the last bit in practice (tests/test_bert.py).
    A NaN norm scales every element, as torch's does (0 * NaN is NaN). Not the deprecated
    `torch.nn.utils.clip_grad_norm`: this one takes the model too, to ask it for the rows."""
    rows = {}
    for m in model.modules():
        if callable(getattr(m, "grad_rows", None)) and (r := m.grad_rows()) is not None:
            rows[id(m.weight)] = r
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if not rows or total_norm is None:  # the common case: torch's own, which also knows DTensors (FSDP)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    with torch.no_grad():
        params = [p for p in params if p.grad is not None]
        sel = [rows.get(id(p)) for p in params]
        grads = [p.grad if r is None else p.grad.index_select(0, r) for p, r in zip(params, sel)]
        norm = total_norm(grads, 2.0)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's formula, to the letter
        if torch.isnan(norm):  # every element times NaN, the rows never touched too
            sel = [None] * len(params)
            grads = [p.grad for p in params]
        for p, g, r in zip(params, grads, sel):
            if r is None:
                g.mul_(coef)
            else:  # the selected rows scaled, then put back
                p.grad.index_copy_(0, r, g.mul_(coef))
    return norm

"""What the training loop sets up before its first step: the seeds, AdamW, the learning-rate schedule."""

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

"""Mixed precision: which autocast dtype a `--precision` means on a device, and the one table of
the names it goes by.

* bf16 autocast on CPU and CUDA (on a CPU, bf16 matmuls are ~4x faster than fp32),
* fp16 autocast with a gradient scaler on CUDA cards without bf16: fp16's narrow range underflows
  small gradients unless the loss is scaled up before backward (`torch.amp.GradScaler`),
* fp32 (no autocast) on request.
"""

from __future__ import annotations

import contextlib

import torch

# Every precision a run can train or predict in: the autocast dtype (None: plain fp32), its short
# name (`--precision`, a saved model's minilab.json), and how a run's log and results describe it.
PRECISIONS = {None: ("fp32", "fp32"), torch.bfloat16: ("bf16", "bf16-autocast"),
              torch.float16: ("fp16", "fp16-autocast+scaler")}


def precision_tag(dtype: torch.dtype | None) -> str:
    """The short name: "fp32", "bf16" or "fp16"."""
    return PRECISIONS[dtype][0]


def precision_name(dtype: torch.dtype | None) -> str:
    """What a run's log and results say: "fp32", "bf16-autocast" or "fp16-autocast+scaler"."""
    return PRECISIONS[dtype][1]


def precision_dtype(tag: str | None) -> torch.dtype | None:
    """The autocast dtype of a short name (None, fp32 or an unknown name: no autocast)."""
    return next((dtype for dtype, (t, _) in PRECISIONS.items() if t == tag), None)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a gradient scaler is needed) for `--precision`
    auto | bf16 | fp16 | fp32 on `device`."""
    if precision == "fp32":
        return None, False
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "fp16" or (precision == "auto" and not bf16_ok):
            return torch.float16, True
        if precision == "bf16" and not bf16_ok:
            raise ValueError("this GPU has no bf16: use --precision fp16 (or auto)")
        return torch.bfloat16, False
    if precision == "fp16":
        raise ValueError("fp16 autocast is for CUDA; on the CPU use --precision bf16 or fp32")
    return torch.bfloat16, False  # auto/bf16 on CPU: bf16 matmuls are ~4x faster than fp32 here


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device` (None: a no-op context, plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

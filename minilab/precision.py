"""Mixed precision: which autocast dtype a `--precision` means on a device, and the one table of
the names it goes by.

* bf16 autocast on CUDA, and on a CPU whose bf16 matmuls run in oneDNN (AVX-512 or AMX): there they
  are ~4x faster than fp32,
* fp32 (no autocast) on a CPU without them (AVX2 only, such as AMD Zen 3): PyTorch then runs bf16
  matmuls in a generic kernel, measured at 19 GFLOP/s against fp32's 117 on SmolLM2's MLP shape
  (896 x 576 @ 576 x 1536, 2 cores) and slower still on backward's transposed operands: a DPO
  step took 46.1 s in bf16 against 2.4 s in fp32, a BERT step 7.9 s against 0.35 s (README:
  Presets and models),
* fp16 autocast with a gradient scaler on CUDA cards without bf16: fp16's narrow range underflows
  small gradients unless the loss is scaled up before backward (`torch.amp.GradScaler`),
* fp32 (no autocast), or bf16 on any CPU, on request (`--precision`).
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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU's bf16 matmuls run in oneDNN, the check PyTorch itself makes before it sends
    a bf16 matmul there (AVX-512 or AMX); without it they run in a generic kernel, 5-20x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without that op: AVX-512 is what oneDNN needs
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


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
    if precision == "auto" and not cpu_has_fast_bf16():
        return None, False  # fp32: bf16 would be 5-20x slower on this CPU (above)
    return torch.bfloat16, False


def precision_note(precision: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """Why `--precision auto` chose fp32 on this CPU, for the run's setup line (else "")."""
    if precision == "auto" and device.type == "cpu" and dtype is None:
        return " (auto: this CPU has no oneDNN bf16 matmul, so bf16 would be 5-20x slower; --precision bf16 forces it)"
    return ""


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device` (None: a no-op context, plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

"""LoRA, written out by hand: low-rank adapters on frozen linear layers.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out, in) and learns a low-rank update:

    y = x W^T + (dropout(x) A^T B^T) * scale        A: (r, in), B: (out, r), r << in, out

B starts at zero, so a fresh adapter leaves the model exactly as it was; A starts random so that
the gradient reaching B is not zero. `scale` is alpha / r (the paper) or alpha / sqrt(r)
(rsLoRA, Kalajdzievski 2023, which keeps the update's size stable as r grows).

Why this file exists rather than `import peft`:
  * it is short and shows every step (injection, freezing, merging);
  * the DPO reference model is the same network with adapters switched off (`disable_adapters`),
    so we never hold a second copy of the weights;
  * the module names and settings are PEFT's, so the adapter files (`minilab/peft_io.py`) load
    with `peft.PeftModel.from_pretrained` and vice versa.

Like torchtune, a model takes its parts: `apply_lora` swaps matching `nn.Linear` children for a
`LoRALinear` that *holds* the original linear as `base_layer` (PEFT's name for it).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def _input_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as `F.linear(x, weight)` needs it. Outside autocast both must share a dtype, so x is cast
    to the weight's; under autocast x is left alone (F.linear casts both to the autocast dtype, and
    casting x here first would only add a copy)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (see the module docstring).

    Dtypes. The base may be bf16 (half the memory of a frozen model that never needs fp32), but
    A and B always live in float32, as in PEFT: they are what the optimizer updates, and AdamW's
    small steps would mostly round away in bf16 (its state, the same dtype as the parameters,
    stays fp32 too). So the forward pass mixes dtypes, on purpose:
      * the base runs in its own dtype (the input is cast to it) or in autocast's;
      * the update B A x runs in fp32, or in autocast's dtype under autocast (F.linear casts);
      * the sum comes out in the base's output dtype, like the nn.Linear it replaces.
    `r` is tiny, so the two extra matmuls cost about 2 r (in + out) / (in * out) of the base
    one: under 3% at r=8, d=576.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) (= nn.Linear's own init), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while B A * scale has been added into base_layer.weight
        self.disabled = False  # True inside `disable_adapters(model)`: behave like the base layer

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(_input_for(x, self.base_layer.weight))  # (..., out), base (or autocast) dtype
        if self.merged:
            if self.disabled:  # the update sits inside W: take it back out (no dropout at eval)
                return y - self._delta(x, dropout=False).to(y.dtype)
            return y
        if self.disabled:
            return y
        return y + self._delta(x, dropout=True).to(y.dtype)

    def _delta(self, x: torch.Tensor, dropout: bool) -> torch.Tensor:
        """B A x * scale, (..., out): in fp32 outside autocast (a bf16 input is upcast; the update
        is small next to W x, and bf16 would keep only ~3 of its digits), in autocast's dtype inside."""
        h = self.lora_dropout(x) if dropout else x
        h = F.linear(_input_for(h, self.lora_A.weight), self.lora_A.weight)  # (..., r)
        return F.linear(h, self.lora_B.weight) * self.scaling  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The dense update B A * scale, (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight, so inference costs nothing extra.

        Exact in fp32; in bf16 the merged weight is rounded, so merge/unmerge is not a perfect
        round trip there (PEFT has the same limitation).
        """
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()`: subtract the update from the base weight again."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of `model`, by their dotted path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # PEFT's rule for a list of names: the full path equals a target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: tuple[str, ...] | list[str] = ATTENTION_MODULES,
    use_rslora: bool = False,
    include_mlp: bool = False,
) -> nn.Module:
    """Replace every `nn.Linear` whose name matches `target_modules` by a LoRALinear, in place.

    Every other parameter is frozen, so afterwards only `lora_A`/`lora_B` require grad.
    `include_mlp=True` adds gate_proj, up_proj and down_proj to the targets. Returns `model`.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules) + (MLP_MODULES if include_mlp else ())
    targets = tuple(dict.fromkeys(targets))  # de-duplicate, keep order
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: apply_lora/load_adapter once per model")
    model.requires_grad_(False)
    # Collect first, then swap: mutating modules while iterating named_modules is unsafe.
    hits = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    if not hits:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches target_modules={list(targets)}; linear layers here are named {linears}")
    for name, linear in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora))
    # Remember the settings for peft_io.save_adapter (targets as the short names PEFT expects).
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), use_rslora=use_rslora)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run `model` as the base model inside the block: every LoRALinear acts as its frozen base.

    This is how DPO gets its reference model for free: same weights, adapters off, no copy.
    Works on merged layers too (the update is subtracted on the fly).
    """
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put its base `nn.Linear` back in the wrapper's place: a plain model
    again, whose weights `save_llama` writes under their Hub names. Merge from fp32 weights for an
    exact result (a bf16 base rounds the merged weight)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model

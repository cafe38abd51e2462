"""LoRA, written out by hand: low-rank adapters on frozen linear layers, saved in PEFT's format.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out, in) and learns a low-rank update:

    y = x W^T + (dropout(x) A^T B^T) * scale        A: (r, in), B: (out, r), r << in, out

B starts at zero, so a fresh adapter leaves the model exactly as it was; A starts random so that
the gradient reaching B is not zero. `scale` is alpha / r (the paper) or alpha / sqrt(r)
(rsLoRA, Kalajdzievski 2023, which keeps the update's size stable as r grows).

Why this file exists rather than `import peft`:
  * it is short and shows every step (injection, freezing, merging, the file format);
  * the DPO reference model is the same network with adapters switched off (`disable_adapters`),
    so we never hold a second copy of the weights;
  * the adapter files are PEFT's own (`adapter_model.safetensors` + `adapter_config.json`), so an
    adapter trained here loads with `peft.PeftModel.from_pretrained` and vice versa.

Like torchtune, a model takes its parts: `apply_lora` swaps matching `nn.Linear` children for a
`LoRALinear` that *holds* the original linear as `base_layer` (PEFT's name for it).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice: PeftModel.base_model (LoraModel).model


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
    # Remember the settings for save_adapter (targets as the short names PEFT expects).
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


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (see LoRALinear.merge)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


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


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


# ---------------------------------------------------------------------------------------------
# PEFT file format
# ---------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names: base_model.model.<module path>.lora_{A,B}.weight."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` in PEFT's layout.

    `base_model_name_or_path` is recorded so `peft.PeftModel.from_pretrained` users know which
    base checkpoint the adapter belongs to. The fields we write are the ones PEFT's LoraConfig
    reads; everything we do not use (DoRA, per-layer ranks, ...) is set to its "off" value.
    """
    from safetensors.torch import save_file

    if not lora_layers(model):
        raise ValueError("model has no LoRA layers: call apply_lora(model, ...) before save_adapter")
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("model has LoRA layers but no model.lora_config: build it with apply_lora or load_adapter")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"],
        "target_modules": list(cfg["target_modules"]),
        "use_rslora": cfg["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply LoRA to `model` as `adapter_config.json` says, then load `adapter_model.safetensors`.

    Accepts adapters written by `save_adapter` or by PEFT (LoRA, list-of-names targets, no
    DoRA / per-layer ranks). Raises ValueError naming the missing/unexpected keys or the
    mismatched shapes, so a wrong base model is caught here rather than as garbage outputs.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"{p} not found: an adapter folder needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (write them with save_adapter)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {
        "use_dora": cfg.get("use_dora"),
        "rank_pattern": cfg.get("rank_pattern"),
        "alpha_pattern": cfg.get("alpha_pattern"),
        "layers_to_transform": cfg.get("layers_to_transform"),
        "modules_to_save": cfg.get("modules_to_save"),
        "fan_in_fan_out": cfg.get("fan_in_fan_out"),
        "lora_bias": cfg.get("lora_bias"),
    }
    used = {k: v for k, v in unsupported.items() if v}
    if cfg.get("bias", "none") != "none":
        used["bias"] = cfg["bias"]
    if used:
        raise ValueError(f"{cfg_path} uses LoRA options minilab does not implement: {used}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{cfg_path}: target_modules must be a list of module names, got {targets!r}")

    apply_lora(
        model,
        r=int(cfg["r"]),
        alpha=cfg.get("lora_alpha", 8),
        dropout=cfg.get("lora_dropout", 0.0),
        target_modules=tuple(targets),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    saved = load_file(str(w_path))
    # PEFT may keep the adapter name in keys (".lora_A.default.weight") in older files: normalise.
    saved = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in saved.items()}
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {adapter_dir} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
            "is it for a different base model?"
        )
    bad = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if saved[k].shape != v.shape]
    if bad:
        raise ValueError(f"adapter {adapter_dir} has mismatched shapes (different base model or rank?): {bad[:3]}")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(saved[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(saved[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model

"""LoRA adapters in and out of files, in PEFT's own format.

An adapter folder holds `adapter_model.safetensors` (the lora_A / lora_B tensors, keyed
`base_model.model.<module path>.lora_{A,B}.weight`: PEFT wraps the model twice, as
PeftModel.base_model (a LoraModel) .model) and `adapter_config.json` (PEFT's LoraConfig
fields). So an adapter trained here loads with `peft.PeftModel.from_pretrained`, and one
trained with PEFT loads here with `load_adapter`, which applies LoRA (`minilab.lora.apply_lora`)
as the config says and then checks every key and shape against the model.

A model whose class names `modules_to_save` (the classification head `score` of
`minilab.llama_cls`) also saves those modules whole, keyed `base_model.model.score.weight` as
PEFT saves them, with `task_type` SEQ_CLS: without it the head, trained in full, would be lost on
reload, the trap PEFT users fall into when they forget `modules_to_save`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .lora import apply_lora, lora_layers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice: PeftModel.base_model (LoraModel).model


def saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules saved whole beside the LoRA tensors (the class's `modules_to_save`), by name."""
    return {name: model.get_submodule(name) for name in getattr(model, "modules_to_save", ())}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names: base_model.model.<module path>.lora_{A,B}.weight,
    and base_model.model.<module>.<param> for each module saved whole."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    for name, module in saved_modules(model).items():
        for pname, p in module.named_parameters():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach().contiguous().cpu()
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
        "task_type": getattr(model, "peft_task_type", "CAUSAL_LM"),
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
        "modules_to_save": list(saved_modules(model)) or None,
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


def read_adapter_config(adapter_dir: Path, model: nn.Module) -> tuple[dict, Path]:
    """The adapter's config, checked: both files there, LoRA only, no option minilab does not
    implement, the modules saved whole (a head) matching the model's. Returns (config, weights path)."""
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
        "fan_in_fan_out": cfg.get("fan_in_fan_out"),
        "lora_bias": cfg.get("lora_bias"),
    }
    used = {k: v for k, v in unsupported.items() if v}
    if cfg.get("bias", "none") != "none":
        used["bias"] = cfg["bias"]
    if used:
        raise ValueError(f"{cfg_path} uses LoRA options minilab does not implement: {used}")
    wanted = set(cfg.get("modules_to_save") or ())
    have = set(saved_modules(model))
    # PEFT's SEQ_CLS configs list both "classifier" and "score" (BERT's and LLaMA's names); the model's own must be there.
    if (wanted and not have & wanted) or have - wanted:
        raise ValueError(f"{cfg_path} saves modules {sorted(wanted) or 'none'} whole, but this model's are "
                         f"{sorted(have) or 'none'}: it is an adapter for a "
                         f"{'classification head' if wanted else 'causal LM'}, load it onto one")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{cfg_path}: target_modules must be a list of module names, got {targets!r}")
    return cfg, w_path


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply LoRA to `model` as `adapter_config.json` says, then load `adapter_model.safetensors`.

    Accepts adapters written by `save_adapter` or by PEFT (LoRA, list-of-names targets, no
    DoRA / per-layer ranks). Raises ValueError naming the missing/unexpected keys or the
    mismatched shapes, so a wrong base model is caught here rather than as garbage outputs.
    """
    from safetensors.torch import load_file

    cfg, w_path = read_adapter_config(Path(adapter_dir), model)
    targets = cfg["target_modules"]
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
        for name, module in saved_modules(model).items():
            for pname, p in module.named_parameters():
                p.copy_(saved[f"{PEFT_PREFIX}{name}.{pname}"])
            module.requires_grad_(True)  # trained in full, as PEFT's modules_to_save are (apply_lora froze them)
    return model

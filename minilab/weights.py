"""Checkpoint I/O for both models: Hub key maps, safetensors reading and writing, the name check.

A Hub checkpoint is a folder: `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and tokenizer files. Loading is always the same four steps:
read the tensors, map each of our parameter names to the Hub's (`bert_key_map`, `llama_key_map`:
written out, so a reader sees exactly which tensors a checkpoint must hold), check names and
shapes (`check_tensor_names`: one error naming every problem), and copy. Saving runs the map
backwards, so transformers' `from_pretrained` reads what we write. The models themselves
(`bert.py`, `llama.py`) know nothing of files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minilab.bert import BertConfig, BertForSequenceClassification, BertModel
from minilab.bert_tokenizer import BertTokenizer, load_bert_tokenizer
from minilab.chat import ChatTokenizer
from minilab.hub import resolve_model_dir
from minilab.llama import LlamaConfig, LlamaForCausalLM

# What a Hub download fetches: the files the loaders read, not every format a repository holds
# (bert-base-uncased also has TF, Flax, ONNX and Core ML weights: several GB we never open).
BERT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
LLAMA_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "*.jinja"]

# -----------------------------------------------------------------------------
# safetensors files and the name check


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (one model.safetensors or an index of shards)."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
        files = [folder / s for s in shards]
    else:
        hint = " (it has pytorch_model.bin: convert it to safetensors first)" if (folder / "pytorch_model.bin").exists() else ""
        raise ValueError(f"no model.safetensors in {folder} (nor a model.safetensors.index.json of shards){hint}")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise ValueError(f"checkpoint shard {f} is missing; re-download the checkpoint")
        try:
            tensors.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                             "re-download or re-save it") from e
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """One safetensors file, contiguous CPU tensors, marked as PyTorch's (as transformers writes it)."""
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path), metadata={"format": "pt"})


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tensor_names(source, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> None:
    """One ValueError naming every missing, unexpected or wrongly shaped tensor of a checkpoint,
    so that a wrong checkpoint is caught at load time rather than as garbage outputs."""
    problems = [f"{what}: {_names(names)}" for what, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", wrong_shape)) if names]
    if problems:
        raise ValueError(f"checkpoint {source} does not match its config.json (re-download it, or fix config.json): "
                         + "; ".join(problems))


# -----------------------------------------------------------------------------
# BERT

# Keys the Hub checkpoints carry that we do not use: pretraining heads and saved index buffers.
_IGNORED_PREFIXES = ("cls.",)
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def bert_key_map(num_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Our BertModel parameter name -> its name in a Hub BertModel checkpoint.

    A tuple means several Hub tensors concatenated along dim 0 (the fused q/k/v projection).
    Inside a BertForSequenceClassification both sides gain a `bert.` prefix.
    """
    m: dict[str, str | tuple[str, ...]] = {}
    for wb in ("weight", "bias"):
        m[f"embeddings.norm.{wb}"] = f"embeddings.LayerNorm.{wb}"
        m[f"pooler.{wb}"] = f"pooler.dense.{wb}"
    m["embeddings.word.weight"] = "embeddings.word_embeddings.weight"
    m["embeddings.position.weight"] = "embeddings.position_embeddings.weight"
    m["embeddings.token_type.weight"] = "embeddings.token_type_embeddings.weight"
    for i in range(num_layers):
        ours, hub = f"layers.{i}.", f"encoder.layer.{i}."
        for wb in ("weight", "bias"):
            m[f"{ours}attn.qkv.{wb}"] = tuple(f"{hub}attention.self.{n}.{wb}" for n in ("query", "key", "value"))
            m[f"{ours}attn.proj.{wb}"] = f"{hub}attention.output.dense.{wb}"
            m[f"{ours}attn_norm.{wb}"] = f"{hub}attention.output.LayerNorm.{wb}"
            m[f"{ours}ffn_in.{wb}"] = f"{hub}intermediate.dense.{wb}"
            m[f"{ours}ffn_out.{wb}"] = f"{hub}output.dense.{wb}"
            m[f"{ours}ffn_norm.{wb}"] = f"{hub}output.LayerNorm.{wb}"
    return m


def bert_classifier_key_map(num_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Our BertForSequenceClassification name -> Hub name (`bert.` prefix + `classifier.*`)."""
    m = {f"bert.{k}": (tuple(f"bert.{n}" for n in v) if isinstance(v, tuple) else f"bert.{v}")
         for k, v in bert_key_map(num_layers).items()}
    m["classifier.weight"] = "classifier.weight"
    m["classifier.bias"] = "classifier.bias"
    return m


def _normalize_hub_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Hub names as a bare BertModel (+ `classifier.*`) would have them, and each one's name in the file.

    Drops the `bert.` prefix, renames TF-era LayerNorm `gamma`/`beta` to `weight`/`bias`, and
    drops pretraining heads and saved position-id buffers.
    """
    out, original = {}, {}
    for name, t in tensors.items():
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
            continue
        k = name.removeprefix("bert.")
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        out[k], original[k] = t, name
    return out, original


def load_bert_weights(model: BertModel | BertForSequenceClassification, folder: str | Path) -> list[str]:
    """Copy a Hub checkpoint's tensors into `model`; returns our names that were not in the file.

    Every missing, unexpected or wrongly shaped tensor is reported by name in one ValueError,
    except that a classifier head may be absent (a pretrained encoder, fine-tuned from scratch).
    """
    folder = Path(folder)
    hub, original = _normalize_hub_keys(read_safetensors(folder))
    prefixed = any(n.startswith("bert.") for n in original.values())

    def shown(k: str) -> str:  # a name as the file spells it (or would, for a missing one)
        return original.get(k) or (f"bert.{k}" if prefixed and not k.startswith("classifier.") else k)

    is_clf = isinstance(model, BertForSequenceClassification)
    encoder = model.bert if is_clf else model
    # hub names without the `bert.` prefix, which _normalize_hub_keys has stripped
    key_map = bert_key_map(len(encoder.layers))
    if is_clf:
        key_map = {f"bert.{k}": v for k, v in key_map.items()}
        key_map["classifier.weight"], key_map["classifier.bias"] = "classifier.weight", "classifier.bias"
    optional = {"classifier.weight", "classifier.bias"} if is_clf else set()

    ours = model.state_dict()
    state, missing, bad_shape, used = {}, [], [], set()
    for name, hub_names in key_map.items():
        names = hub_names if isinstance(hub_names, tuple) else (hub_names,)
        used.update(names)
        absent = [n for n in names if n not in hub]
        if absent:
            if name not in optional:
                missing.extend(shown(n) for n in absent)
            continue
        t = torch.cat([hub[n] for n in names]) if len(names) > 1 else hub[names[0]]
        if t.shape != ours[name].shape:
            bad_shape.append(f"{'+'.join(shown(n) for n in names)}: "
                             f"checkpoint {tuple(t.shape)} vs model {tuple(ours[name].shape)}")
            continue
        state[name] = t
    head_absent = sorted(n for n in optional if key_map[n] not in hub)
    if 0 < len(head_absent) < len(optional):  # half a head is a broken file, not a fresh start
        missing.extend(shown(key_map[n]) for n in head_absent)
    unexpected = sorted(shown(k) for k in set(hub) - used
                        if is_clf or not k.startswith("classifier."))  # an encoder may drop the head
    check_tensor_names(folder, missing, unexpected, bad_shape)
    with torch.no_grad():
        for name, t in state.items():
            ours[name].copy_(t)
    return sorted(set(key_map) - set(state))


def load_bert_classifier(name_or_path: str, num_labels: int, id2label: dict[int, str] | None = None,
                         seed: int = 0) -> tuple[BertForSequenceClassification, BertTokenizer]:
    """A BertForSequenceClassification from a Hub id or folder, plus its tokenizer.

    Works with full pretraining checkpoints (`bert-base-uncased`), bare encoders (MiniLM) and
    fine-tuned classifiers. A classifier head absent from the checkpoint is drawn from
    N(0, initializer_range) with a generator seeded by `seed`, so runs are reproducible.
    The model is returned in eval mode, like transformers; call `.train()` to fine-tune.
    """
    folder = resolve_model_dir(name_or_path, allow_patterns=BERT_FILES)
    config = BertConfig.from_pretrained(folder)
    if id2label is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
    elif config.id2label is not None and len(config.id2label) != num_labels:
        config.id2label = None
    # Build on the meta device: every tensor is about to be overwritten, so skip the random init.
    with torch.device("meta"):
        model = BertForSequenceClassification(config, num_labels)
    model.to_empty(device="cpu")
    fresh = load_bert_weights(model, folder)
    if fresh:  # the classifier head
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, config.initializer_range, generator=g)
            model.classifier.bias.zero_()
    return model.eval(), load_bert_tokenizer(folder)


def save_bert_classifier(model: BertForSequenceClassification, tokenizer: BertTokenizer, out_dir: str | Path,
                         id2label: dict[int, str] | None = None) -> Path:
    """Write a folder that transformers' AutoModelForSequenceClassification loads as is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(**asdict(model.config))
    if id2label is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
    if config.id2label is not None and len(config.id2label) != config.num_labels:
        raise ValueError(f"id2label has {len(config.id2label)} labels but the model has {config.num_labels} outputs")
    (out / "config.json").write_text(json.dumps(config.to_hub_dict(), indent=2) + "\n")

    state = model.state_dict()
    tensors = {}
    for name, hub_names in bert_classifier_key_map(len(model.bert.layers)).items():
        if name not in state:
            raise ValueError(f"model has no parameter {name!r}: merge any adapters (LoRA) into the weights "
                             "before saving")
        t = state[name].detach().cpu()
        if isinstance(hub_names, tuple):  # fused q/k/v -> query, key, value
            for hub_name, part in zip(hub_names, t.chunk(len(hub_names), dim=0)):
                tensors[hub_name] = part.contiguous()
        else:
            tensors[hub_names] = t.contiguous()
    write_safetensors(tensors, out / "model.safetensors")
    tokenizer.save(out)
    return out


# -----------------------------------------------------------------------------
# LLaMA


def llama_key_map(config: LlamaConfig) -> dict[str, str]:
    """Our LlamaForCausalLM parameter name -> its Hub name, for every tensor a checkpoint must hold.

    The two sides are equal because llama.py mirrors transformers' module names (so that PEFT
    adapters keep their keys); the map still states exactly which tensors are expected.
    """
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    proj = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in proj:
            names.append(f"{p}{name}.weight")
            if config.attention_bias if name.startswith("self_attn") else config.mlp_bias:
                names.append(f"{p}{name}.bias")
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return {n: n for n in names}


def llama_from_tensors(config: LlamaConfig, tensors: dict[str, torch.Tensor], dtype=torch.float32,
                       source: str = "checkpoint") -> LlamaForCausalLM:
    """Build a model from Hub-named tensors, checking names and shapes first.

    The model is created on the meta device (no random init, no memory) and each parameter is then
    replaced by the checkpoint's tensor, so loading a 1B model costs one copy of its weights.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    keys = llama_key_map(config)
    ours = dict(model.named_parameters(remove_duplicate=False))
    ignorable = {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    hub_names = set(keys.values())
    missing = [h for h in keys.values() if h not in tensors]
    unexpected = [k for k in tensors if k not in hub_names and k not in ignorable]
    wrong = [f"{h} {tuple(tensors[h].shape)} (expected {tuple(ours[o].shape)})"
             for o, h in keys.items() if h in tensors and tuple(tensors[h].shape) != tuple(ours[o].shape)]
    check_tensor_names(source, missing, unexpected, wrong)
    for our_name, hub_name in keys.items():
        module_name, _, attr = our_name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensors[hub_name].to(dtype), requires_grad=True))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def load_llama(name_or_path: str, dtype=torch.float32) -> tuple[LlamaForCausalLM, ChatTokenizer]:
    """(model, tokenizer) from a checkpoint folder, a Hub id, or a path to a `.gguf` file."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix == ".gguf":
        from minilab.gguf_weights import read_gguf  # the `gguf` package is needed for GGUF files only

        config, tensors, tokenizer = read_gguf(path)
        return llama_from_tensors(config, tensors, dtype, source=str(path)), tokenizer
    folder = resolve_model_dir(str(name_or_path), allow_patterns=LLAMA_FILES)
    config = LlamaConfig.from_pretrained(folder)
    return llama_from_tensors(config, read_safetensors(folder), dtype, source=str(folder)), ChatTokenizer.from_folder(folder)


def save_llama(model: LlamaForCausalLM, tokenizer: ChatTokenizer | None, folder: str | Path) -> Path:
    """Write a Hub-layout folder (config.json, model.safetensors, tokenizer files) that both
    `load_llama` and transformers' `from_pretrained` read. Merge LoRA adapters first: the file
    holds exactly the tensors of `llama_key_map`, under their Hub names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {hub: model.get_parameter(ours) for ours, hub in llama_key_map(config).items()}
    write_safetensors(tensors, folder / "model.safetensors")
    cfg = config.to_hub_dict()
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eot_ids), "pad_token_id": tokenizer.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tokenizer.save(folder)
    return folder


def save_llama_classifier(model, tokenizer: ChatTokenizer | None, folder: str | Path, label_names: list[str]) -> Path:
    """A `minilab.llama_cls.LlamaForSequenceClassification` (LoRA merged first) as the Hub folder of
    transformers' LlamaForSequenceClassification: the decoder's tensors under their Hub names, the
    head as `score.weight`, and num_labels / id2label in config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {hub: model.get_parameter(ours) for ours, hub in llama_key_map(config).items() if ours.startswith("model.")}
    tensors["score.weight"] = model.score.weight
    write_safetensors(tensors, folder / "model.safetensors")
    cfg = config.to_hub_dict()
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=len(label_names),
               id2label={str(i): n for i, n in enumerate(label_names)}, label2id={n: i for i, n in enumerate(label_names)},
               torch_dtype=str(model.score.weight.dtype).removeprefix("torch."))
    if tokenizer is not None:
        cfg["pad_token_id"] = tokenizer.pad_id  # transformers finds each row's last real token by it
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def save_gguf_as_safetensors(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hub-layout folder from a GGUF file (dequantised fp32 weights, tokenizer).

    transformers-based tools (TRL, PEFT) then load the very same weights as minilab with a plain
    `from_pretrained(out_dir)`.
    """
    model, tokenizer = load_llama(str(gguf_path))
    return save_llama(model, tokenizer, out_dir)

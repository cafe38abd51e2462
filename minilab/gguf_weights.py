"""Read a LLaMA-architecture GGUF file (llama.cpp's format) into Hub-named fp32 tensors.

A GGUF file holds metadata (the config and the tokeniser, under keys like `llama.block_count`
and `tokenizer.ggml.tokens`) and tensors, most of them block-quantised (Q4_1: 32 weights share a
scale and a minimum). Loading it takes four steps:

1. config from the `llama.*` metadata;
2. tensor names: llama.cpp's `blk.N.attn_q.weight` -> Hub's `model.layers.N.self_attn.q_proj.weight`;
3. shapes: GGUF lists dimensions fastest-varying first, i.e. reversed from PyTorch, so a
   (out, in) nn.Linear weight is stored with shape [in, out];
4. undo llama.cpp's q/k row permutation (see `unpermute_qk`).

The dequantised model is exactly the quantised one in fp32: no accuracy is recovered, but it runs
(and trains LoRA adapters) like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minilab.chat import ChatTokenizer
from minilab.llama import LlamaConfig

# llama.cpp tensor name -> Hub tensor name; per-block names take the layer index.
GGUF_TO_HUB = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_TO_HUB = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hub_name(gguf_name: str) -> str | None:
    """`blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`; None for names we do not know."""
    if gguf_name in GGUF_TO_HUB:
        return GGUF_TO_HUB[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_BLOCK_TO_HUB:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_TO_HUB[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj/k_proj rows.

    HF's rotary embedding pairs dimension i with i + hd/2 within each head ("rotate half");
    llama.cpp's pairs 2i with 2i+1 (interleaved). Its converter therefore reorders each head's rows
    with `w.reshape(n_heads, 2, hd/2, in).swapaxes(1, 2)`: row (half h, index i) moves to 2i + h.
    Reading the rows as (hd/2, 2) and swapping back restores HF's order.
    """
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict:
    """All GGUF key/value metadata as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = f.contents()
    return meta


def config_from_metadata(meta: dict, tensor_names: set[str]) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; minilab reads 'llama' GGUF files only")
    if "rope_freqs.weight" in tensor_names or meta.get("llama.rope.scaling.type", "none") not in ("none",):
        raise ValueError(
            "this GGUF uses scaled rotary embeddings (rope_freqs / llama.rope.scaling.*), which the "
            "GGUF loader does not support: load the model's Hub safetensors checkpoint instead"
        )
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    rot = meta.get("llama.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"GGUF rotates {rot} of {head_dim} head dimensions; partial rotary is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=meta.get("llama.vocab_size", len(tokens) if tokens else 0),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=meta.get("llama.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,  # no output matrix: the head reuses the embedding
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], ChatTokenizer]:
    """(config, Hub-named fp32 tensors, tokenizer) from a GGUF file."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError) as e:  # "GGUF magic invalid", an empty or cut-short file
        raise ValueError(f"{path} is not a GGUF file ({e}): pass a llama.cpp .gguf model file, or a Hub checkpoint "
                         "folder (config.json + safetensors)") from e
    meta = read_metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors})
    tensors, unknown = {}, []
    for t in reader.tensors:
        name = hub_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        # np.array copies out of the memory map first: dequantising a plain array is ~2x faster
        values = dequantize(np.array(t.data), t.tensor_type)
        w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        tensors[name] = w
    if unknown:
        raise ValueError(f"{path} holds tensors minilab does not know: {', '.join(unknown[:8])}")
    return config, tensors, ChatTokenizer.from_gguf_metadata(meta)

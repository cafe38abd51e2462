"""LLaMA (3.x) decoder, written out by hand: config, RMSNorm, rotary embeddings, GQA attention,
SwiGLU MLP and a KV cache. Hub checkpoints (safetensors) and GGUF files are read by `minilab/weights.py`.

The module names mirror Hugging Face's `LlamaForCausalLM` exactly
(`model.layers.3.self_attn.q_proj`, `model.layers.3.mlp.down_proj`, `lm_head`, ...). That is not
nostalgia: a PEFT LoRA adapter is a dictionary keyed by those names, so keeping them lets an adapter
trained here load in PEFT and vice versa, and lets `minilab.lora` find the projections to wrap by
name. Every projection is a separate `nn.Linear` attribute, never fused, for the same reason.

Like torchtune, the attention and MLP blocks take their projections as constructor arguments
instead of building them, so a caller can hand in a LoRA-wrapped linear without subclassing.

Shapes: B batch, T new tokens, S = past + new tokens (keys), D hidden size, H query heads,
K key/value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} as in Llama-3.1/3.2's config.json.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unused config.json keys, kept for saving

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs it to be"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"rope scaling {rope_type!r} is not supported (only the default rotary embedding and "
                "'llama3' scaling are): use a LLaMA-3.x checkpoint or drop rope_scaling"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Build from a Hub `config.json` dictionary (transformers 4.x or 5.x spelling).

        transformers 5 writes the rotary settings as `rope_parameters: {rope_theta, rope_type, ...}`;
        4.x and the Hub's Llama-3.2 files use `rope_theta` plus `rope_scaling`. Both are accepted.
        """
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json says model_type={model_type!r}; minilab.llama only loads 'llama' checkpoints")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported: LLaMA uses 'silu' (SwiGLU)")
        rope = d.pop("rope_parameters", None) or {}
        scaling = d.get("rope_scaling") or None
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
            scaling.pop("type", None)
            if scaling["rope_type"] == "default":
                scaling = None
        d["rope_scaling"] = scaling
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LlamaConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no config.json: pass a Hugging Face checkpoint folder or a .gguf file")
        return cls.from_dict(json.loads(path.read_text()))

    def to_hub_dict(self) -> dict:
        """The config.json that transformers' LlamaForCausalLM reads back."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"},
        }
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight. The mean of squares is taken in fp32 because in bf16 it loses enough
    precision to shift the logits; the result is cast back before the (learned) scale, as in HF."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd) for i < hd/2, in fp32, with LLaMA-3's scaling if asked.

    LLaMA-3 scaling (`rope_type: llama3`) stretches the context: wavelengths longer than
    original_max / low_freq_factor are divided by `factor` (slowed down), those shorter than
    original_max / high_freq_factor are kept, and the band in between is a linear blend of the two.
    """
    hd = config.head_dim
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd
    inv_freq = 1.0 / (config.rope_theta**exponent)  # (hd/2,)
    scaling = config.rope_scaling
    if scaling is None or scaling.get("rope_type") == "default":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. The inverse frequencies are a plain fp32 tensor, not a
    buffer, so `model.to(torch.bfloat16)` cannot round them (a bf16 angle is off by whole radians
    at position 1000)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(config)  # (hd/2,) fp32, CPU; moved to the input's device on first use

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:  # kept there: a copy from the CPU per call waits for the GPU
            self.inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd): HF's "rotate half" layout
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by the position's angle. x: (B, nh, T, hd), cos/sin: (B, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of the tokens seen so far, one (B, K, S, hd) pair per layer.

    Tensors grow by concatenation. That costs a copy per step, but they stay ordinary autograd
    tensors: DPO runs the shared prefix once, `repeat_interleave`s its cache for every prompt and
    backpropagates through it, which in-place writes into a preallocated buffer would break.
    Decoding, which needs no gradients, `reserve`s room and appends in place.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # see `reserve`

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, K, T, hd) keys/values and return everything so far."""
        old, buf = self.keys[layer], self.buffers[layer]
        if buf is not None and old.shape[2] + k.shape[2] <= buf[0].shape[2] and not torch.is_grad_enabled():
            S, T = old.shape[2], k.shape[2]  # written into the reserved room, nothing copied
            buf[0][:, :, S : S + T], buf[1][:, :, S : S + T] = k, v
            k, v = buf[0][:, :, : S + T], buf[1][:, :, : S + T]  # (B, K, S + T, hd) views
        elif old is not None:
            k = torch.cat([old, k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
            self.buffers[layer] = None
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reserve(self, n: int) -> None:
        """Room for n more columns in every layer, which `update` then fills in place (without gradients).

        Decoding appends one column per step, and a concatenation copies the whole cache each
        time: 128 rows of 100 columns are 0.5 GB of SmolLM2's fp32 keys and values a step. Here
        the cache is copied once into buffers n columns longer, and the tensors it holds are views
        of their filled part. Only without autograd: an in-place write into a tensor that autograd
        saved for the backward would break it, so with gradients on `update` concatenates as before.
        """
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                B, K, S, hd = k.shape
                kb, vb = k.new_empty(B, K, S + n, hd), v.new_empty(B, K, S + n, hd)
                kb[:, :, :S], vb[:, :, :S] = k, v
                self.buffers[i] = (kb, vb)
                self.keys[i], self.values[i] = kb[:, :, :S], vb[:, :, :S]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a (B',) index), in place: decoding drops the rows that ended."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is None:
                continue
            buf = self.buffers[i]
            if buf is None:
                self.keys[i], self.values[i] = k.index_select(0, rows), v.index_select(0, rows)
            else:  # keep the room: select from the whole buffers
                S = k.shape[2]
                kb, vb = buf[0].index_select(0, rows), buf[1].index_select(0, rows)
                self.buffers[i] = (kb, vb)
                self.keys[i], self.values[i] = kb[:, :, :S], vb[:, :, :S]

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """One cache holding the rows of several, each LEFT-padded with zero columns to the longest.

        The padded columns must be masked by whoever attends to them (`scoring.Prefilled.concat`
        pads the attention mask to match). Keys hold their rotary positions already, so moving a
        row's columns to the right changes nothing it computes but the rounding.
        """
        S = max(c.seq_len for c in caches)

        def left_pad(t: torch.Tensor) -> torch.Tensor:  # (B, K, s, hd) -> (B, K, S, hd)
            return F.pad(t, (0, 0, S - t.shape[2], 0))

        out = KVCache(len(caches[0].keys))
        out.keys = [torch.cat([left_pad(c.keys[i]) for c in caches]) for i in range(len(out.keys))]
        out.values = [torch.cat([left_pad(c.values[i]) for c in caches]) for i in range(len(out.values))]
        return out

    def repeat_interleave(self, n: int) -> "KVCache":
        """A new cache whose batch rows are each repeated n times (row b -> rows b*n .. b*n+n-1)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k.repeat_interleave(n, dim=0) for k in self.keys]
        out.values = [None if v is None else v.repeat_interleave(n, dim=0) for v in self.values]
        return out


# SDPA takes `enable_gqa` from torch 2.5 on. On the CPU it was measured bit for bit equal to SDPA over
# copied-out heads, and faster, with torch 2.13 (the release the Makefile installs); releases before that
# copy the heads out as before, so that no result depends on an older release's choice of kernel.
CPU_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, H, T, hd) queries over (B, K, S, hd) keys and values:
    each of the K key/value heads serves H/K consecutive query heads (grouped-query attention).

    mask: (B, 1, T, S) bool (True = may attend), or None for plain causal attention (no past).
    Two paths compute it:

    * `F.scaled_dot_product_attention` (SDPA), except when training on the CPU. On the CPU, SDPA
      reads the K shared heads itself (`enable_gqa`, `CPU_SDPA_GQA` above): bit for bit what it
      gives over the heads copied out to H with `repeat_interleave`, without the copies, which
      took as long as SDPA itself when decoding (torch.profiler, 12 greedy steps of 32 rows of
      SmolLM2: 77 ms of copies beside 69 ms of SDPA). On CUDA not every SDPA kernel takes
      `enable_gqa`, so there the heads are still copied out.
    * Written out as two matmuls and a softmax, when training on the CPU, with each group's
      query heads stacked as rows over their shared key/value head. There SDPA's
      flash-attention backward kernel was a quarter of a whole DPO step at the lab's lengths
      (about 100-300 tokens), where attention is only a few percent of the FLOPs; autograd's
      backward of this is plain matmuls too, and a DPO step is 1.3x faster (bench/profile_step.py).
      Scores come out of the matmul in the input dtype (bf16 under autocast) and the softmax runs
      in fp32, as transformers' "eager" attention does.
    """
    B, H, T, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    group = H // K
    if q.device.type == "cpu" and torch.is_grad_enabled():  # training on the CPU: written out
        # A group's H/K query heads become extra query rows of their key/value head. The shared
        # heads are read where they are: no copies out to H heads, and no sum of those copies'
        # gradients in the backward. And a one-token query (DPO's answer column) gives matmuls
        # of g rows, not 1. With one row, autograd's backward products (S, 1) @ (1, hd) took a
        # slow path, one small matrix at a time: 16 answer rows of SmolLM2 over 84 columns took
        # 4.1 ms forward and backward as H heads, and 1.0 ms as grouped rows (fp32, 2 cores).
        qg = q.reshape(B, K, group * T, hd)  # (B, K, g*T, hd): rows = (head in group, token)
        scores = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, K, g*T, S)
        scores = scores.view(B, K, group, T, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S) causal
        else:
            mask = mask[:, :, None]  # (B, 1, 1, T, S): the same for every head
        scores = scores.masked_fill(~mask, float("-inf")).view(B, K, group * T, S)
        y = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (B, K, g*T, hd)
        return y.view(B, H, T, hd)
    shared_kv = group > 1 and q.device.type == "cpu" and CPU_SDPA_GQA  # SDPA reads the K heads
    if group > 1 and not shared_kv:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
    gqa = {"enable_gqa": True} if shared_kv else {}
    if mask is None:  # no padding, no past: the fused causal path
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention: H query heads share K key/value heads (H/K queries per group)."""

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module,
                 num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
        y = attention(q, k, v, mask)  # (B, H, T, hd): each kv head serves H/K consecutive query heads
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, self_attn: LlamaAttention, mlp: LlamaMLP, input_layernorm: RMSNorm,
                 post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_layer(config: LlamaConfig, layer_idx: int) -> LlamaDecoderLayer:
    D, hd = config.hidden_size, config.head_dim
    H, K, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    ab, mb = config.attention_bias, config.mlp_bias
    attn = LlamaAttention(
        q_proj=nn.Linear(D, H * hd, bias=ab), k_proj=nn.Linear(D, K * hd, bias=ab),
        v_proj=nn.Linear(D, K * hd, bias=ab), o_proj=nn.Linear(H * hd, D, bias=ab),
        num_heads=H, num_kv_heads=K, head_dim=hd, layer_idx=layer_idx,
    )
    mlp = LlamaMLP(gate_proj=nn.Linear(D, I, bias=mb), up_proj=nn.Linear(D, I, bias=mb),
                   down_proj=nn.Linear(I, D, bias=mb))
    eps = config.rms_norm_eps
    return LlamaDecoderLayer(attn, mlp, RMSNorm(D, eps), RMSNorm(D, eps))


def build_attention_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                         device) -> torch.Tensor | None:
    """(B, 1, T, S) boolean mask, True = may attend; None when plain causal attention is enough.
    A caller with a structure of its own (answers side by side after a prompt) passes that
    (B, 1, T, S) bool mask, which is checked and used as it is.

    Query i (absolute position past + i) sees key j when j <= past + i and key j is not padding.
    A query always sees itself, so a padding query's row is never fully masked: its output is junk
    that nobody reads, but it is finite. Current PyTorch returns zeros for an all-False row, but
    releases before 2.5 return NaN, which would leak through `loss * mask` into gradients.
    """
    S = past + T
    if attention_mask is not None and attention_mask.dim() == 4:  # built by the caller (`scoring.answer_tree_mask`)
        if tuple(attention_mask.shape) != (B, 1, T, S) or attention_mask.dtype != torch.bool \
                or attention_mask.device != torch.device(device):
            raise ValueError(f"a 4-d attention_mask must be bool of shape (batch, 1, new, past + new) = {(B, 1, T, S)} "
                             f"on {device}, got {attention_mask.dtype} {tuple(attention_mask.shape)} on {attention_mask.device}")
        return attention_mask
    if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = {(B, S)}"
        )
    if attention_mask is not None and past == 0 and bool(attention_mask.all()):
        attention_mask = None  # no padding: let SDPA use its fused causal kernel
    if attention_mask is None and (past == 0 or T == 1):
        return None
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed.expand(B, 1, T, S)


class LlamaModel(nn.Module):
    """Embeddings, the decoder stack and the final norm (HF's `LlamaForCausalLM.model`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4-d attention_mask needs position_ids: the model cannot count real tokens from it")
            if attention_mask is not None:
                # Position = number of real tokens before this one, so left padding does not shift them.
                pos = attention_mask.long().cumsum(-1) - 1  # (B, S)
                position_ids = pos.clamp(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary_emb(position_ids)  # (B, T, hd) each, fp32
        mask = build_attention_mask(attention_mask, B, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self):
        """Share one (V, D) matrix between the input embedding and the output head."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, D) after the final norm; callers apply `lm_head` only where they need logits."""
        return self.model(input_ids, attention_mask, position_ids, cache)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, V) logits. attention_mask: (B, past + T), 1 = real token, 0 = padding."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

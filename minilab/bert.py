"""BERT encoder and sequence classifier, written out by hand (one file, plain PyTorch).

Reads and writes Hugging Face checkpoints (`bert-base-uncased`, MiniLM, fine-tuned classifiers)
so that a model trained here loads in `transformers` and predicts the same. The math is the
original post-LayerNorm BERT; what differs from the reference implementation is only *how*
the work is done, because on a CPU every skipped FLOP is wall-clock time:

1. Query, key and value are one fused `Linear(H, 3H)`: one matmul instead of three. The Hub
   stores them separately, so we concatenate when loading and split again when saving.
2. Padding is never computed. Text batches are padded to the longest sentence, and often a
   third to a half of a batch is padding (random SST-2 batches of 32: 49%). Everything in
   BERT except attention works token by token (embeddings, LayerNorm, projections, FFN), so
   we gather the real tokens into one packed (N, H) matrix and run those parts on N rows
   instead of B*T. Only attention needs the (B, T)
   layout; it scatters q/k/v back into a padded tensor for `F.scaled_dot_product_attention`
   and gathers its output again. Padding tokens never influence real tokens (they are masked
   as keys), so the real rows get the same math as with padding; only float rounding differs.
3. The classifier only reads the [CLS] token of the last layer. Its keys and values still
   need every token, but its output projection, LayerNorms and FFN are run on the B [CLS]
   rows only (`cls_only=True`). The loss is identical: in the reference those other rows are
   computed and then thrown away.

Padding positions of `BertModel.forward`'s `last_hidden` are zeros (they were not computed);
mask them out as you would anyway.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from minilab.hub import check_tensor_names, resolve_model_dir

# -----------------------------------------------------------------------------
# Config


@dataclass
class BertConfig:
    """The fields of a Hub `config.json` that BERT's math depends on (names kept as on the Hub)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob, as transformers does
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    id2label: dict[int, str] | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: fix config.json"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.num_hidden_layers < 1:
            raise ValueError("num_hidden_layers must be at least 1")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Build from a Hub config dict, ignoring the fields that do not change the math."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config.json has model_type {model_type!r}; this loader only reads BERT checkpoints")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "id2label" in d and "num_labels" not in d:
            kw["num_labels"] = len(d["id2label"])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "BertConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in {folder}: pass a Hugging Face BERT checkpoint folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(d)

    def to_hub_dict(self) -> dict:
        """The config.json that transformers' BertConfig reads back."""
        d = asdict(self)
        id2label = d.pop("id2label") or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d.update(
            model_type="bert",
            architectures=["BertForSequenceClassification"],
            position_embedding_type="absolute",
            id2label={str(i): name for i, name in id2label.items()},
            label2id={name: i for i, name in id2label.items()},
        )
        return d


_ACTIVATIONS = {
    "gelu": F.gelu,  # the exact, erf-based GELU of the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# -----------------------------------------------------------------------------
# Dropout


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        scale = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))  # 0 or 1/(1-p)
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class Dropout(nn.Module):
    """Inverted dropout, the same as nn.Dropout, drawn faster on CPU.

    Each element is kept with probability 1 - p and scaled by 1/(1 - p), exactly the
    distribution of nn.Dropout; we draw it as `rand >= p` rather than with `bernoulli_`, which
    on CPU is about twice as slow, and a BERT step draws a mask for every activation of the
    residual stream three times per layer (measured: 5.5 vs 9.2 ms forward+backward for a
    1280 x 384 activation, one thread).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFn.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -----------------------------------------------------------------------------
# Packing: where the real tokens of a padded batch are


class Packing:
    """Maps between a padded (B, T, ...) batch and the packed (N, ...) rows that we compute.

    `rows` are the flat indices (into B*T) of the rows we compute: every real token, plus
    position 0 of each sequence (the [CLS] token the pooler reads, even in the odd batch whose
    first position is padding). With no padding `rows` is None and packing is a free reshape.
    """

    def __init__(self, attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device):
        self.B, self.T = B, T
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool().clone()
            keep[:, 0] = True
            self.rows = keep.flatten().nonzero().squeeze(1)  # (N,)
            self.mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = may attend
            # the same mask as an additive bias on attention scores, built once per batch, not per layer;
            # the most negative float rather than -inf, so a sequence of only padding gives no NaN
            self.bias = torch.zeros(self.mask.shape, device=device).masked_fill_(~self.mask, torch.finfo(torch.float32).min)
            self.positions = self.rows % T  # (N,) absolute position of each packed row
            # packed row of each sequence's position 0
            self.cls_rows = torch.searchsorted(self.rows, torch.arange(B, device=device) * T)  # (B,)
        else:
            self.rows = self.mask = self.bias = None
            self.positions = torch.arange(T, device=device).repeat(B)  # (B*T,)
            self.cls_rows = torch.arange(B, device=device) * T

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        x = x.flatten(0, 1)
        return x if self.rows is None else x.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D), zeros at the padding rows we did not compute."""
        if self.rows is not None:
            x = x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.rows, x)
        return x.view(self.B, self.T, x.shape[-1])


# -----------------------------------------------------------------------------
# Modules


class _LookupIntoGradBuffer(torch.autograd.Function):
    """F.embedding whose backward adds the weight gradient into the module's kept buffer."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, module: "WordEmbedding") -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.module = module
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ctx.module.add_grad(ids, grad)
        return None, None, None  # the weight's gradient is already in weight.grad


class WordEmbedding(nn.Embedding):
    """nn.Embedding whose weight gradient lives in one buffer kept from step to step.

    Why: the gradient of a 30522 x 384 word embedding is a dense 47 MB tensor, of which a batch
    touches a few hundred rows. nn.Embedding allocates and zero-fills a new one in every backward
    (and a block that large comes from the OS as fresh pages, which it zero-fills first): 10 to
    18 ms of a 180 ms MiniLM step on one core. Here the first backward of a step zeroes only the
    rows that the previous step touched and adds into the same buffer. The gradient is the same
    numbers in the usual place, `weight.grad`, so clipping, accumulation and the optimizer see no
    difference. (`torch.autograd.grad` cannot see it: train with `.backward()`.)
    """

    _buffer: torch.Tensor | None = None
    _touched: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.weight.requires_grad and torch.is_grad_enabled()):
            return super().forward(ids)
        return _LookupIntoGradBuffer.apply(ids, self.weight, self)

    @torch.no_grad()
    def add_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        w = self.weight
        if w.grad is None:  # the first backward since zero_grad(set_to_none=True)
            buf = self._buffer
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                self._buffer = torch.zeros_like(w)
            elif self._touched:
                buf.index_fill_(0, torch.cat(self._touched), 0.0)
            self._touched = []
            w.grad = self._buffer
        w.grad.index_add_(0, ids, grad.to(w.grad.dtype))
        if w.grad is self._buffer:
            self._touched.append(ids)
        if self.padding_idx is not None:
            w.grad[self.padding_idx] = 0.0  # as nn.Embedding: the [PAD] row learns nothing


class BertEmbeddings(nn.Module):
    """word + token type + absolute position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        # padding_idx: the [PAD] row gets no gradient, as in the reference model
        self.word = WordEmbedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, H)
        self.token_type = nn.Embedding(config.type_vocab_size, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.drop = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, packing: Packing) -> torch.Tensor:
        x = self.word(packing.pack(input_ids))  # (N, H)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all type 0: add the row, skip the lookup
        else:
            x = x + self.token_type(packing.pack(token_type_ids))
        x = x + self.position(packing.positions)
        return self.drop(self.norm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention over a packed batch, with one fused q/k/v projection.

    `qkv` maps H -> 3H, laid out [query | key | value], each H = n_head * head_dim wide.
    """

    def __init__(self, n_head: int, qkv: nn.Module, proj: nn.Module, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = qkv
        self.proj = proj
        self.dropout_p = dropout
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, packing: Packing, cls_only: bool = False) -> torch.Tensor:
        B, T = packing.B, packing.T
        qkv = packing.unpack(self.qkv(x))  # (B, T, 3H)
        H = qkv.shape[-1] // 3
        q, k, v = qkv.view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
        if cls_only:
            q = q[:, :, :1]  # only [CLS] asks; every real token still answers
        if self.training:
            y = self.attend(q, k, v, packing)  # (B, nh, Tq, hd)
        else:  # inference: SDPA's fused kernel is the fastest forward
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.mask)  # (B, nh, Tq, hd)
        y = y.transpose(1, 2).flatten(2)  # (B, Tq, H)
        y = y[:, 0] if cls_only else packing.pack(y)  # (B, H) or (N, H)
        return self.proj(y)

    def attend(self, q, k, v, packing: Packing) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim) + mask), dropped out, times v: attention written out for training.

        Why not `F.scaled_dot_product_attention` here: on CPU, with dropout it has no fused kernel
        and falls back to a generic path that copies q, k and v to fp32, scales both q and k and
        rebuilds the mask in every layer; without dropout its fused kernel's backward is slower
        still. Written out, the two matmuls run in autocast's dtype (bf16, as in transformers'
        eager attention), softmax in fp32, and the mask is the bias `Packing` built once.
        Measured on the sst2 benchmark (bench/bench_bert.py): forward+backward 10-15% faster.
        """
        att = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, Tq, T)
        if packing.bias is not None:
            att = att + packing.bias  # fp32 bias: the sum, and so the softmax, is fp32
        att = self.drop(att.float().softmax(-1))
        return att @ v


class BertLayer(nn.Module):
    """One post-LayerNorm encoder block: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, attn: BertSelfAttention, attn_norm: nn.Module, ffn_in: nn.Module, ffn_out: nn.Module,
                 ffn_norm: nn.Module, act: str, dropout: float):
        super().__init__()
        self.attn = attn
        self.attn_norm = attn_norm
        self.ffn_in = ffn_in
        self.ffn_out = ffn_out
        self.ffn_norm = ffn_norm
        self.act = _ACTIVATIONS[act]
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, packing: Packing, cls_only: bool = False) -> torch.Tensor:
        h = self.attn(x, packing, cls_only)
        if cls_only:
            x = x.index_select(0, packing.cls_rows)  # (B, H): the residual of [CLS] only
        x = self.attn_norm(x + self.drop(h))
        h = self.ffn_out(self.act(self.ffn_in(x)))
        return self.ffn_norm(x + self.drop(h))


def build_layer(config: BertConfig) -> BertLayer:
    H, I = config.hidden_size, config.intermediate_size
    attn = BertSelfAttention(config.num_attention_heads, nn.Linear(H, 3 * H), nn.Linear(H, H),
                             config.attention_probs_dropout_prob)
    return BertLayer(attn, nn.LayerNorm(H, eps=config.layer_norm_eps), nn.Linear(H, I), nn.Linear(I, H),
                     nn.LayerNorm(H, eps=config.layer_norm_eps), config.hidden_act, config.hidden_dropout_prob)


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(build_layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cls_only: bool = False):
        """Run the encoder on the packed real tokens; returns (x, packing).

        x is (N, H) packed rows, or (B, H) [CLS] rows when `cls_only` (the last layer then
        computes only what the pooler reads).
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} is longer than max_position_embeddings "
                             f"{self.config.max_position_embeddings}: truncate the inputs")
        packing = Packing(attention_mask, B, T, input_ids.device)
        x = self.embeddings(input_ids, token_type_ids, packing)  # (N, H)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, packing, cls_only=cls_only and i == last)
        return x, packing

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: dense + tanh on the final [CLS] vector, (B, H) -> (B, H)."""
        return torch.tanh(self.pooler(cls))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> (last_hidden (B, T, H), zero at padding; pooled (B, H))"""
        x, packing = self.encode(input_ids, attention_mask, token_type_ids)
        last_hidden = packing.unpack(x)  # (B, T, H)
        return last_hidden, self.pool(last_hidden[:, 0])


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + dropout + linear head on [CLS], as in transformers."""

    def __init__(self, config: BertConfig, num_labels: int | None = None):
        super().__init__()
        if num_labels is not None:
            config.num_labels = num_labels
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """-> logits (B, num_labels)"""
        cls, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, cls_only=True)  # (B, H)
        return self.classifier(self.dropout(self.bert.pool(cls)))


# -----------------------------------------------------------------------------
# Hub checkpoints

# Keys the Hub checkpoints carry that we do not use: pretraining heads and saved index buffers.
_IGNORED_PREFIXES = ("cls.",)
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def hub_key_map(num_layers: int) -> dict[str, str | tuple[str, ...]]:
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


def classifier_key_map(num_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Our BertForSequenceClassification name -> Hub name (`bert.` prefix + `classifier.*`)."""
    m = {f"bert.{k}": (tuple(f"bert.{n}" for n in v) if isinstance(v, tuple) else f"bert.{v}")
         for k, v in hub_key_map(num_layers).items()}
    m["classifier.weight"] = "classifier.weight"
    m["classifier.bias"] = "classifier.bias"
    return m


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (one model.safetensors or an index of shards)."""
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
        hint = ""
        if (folder / "pytorch_model.bin").exists():
            hint = " (it has pytorch_model.bin: convert it to safetensors first)"
        raise ValueError(f"no model.safetensors in {folder}{hint}")
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
    key_map = hub_key_map(len(encoder.layers))
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
                         seed: int = 0) -> tuple[BertForSequenceClassification, "BertTokenizer"]:
    """A BertForSequenceClassification from a Hub id or folder, plus its tokenizer.

    Works with full pretraining checkpoints (`bert-base-uncased`), bare encoders (MiniLM) and
    fine-tuned classifiers. A classifier head absent from the checkpoint is drawn from
    N(0, initializer_range) with a generator seeded by `seed`, so runs are reproducible.
    The model is returned in eval mode, like transformers; call `.train()` to fine-tune.
    """
    folder = resolve_model_dir(name_or_path)
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


def save_bert_classifier(model: BertForSequenceClassification, tokenizer: "BertTokenizer", out_dir: str | Path,
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
    for name, hub_names in classifier_key_map(len(model.bert.layers)).items():
        if name not in state:
            raise ValueError(f"model has no parameter {name!r}: merge any adapters (LoRA) into the weights "
                             "before saving")
        t = state[name].detach().cpu()
        if isinstance(hub_names, tuple):  # fused q/k/v -> query, key, value
            for hub_name, part in zip(hub_names, t.chunk(len(hub_names), dim=0)):
                tensors[hub_name] = part.contiguous()
        else:
            tensors[hub_names] = t.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(out)
    return out


# -----------------------------------------------------------------------------
# Tokenizer


class BertTokenizer:
    """WordPiece tokenisation through the `tokenizers` library (Rust, batched).

    Loaded from `tokenizer.json` when the checkpoint has one, else built from `vocab.txt` with
    BERT's normaliser (lower-casing per tokenizer_config.json). Padding and truncation stored in
    tokenizer.json are switched off: we pad per batch, to the longest sequence, ourselves.
    """

    def __init__(self, tokenizer, do_lower_case: bool = True, model_max_length: int = 512,
                 pad_token: str = "[PAD]"):
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.no_truncation()
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._max_length = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], truncated to max_length, unpadded."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
        if max_length != self._max_length:
            self.tok.enable_truncation(max_length)  # keeps [SEP] at the end, as transformers does
            self._max_length = max_length
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence: input_ids, attention_mask, token_type_ids (B, T)."""
        T = max((len(x) for x in ids), default=0)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(texts, max_length))

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json + vocab.txt + tokenizer_config.json, readable by transformers' AutoTokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.no_truncation()
        self._max_length = None
        self.tok.save(str(out / "tokenizer.json"))
        vocab = sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")
        special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": self.pad_token,
                   "cls_token": "[CLS]", "mask_token": "[MASK]"}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
               "model_max_length": self.model_max_length, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _wordpiece_from_vocab(vocab_file: Path, lowercase: bool, strip_accents: bool | None):
    """BERT's tokenizer rebuilt from a bare vocab.txt (for checkpoints without tokenizer.json)."""
    tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab_file} lacks [CLS] or [SEP]; it is not a BERT vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    # special tokens written in the text stay whole, as in transformers' BertTokenizer
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    return tok


def load_bert_tokenizer(folder: str | Path) -> BertTokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json, else vocab.txt."""
    folder = Path(folder)
    cfg = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from e
    lower = bool(cfg.get("do_lower_case", True))
    max_len = cfg.get("model_max_length", 512)
    max_len = 512 if not isinstance(max_len, int) or max_len > 1_000_000 else max_len
    pad = cfg.get("pad_token", "[PAD]")
    pad = pad.get("content", "[PAD]") if isinstance(pad, dict) else pad
    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{folder / 'tokenizer.json'} could not be read ({e}); re-download it") from e
    elif (folder / "vocab.txt").is_file():
        tok = _wordpiece_from_vocab(folder / "vocab.txt", lower, cfg.get("strip_accents"))
    else:
        raise ValueError(f"no tokenizer.json or vocab.txt in {folder}: the checkpoint has no BERT tokenizer")
    return BertTokenizer(tok, do_lower_case=lower, model_max_length=max_len, pad_token=pad)

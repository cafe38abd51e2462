"""BERT, written out plainly: config, embeddings, attention, layer, encoder, pooler, classifier head.

The original post-LayerNorm BERT (Devlin et al., 2018), the same math and parameter shapes as
transformers' `BertForSequenceClassification`, so that a Hub checkpoint loads into it and a model
trained here loads back into transformers (the key maps and file I/O are in `minilab/weights.py`,
the tokenizer in `minilab/bert_tokenizer.py`).

Every module works on a padded batch: `x` is (B, T, H), and the attention mask says which of the
T positions are real tokens. That is the form to read and the form used on a GPU. On a CPU, where
every skipped FLOP is wall-clock time, `minilab/bert_fast.py` swaps in faster parts (no work on
padding, a [CLS]-only last layer, a faster dropout, a reused embedding gradient) that compute the
same function; its tests hold it to this file.

Modules take their parts (an `nn.Linear`, an `nn.Dropout`, an `nn.Embedding`) instead of making
them, so that a part can be replaced without subclassing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}: fix config.json")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
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
        d.update(model_type="bert", architectures=["BertForSequenceClassification"],
                 position_embedding_type="absolute",
                 id2label={str(i): name for i, name in id2label.items()},
                 label2id={name: i for i, name in id2label.items()})
        return d


ACTIVATIONS = {
    "gelu": F.gelu,  # the exact, erf-based GELU of the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# -----------------------------------------------------------------------------
# Modules


class BertEmbeddings(nn.Module):
    """word + token type + absolute position embeddings, then LayerNorm and dropout."""

    def __init__(self, word: nn.Module, position: nn.Embedding, token_type: nn.Embedding, norm: nn.LayerNorm,
                 drop: nn.Module):
        super().__init__()
        self.word, self.position, self.token_type, self.norm, self.drop = word, position, token_type, norm, drop

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
        """ids and positions of any shape (..., ) -> (..., H)"""
        x = self.word(input_ids)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all type 0: add the row, skip the lookup
        else:
            x = x + self.token_type(token_type_ids)
        x = x + self.position(positions)
        return self.drop(self.norm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    `qkv` maps H -> 3H, laid out [query | key | value], each H = n_head * head_dim wide: one
    matmul instead of three (the Hub stores them apart; the weight loader concatenates them).
    """

    def __init__(self, n_head: int, qkv: nn.Module, proj: nn.Module, dropout: float):
        super().__init__()
        self.n_head, self.qkv, self.proj, self.dropout = n_head, qkv, proj, dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, H), mask (B, 1, 1, T) True where a key may be attended to -> (B, T, H)"""
        B, T, H3 = x.shape[0], x.shape[1], 3 * x.shape[2]
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, H3 // 3 // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd) each
        # softmax(q k^T / sqrt(hd), masked) @ v, with dropout on the attention probabilities;
        # the fused kernel does exactly that (flash or memory-efficient attention on a GPU)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, nh, T, hd) -> (B, T, H)


class BertLayer(nn.Module):
    """One post-LayerNorm encoder block: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, attn: BertSelfAttention, attn_norm: nn.Module, ffn_in: nn.Module, ffn_out: nn.Module,
                 ffn_norm: nn.Module, act: str, drop: nn.Module):
        super().__init__()
        self.attn, self.attn_norm, self.ffn_in, self.ffn_out, self.ffn_norm = attn, attn_norm, ffn_in, ffn_out, ffn_norm
        self.act = ACTIVATIONS[act]
        self.drop = drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))  # (B, T, H)
        h = self.ffn_out(self.act(self.ffn_in(x)))  # H -> intermediate -> H
        return self.ffn_norm(x + self.drop(h))


def build_embeddings(config: BertConfig) -> BertEmbeddings:
    H = config.hidden_size
    # padding_idx: the [PAD] row gets no gradient, as in the reference model
    return BertEmbeddings(nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id),
                          nn.Embedding(config.max_position_embeddings, H), nn.Embedding(config.type_vocab_size, H),
                          nn.LayerNorm(H, eps=config.layer_norm_eps), nn.Dropout(config.hidden_dropout_prob))


def build_layer(config: BertConfig) -> BertLayer:
    H, I, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
    attn = BertSelfAttention(config.num_attention_heads, nn.Linear(H, 3 * H), nn.Linear(H, H),
                             config.attention_probs_dropout_prob)
    return BertLayer(attn, nn.LayerNorm(H, eps=eps), nn.Linear(H, I), nn.Linear(I, H), nn.LayerNorm(H, eps=eps),
                     config.hidden_act, nn.Dropout(config.hidden_dropout_prob))


def init_weights(module: nn.Module, std: float) -> None:
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
    """The encoder: embeddings, a stack of layers, and the pooler (dense + tanh on [CLS])."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = build_embeddings(config)
        self.layers = nn.ModuleList(build_layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def check_length(self, T: int) -> None:
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} is longer than max_position_embeddings "
                             f"{self.config.max_position_embeddings}: truncate the inputs")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> (last_hidden (B, T, H), pooled (B, H))"""
        B, T = input_ids.shape
        self.check_length(T)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, torch.arange(T, device=input_ids.device))  # (B, T, H)
        for layer in self.layers:
            x = layer(x, mask)
        return x, self.pool(x[:, 0])

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: dense + tanh on the final [CLS] vector, (B, H) -> (B, H)."""
        return torch.tanh(self.pooler(cls))

    def pooled(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """-> (B, H): what the classifier reads. (bert_fast computes only this.)"""
        return self.forward(input_ids, attention_mask, token_type_ids)[1]


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + dropout + linear head on [CLS], as in transformers.

    `bert` may be any encoder with the plain one's parameters and a `pooled()` method (for
    example `bert_fast.PackedBertModel`); by default the plain `BertModel`.
    """

    def __init__(self, config: BertConfig, num_labels: int | None = None, bert: nn.Module | None = None):
        super().__init__()
        if num_labels is not None:
            config.num_labels = num_labels
        self.config = config
        self.bert = bert if bert is not None else BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, num_labels)"""
        return self.classifier(self.dropout(self.bert.pooled(input_ids, attention_mask, token_type_ids)))

"""CPU speed tricks for `minilab/bert.py`: the same function, less work.

Read `bert.py` first; everything here computes what it computes (tests/test_bert.py holds each
part to the plain form) and only changes *how*. `speed_up(model)` swaps these parts into a
plain `BertForSequenceClassification`, keeping every parameter (same objects, same names), so
checkpoints, optimizers and the weight key maps do not notice. `train_bert.py` turns them on
where they pay, on the CPU (`--fast auto`); on a GPU the plain model's fused attention kernels
and native dropout are the fast path. `bench/bench_bert.py --tricks` times each one.

1. **No work on padding** (`Packing`, `PackedBertModel`). Text batches are padded to their
   longest sentence, and a third to a half of a batch is often padding. Everything in BERT except
   attention works token by token, so the real tokens are gathered into one packed (N, H) matrix
   and only attention sees the (B, T) layout. Padding never influences real tokens (it is masked
   as a key), so the real rows get the same math; only float rounding differs. N is rounded up to
   a multiple of 32 with a few padding rows, so that the matmul shapes repeat from batch to batch
   (a new shape costs the CPU's matmul library a new kernel: `Packing` says how much). A batch
   with less than 1/16 padding, as batches grouped by length often are, runs padded: there the
   copies would cost more than the rows they save.
2. **A [CLS]-only last layer.** The classifier reads the last layer's [CLS] vector only. Its
   keys and values still need every token, but its query, output projection, LayerNorms and FFN
   run on the B [CLS] rows alone (the fused q/k/v weight is cut into its query rows and its
   key/value rows for that).
3. **Attention written out in training.** On the CPU, `scaled_dot_product_attention` with dropout
   has no fused kernel and falls back to a generic path that copies q, k and v to fp32 in every
   layer; two matmuls in autocast's dtype with an fp32 softmax and a mask bias built once per
   batch are faster. Evaluation keeps the fused kernel (no dropout).
4. **A faster dropout** (`Dropout`): nn.Dropout's distribution (p to within 1/131072), with the
   mask drawn from 16 random bits per element (`keep_scale`) rather than with a float `rand` or
   `bernoulli_`, which cost 2.2-2.9x and about 4x as much on the CPU. The mask becomes one fp32
   tensor of 0 and 1/(1-p), and forward and backward are each one multiply by it, rounded once
   to the activation's dtype. The masked_fill-then-scale it replaced read and wrote x twice
   (2.1-4.3x as long) and gave the same values for finite x; the scale is fp32, not rounded to bf16.
5. **A reused word-embedding gradient** (`BufferedEmbedding`). The gradient of a 30522 x 384
   embedding is a dense 47 MB tensor of which a batch touches a few hundred rows; `nn.Embedding`
   allocates and zero-fills a fresh one in every backward (fresh pages from the OS, zeroed
   twice). Here the gradient is returned through autograd as usual, but into the same buffer
   each step, zeroing only the rows the last step touched.
"""

from __future__ import annotations

import math
import weakref
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minilab.bert import BertForSequenceClassification, BertLayer, BertModel, BertSelfAttention

# -----------------------------------------------------------------------------
# 4. Dropout


def keep_scale(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """An fp32 tensor of `shape`, each element 1/(1 - p) (kept) with probability 1 - p, to 1/65536,
    else 0 (dropped): the dropout mask with its scale, what one multiply applies.

    Why not `torch.rand(shape) >= p`: on the CPU the generator is a Mersenne Twister that gives 32
    bits per call, and a float draw spends one call (24 of its bits) per element, then a compare
    in fp32. Dropout needs far less resolution than that. Here each 64-bit integer draw (two calls)
    is cut into four 16-bit words, one per element: half the generator calls, and the compare runs
    on int16. 614k elements (one attention dropout of a BERT step): 1.1-1.3 ms instead of 2.9-3.2
    (`bernoulli_`: 4.6). The draw spans [-2^63, 2^63 - 1), 2^64 - 1 values, so every bit of every
    word is random (to a bias of 2^-64); `random_()` without a range stops at 2^63 - 1, which would
    leave every fourth word's top bit at 0. An element is dropped when its word, read as a number
    in [0, 65536), is below round(p * 65536): probability 6554/65536 = 0.1000061 for p = 0.1. Where
    that grid is more than 0.1% away from p (possible only for p below 0.0077; p = 1e-6 would round
    to 0), or p is so close to 1 that it rounds to 65536 (which no int16 word is below), the mask
    is drawn the float way instead.
    """
    scale, levels = 1.0 / (1.0 - p), round(p * 65536)
    if levels >= 65536 or abs(levels / 65536 - p) > 1e-3 * p:
        return (torch.rand(shape, device=device) >= p).to(torch.float32).mul_(scale)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    threshold = levels - 32768  # the int16 word w stands for w + 32768 in [0, 65536)
    # the compare writes 1.0 / 0.0 straight into fp32 (2.3x faster than a bool mask, then a cast)
    keep = torch.ge(words.view(torch.int16)[:n], threshold, out=torch.empty(n, dtype=torch.float32, device=device))
    return keep.mul_(scale).view(shape)


def _scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale (a keep_scale mask) computed in fp32 and written in `dtype`: one pass, each value rounded once
    (bf16 x: the values of x.mul(keep).mul_(1 / (1 - p)), the Python-float scale applied in fp32).
    A dropped element is x * 0, as in nn.Dropout: -0.0 for a negative x, NaN for an inf or NaN."""
    return torch.mul(x, scale, out=torch.empty_like(x, dtype=dtype))


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, dtype: torch.dtype | None) -> torch.Tensor:
        # fp32 0 or 1/(1 - p), kept for backward: 4 bytes an element where a bool mask takes 1,
        # the price of a single multiply each way
        mask = keep_scale(x.shape, p, x.device)
        ctx.save_for_backward(mask)
        ctx.in_dtype = x.dtype
        return _scaled(x, mask, dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return _scaled(grad, mask, ctx.in_dtype), None, None


def dropout(x: torch.Tensor, p: float, training: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverted dropout: each element kept with probability 1 - p and scaled by 1/(1 - p); the
    result in `dtype` (default: x's). `dropout(x, p, True, torch.bfloat16)` gives, bit for bit,
    `dropout(x, p, True).to(torch.bfloat16)`, forward and backward, in one pass instead of two."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not (training and p > 0.0):
        return x if dtype is None else x.to(dtype)
    return _DropoutFn.apply(x, p, dtype)


class Dropout(nn.Module):
    """Drop-in for nn.Dropout (same distribution, same scale), drawn faster on the CPU."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -----------------------------------------------------------------------------
# 5. Word embedding with a reused gradient buffer


class _BufferedLookup(torch.autograd.Function):
    """F.embedding whose weight gradient is built in the module's kept buffer."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, module: "BufferedEmbedding") -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.module = module
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return None, ctx.module.weight_grad(ids.flatten(), grad.reshape(-1, grad.shape[-1])), None


class BufferedEmbedding(nn.Module):
    """nn.Embedding (with padding_idx) whose weight gradient reuses one buffer from step to step.

    The gradient goes through autograd like any other (so DDP's hooks, gradient accumulation and
    `torch.autograd.grad` see it); only its memory is reused. After autograd has stored it as
    `weight.grad` (it takes a returned tensor nobody else holds without copying), a post-accumulate
    hook keeps a reference; once `zero_grad(set_to_none=True)` has dropped `weight.grad`, the next
    backward zeroes the rows it knows are dirty and returns the same buffer. A later micro-batch
    of the same step, whose gradient autograd adds into `weight.grad`, gets a fresh tensor.

    The rows are known only while every write to the gradient is ours. Where others write, the whole
    buffer is zeroed instead: under torch.distributed (an all-reduce adds rows other ranks touched),
    after a gradient this module did not build (an eval-mode backward), and after a step whose
    gradient norm was not finite (clipping then multiplies every row, zeros included, by NaN).
    """

    def __init__(self, weight: nn.Parameter, padding_idx: int | None):
        super().__init__()
        self.weight, self.padding_idx = weight, padding_idx
        self._buffer: torch.Tensor | None = None
        self._dirty: list[torch.Tensor] | None = []  # ids of the rows that may be non-zero; None: unknown
        self._produced = False  # this backward's gradient was built here
        self._hooked = None  # weakref to the weight whose hook is registered

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "BufferedEmbedding":
        return cls(emb.weight, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        self._produced = False  # e.g. a torch.autograd.grad through the last lookup never reached _adopt
        if w.requires_grad and (self._hooked is None or self._hooked() is not w):
            w.register_post_accumulate_grad_hook(self._adopt)
            self._hooked = weakref.ref(w)
        if not (self.training and w.requires_grad and torch.is_grad_enabled()):
            return F.embedding(ids, w, self.padding_idx)
        return _BufferedLookup.apply(ids, w, self)

    def _adopt(self, w: torch.Tensor) -> None:
        """After autograd stored `w.grad`: keep it alive across zero_grad(set_to_none=True)."""
        if not self._produced or w._backward_hooks:
            self._dirty = None  # a gradient built elsewhere, or one a hook on the weight may have changed: rows unknown
        self._produced = False
        self._buffer = w.grad

    @torch.no_grad()
    def weight_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The weight gradient of one lookup, (V, H), in the kept buffer when it is free."""
        w, buf, self._buffer = self.weight, self._buffer, None
        if w.grad is None and buf is not None and (buf.shape, buf.dtype, buf.device) == (w.shape, w.dtype, w.device):
            out = buf
            if self._dirty is None or (dist.is_available() and dist.is_initialized()):
                out.zero_()  # rows unknown
            elif self._dirty:
                rows = torch.cat([d.to(out.device) for d in self._dirty])
                if torch.isfinite(out.index_select(0, rows)).all():
                    out.index_fill_(0, rows, 0.0)
                else:
                    out.zero_()  # a non-finite clip touched every row
            self._dirty = []
        else:
            out = torch.zeros_like(w)
            if w.grad is not None and w.grad is not buf:
                self._dirty = None  # autograd will add ours into a gradient whose rows we do not know
        out.index_add_(0, ids, grad.to(out.dtype))
        if self.padding_idx is not None:
            out[self.padding_idx] = 0.0  # as nn.Embedding: the [PAD] row learns nothing
        if self._dirty is not None:
            self._dirty.append(ids)
            if sum(len(d) for d in self._dirty) > w.shape[0]:
                self._dirty = None  # cheaper to zero it all
        self._produced = True
        return out

    def grad_rows(self) -> torch.Tensor | None:
        """The rows of `weight.grad` that may be non-zero (sorted, each once), or None where they
        are not known: what lets gradient clipping read a few hundred rows, not all 30522
        (`optim.clip_grad_norm`)."""
        w = self.weight
        if w.grad is None or w.grad is not self._buffer or self._dirty is None:  # (_adopt: None after a hook)
            return None
        if w.device.type != "cpu" or (dist.is_available() and dist.is_initialized()):
            return None  # others add rows (all-reduce); off the CPU the exact norm is not checked
        if not self._dirty:
            return torch.zeros(0, dtype=torch.long, device=w.device)
        return torch.unique(torch.cat([d.to(w.device) for d in self._dirty]))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, padding_idx={self.padding_idx}"


# -----------------------------------------------------------------------------
# 1. Packing: where the real tokens of a padded batch are


ROW_MULTIPLE = 32  # packed rows are rounded up to a multiple of this (see Packing)
MIN_PADDING = 1 / 16  # a batch is packed only when at least this share of its positions is padding


class Packing:
    """Maps between a padded (B, T, ...) batch and the packed (N, ...) rows that we compute.

    `rows` are the flat indices (into B*T) of the rows we compute: every real token, plus
    position 0 of each sequence (the [CLS] token the pooler reads, even in the odd batch whose
    first position is padding), plus `fillers`: padding positions that round N up to a multiple
    of `row_multiple`. With no padding `rows` is None and packing is a free reshape.

    Why fillers: the CPU's matmul library (oneDNN) builds a kernel for each new matrix shape and
    keeps it. A padded batch's shapes repeat (T takes a few dozen values), but N, the number of
    real tokens, is new in almost every batch, and a new shape is dear: a 384 -> 1536 linear's
    forward and backward at M ~ 700 took 10.0 ms at unseen sizes against 5.6 ms at seen ones.
    Rounded up to a multiple of 32, N repeats as the padded shapes do, for at most 31 rows of
    extra work (a BERT training run on sst2: 1.19-1.21x the examples/s). A filler is a padding
    position, so attention masks it as a key like any padding; its own output is never read.

    Why not every padded batch: packing costs a gather and a scatter of the activations in every
    layer, forward and backward, which pays only for the padding it skips. Batches grouped by
    length (as train_bert.py and evaluation make them) are often 0-5% padding, and below about 6%
    the copies cost more than the rows save (sst2 batches of 32, 3% padding on average, fp32: 2%
    more examples/s unpacked). Such a batch runs padded, as in bert.py (`rows` None, `mask` set).
    """

    def __init__(self, attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device,
                 row_multiple: int | None = None, min_padding: float | None = None):
        self.B, self.T = B, T
        row_multiple = row_multiple or ROW_MULTIPLE
        min_padding = MIN_PADDING if min_padding is None else min_padding
        self.fillers = self.rows = self.mask = None
        self.positions = torch.arange(T, device=device).repeat(B)  # (B*T,)
        self.cls_rows = torch.arange(B, device=device) * T
        if attention_mask is None or bool(attention_mask.all()):
            return
        self.mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = may attend
        if 1 - int(attention_mask.sum()) / (B * T) < min_padding:
            return  # run padded (see above)
        keep = attention_mask.bool().clone()
        keep[:, 0] = True
        missing = -int(keep.sum()) % row_multiple
        if missing:  # padding positions, as many as there are, up to the multiple
            self.fillers = (~keep).flatten().nonzero().squeeze(1)[:missing]  # (F,) flat indices
            keep.view(-1)[self.fillers] = True
        self.rows = keep.flatten().nonzero().squeeze(1)  # (N,)
        self.positions = self.rows % T  # (N,) absolute position of each packed row
        self.cls_rows = torch.searchsorted(self.rows, self.cls_rows)  # (B,)

    @cached_property
    def bias(self) -> torch.Tensor | None:
        """The mask as an additive fp32 bias on attention scores, built once per batch, not per layer;
        the most negative float rather than -inf, so a sequence of only padding gives no NaN."""
        if self.mask is None:
            return None
        return torch.zeros(self.mask.shape, device=self.mask.device).masked_fill_(~self.mask, torch.finfo(torch.float32).min)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        x = x.flatten(0, 1)
        return x if self.rows is None else x.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """(N, D) -> (B, T, D), zeros at the padding rows we did not compute; with `zero_padding`,
        zeros at every padding position but position 0, which is always computed (the pooler reads
        it). The others hold junk that attention masks anyway: fillers, or a batch run padded."""
        if self.rows is not None:
            x = x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.rows, x)
            if zero_padding and self.fillers is not None:
                x = x.index_fill(0, self.fillers, 0.0)
        elif zero_padding and self.mask is not None:
            junk = ~self.mask.view(self.B, self.T)
            junk[:, 0] = False  # as when packed: position 0 is kept even where it is padding
            x = x.masked_fill(junk.view(-1, 1), 0.0)
        return x.view(self.B, self.T, x.shape[-1])


# -----------------------------------------------------------------------------
# 1-3. The encoder on packed rows


def cls_query_and_keys(qkv: nn.Linear, x: torch.Tensor, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's projections (2.): the query of the B [CLS] rows (B, H) and the keys and
    values of every row, unpacked (B, T, 2H). The fused weight is laid out [query | key | value],
    so its row slices are the three projections; the queries of the other N - B rows, a third of
    this layer's q/k/v matmul, are never computed."""
    H, w, b = qkv.out_features // 3, qkv.weight, qkv.bias
    q = F.linear(x.index_select(0, packing.cls_rows), w[:H], None if b is None else b[:H])  # (B, H)
    kv = packing.unpack(F.linear(x, w[H:], None if b is None else b[H:]))  # (B, T, 2H)
    return q, kv


def packed_attention(attn: BertSelfAttention, x: torch.Tensor, packing: Packing, cls_only: bool) -> torch.Tensor:
    """BertSelfAttention.forward on packed rows: x (N, H) -> (N, H), or (B, H) for [CLS] only."""
    B, T = packing.B, packing.T
    if cls_only and type(attn.qkv) is nn.Linear:  # only [CLS] asks; every real token still answers
        q, kv = cls_query_and_keys(attn.qkv, x, packing)
        H = q.shape[-1]
        q = q.view(B, 1, attn.n_head, H // attn.n_head).transpose(1, 2)  # (B, nh, 1, hd)
        k, v = kv.view(B, T, 2, attn.n_head, H // attn.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
    else:
        qkv = packing.unpack(attn.qkv(x))  # (B, T, 3H)
        H = qkv.shape[-1] // 3
        q, k, v = qkv.view(B, T, 3, attn.n_head, H // attn.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
        if cls_only:  # a qkv that is not a plain Linear: all queries computed, [CLS]'s kept
            q = q[:, :, :1]
    if attn.training and x.device.type == "cpu":  # 3. written out (see the module docstring)
        att = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, Tq, T)
        if packing.bias is not None:
            att = att + packing.bias  # fp32 bias: the sum, and so the softmax, is fp32
        # the fp32 probabilities dropped and written in v's dtype (bf16 in autocast) at once
        y = dropout(att.float().softmax(-1), attn.dropout, True, v.dtype) @ v  # (B, nh, Tq, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.mask,
                                           dropout_p=attn.dropout if attn.training else 0.0)
    y = y.transpose(1, 2).flatten(2)  # (B, Tq, H)
    return attn.proj(y[:, 0] if cls_only else packing.pack(y))  # (B, H) or (N, H)


def packed_layer(layer: BertLayer, x: torch.Tensor, packing: Packing, cls_only: bool) -> torch.Tensor:
    """BertLayer.forward on packed rows; with `cls_only`, only the B [CLS] rows come out."""
    h = packed_attention(layer.attn, x, packing, cls_only)
    if cls_only:
        x = x.index_select(0, packing.cls_rows)  # (B, H): the residual of [CLS] only
    x = layer.attn_norm(x + layer.drop(h))
    h = layer.ffn_out(layer.act(layer.ffn_in(x)))
    return layer.ffn_norm(x + layer.drop(h))


class PackedBertModel(nn.Module):
    """A plain BertModel's modules (the same objects, so the same parameter names), run on packed rows."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.config, self.embeddings, self.layers, self.pooler = bert.config, bert.embeddings, bert.layers, bert.pooler

    check_length, pool = BertModel.check_length, BertModel.pool

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cls_only: bool = False):
        """-> (x, packing): x is (N, H) packed rows, or (B, H) [CLS] rows when `cls_only`."""
        B, T = input_ids.shape
        self.check_length(T)
        packing = Packing(attention_mask, B, T, input_ids.device)
        tt = None if token_type_ids is None else packing.pack(token_type_ids)
        x = self.embeddings(packing.pack(input_ids), tt, packing.positions)  # (N, H)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = packed_layer(layer, x, packing, cls_only and i == last)
        return x, packing

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> (last_hidden (B, T, H), zeros at padding; pooled (B, H))"""
        x, packing = self.encode(input_ids, attention_mask, token_type_ids)
        last_hidden = packing.unpack(x, zero_padding=True)
        return last_hidden, self.pool(last_hidden[:, 0])

    def pooled(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        cls, _ = self.encode(input_ids, attention_mask, token_type_ids, cls_only=True)  # (B, H)
        return self.pool(cls)


# -----------------------------------------------------------------------------
# Swapping them in


def speed_up(model: BertForSequenceClassification) -> BertForSequenceClassification:
    """Swap every trick into `model`, in place; parameters and their names stay the same."""
    if isinstance(model.bert, PackedBertModel):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    emb = model.bert.embeddings
    if type(emb.word) is nn.Embedding:
        emb.word = BufferedEmbedding.from_embedding(emb.word)
    model.bert = PackedBertModel(model.bert)
    return model.train(model.training)  # the new modules take the model's mode


def use_fast(choice: str, device: torch.device) -> bool:
    """`--fast auto|on|off`: auto means on the CPU, where the tricks pay."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--fast must be auto, on or off, not {choice!r}")
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cpu")

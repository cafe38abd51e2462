"""LoRA: the maths of one layer, injection/freezing, merging, disabling, and PEFT file parity."""

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from minilab.lora import (
    ATTENTION_MODULES,
    MLP_MODULES,
    LoRALinear,
    apply_lora,
    count_parameters,
    disable_adapters,
    lora_layers,
)
from minilab.peft_io import load_adapter, save_adapter


class ToyBlock(nn.Module):
    """Linear layers named like a llama block, plus one that LoRA must leave alone (`head`)."""

    def __init__(self, d=16, f=24):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up_proj = nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.o_proj(torch.tanh(self.q_proj(x) + self.k_proj(x) * self.v_proj(x)))
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.head(h)


def _toy(seed=0, **lora_kw):
    torch.manual_seed(seed)
    base = ToyBlock()
    model = ToyBlock()
    model.load_state_dict(base.state_dict())
    return base, apply_lora(model, **lora_kw)


def _randomise_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_fresh_adapter_changes_nothing_and_init_matches_peft_default():
    base, model = _toy(dropout=0.0)
    x = torch.randn(3, 7, 16)
    assert torch.equal(model(x), base(x))  # B = 0, so base(x) + 0 exactly
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        A = layer.lora_A.weight  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert A.abs().max() <= 1 / math.sqrt(16) and A.std() > 0.1 / math.sqrt(16)
        assert A.dtype == torch.float32


def test_only_lora_weights_train_and_counts():
    _, model = _toy(r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(lora_layers(model)) == set(ATTENTION_MODULES)  # MLP and head untouched by default
    # 4 attention layers, each A (4, 16) + B (16, 4) = 128 -> 512 trainable
    base_total = sum(p.numel() for p in ToyBlock().parameters())
    assert count_parameters(model) == (512, base_total + 512)
    # include_mlp adds up/down (gate_proj is absent in the toy): A (4,16)+B (24,4) and A (4,24)+B (16,4)
    _, model2 = _toy(r=4, alpha=8, include_mlp=True)
    assert set(lora_layers(model2)) == set(ATTENTION_MODULES) | {"up_proj", "down_proj"}
    assert count_parameters(model2)[0] == 512 + (64 + 96) + (96 + 64)
    # gradients reach only the adapters
    model2(torch.randn(2, 3, 16)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model2.parameters())


def test_layer_formula_and_scalings():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    for rslora, expected_scale in [(False, 16 / 4), (True, 16 / math.sqrt(4))]:  # alpha/r vs alpha/sqrt(r)
        layer = LoRALinear(lin, r=4, alpha=16, use_rslora=rslora)
        assert layer.scaling == pytest.approx(expected_scale)
        nn.init.normal_(layer.lora_B.weight)
        x = torch.randn(5, 16)
        by_hand = x @ lin.weight.T + lin.bias + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * expected_scale
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)
    # rsLoRA at r=16, alpha=16: scale 16/4 = 4, plain LoRA: 16/16 = 1
    assert LoRALinear(lin, 16, 16, use_rslora=True).scaling == 4.0 and LoRALinear(lin, 16, 16).scaling == 1.0


def test_merge_equals_unmerged_after_a_training_step_and_unmerge_restores():
    base, model = _toy(r=4, alpha=8, dropout=0.0, include_mlp=True)
    x = torch.randn(4, 6, 16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # step 1 moves B off zero, step 2 then moves A too
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-3  # the adapter really does something now
    for layer in lora_layers(model).values():
        layer.merge()
    assert (model.q_proj.base_layer.weight - before["q_proj.base_layer.weight"]).abs().max() > 0
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    with disable_adapters(model):  # merged + disabled: the update is taken back out
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_disable_adapters_gives_base_outputs_and_restores():
    base, model = _toy(dropout=0.0)
    _randomise_B(model)
    x = torch.randn(2, 5, 16)
    y = model(x)
    with disable_adapters(model):
        assert torch.equal(model(x), base(x))
    torch.testing.assert_close(model(x), y)


def test_dropout_only_in_training():
    _, model = _toy(dropout=0.5)
    _randomise_B(model)
    x = torch.randn(2, 5, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(ToyBlock(), target_modules=("query",))
    _, model = _toy()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="positive"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)


# ---------------------------------------------------------------------------------------------
# A bf16 base under fp32 adapters
# ---------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: one rounding is off by up to 2^-8 = 0.4% of the value, and a
# network rounds at every layer. The bf16 tolerances below are stated relative to the size of the
# outputs: 2% of the largest value for one layer, 10% of the logits' RMS for a whole (tiny) model.
BF16_LAYER_RTOL, BF16_MODEL_RTOL = 0.02, 0.10


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amp", [False, True], ids=["no-autocast", "autocast"])
def test_lora_on_a_bf16_base(x_dtype, amp):
    """A bf16 base with fp32 A, B: works with fp32 or bf16 inputs, with or without autocast, comes
    out in the base's dtype, and matches the all-fp32 layer within bf16 rounding."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    ref = LoRALinear(lin, r=4, alpha=8)
    nn.init.normal_(ref.lora_B.weight)
    layer = LoRALinear(nn.Linear(16, 12).to(torch.bfloat16), r=4, alpha=8)
    with torch.no_grad():
        layer.base_layer.load_state_dict(lin.state_dict())  # copy_ rounds to bf16
        layer.lora_A.weight.copy_(ref.lora_A.weight)
        layer.lora_B.weight.copy_(ref.lora_B.weight)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = layer(x.to(x_dtype))
    assert y.dtype == torch.bfloat16
    want = ref(x.to(x_dtype).float())  # the same input values, all in fp32
    torch.testing.assert_close(y.float(), want, rtol=0, atol=BF16_LAYER_RTOL * want.abs().max().item())
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_lora_update_on_a_bf16_base_is_computed_in_fp32():
    """Without autocast, B A x runs in fp32 and is rounded to bf16 once, at the end: with a zero
    base weight the output is exactly the fp32 update rounded (bf16 matmuls would round twice)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32, bias=False).to(torch.bfloat16), r=8, alpha=16)
    nn.init.zeros_(layer.base_layer.weight)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 64).to(torch.bfloat16)
    want = (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling).to(torch.bfloat16)
    assert torch.equal(layer(x), want)


def _llama_fp32_and_bf16_base(seed=0):
    """The same tiny llama twice, fp32 and with its base in bf16, with identical fp32 adapters."""
    llama = pytest.importorskip("minilab.llama")
    torch.manual_seed(seed)
    cfg = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    fp32 = llama.LlamaForCausalLM(cfg)
    with torch.no_grad():  # default init gives near-constant logits; spread them so errors show
        for p in fp32.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    bf16 = llama.LlamaForCausalLM(cfg)
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)  # the frozen base only: LoRA comes after, as in train_dpo.py
    for m in (fp32, bf16):
        apply_lora(m, r=4, alpha=8, dropout=0.0, include_mlp=True)
    _randomise_B(fp32)
    with torch.no_grad():
        for a, b in zip(lora_layers(fp32).values(), lora_layers(bf16).values()):
            b.lora_A.weight.copy_(a.lora_A.weight)
            b.lora_B.weight.copy_(a.lora_B.weight)
    return fp32, bf16


@pytest.mark.parametrize("amp", [False, True], ids=["no-autocast", "autocast"])
def test_bf16_base_with_fp32_lora_matches_the_fp32_model(amp):
    """apply_lora on a bf16 llama makes fp32 adapters; the model's logits and the adapters'
    gradients match the all-fp32 model within bf16 tolerance, and an AdamW step keeps fp32 state."""
    fp32, bf16 = _llama_fp32_and_bf16_base()
    assert {p.dtype for n, p in bf16.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    trainable = [p for p in bf16.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(p.dtype == torch.float32 for p in trainable)  # A, B x 7 modules x 2 layers
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    want = fp32(ids)  # (B, T, V) fp32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        got = bf16(ids)
    assert got.dtype == torch.bfloat16
    rms = want.pow(2).mean().sqrt().item()
    torch.testing.assert_close(got.float(), want, rtol=0, atol=BF16_MODEL_RTOL * rms)
    # gradients: every adapter gets one, in fp32, pointing the same way as the fp32 model's
    want.logsumexp(-1).sum().backward()
    got.float().logsumexp(-1).sum().backward()
    pairs = [(p32, p16) for p32, p16 in zip(fp32.parameters(), bf16.parameters()) if p16.requires_grad]
    for p32, p16 in pairs:
        assert p16.grad is not None and p16.grad.dtype == torch.float32 and p16.grad.abs().sum() > 0
        cos = torch.nn.functional.cosine_similarity(p16.grad.flatten(), p32.grad.flatten(), dim=0)
        assert cos > 0.99
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in (st["exp_avg"], st["exp_avg_sq"]))


# ---------------------------------------------------------------------------------------------
# PEFT format
# ---------------------------------------------------------------------------------------------

try:  # test-only references; the maths tests above run without them
    import peft
    import transformers
except ImportError:  # pragma: no cover
    peft = transformers = None
needs_peft = pytest.mark.skipif(peft is None, reason="transformers and peft are needed for the PEFT parity tests")


def _tiny_hf_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _peft_load_quietly(hf_model, adapter_dir):
    """PeftModel.from_pretrained, failing the test on any warning (e.g. missing adapter keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir))
    bad = [str(w.message) for w in caught if "key" in str(w.message).lower() or "missing" in str(w.message).lower()]
    assert not bad, bad
    return pm.eval()


@needs_peft
def test_save_adapter_files_load_in_peft_with_same_outputs(tmp_path):
    """Our LoRA on a transformers llama (same module names as ours) -> save -> PEFT loads it."""
    ours = _tiny_hf_llama()
    ref = _tiny_hf_llama()  # same seed: identical base weights
    apply_lora(ours, r=4, alpha=8, dropout=0.0, include_mlp=True, use_rslora=True)
    _randomise_B(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    assert set(cfg["target_modules"]) == set(ATTENTION_MODULES + MLP_MODULES)
    pm = _peft_load_quietly(ref, tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-4)


@needs_peft
def test_peft_saved_adapter_loads_with_load_adapter(tmp_path):
    hf = _tiny_hf_llama()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path))
    ours = load_adapter(_tiny_hf_llama(), tmp_path).eval()
    assert set(n.rsplit(".", 1)[-1] for n in lora_layers(ours)) == {"q_proj", "v_proj", "down_proj"}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, rtol=0, atol=1e-4)


@needs_peft
def test_load_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(_tiny_hf_llama(), tmp_path)
    m = apply_lora(_tiny_hf_llama(), r=4)
    save_adapter(m, tmp_path)
    # a model with a different hidden size: same key names, wrong shapes
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="mismatched shapes"):
        load_adapter(transformers.LlamaForCausalLM(cfg), tmp_path)
    # a model with more layers: missing keys are listed
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="missing .*layers.2"):
        load_adapter(transformers.LlamaForCausalLM(cfg), tmp_path)


def _our_llama_from_hf(hf_model, tmp_path):
    llama = pytest.importorskip("minilab.llama")
    weights = pytest.importorskip("minilab.weights")
    hf_model.save_pretrained(tmp_path)
    # load_llama's building blocks: a tiny random checkpoint has no tokenizer files to load
    config = llama.LlamaConfig.from_pretrained(tmp_path)
    model = weights.llama_from_tensors(config, weights.read_safetensors(tmp_path), torch.float32)
    return model.eval()


@needs_peft
def test_our_llama_adapter_roundtrip_with_peft(tmp_path):
    """The brief's parity test on minilab's own llama: our adapter -> PEFT on transformers, and back."""
    hf = _tiny_hf_llama()
    model = _our_llama_from_hf(hf, tmp_path / "base")
    apply_lora(model, r=8, alpha=16, dropout=0.05, include_mlp=True)
    _randomise_B(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        pm = _peft_load_quietly(_tiny_hf_llama(), tmp_path / "adapter")
        torch.testing.assert_close(ours, pm(input_ids=ids).logits, rtol=0, atol=1e-4)
        # and our own load_adapter on a fresh copy of our llama gives the same logits
        fresh = load_adapter(_our_llama_from_hf(_tiny_hf_llama(), tmp_path / "again"), tmp_path / "adapter").eval()
        torch.testing.assert_close(fresh(ids), ours, rtol=0, atol=1e-6)

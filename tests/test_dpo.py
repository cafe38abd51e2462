"""DPO: the loss formulas worked out by hand, and shared-prompt scoring against the plain way."""

import math

import pytest
import torch

from minilab.dpo import dpo_loss, reference_logps, split_pairs
from minilab.lora import apply_lora, disable_adapters, lora_layers
from minilab.scoring import answer_logps, answer_logps_separate, answer_tree_mask, fp32_weight, prefill, score_answers

# Two preference pairs (summed log-probs), beta = 0.1 unless a test says otherwise.
#   pair 1: policy chosen -1, rejected -3; reference -2, -2
#           logits = (-1 - -3) - (-2 - -2) = 2.0,  beta * logits = 0.2
#   pair 2: policy chosen -5, rejected -4; reference -4.5, -4.5
#           logits = (-5 - -4) - 0 = -1.0,        beta * logits = -0.1
PC = torch.tensor([-1.0, -5.0])
PR = torch.tensor([-3.0, -4.0])
RC = torch.tensor([-2.0, -4.5])
RR = torch.tensor([-2.0, -4.5])


def test_sigmoid_loss_and_metrics_by_hand():
    loss, m = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # pair 1: -log sigmoid(0.2)  = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    # pair 2: -log sigmoid(-0.1) = log(1 + e^0.1)  = log(2.1051709) = 0.7443967
    # mean: (0.5981389 + 0.7443967) / 2 = 0.6712678
    assert loss.item() == pytest.approx(0.6712678, abs=1e-6)
    # rewards = beta * (policy - reference)
    #   chosen:   0.1 * (-1 + 2) = 0.1,   0.1 * (-5 + 4.5) = -0.05  -> mean 0.025
    #   rejected: 0.1 * (-3 + 2) = -0.1,  0.1 * (-4 + 4.5) = 0.05   -> mean -0.025
    #   margins: 0.2 and -0.1 -> mean 0.05; accuracies: pair 1 yes, pair 2 no -> 0.5
    assert m["rewards/chosen"].item() == pytest.approx(0.025, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-0.025, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.05, abs=1e-6)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["logps/chosen"].item() == pytest.approx(-3.0) and m["logps/rejected"].item() == pytest.approx(-3.5)
    assert not any(v.requires_grad for v in m.values())


def test_sigmoid_gradient_by_hand():
    # d/d(policy_chosen) of -log sigmoid(beta * logits) = -beta * sigmoid(-beta * logits)
    # pair 1 alone: -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660 = -0.0450166
    pc = PC[:1].clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, PR[:1], RC[:1], RR[:1], beta=0.1)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)


def test_label_smoothing_ipo_hinge_by_hand():
    one = (PC[:1], PR[:1], RC[:1], RR[:1])  # logits = 2.0
    # cDPO, eps = 0.1: 0.9 * -log sigmoid(0.2) + 0.1 * -log sigmoid(-0.2)
    #   -log sigmoid(-0.2) = log(1 + e^0.2) = log(2.2214028) = 0.7981389
    #   0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.5383250 + 0.0798139 = 0.6181389
    assert dpo_loss(*one, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(0.6181389, abs=1e-6)
    # IPO: (logits - 1/(2 beta))^2; beta 0.1: (2 - 5)^2 = 9; beta 0.5: (2 - 1)^2 = 1
    assert dpo_loss(*one, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(9.0)
    assert dpo_loss(*one, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    # hinge: relu(1 - beta * logits); beta 0.1: 1 - 0.2 = 0.8; beta 1: relu(1 - 2) = 0
    assert dpo_loss(*one, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    assert dpo_loss(*one, beta=1.0, loss_type="hinge")[0].item() == 0.0
    # both pairs, hinge at beta 0.1: relu(0.8) and relu(1 + 0.1) = 1.1 -> mean 0.95
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.95)


def test_step_zero_loss_is_ln2_and_rewards_zero():
    torch.manual_seed(0)
    c, r = -torch.rand(8) * 20, -torch.rand(8) * 20
    loss, m = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)  # policy == reference: logits = 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0) = ln 2 = 0.6931472
    assert m["rewards/chosen"].item() == 0 and m["rewards/rejected"].item() == 0 and m["rewards/margins"].item() == 0


def test_loss_errors():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(PC, PR, RC[:1], RR)


# ---------------------------------------------------------------------------------------------
# Scoring answers with minilab's llama
# ---------------------------------------------------------------------------------------------

V = 101


def _tiny_llama(seed=0, dtype=torch.float32):
    llama = pytest.importorskip("minilab.llama")
    torch.manual_seed(seed)
    cfg = llama.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = llama.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # nn.Embedding/Linear default init gives a near-uniform softmax; spread it
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def _batch(prompt_lens, answer_lens, seed=0):
    """Left-padded prompts (B, Tp) and right-padded answers (B*n, Ta), pad id 0 under mask 0."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(prompt_lens), len(answer_lens)
    Tp, Ta = max(prompt_lens), max(answer_lens)
    pid, pm = torch.zeros(B, Tp, dtype=torch.long), torch.zeros(B, Tp, dtype=torch.long)
    for b, L in enumerate(prompt_lens):
        pid[b, Tp - L:] = torch.randint(1, V, (L,), generator=g)
        pm[b, Tp - L:] = 1
    aid, am = torch.zeros(R, Ta, dtype=torch.long), torch.zeros(R, Ta, dtype=torch.long)
    for r, L in enumerate(answer_lens):
        aid[r, :L] = torch.randint(1, V, (L,), generator=g)
        am[r, :L] = 1
    return dict(prompt_ids=pid, prompt_mask=pm, answer_ids=aid, answer_mask=am)


def _args(b):
    return b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"]


def test_separate_scoring_matches_full_logits_by_hand():
    """The plain path against log_softmax of the model's own full logits, position by position."""
    model = _tiny_llama()
    b = _batch([4, 2], [3, 1])  # n = 1 answer per prompt
    got = answer_logps_separate(model, *_args(b))
    for r in range(2):
        p = b["prompt_ids"][r][b["prompt_mask"][r].bool()]
        a = b["answer_ids"][r][b["answer_mask"][r].bool()]
        seq = torch.cat([p, a])[None]  # (1, Lp + La)
        logp = torch.log_softmax(model(seq).float(), -1)[0]  # (Lp + La, V)
        # answer token k (at index Lp + k) is predicted from index Lp + k - 1
        want = sum(logp[len(p) + k - 1, a[k]] for k in range(len(a)))
        assert got[r].item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("prompt_lens,answer_lens", [
    ([5, 2, 7], [1, 4, 3, 3, 2, 1]),  # DPO pairs: n = 2 (chosen, rejected) per prompt
    ([3, 6], [2, 1, 3, 1, 4, 2]),  # K = 3 label answers per prompt
    ([4, 2], [1, 1, 1, 1]),  # one-token answers: the prompt's last state predicts them, no answer forward
])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_shared_prompt_equals_separate_scoring(prompt_lens, answer_lens, grad):
    """`answer_logps` (answers side by side after their prompt, one call) and `prefill` +
    `score_answers` (answers on copies of the prompt's cache, what evaluation runs) both score as
    each answer run after its prompt alone; with autograd on, the training path's attention."""
    model = _tiny_llama()
    b = _batch(prompt_lens, answer_lens)
    with torch.set_grad_enabled(grad):
        shared = answer_logps(model, *_args(b))
        cached = score_answers(model, prefill(model, b["prompt_ids"], b["prompt_mask"]), b["answer_ids"], b["answer_mask"])
        separate = answer_logps_separate(model, *_args(b))
    assert shared.shape == (len(answer_lens),) and shared.dtype == torch.float32
    assert (shared < 0).all()
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached, separate, rtol=0, atol=1e-4)
    # length normalisation divides by the number of real answer tokens
    with torch.no_grad():
        mean = answer_logps(model, *_args(b), normalize=True)
    torch.testing.assert_close(mean, shared / torch.tensor(answer_lens, dtype=torch.float32), rtol=0, atol=1e-5)


def test_the_last_answer_column_is_only_a_target():
    """Answers of up to Ta tokens run Ta - 1 columns through the model: the last token's own state
    predicts nothing. `score_answers` runs the prompts (B, Tp), then the answers without their last
    column; `answer_logps` runs each prompt with its n answers' Ta - 1 columns beside it, in one call."""
    model = _tiny_llama()
    b = _batch([5, 2, 7], [1, 4, 3, 3, 2, 1])  # B = 3, n = 2, Ta = 4
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        score_answers(model, prefill(model, b["prompt_ids"], b["prompt_mask"]), b["answer_ids"], b["answer_mask"])
        assert seen == [(3, 7), (6, 3)]
        seen.clear()
        answer_logps(model, *_args(b))
        assert seen == [(3, 7 + 2 * 3)]
        seen.clear()
        b = _batch([5, 2], [1, 1, 1, 1])
        score_answers(model, prefill(model, b["prompt_ids"], b["prompt_mask"]), b["answer_ids"], b["answer_mask"])
        answer_logps(model, *_args(b))
    assert seen == [(2, 5), (2, 5)]  # one-token answers: nothing but the prompts runs


def test_answers_side_by_side_see_their_prompt_and_themselves_only():
    """`answer_tree_mask` by hand: prefix P = 1, one prompt left-padded by one, n = 2 answers of
    A = 2 columns, the second answer's last column padding. Rows are queries, columns keys."""
    prompt_mask = torch.tensor([[0, 1, 1]])
    answer_mask = torch.tensor([[1, 1, 1, 0]])  # answer 0: both columns; answer 1: its first
    got = answer_tree_mask(prompt_mask, answer_mask, n=2, P=1)[0, 0].int()
    want = torch.tensor([
        # pre pad  p1  p2  a0  a0' a1  a1'
        [1,  1,  0,  0,  0,  0,  0,  0],  # the padding query sees itself (and the prefix)
        [1,  0,  1,  0,  0,  0,  0,  0],  # p1
        [1,  0,  1,  1,  0,  0,  0,  0],  # p2
        [1,  0,  1,  1,  1,  0,  0,  0],  # answer 0, column 0
        [1,  0,  1,  1,  1,  1,  0,  0],  # answer 0, column 1
        [1,  0,  1,  1,  0,  0,  1,  0],  # answer 1, column 0: not answer 0
        [1,  0,  1,  1,  0,  0,  1,  1],  # answer 1's padding column: itself
    ])
    assert torch.equal(got, want)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_shared_prefix_equals_prepending_it_to_every_prompt(grad):
    """A (1, P) instruction prefix run once and shared must score like prefix + prompt per row,
    also with autograd on (DPO's step: the prefix's cache under the answers' tree mask)."""
    model = _tiny_llama()
    b = _batch([5, 2, 7], [1, 4, 3, 3, 2, 1])
    prefix = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(5))
    B = b["prompt_ids"].shape[0]
    joined_ids = torch.cat([prefix.expand(B, -1), b["prompt_ids"]], dim=1)
    joined_mask = torch.cat([torch.ones(B, 6, dtype=torch.long), b["prompt_mask"]], dim=1)
    with torch.set_grad_enabled(grad):
        shared = answer_logps(model, *_args(b), prefix_ids=prefix)
        separate = answer_logps_separate(model, joined_ids, joined_mask, b["answer_ids"], b["answer_mask"])
        without = answer_logps(model, *_args(b))
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-4)
    assert (shared - without).abs().max() > 1e-3  # the prefix really conditions the answers


@pytest.mark.parametrize("with_prefix", [False, True], ids=["no-prefix", "prefix"])
def test_shared_prompt_gradients_match_separate(with_prefix):
    """Gradients must flow through the shared prefix's cache, the prompts and the answers beside
    them into the LoRA weights, as in the plain path (prefix joined to every prompt there)."""
    model = apply_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0, include_mlp=True)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    b = _batch([5, 3], [2, 3, 1, 2])
    prefix = torch.randint(1, V, (1, 4), generator=torch.Generator().manual_seed(7)) if with_prefix else None
    B = b["prompt_ids"].shape[0]
    joined = b if prefix is None else dict(
        b, prompt_ids=torch.cat([prefix.expand(B, -1), b["prompt_ids"]], dim=1),
        prompt_mask=torch.cat([torch.ones(B, 4, dtype=torch.long), b["prompt_mask"]], dim=1))
    grads = []
    for logps in (lambda: answer_logps(model, *_args(b), prefix_ids=prefix),
                  lambda: answer_logps_separate(model, *_args(joined))):
        model.zero_grad()
        pc, pr = split_pairs(logps())
        (pc - pr).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2  # A, B x 7 modules x 2 layers
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5, msg=n)
    q_A = "model.layers.0.self_attn.q_proj.lora_A.weight"  # only reached through the prompt + answers
    assert grads[0][q_A].abs().max() > 0


def test_bf16_model_scores_in_fp32():
    model = _tiny_llama(dtype=torch.bfloat16)
    b = _batch([4, 2], [2, 3, 1, 1])
    with torch.no_grad():
        out = answer_logps(model, *_args(b))
        ref = answer_logps(_tiny_llama(), *_args(b))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.2)  # bf16 body, fp32 head: close, not equal


def test_frozen_bf16_head_is_upcast_once_and_recast_after_any_change():
    """The fp32 copy of a frozen head is reused between calls (it is the same cast) and made
    again whenever the weight changes in place, so a merge or a reload never scores on a stale
    copy; a trainable head is never cached (its gradient flows through the cast)."""
    model = _tiny_llama(dtype=torch.bfloat16).requires_grad_(False)
    b = _batch([4, 2], [2, 3, 1, 1])
    w = model.lm_head.weight
    first = fp32_weight(w)
    assert first.dtype == torch.float32 and torch.equal(first, w.float())
    assert fp32_weight(w) is first  # kept, not recast
    with torch.no_grad():
        before = answer_logps(model, *_args(b))
        assert torch.equal(answer_logps(model, *_args(b)), before)  # the cached cast scores exactly as the first
        w.mul_(2.0)  # an in-place change: the copy must follow it
        assert torch.equal(fp32_weight(w), w.float()) and fp32_weight(w) is not first
        after = answer_logps(model, *_args(b))
        w.div_(2.0)
    assert (after - before).abs().max() > 1e-2  # the doubled head really scored
    model.lm_head.weight.requires_grad_(True)
    assert fp32_weight(model.lm_head.weight).grad_fn is not None  # trainable: a fresh cast in the graph


def test_head_runs_in_fp32_on_a_bf16_model_even_under_autocast():
    """The output head of a bf16 model (and its log-softmax) is computed in fp32 from the bf16
    values, autocast or not: the same numbers as float64 arithmetic on them, to fp32 precision."""
    from minilab.scoring import _head_logps

    model = _tiny_llama(dtype=torch.bfloat16)
    h = torch.randn(6, 32).to(torch.bfloat16)  # (N, D)
    targets = torch.randint(0, V, (6,))
    want = torch.log_softmax(h.double() @ model.lm_head.weight.double().T, -1)[torch.arange(6), targets]
    for amp in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            got = _head_logps(model, h, targets)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_scoring_input_errors():
    model = _tiny_llama()
    b = _batch([3, 2], [1, 1, 1])
    with pytest.raises(ValueError, match="multiple of prompt rows"):
        answer_logps(model, *_args(b))
    b = _batch([3, 2], [1, 2])
    b["answer_mask"][1] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        answer_logps(model, *_args(b))


def test_reference_logps_uses_base_model_and_restores_mode():
    model = apply_lora(_tiny_llama(), r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    batches = [_batch([4, 3], [2, 1, 3, 2], seed=s) for s in range(2)]
    model.train()
    ref = reference_logps(model, batches)
    assert model.training and len(ref) == 2 and not ref[0].requires_grad
    base = _tiny_llama()  # same seed: the weights the adapters sit on
    with torch.no_grad():
        for got, b in zip(ref, batches):
            torch.testing.assert_close(got, answer_logps(base, *_args(b)), rtol=0, atol=1e-5)
            model.eval()
            assert (answer_logps(model, *_args(b)) - got).abs().max() > 1e-3  # adapters on: different


def test_a_few_dpo_steps_learn_the_preference():
    """End to end on a tiny model: LoRA + reference from disabled adapters + sigmoid loss."""
    model = apply_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0)
    batches = [_batch([5, 3, 4], [1, 2, 2, 1, 1, 1], seed=7)]
    ref_c, ref_r = split_pairs(reference_logps(model, batches)[0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        pc, pr = split_pairs(answer_logps(model, *_args(batches[0])))
        loss, m = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy == reference
    assert losses[-1] < 0.5 and m["rewards/accuracies"].item() == 1.0
    with disable_adapters(model), torch.no_grad():  # the reference itself never moved
        c, r = split_pairs(answer_logps(model, *_args(batches[0])))
    torch.testing.assert_close(c, ref_c, rtol=0, atol=1e-5)


def test_rpo_adds_the_chosen_nll_per_token():
    # chosen logps -2.0 over 2 tokens and -3.0 over 1 token: NLL per token 1.0 and 3.0, mean 2.0.
    # With policy == reference the DPO part is ln 2, so the loss is ln 2 + 0.5 * 2.0 = 1.6931.
    pc, pr = torch.tensor([-2.0, -3.0]), torch.tensor([-5.0, -4.0])
    loss, m = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, rpo_alpha=0.5, chosen_lengths=torch.tensor([2, 1]))
    assert loss.item() == pytest.approx(math.log(2) + 1.0, abs=1e-6)
    assert m["nll/chosen"].item() == pytest.approx(2.0) and m["loss/dpo"].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, pc, pr, rpo_alpha=0.5)


def test_pair_weights_scale_each_pairs_loss():
    # margins 0 and 2 (beta 1): losses ln 2 = 0.6931 and -log sigmoid(2) = 0.1269; weights 2 and 0.5
    pc, pr = torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.0])
    zeros = torch.zeros(2)
    w = torch.tensor([2.0, 0.5])
    loss, m = dpo_loss(pc, pr, zeros, zeros, beta=1.0, weights=w)
    expected = (2.0 * math.log(2) + 0.5 * -math.log(1 / (1 + math.exp(-2.0)))) / 2  # 0.7249
    assert loss.item() == pytest.approx(expected, rel=1e-6) and m["loss/dpo"].item() == pytest.approx(expected, rel=1e-6)
    unweighted, _ = dpo_loss(pc, pr, zeros, zeros, beta=1.0, weights=torch.ones(2))
    assert unweighted.item() == pytest.approx(dpo_loss(pc, pr, zeros, zeros, beta=1.0)[0].item())


def test_simpo_loss_by_hand():
    """SimPO: -log sigmoid(beta * (sum logp_w / |y_w| - sum logp_l / |y_l|) - gamma), no reference."""
    from minilab.dpo import simpo_loss

    pc, pr = torch.tensor([-2.0, -3.0]), torch.tensor([-6.0, -4.0])
    lc, lr = torch.tensor([2, 1]), torch.tensor([3, 2])
    loss, m = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    # pair 1: mean logps -1 and -2 -> rewards -2 and -4 -> logits -2 + 4 - 0.5 = 1.5
    #   -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.2231302) = 0.2014133
    # pair 2: mean logps -3 and -2 -> rewards -6 and -4 -> logits -6 + 4 - 0.5 = -2.5
    #   -log sigmoid(-2.5) = log(1 + e^2.5) = log(13.1824940) = 2.5788897
    # mean: (0.2014133 + 2.5788897) / 2 = 1.3901515
    assert loss.item() == pytest.approx(1.3901515, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-4.0) and m["rewards/rejected"].item() == pytest.approx(-4.0)
    assert m["rewards/margins"].item() == pytest.approx(0.0) and m["rewards/accuracies"].item() == 0.5
    # label smoothing 0.1, pair 1: 0.9 * 0.2014133 + 0.1 * log(1 + e^1.5) = 0.1812720 + 0.1701413 = 0.3514133
    one = (pc[:1], pr[:1], lc[:1], lr[:1])
    assert simpo_loss(*one, beta=2.0, gamma=0.5, label_smoothing=0.1)[0].item() == pytest.approx(0.3514133, abs=1e-6)
    # the gradient, pair 1: d/d(sum logp_w) = -sigmoid(-1.5) * beta / |y_w| = -0.1824255 * 2 / 2
    g = pc[:1].clone().requires_grad_(True)
    simpo_loss(g, pr[:1], lc[:1], lr[:1], beta=2.0, gamma=0.5)[0].backward()
    assert g.grad.item() == pytest.approx(-0.1824255, abs=1e-6)
    # equal rewards (the usual start): -log sigmoid(-gamma) = log(1 + e^0.5) = 0.9740770, not ln 2
    same = torch.tensor([-3.0, -5.0])
    assert simpo_loss(same, same, lc, lc, beta=2.0, gamma=0.5)[0].item() == pytest.approx(0.9740770, abs=1e-6)


def test_sft_loss_by_hand():
    """Mean cross-entropy per answer token of the batch: -(sum of summed logps) / (sum of lengths)."""
    from minilab.dpo import sft_loss

    pc, lc = torch.tensor([-2.0, -3.0, -0.5]), torch.tensor([2, 1, 1])
    # (2 + 3 + 0.5) / (2 + 1 + 1) = 5.5 / 4 = 1.375
    assert sft_loss(pc, lc)[0].item() == pytest.approx(1.375)
    # weights 1, 2, 0: (2 + 6 + 0) / (2 + 2 + 0) = 8 / 4 = 2.0
    assert sft_loss(pc, lc, weights=torch.tensor([1.0, 2.0, 0.0]))[0].item() == pytest.approx(2.0)
    g = pc.clone().requires_grad_(True)
    sft_loss(g, lc)[0].backward()  # d/d(logp_i) = -1 / 4 for every answer
    assert g.grad.tolist() == pytest.approx([-0.25, -0.25, -0.25])


def test_kept_results_are_keyed_by_the_code_version(monkeypatch, tmp_path):
    """A reference pass or zero-shot result kept by older code (which rounded differently) is not
    read back: `KEPT_RESULTS_VERSION` is part of every key."""
    from minilab import caches

    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights")
    base = (str(weights), _tiny_llama(), None, [1, 2])
    before = caches.reference_key(*base, []), caches.zero_shot_key(*base, [[3]], [0], [[4]], ["a"], 2, "cpu")
    assert before == (caches.reference_key(*base, []), caches.zero_shot_key(*base, [[3]], [0], [[4]], ["a"], 2, "cpu"))
    monkeypatch.setattr(caches, "KEPT_RESULTS_VERSION", caches.KEPT_RESULTS_VERSION + 1)
    after = caches.reference_key(*base, []), caches.zero_shot_key(*base, [[3]], [0], [[4]], ["a"], 2, "cpu")
    assert before[0] != after[0] and before[1] != after[1]

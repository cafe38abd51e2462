"""Shared test fixtures: the real data folder, and W&B switched off."""

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    root = Path(os.environ.get("MINILAB_DATA") or REPO.parent / "shared" / "data")
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set MINILAB_DATA or put shared/data beside the repo")
    return root

"""The data loader: real folders, Hub ids, and one clear line for each kind of bad input."""

import json
from pathlib import Path

import pytest

from minilab.data import DataError, load_task
from minilab.hub import HubError
from minilab.metrics import evaluate_predictions, macro_f1, wilson_interval


def _write(folder: Path, name: str, rows: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        cols = list(rows[0])
        path.write_text(sep.join(cols) + "\n" + "".join(sep.join(str(r[c]) for c in cols) + "\n" for r in rows))
    return path


ROWS = [{"text": f"text number {i}", "label": i % 2} for i in range(20)]


def test_real_folders(shared_data):
    steam = load_task(str(shared_data / "steam"))
    assert steam.task == "steam" and steam.sizes() == {"train": 1168, "dev": 146, "test": 147}
    assert steam.label_names == ["not constructive", "constructive"]
    emotion = load_task(str(shared_data / "emotion"))
    assert emotion.label_names == ["anger", "joy", "optimism", "sadness"]
    assert emotion.sizes()["dev"] == 374  # validation.jsonl is the dev split


def test_label_names_from_label_text_column(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3, "label_text": ["red", "green", "blue"][i % 3]} for i in range(12)]
    for split in ("train", "validation", "test"):
        _write(tmp_path / "colours", f"{split}.jsonl", rows)
    data = load_task(str(tmp_path / "colours"))
    assert data.label_names == ["red", "green", "blue"] and data.task == "colours"


def test_string_labels_and_tsv(tmp_path):
    rows = [{"sentence": f"s{i}", "y": ["cat", "dog"][i % 2]} for i in range(10)]
    for split in ("train", "dev", "test"):
        _write(tmp_path / "pets", f"{split}.tsv", rows)
    data = load_task(str(tmp_path / "pets"), text_col="sentence", label_col="y")
    assert data.label_names == ["cat", "dog"] and data.train.labels[:2] == [0, 1]


def test_missing_dev_is_carved_from_train_with_a_note(tmp_path):
    _write(tmp_path / "d", "train.csv", ROWS)
    _write(tmp_path / "d", "test.csv", ROWS[:4])
    a = load_task(str(tmp_path / "d"), seed=1)
    b = load_task(str(tmp_path / "d"), seed=1)
    assert len(a.dev) == 2 and len(a.train) == 18 and a.dev.texts == b.dev.texts
    assert "carved 2 examples" in a.notes[0]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "nope"))


def test_missing_file(tmp_path):
    _write(tmp_path / "d", "test.csv", ROWS)
    with pytest.raises(DataError, match="no train file"):
        load_task(str(tmp_path / "d"))


def test_missing_column_names_the_columns(tmp_path):
    for split in ("train", "dev", "test"):
        _write(tmp_path / "d", f"{split}.csv", ROWS)
    with pytest.raises(DataError, match=r"no column 'review' \(columns: text, label\); pass --text-col"):
        load_task(str(tmp_path / "d"), text_col="review")


def test_empty_text(tmp_path):
    bad = ROWS[:3] + [{"text": "  ", "label": 1}]
    _write(tmp_path / "d", "train.jsonl", bad)
    _write(tmp_path / "d", "test.jsonl", ROWS)
    with pytest.raises(DataError, match="row 5: empty text"):
        load_task(str(tmp_path / "d"))


def test_label_never_seen_in_train(tmp_path):
    _write(tmp_path / "d", "train.csv", ROWS)
    _write(tmp_path / "d", "dev.csv", ROWS)
    _write(tmp_path / "d", "test.csv", ROWS + [{"text": "x", "label": 7}])
    with pytest.raises(DataError, match=r"test split .* label\(s\) 7 never seen in train"):
        load_task(str(tmp_path / "d"))


def test_offline_hub_id_suggests_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="--data DIR"):
        load_task("someone/unknown-dataset-xyz")


def test_wilson_interval_and_macro_f1_arithmetic():
    # 8 of 10 correct: p=0.8, z=1.96 -> centre (0.8+0.192)/1.384=0.7168, half 1.96*sqrt(0.016+0.0096)/1.384=0.2266
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    # class 0: tp=2 fp=1 fn=0 -> F1=4/5; class 1: tp=1 fp=0 fn=1 -> F1=2/3; mean 0.7333
    assert macro_f1([[2, 0], [1, 1]]) == pytest.approx((0.8 + 2 / 3) / 2)
    m = evaluate_predictions([0, 0, 1, 1], [0, 0, 0, 1], 2)
    assert m["accuracy"] == 0.75 and m["confusion"] == [[2, 0], [1, 1]]

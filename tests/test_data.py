"""The data loader: real folders, Hub ids, and one clear line for each kind of bad input."""

import json
from pathlib import Path

import pytest

from minilab.data import DataError, load_task, resolve_spec
from minilab.hub import HubError
from minilab.metrics import evaluate_predictions, macro_f1, one_label_warning, wilson_interval


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
    assert any("carved 2 examples" in n for n in a.notes)


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
    with pytest.raises(DataError, match=r"train\.jsonl, line 4: empty text"):  # the file's own line (no header)
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


# --------------------------------------------------------------------------------------------
# Label mapping off the presets' path: odd values, odd files


def _splits(folder: Path, rows: list[dict], ext: str = "csv"):
    for split in ("train", "dev", "test"):
        _write(folder, f"{split}.{ext}", rows)


def test_labels_1_and_2_are_two_classes_named_after_their_values(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": 1 + i % 2} for i in range(10)])
    data = load_task(str(tmp_path / "d"))
    assert data.label_names == ["1", "2"] and data.num_labels == 2
    assert data.train.labels[:4] == [0, 1, 0, 1]  # 1 -> id 0, 2 -> id 1
    assert any("--label-names NAME_1,NAME_2" in n for n in data.notes)  # says how to name them


def test_more_names_than_train_classes_index_the_names(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    with pytest.raises(DataError, match=r"3 label names \(a, b, c\) but train has 2 classes .* --absent-labels c"):
        load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("a", "b", "c")))
    data = load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("a", "b", "c"),
                                                            absent_labels=("c",)))  # declared: a class train lacks
    assert data.label_names == ["a", "b", "c"] and data.train.labels[:2] == [0, 1]
    assert any("label(s) c have no train examples" in n for n in data.notes)


def test_negative_labels_sort_into_ids(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": [-1, 0, 1][i % 3]} for i in range(9)], ext="jsonl")
    data = load_task(str(tmp_path / "d"))
    assert data.label_names == ["-1", "0", "1"] and data.train.labels[:3] == [0, 1, 2]


def test_label_names_flag_names_sorted_values(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": 1 + i % 2} for i in range(10)])
    data = load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("bad", "good")))
    assert data.label_names == ["bad", "good"] and data.train.labels[:2] == [0, 1]
    assert data.notes == ["label values named: 1 = 'bad', 2 = 'good'"]
    with pytest.raises(DataError, match=r"3 label names \(a, b, c\) for 2 label values \(3, 4\)"):
        _splits(tmp_path / "e", [{"text": f"t{i}", "label": 3 + i % 2} for i in range(10)])
        load_task(str(tmp_path / "e"), spec=resolve_spec(data=str(tmp_path / "e"), label_names=("a", "b", "c")))


def test_string_labels_sorted_or_in_the_given_order(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": ["pos", "neg"][i % 2]} for i in range(10)])
    assert load_task(str(tmp_path / "d")).label_names == ["neg", "pos"]
    data = load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("pos", "neg")))
    assert data.label_names == ["pos", "neg"] and data.train.labels[:2] == [0, 1]
    renamed = load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("bad", "good")))
    assert renamed.label_names == ["bad", "good"] and renamed.train.labels[:2] == [1, 0]  # sorted: neg = bad, pos = good
    assert "label values named: neg = 'bad', pos = 'good'" in renamed.notes
    with pytest.raises(DataError, match=r"label\(s\) neg, pos not among the label names \(a, b, c\)"):
        load_task(str(tmp_path / "d"), spec=resolve_spec(data=str(tmp_path / "d"), label_names=("a", "b", "c")))


def test_mixed_label_types_is_one_line(tmp_path):
    _splits(tmp_path / "d", [{"text": f"t{i}", "label": [0, "cat"][i % 2]} for i in range(10)], ext="jsonl")
    with pytest.raises(DataError, match=r"labels mix numbers \(0, \.\.\.\) and names \(cat, \.\.\.\)"):
        load_task(str(tmp_path / "d"))


@pytest.mark.parametrize("bad", [0.5, None, [1]])
def test_unusable_label_value_is_one_line(tmp_path, bad):
    _splits(tmp_path / "d", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": bad}], ext="jsonl")
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: label .* is not a class"):
        load_task(str(tmp_path / "d"))


def test_one_class_in_train_is_refused(tmp_path):
    _write(tmp_path / "d", "train.csv", [{"text": f"t{i}", "label": 1} for i in range(5)])
    _write(tmp_path / "d", "test.csv", [{"text": f"t{i}", "label": 1} for i in range(5)])
    with pytest.raises(DataError, match="train has only one class \\(1\\); a classifier needs at least two"):
        load_task(str(tmp_path / "d"))


def test_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    for split in ("train", "test"):
        path = _write(tmp_path / "d", f"{split}.csv", ROWS)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Excel's "CSV UTF-8" writes
    data = load_task(str(tmp_path / "d"))
    assert data.train.texts[0].startswith("text number") and data.num_labels == 2


def test_metric_is_macro_f1_when_train_is_imbalanced(tmp_path):
    _splits(tmp_path / "bal", ROWS)
    _splits(tmp_path / "imb", [{"text": f"t{i}", "label": int(i % 4 != 0)} for i in range(20)])  # 3/4 ones
    assert load_task(str(tmp_path / "bal")).metric == "accuracy"
    assert load_task(str(tmp_path / "imb")).metric == "macro_f1"
    assert load_task(str(tmp_path / "imb"), spec=resolve_spec(data=str(tmp_path / "imb"), metric="accuracy")).metric == "accuracy"


# --------------------------------------------------------------------------------------------
# Task specs: registry, task file, flags


def test_task_file_and_flags_give_the_registry_entry(tmp_path):
    from minilab.prompts import PromptBuilder, PromptFormat  # noqa: F401
    from minilab.tasks import TASKS

    reg = TASKS["sst2"]
    fields = {"name": "sst2", "label_names": list(reg.label_names), "answers": list(reg.answers), "question": reg.question,
              "metric": reg.metric, "hub_id": reg.hub_id}
    (tmp_path / "t.json").write_text(json.dumps(fields))
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    (tmp_path / "t.toml").write_text(toml)
    from_json = resolve_spec(task_file=str(tmp_path / "t.json"))
    from_toml = resolve_spec(task_file=str(tmp_path / "t.toml"))
    from_flags = resolve_spec(task="sst2-copy", label_names=reg.label_names, answers=reg.answers, question=reg.question,
                              metric=reg.metric)
    for spec in (from_json, from_toml, from_flags):
        a = PromptFormat.for_task(spec, list(reg.label_names))
        b = PromptFormat.for_task(reg, list(reg.label_names))
        assert (a.question, a.answers, a.keep) == (b.question, b.answers, b.keep)
    assert from_json == reg and from_toml == reg


def test_flags_override_the_task_file(tmp_path):
    (tmp_path / "t.toml").write_text('name = "mine"\nquestion = "Q1?"\nanswers = ["x", "y"]\n')
    spec = resolve_spec(task_file=str(tmp_path / "t.toml"), question="Q2?")
    assert spec.name == "mine" and spec.question == "Q2?" and spec.answers == ("x", "y")


@pytest.mark.parametrize("content,message", [
    ('name = "t"\ncolour = "red"\n', r"unknown field\(s\) colour"),
    ('name = "t"\nanswers = ["yes", "yes"]\n', "has duplicates"),
    ('name = "t"\nlabel_names = ["a", "b"]\nanswers = ["x", "y", "z"]\n', "2 label names but 3 answers"),
    ('name = "t"\nmetric = "f1"\n', "metric 'f1' is not one of accuracy, macro_f1"),
    ('name = "t\n', "is not valid TOML"),
])
def test_bad_task_file_is_one_line(tmp_path, content, message):
    (tmp_path / "t.toml").write_text(content)
    with pytest.raises(DataError, match=message):
        resolve_spec(task_file=str(tmp_path / "t.toml"))


def test_one_label_warning_only_when_every_prediction_is_one_label():
    collapsed = evaluate_predictions([0, 1, 1, 1], [1, 1, 1, 1], 2)
    assert collapsed["predicted_labels"] == 1
    assert "every test prediction is 'yes'" in one_label_warning(collapsed, ["no", "yes"])
    assert one_label_warning(evaluate_predictions([0, 1, 1, 1], [0, 1, 1, 1], 2), ["no", "yes"]) is None

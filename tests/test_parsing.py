"""Strict, located parsing: every malformed file is one line naming the file and its real line (CSV/TSV:
the physical line a record starts on; JSONL: the file's line; parquet: the row), and the label names
match the classes. Each test builds its files in tmp_path; none needs a model or the network."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minilab.data import DataError, load_task, read_table, resolve_spec
from minilab.hub import HubError

REPO = Path(__file__).resolve().parents[1]
GOOD = "".join(f"text {i},{i % 2}\n" for i in range(6))  # lines 2-7 under the header


def folder(tmp_path: Path, train: str, name: str = "train.csv", test: str | None = None) -> Path:
    """A dataset folder: `train` as the train file (given verbatim), a clean test file."""
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    (d / name).write_text(train, encoding="utf-8")
    (d / "test.csv").write_text(test or "text,label\n" + GOOD, encoding="utf-8")
    return d


def error_of(d: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_task(str(d), **kw)
    return str(e.value)


# --------------------------------------------------------------------------------------------
# CSV / TSV


def test_unclosed_quote_names_the_line_it_opens_on(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD + '"never closed,1\n' + GOOD)  # the quote opens on line 8
    msg = error_of(d)
    assert f"{d / 'train.csv'}, line 8: a quote opens a text here and never closes" in msg


def test_quote_closed_by_a_stray_one_later_names_both_lines(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD + '"left open,1\nmore,0\n"quoted, fine",1\n')
    assert f"train.csv, line 8: a quoted text opens here and runs to line 10" in error_of(d)


def test_text_starting_with_a_quote_must_be_quoted_whole(tmp_path):
    d = folder(tmp_path, 'text,label\nok,0\n"Best" game ever,1\n')
    assert "train.csv, line 3: a quote is followed by more text" in error_of(d)


def test_unquoted_delimiter_is_too_many_fields(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD + "fun, but short,1\n")
    msg = error_of(d)
    assert "train.csv, line 8: 3 fields where the header has 2 (text, label): quote a text that holds a comma" in msg


def test_short_row_is_too_few_fields(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD[:20] + "no label here\n" + GOOD)
    assert "train.csv, line 4: 1 field where the header has 2 (text, label): fill in the missing field" in error_of(d)


def test_tsv_extra_tab(tmp_path):
    rows = "text\tlabel\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(4)) + "a\ttab\t1\n"
    d = folder(tmp_path, rows, name="train.tsv")
    assert "train.tsv, line 6: 3 fields where the header has 2 (text, label): quote a text that holds a tab" in error_of(d)


def test_quoted_text_over_several_lines_parses_and_later_lines_stay_right(tmp_path):
    train = 'text,label\n"first line,\nsecond line, ""quoted""\nthird",1\n' + GOOD + " ,0\n"  # empty text on line 11
    d = folder(tmp_path, train)
    assert "train.csv, line 11: empty text in column 'text'" in error_of(d)
    (d / "train.csv").write_text(train.replace(" ,0\n", ""))
    data = load_task(str(d))
    assert sorted(data.train.texts + data.dev.texts)[0] == 'first line,\nsecond line, "quoted"\nthird'
    assert len(data.train) + len(data.dev) == 7 and not any("reads as a whole row" in n for n in data.notes)
    table = read_table(d / "train.csv")
    assert table.where[:2] == ["line 2", "line 5"] and table.spans == {0: (2, 4)}


def test_crlf_and_blank_lines_count(tmp_path):
    d = folder(tmp_path, "text,label\r\n\r\na,0\r\n\r\nb,2,3\r\n")
    assert "train.csv, line 5: 3 fields" in error_of(d)


def test_rows_merged_by_a_stray_closing_quote_are_a_note(tmp_path):
    d = folder(tmp_path, 'text,label\na,0\n"left open,1\nb,0\nscreen 5",1\nc,1\n')
    data = load_task(str(d))
    assert any("train.csv, lines 3-5: one quoted text holds a line that reads as a whole row" in n for n in data.notes)


def test_bad_label_and_empty_text_name_the_csv_line(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD + "x, \n")
    assert "train.csv, line 8: label ' ' is not a class" in error_of(d)
    (d / "train.csv").write_text("text,label\n" + GOOD + "x,0.5\n")  # a name among numbers
    assert f"labels mix numbers (0, 1, ...) and names (0.5, ...) (the first name at {d / 'train.csv'}, line 8)" in error_of(d)


def test_duplicate_header_column(tmp_path):
    d = folder(tmp_path, "text,label,text\na,0,b\n")
    assert "train.csv, line 1: the header names column(s) 'text' more than once" in error_of(d)


def test_bad_byte_names_the_line(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD)
    (d / "train.csv").write_bytes(b"text,label\na,0\nb\xff,1\n")
    assert "train.csv, line 3: not UTF-8 text (byte 0xff)" in error_of(d)


# --------------------------------------------------------------------------------------------
# JSONL and parquet


def jsonl(*lines) -> str:
    return "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)


def test_malformed_jsonl_names_the_files_line(tmp_path):
    train = jsonl({"text": "a", "label": 0}, "", {"text": "b", "label": 1}, '{"text": "c", "label": 1')
    d = folder(tmp_path, train, name="train.jsonl")
    assert "train.jsonl, line 4: not valid JSON (Expecting ',' delimiter, column 25)" in error_of(d)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    d = folder(tmp_path, jsonl({"text": "a", "label": 0}, ["b", 1]), name="train.jsonl")
    assert "train.jsonl, line 2: an array, not a JSON object" in error_of(d)


def test_jsonl_empty_text_bad_label_missing_key_count_blank_lines(tmp_path):
    ok = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    d = folder(tmp_path, jsonl(*ok, "", "  ", {"text": " ", "label": 1}), name="train.jsonl")
    assert "train.jsonl, line 5: empty text in column 'text'" in error_of(d)
    (d / "train.jsonl").write_text(jsonl(*ok, "", {"text": "c", "label": [1]}))
    assert "train.jsonl, line 4: label [1] is not a class" in error_of(d)
    (d / "train.jsonl").write_text(jsonl(*ok, {"text": "c"}))
    assert "train.jsonl, line 3: no 'label' key (this row has: text)" in error_of(d)
    (d / "train.jsonl").write_text(jsonl(*ok, {"text": 5, "label": 0}))
    assert "train.jsonl, line 3: the text in column 'text' is int 5, not a string" in error_of(d)


def test_parquet_rows_are_numbered_from_one(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = folder(tmp_path, "text,label\n" + GOOD)
    (d / "train.csv").unlink()
    pq.write_table(pa.table({"text": ["a", "b", ""], "label": [0, 1, 1]}), d / "train.parquet")
    assert "train.parquet, row 3: empty text in column 'text'" in error_of(d)
    (d / "train.parquet").write_bytes(b"not parquet at all")
    assert "train.parquet is not a valid parquet file" in error_of(d)


# --------------------------------------------------------------------------------------------
# Which files, which folder


def test_two_files_for_one_split_are_refused(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD)
    (d / "train.jsonl").write_text(jsonl({"text": "a", "label": 0}))
    assert f"{d} holds 2 files for the train split (train.csv and train.jsonl): keep one" in error_of(d)
    (d / "train.jsonl").unlink()
    (d / "dev.csv").write_text("text,label\n" + GOOD)
    (d / "validation.csv").write_text("text,label\n" + GOOD)
    assert "holds 2 files for the dev split (dev.csv and validation.csv)" in error_of(d)


def test_parquet_shards_are_one_split_and_must_all_be_there(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = folder(tmp_path, "text,label\n" + GOOD)
    (d / "train.csv").unlink()
    for i in range(2):
        pq.write_table(pa.table({"text": [f"s{i}a", f"s{i}b"] * 3, "label": [0, 1] * 3}), d / f"train-0000{i}-of-00002.parquet")
    data = load_task(str(d))
    assert len(data.train) + len(data.dev) == 12
    (d / "train-00001-of-00002.parquet").unlink()
    assert "the train split is sharded into 2 file(s) (train-00000-of-00002.parquet) with shard(s) 00001 missing" in error_of(d)


def test_mistyped_folders_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "steam").mkdir(parents=True)
    (tmp_path / "steam").mkdir()
    for typo, says in [
        ("data/stema", "data folder data/stema does not exist (did you mean data/steam?); its parent data/ does, so it "
                       "is not read as a Hub id (for the Hub dataset, pass hf://datasets/data/stema)"),
        ("stema", "data folder stema does not exist (did you mean steam"),
        ("./nope", "data folder ./nope does not exist"),
        ("a/b/c", "data folder a/b/c does not exist"),
    ]:
        with pytest.raises(DataError) as e:
            load_task(typo, task="steam")
        assert says in str(e.value), (typo, str(e.value))


def test_unreachable_hub_is_one_quick_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(HubError, match=r"cannot reach the Hugging Face Hub to list dataset 'someone/nothing-here' "
                                       r"\(no connection to 127\.0\.0\.1: .*--data DIR"):
        load_task("someone/nothing-here")
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------
# Label names that match the classes


def test_more_label_names_than_train_classes_is_refused_unless_declared_absent(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD)
    msg = error_of(d, task="emotion")  # 4 names on two-class data
    assert ("4 label names (anger, joy, optimism, sadness) but train has 2 classes (0, 1): optimism, sadness would be "
            "class(es) with no train example") in msg and "--absent-labels optimism,sadness" in msg
    spec = resolve_spec("emotion", str(d), absent_labels=("optimism", "sadness"))
    data = load_task(str(d), spec=spec)
    assert data.num_labels == 4 and any("optimism, sadness have no train examples (declared absent)" in n for n in data.notes)
    (tmp_path / "t.toml").write_text('name = "t"\nlabel_names = ["no", "yes", "maybe"]\nabsent_labels = ["maybe"]\n')
    assert load_task(str(d), spec=resolve_spec(data=str(d), task_file=str(tmp_path / "t.toml"))).num_labels == 3
    with pytest.raises(DataError, match=r"absent label\(s\) perhaps are not among the label names \(no, yes\)"):
        resolve_spec(data=str(d), label_names=("no", "yes"), absent_labels=("perhaps",))


def test_string_labels_with_an_extra_name(tmp_path):
    d = folder(tmp_path, "text,label\na,pos\nb,neg\n", test="text,label\nc,pos\n")
    msg = error_of(d, spec=resolve_spec(data=str(d), label_names=("neg", "pos", "mixed")))
    assert "mixed would be class(es) with no train example" in msg
    ok = load_task(str(d), spec=resolve_spec(data=str(d), label_names=("neg", "pos", "mixed"), absent_labels=("mixed",)))
    assert ok.label_names == ["neg", "pos", "mixed"]


def test_absent_labels_flag_reaches_the_spec():
    from minilab.data import add_data_args, spec_from_args

    p = argparse.ArgumentParser()
    add_data_args(p)
    spec = spec_from_args(p.parse_args(["--task", "emotion", "--absent-labels", "optimism, sadness"]))
    assert spec.absent_labels == ("optimism", "sadness")


# --------------------------------------------------------------------------------------------
# The same reader elsewhere: predict's --input, GGUF files, and the command line


def test_predict_input_with_a_short_row_is_refused(tmp_path):
    from minilab.predict import PredictError, read_texts

    path = tmp_path / "in.csv"
    path.write_text("id,review\n1,fine\n2\n")
    args = argparse.Namespace(input=str(path), text_col="review", texts=[])
    with pytest.raises(PredictError, match=r"in\.csv, line 3: 1 field where the header has 2 \(id, review\)"):
        read_texts(args)
    path.write_text("id,review\n1,fine\n2,\n")
    with pytest.raises(PredictError, match=r"in\.csv, line 3: empty text in column 'review' \(--text-col\)"):
        read_texts(args)
    path.write_text('id,review\n1,"two\nlines"\n2,ok\n')
    assert read_texts(args) == ["two\nlines", "ok"]


def test_not_a_gguf_file_is_named(tmp_path):
    pytest.importorskip("gguf")
    from minilab.gguf_weights import read_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 4)
    with pytest.raises(ValueError, match=rf"{path} is not a GGUF file \(GGUF magic invalid\)"):
        read_gguf(path)


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    d = folder(tmp_path, "text,label\n" + GOOD + "fun, but short,1\n")
    res = subprocess.run([sys.executable, "baseline.py", "--data", str(d), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {d / 'train.csv'}, line 8: 3 fields where the header has 2 (text, "
                                               'label): quote a text that holds a comma ("like, this"), or remove the extra '
                                               "field(s)"]


def test_unreachable_hub_uses_a_cached_copy(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "datasets--someone--cached"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for split in ("train", "test"):
        (snapshot / f"{split}.csv").write_text("text,label\n" + GOOD)
    data = load_task("someone/cached", task="cached")  # HF_HUB_OFFLINE=1 (conftest)
    assert len(data.train) + len(data.dev) == 6 and "using the cached copy of someone/cached" in data.notes[0]

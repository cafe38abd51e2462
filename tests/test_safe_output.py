"""Nothing lost: an output folder is replaced only when minilab wrote it, never when it holds a
user's files or is (or holds) what the run reads; the check runs before any training; stored
paths are absolute, so `predict --run` works from any folder (and older relative ones still do).

The scripts run in this process, through `run_main` as `python script.py ...` runs them (exit
status and the one `error:` line), on the tiny models and the tiny steam slice of conftest.py."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from minilab.files import MARKER, OutputError, atomic_folder, check_output_folder
from minilab.predict import PredictError, load_classifier

REPO = Path(__file__).resolve().parents[1]
_SCRIPTS = {}


def script(name):
    """train_bert.py, train_dpo.py or baseline.py as a module (loaded once)."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_minilab_script_{name}", REPO / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _SCRIPTS[name] = mod
    return _SCRIPTS[name]


def run(name, argv, capsys):
    """`python <name>.py argv` in this process: (exit status, stdout, stderr)."""
    from minilab.cli import run_main

    main = (lambda: __import__("minilab.predict", fromlist=["main"]).main(argv)) if name == "predict" \
        else (lambda: script(name).main(argv))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test in its own folder (the scripts' default paths are relative); torch's global
    settings that the scripts change are put back."""
    monkeypatch.chdir(tmp_path)
    threads, matmul = torch.get_num_threads(), torch.get_float32_matmul_precision()
    yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(matmul)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def bert_args(data, model, out, save_dir, *extra):
    return ["--data", str(data), "--model", str(model), "--max-steps", "1", "--batch-size", "8", "--max-length", "64",
            "--eval-every", "0", "--out", str(out / "results"), "--save-dir", str(save_dir),
            "--checkpoint-dir", str(out / "ck"), "--no-progress", *extra]


def dpo_args(data, model, out, save_dir, *extra):
    return ["--data", str(data), "--model", str(model), "--max-steps", "1", "--max-pairs", "4", "--batch-size", "4",
            "--test-limit", "4", "--eval-limit", "4", "--eval-every", "0", "--max-new-tokens", "1", "--stream-examples", "0",
            "--out", str(out / "results"), "--save-dir", str(save_dir), "--checkpoint-dir", str(out / "ck"),
            "--ref-cache", str(out / "ref"), "--no-progress", *extra]


def baseline_args(data, model, out, save_dir, *extra):
    return ["--data", str(data), "--grid", "1", "--out", str(out / "results"), "--save-dir", str(save_dir), *extra]


ARGS = {"train_bert": bert_args, "train_dpo": dpo_args, "baseline": baseline_args}


# --------------------------------------------------------------------------------------------
# check_output_folder and atomic_folder, case by case


def test_check_output_folder_cases(tmp_path):
    assert check_output_folder(tmp_path / "new") == (tmp_path / "new").resolve()  # a new folder
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")  # an empty one
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / MARKER).write_text("{}")
    (tmp_path / "ours" / "model.safetensors").write_text("x")
    check_output_folder(tmp_path / "ours")  # one minilab wrote
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="is not empty and was not written by minilab"):
        check_output_folder(tmp_path / "theirs")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file")
    data = tmp_path / "ours" / "data"
    data.mkdir()
    with pytest.raises(OutputError, match="contains .*data, which this run reads"):
        check_output_folder(tmp_path / "ours", protect=[data])  # ours, but holding the run's data
    with pytest.raises(OutputError, match=r"--merge \S+ is .*which this run reads.*pass another --merge"):
        check_output_folder(data, protect=[str(data)], flag="--merge")
    check_output_folder(tmp_path / "ours", protect=["org/hub-model", None, ""])  # not on disk: a Hub id
    check_output_folder(tmp_path / "ours", protect=[tmp_path / "empty"])  # a sibling is no concern
    with pytest.raises(OutputError, match="contains .*ck, which this run writes"):  # before it exists
        check_output_folder(tmp_path / "new", outputs=[tmp_path / "new" / "ck"])
    messages = []
    for bad in ("theirs", "file"):
        with pytest.raises(OutputError) as e:
            check_output_folder(tmp_path / bad)
        messages.append(str(e.value))
    assert all("\n" not in m for m in messages)
    assert snapshot(tmp_path / "theirs") == {"thesis.tex": b"years of work"}


def test_atomic_folder_replaces_only_whole_and_marked(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / MARKER).write_text("{}")
    with pytest.raises(RuntimeError, match="wrote no minilab.json"):
        with atomic_folder(target) as tmp:
            (tmp / "b").write_text("2")
    with pytest.raises(KeyError):
        with atomic_folder(target) as tmp:
            (tmp / MARKER).write_text("{}")
            raise KeyError("killed mid-save")
    assert snapshot(target) == {"a": b"1", MARKER: b"{}"}  # the old folder, whole
    with atomic_folder(target) as tmp:
        (tmp / "c").write_text("3")
        (tmp / MARKER).write_text("{}")
    assert snapshot(target) == {"c": b"3", MARKER: b"{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp-/.old- folders left


# --------------------------------------------------------------------------------------------
# The scripts refuse at their start, and lose nothing


@pytest.mark.parametrize("name", ["train_bert", "train_dpo", "baseline"])
def test_user_folder_as_save_dir_is_refused_at_the_start(name, tmp_path, tiny_steam, tiny_bert, tiny_llama, capsys):
    model = tiny_llama if name == "train_dpo" else tiny_bert
    mine = tmp_path / "my-stuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, out, err = run(name, ARGS[name](tiny_steam, model, tmp_path, mine), capsys)
    assert code == 2
    assert "is not empty and was not written by minilab" in one_error_line(err)
    assert snapshot(mine) == {"notes.txt": b"mine"}
    assert "[3/" not in out and "tf-idf" not in out  # refused before the model, the features or any training
    assert not (tmp_path / "ck").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["train_bert", "train_dpo", "baseline"])
def test_data_folder_as_save_dir_is_refused(name, tmp_path, tiny_steam, tiny_bert, tiny_llama, capsys):
    model = tiny_llama if name == "train_dpo" else tiny_bert
    data = tmp_path / "steam"
    shutil.copytree(tiny_steam, data)
    (data / MARKER).write_text("{}")  # even a folder that looks like minilab's
    before = snapshot(data)
    code, _, err = run(name, ARGS[name](data, model, tmp_path, data), capsys)
    assert code == 2
    assert f"is {data.resolve()}, which this run reads" in one_error_line(err)
    assert snapshot(data) == before


def test_save_baseline_itself_refuses_the_data_folder(tmp_path, tiny_steam):
    from minilab.tfidf import save_baseline

    data = Path(shutil.copytree(tiny_steam, tmp_path / "steam"))
    before = snapshot(data)
    with pytest.raises(OutputError, match="which this run reads"):
        save_baseline(data.parent, None, None, ["a", "b"], protect=[data])
    assert snapshot(data) == before


@pytest.mark.parametrize("name", ["train_bert", "train_dpo"])
def test_save_dir_holding_the_checkpoints_or_model_is_refused(name, tmp_path, tiny_steam, tiny_bert, tiny_llama, capsys):
    model = tiny_llama if name == "train_dpo" else tiny_bert
    code, _, err = run(name, ARGS[name](tiny_steam, model, tmp_path, tmp_path), capsys)  # holds ck/ (not there yet)
    assert code == 2 and "contains" in one_error_line(err) and "which this run writes" in err
    model = Path(shutil.copytree(model, tmp_path / "models" / "base"))
    before = snapshot(model)
    code, _, err = run(name, ARGS[name](tiny_steam, model, tmp_path, model.parent), capsys)
    assert code == 2 and f"contains {model.resolve()}, which this run reads" in one_error_line(err)
    assert snapshot(model) == before


# --------------------------------------------------------------------------------------------
# Replacing minilab's own folder works; results are readable by others; paths are absolute


def test_bert_rerun_replaces_its_folder_and_predicts_from_anywhere(tmp_path, tiny_steam, tiny_bert, capsys):
    save = tmp_path / "proj" / "runs" / "steam" / "bert"
    save.parent.mkdir(parents=True)
    os.chdir(tmp_path / "proj")  # relative paths, as a user types them in the project folder
    args = bert_args(tiny_steam, os.path.relpath(tiny_bert), Path("."), Path("runs/steam/bert"))
    old = os.umask(0o022)
    try:
        for _ in range(2):  # the second run replaces the folder the first wrote
            code, _, err = run("train_bert", args, capsys)
            assert code == 0, err[-2000:]
    finally:
        os.umask(old)
    results = tmp_path / "proj" / "results" / "steam" / "bert.json"
    assert results.stat().st_mode & 0o777 == 0o644
    r = json.loads(results.read_text())
    assert r["save_dir"] == str(save.resolve()) and Path(r["metrics_log"]).is_absolute()
    assert r["model"] == str(tiny_bert.resolve())
    assert (save / MARKER).is_file() and sorted(p.name for p in save.parent.iterdir()) == ["bert"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # `predict --run ../proj/results/steam/bert.json` from another folder
    code, out, err = run("predict", ["--run", os.path.relpath(results), "a great game"], capsys)
    assert code == 0, err[-2000:]
    assert "a great game" in out


def test_baseline_rerun_and_older_relative_results(tmp_path, tiny_steam, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    os.chdir(proj)
    args = baseline_args(tiny_steam, None, Path("."), Path("runs/steam/baseline"))
    for _ in range(2):
        code, _, err = run("baseline", args, capsys)
        assert code == 0, err[-2000:]
    results = proj / "results" / "steam" / "baseline.json"
    r = json.loads(results.read_text())
    assert r["save_dir"] == str((proj / "runs" / "steam" / "baseline").resolve())
    r["save_dir"] = "runs/steam/baseline"  # as older versions wrote it: relative to the project folder
    results.write_text(json.dumps(r))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    clf = load_classifier(results)
    assert clf.kind == "baseline" and clf.path == (proj / "runs" / "steam" / "baseline").resolve()
    r["save_dir"] = "runs/steam/gone"
    results.write_text(json.dumps(r))
    with pytest.raises(PredictError, match="names save_dir runs/steam/gone, which is under none of"):
        load_classifier(results)


# --------------------------------------------------------------------------------------------
# The LLaMA adapter: its base recorded absolutely, --merge guarded, a missing base named by --base


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_steam, tiny_llama):
    """A tiny train_dpo.py run, run twice over the same --save-dir (the second replaces the first)."""
    import minilab.cli

    out = tmp_path_factory.mktemp("dpo")
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(out)
    try:
        for _ in range(2):
            with pytest.raises(SystemExit) as e:  # relative paths: they must be stored absolute
                minilab.cli.run_main(lambda: script("train_dpo").main(
                    dpo_args(tiny_steam, os.path.relpath(tiny_llama), Path("."), Path("adapter"))))
            assert e.value.code == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return out


def test_adapter_records_absolute_paths(adapter, tiny_llama):
    cfg = json.loads((adapter / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama.resolve())
    r = json.loads((adapter / "results" / "steam" / "llama.json").read_text())
    assert r["save_dir"] == str((adapter / "adapter").resolve()) and r["model"] == str(tiny_llama.resolve())
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith(".")) == []


def test_merge_is_guarded_and_marked(adapter, tiny_llama, tmp_path, capsys):
    before, base_before = snapshot(adapter / "adapter"), snapshot(tiny_llama)
    for target, what in ((adapter / "adapter", "is"), (tiny_llama, "is"), (tiny_llama.parent, "contains")):
        code, _, err = run("predict", [str(adapter / "adapter"), "--merge", str(target)], capsys)
        assert code == 2, err[-2000:]
        line = one_error_line(err)
        assert line.startswith(f"error: --merge {target} {what} ") and "pass another --merge" in line
    clf = load_classifier(adapter / "adapter", base_dtype="float32")
    for target in (adapter / "adapter", tiny_llama):  # LlamaClassifier.merge guards the write itself
        with pytest.raises(OutputError, match="which this run reads"):
            clf.impl.merge(target)
    assert snapshot(adapter / "adapter") == before and snapshot(tiny_llama) == base_before
    merged = tmp_path / "merged"
    for _ in range(2):  # a merged folder minilab wrote may be replaced
        code, _, err = run("predict", [str(adapter / "adapter"), "--merge", str(merged)], capsys)
        assert code == 0, err[-2000:]
    meta = json.loads((merged / MARKER).read_text())
    assert meta["kind"] == "llama-merged" and meta["adapter"] == str((adapter / "adapter").resolve())
    assert meta["base"] == str(tiny_llama.resolve()) and meta["label_names"]
    with pytest.raises(PredictError, match="a merged LLaMA folder: load it with transformers, or predict with the "
                                           f"adapter folder {adapter.resolve() / 'adapter'}"):
        load_classifier(merged)


@pytest.mark.parametrize("recorded,given", [("/nowhere/model", None), ("./models/tiny", None), ("models/a/b", None),
                                            (None, "/nowhere/base"), (None, "base.gguf")])
def test_missing_base_names_base_not_model_nor_the_hub(adapter, tmp_path, capsys, recorded, given):
    shutil.copytree(adapter / "adapter", tmp_path / "adapter")
    if recorded:
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = recorded
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run("predict", [str(tmp_path / "adapter"), "some text", *(["--base", given] if given else [])], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "--base" in line and "--model" not in line and "Hub" not in line, line


def test_hub_like_base_names_base(adapter, tmp_path, capsys):
    shutil.copytree(adapter / "adapter", tmp_path / "adapter")
    code, _, err = run("predict", [str(tmp_path / "adapter"), "some text", "--base", "nobody/no-such-model"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "--base" in line and "--model" not in line, line


def test_older_adapter_with_a_relative_base(adapter, tiny_llama, tmp_path):
    """An adapter written before bases were recorded absolutely: relative to its project folder."""
    proj = tmp_path / "proj"
    shutil.copytree(adapter / "adapter", proj / "runs" / "steam" / "llama-adapter")
    (proj / "models").mkdir()
    (proj / "models" / "tiny").symlink_to(tiny_llama)
    cfg_path = proj / "runs" / "steam" / "llama-adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "./models/tiny"
    cfg_path.write_text(json.dumps(cfg))
    os.chdir(tmp_path)  # not the project folder
    clf = load_classifier(proj / "runs" / "steam" / "llama-adapter")
    assert clf.impl.base == str(proj / "models" / "tiny") and len(clf.predict(["a dull mess"])) == 1

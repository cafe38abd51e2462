"""minilab.predict: a saved model of each kind predicts what its training run predicted, the merged
LLaMA loads in transformers with the same logits, and bad input is one line."""

import json
import shutil

import pytest
import torch

from minilab.predict import load_classifier
from test_scripts import run

pytestmark = pytest.mark.slow  # each fixture trains a (tiny) model end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_steam, tiny_bert, tiny_llama):
    """One tiny run of each training script, with its saved model."""
    out = tmp_path_factory.mktemp("trained")
    common = ["--data", str(tiny_steam), "--out", str(out / "results")]
    runs = {
        "baseline": ["baseline.py", *common, "--save-dir", str(out / "baseline")],
        "bert": ["train_bert.py", *common, "--model", str(tiny_bert), "--epochs", "1", "--batch-size", "8",
                 "--save-dir", str(out / "bert"), "--checkpoint-dir", str(out / "bert-ck"), "--no-progress"],
        "llama": ["train_dpo.py", *common, "--model", str(tiny_llama), "--epochs", "1", "--max-pairs", "16", "--batch-size", "4",
                  "--test-limit", "24", "--eval-limit", "8", "--max-new-tokens", "2", "--stream-examples", "1",
                  "--lr", "1e-3", "--save-dir", str(out / "llama"), "--checkpoint-dir", str(out / "llama-ck"),
                  "--ref-cache", str(out / "ref"), "--no-progress"],
        "llama-head": ["train_dpo.py", *common, "--model", str(tiny_llama), "--objective", "head", "--epochs", "1",
                       "--max-pairs", "16", "--batch-size", "4", "--test-limit", "24", "--eval-limit", "8", "--lr", "1e-3",
                       "--save-dir", str(out / "llama-head"), "--checkpoint-dir", str(out / "llama-head-ck"), "--no-progress"],
    }
    for name, args in runs.items():
        res = run(args)
        assert res.returncode == 0, (name, res.stderr[-2000:])
    return out


@pytest.mark.parametrize("name", ["baseline", "bert", "llama", "llama-head"])
def test_predict_equals_the_training_runs_test_predictions(trained, tiny_steam, name):
    from minilab.data import load_task

    r = json.loads((trained / "results" / "steam" / f"{name}.json").read_text())
    texts = load_task(str(tiny_steam)).test.texts[: len(r["predictions"])]
    clf = load_classifier(trained / "results" / "steam" / f"{name}.json")  # through the results file
    assert clf.label_names == r["label_names"]
    assert clf.predict(texts) == [r["label_names"][p] for p in r["predictions"]]
    probs = clf.predict_proba(texts[:3])
    assert all(len(p) == 2 and abs(sum(p) - 1) < 1e-5 for p in probs)


def test_cli_reads_a_file_and_writes_jsonl(trained, tiny_steam, tmp_path):
    out = tmp_path / "out.jsonl"
    res = run(["-m", "minilab.predict", str(trained / "bert"), "--input", str(tiny_steam / "test.csv"),
               "--output", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]["probs"]) == {"not constructive", "constructive"}
    assert "texts/s" in res.stderr
    table = run(["-m", "minilab.predict", str(trained / "baseline"), "a great game", "buggy mess"])
    assert table.returncode == 0 and table.stdout.count("\n") == 4  # header, rule, two rows
    mixed = run(["-m", "minilab.predict", str(trained / "baseline"), "--batch-size", "1", "a great game", "buggy mess"])
    assert mixed.returncode == 0 and mixed.stdout == table.stdout  # texts after an option are texts too


def test_merged_llama_loads_in_transformers_with_equal_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    res = run(["-m", "minilab.predict", str(trained / "llama"), "--merge", str(tmp_path / "merged")])
    assert res.returncode == 0, res.stderr[-2000:]
    clf = load_classifier(trained / "llama", base_dtype="float32")  # adapters unmerged, fp32
    builder = clf.impl.builder
    ids = torch.tensor([builder.prefix + builder.example("A long review about a game with many bugs.")])
    with torch.no_grad():
        ours = clf.impl.model(ids).float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert not list((tmp_path / "merged").glob("adapter_*"))


def test_head_adapter_and_its_merge_load_in_transformers(trained, tmp_path):
    """--objective head: the adapter holds the head (PEFT's modules_to_save), and --merge writes a
    LlamaForSequenceClassification folder that transformers loads with our logits (within 1e-4)."""
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((trained / "llama-head" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    res = run(["-m", "minilab.predict", str(trained / "llama-head"), "--merge", str(tmp_path / "merged")])
    assert res.returncode == 0, res.stderr[-2000:]
    clf = load_classifier(trained / "llama-head", base_dtype="float32")
    builder = clf.impl.builder
    ids = torch.tensor([builder.prefix + builder.example("A long review about a game with many bugs.")])
    with torch.no_grad():
        ours = clf.impl.model(ids).float()
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
        theirs = hf.eval()(ids).logits
    assert ours.shape == theirs.shape == (1, 2)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert hf.config.id2label == {0: clf.label_names[0], 1: clf.label_names[1]}


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("not-a-model", "is not a model minilab saved"),
    ("no-base", "the adapter's base model /nowhere/model does not exist here: pass --base MODEL"),
    ("empty-input", "has no rows"),
    ("no-column", "has no column 'text' (columns: review); pass --text-col NAME"),
])
def test_bad_input_is_one_line(trained, tmp_path, case, message):
    model, extra = str(trained / "baseline"), []
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "not-a-model":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "no-base":
        shutil.copytree(trained / "llama", tmp_path / "adapter")
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "/nowhere/model"
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
        model, extra = str(tmp_path / "adapter"), ["some text"]
    elif case == "empty-input":
        (tmp_path / "in.csv").write_text("text\n")
        extra = ["--input", str(tmp_path / "in.csv")]
    else:
        (tmp_path / "in.csv").write_text("review\nhello\n")
        extra = ["--input", str(tmp_path / "in.csv")]
    res = run(["-m", "minilab.predict", model, *extra])
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, res.stderr[-1000:]

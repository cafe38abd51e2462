"""End-to-end runs of the lab's scripts on tiny models and a slice of real data, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilab.results import REQUIRED

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd=REPO, **env):
    e = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_bert_end_to_end(tmp_path, tiny_steam, tiny_bert):
    res = run(["train_bert.py", "--data", str(tiny_steam), "--model", str(tiny_bert), "--epochs", "1",
               "--batch-size", "8", "--out", str(tmp_path), "--save-dir", str(tmp_path / "saved"), "--no-progress",
               "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.returncode == 0, res.stderr[-2000:]
    for step in range(1, 10):
        assert f"[{step}/9]" in res.stdout
    r = json.loads((tmp_path / "steam" / "bert.json").read_text())
    assert set(REQUIRED) <= set(r)
    assert r["split_sizes"] == {"train": 64, "dev": 24, "test": 24}
    assert r["fine_tuned"]["n"] == 24 and 0 <= r["fine_tuned"]["accuracy"] <= 1
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    ev = r["evaluation"]  # each test evaluation and the dev ones during training, timed apart
    assert set(ev) == {"zero_shot_seconds", "dev_seconds", "test_seconds"} and all(v > 0 for v in ev.values())
    assert ev["dev_seconds"] + ev["test_seconds"] < r["wall_seconds"]  # wall_seconds: from fine-tuning on
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


@pytest.mark.slow
def test_train_dpo_end_to_end(tmp_path, tiny_steam, tiny_llama):
    res = run(["train_dpo.py", "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "16",
               "--batch-size", "4", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2",
               "--max-new-tokens", "3", "--lr", "1e-3", "--out", str(tmp_path), "--save-dir", str(tmp_path / "adapter"),
               "--no-progress", "--checkpoint-dir", str(tmp_path / "ck"), "--ref-cache", str(tmp_path / "ref")])
    assert res.returncode == 0, res.stderr[-3000:]
    for step in range(1, 11):
        assert f"[{step}/10]" in res.stdout
    r = json.loads((tmp_path / "steam" / "llama.json").read_text())
    assert set(REQUIRED) <= set(r)
    assert r["training"]["steps"] == 4 and r["training"]["pairs"] == 16 and r["fine_tuned"]["n"] == 8
    assert len(r["examples"]) == 3 and {"before", "after", "true"} <= set(r["examples"][0])
    ev = r["evaluation"]  # the zero-shot and final test evaluations and the dev ones, timed apart
    assert set(ev) == {"zero_shot_seconds", "dev_seconds", "test_seconds"} and all(v > 0 for v in ev.values())
    assert sum(ev.values()) + r["train_seconds"] < r["wall_seconds"]  # wall_seconds: from setup on
    sys.path.insert(0, str(REPO / "bench"))
    from common import lab_stage_line, lab_stages  # make bench's line of make lab's stage timings

    line = lab_stage_line(lab_stages("steam", tmp_path))
    assert "reference pass" in line and "DPO steps" in line and "DPO script" in line, line
    assert "DPO evaluation" in line and all(f"{k} " in line for k in ("zero-shot", "dev", "test")), line
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny_llama)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "steam" / "llama_metrics.jsonl").read_text().splitlines()]
    train = [x for x in log if x["kind"] == "train"]
    assert train and "rewards/margins" in train[0] and "logps/chosen" in train[0]
    assert (tmp_path / "steam" / "pictures" / "llama_dpo_rewards.png").stat().st_size > 5000


@pytest.mark.slow
def test_train_dpo_simpo_runs_without_a_reference_pass(tmp_path, tiny_steam, tiny_llama):
    """--loss-type simpo: no reference log-probs are computed or cached, the loss starts at
    -log sigmoid(-gamma) (equal rewards), and the results record the loss and its margin."""
    res = run(["train_dpo.py", "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "16",
               "--batch-size", "4", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2",
               "--max-new-tokens", "3", "--loss-type", "simpo", "--simpo-gamma", "0.5", "--stream-examples", "0",
               "--out", str(tmp_path), "--save-dir", str(tmp_path / "adapter"), "--no-progress",
               "--checkpoint-dir", str(tmp_path / "ck"), "--ref-cache", str(tmp_path / "ref")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SimPO (reference-free, no reference pass): beta 2.0, gamma 0.5" in res.stdout
    assert not list((tmp_path / "ref").glob("*.safetensors"))  # no reference log-probs (only the zero-shot scores)
    r = json.loads((tmp_path / "steam" / "llama-simpo.json").read_text())  # its own name: DPO's llama.json stays
    assert r["training"]["loss_type"] == "simpo" and r["training"]["simpo_gamma"] == 0.5 and r["training"]["beta"] == 2.0
    log = [json.loads(line) for line in (tmp_path / "steam" / "llama-simpo_metrics.jsonl").read_text().splitlines()]
    first = next(x for x in log if x["kind"] == "train")
    # a random tiny model gives the two answers different mean log-probs, so only roughly 0.974
    assert "rewards/margins" in first and 0.3 < first["loss"] < 3.0


@pytest.mark.slow
def test_train_dpo_sft_objective(tmp_path, tiny_steam, tiny_llama):
    """--objective sft: the answer cross-entropy, no reference pass, its own names (llama-sft), no
    DPO rewards in the log, and a loss on the scale of an NLL per token (the random tiny model's
    large weights put it well above ln 2)."""
    res = run([str(REPO / "train_dpo.py"), "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "16",
               "--batch-size", "4", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2",
               "--max-new-tokens", "3", "--objective", "sft", "--stream-examples", "0", "--out", str(tmp_path),
               "--no-progress", "--ref-cache", str(tmp_path / "ref")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[6/10] SFT: cross-entropy" in res.stdout
    assert not list((tmp_path / "ref").glob("*.safetensors"))  # no reference log-probs (only the zero-shot scores)
    r = json.loads((tmp_path / "steam" / "llama-sft.json").read_text())
    assert r["training"]["objective"] == "sft" and r["training"]["steps"] == 4
    assert (tmp_path / "runs" / "steam" / "llama-sft-adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "steam" / "llama-sft_metrics.jsonl").read_text().splitlines()]
    first = next(x for x in log if x["kind"] == "train")
    assert "rewards/margins" not in first and "loss/sft" in first and first["loss"] > 1.0
    bad = run([str(REPO / "train_dpo.py"), "--data", str(tiny_steam), "--objective", "sft", "--loss-type", "ipo"], cwd=tmp_path)
    assert bad.returncode == 2 and "apply to --objective dpo only" in bad.stderr


@pytest.mark.slow
def test_real_minilm_learns_steam_in_one_epoch(tmp_path, shared_data):
    """The CPU preset on the real MiniLM and the full steam data, one epoch: the fine-tuned model
    must beat its untrained head (0.476 here) by a wide margin (one epoch reaches about 0.70-0.80)."""
    res = run(["train_bert.py", "--data", str(shared_data / "steam"), "--epochs", "1", "--out", str(tmp_path),
               "--save-dir", str(tmp_path / "saved"), "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "steam" / "bert.json").read_text())
    assert r["fine_tuned"]["accuracy"] > r["zero_shot"]["accuracy"] + 0.1
    assert r["fine_tuned"]["accuracy"] > 0.65 and r["fine_tuned"]["n"] == 147


# --------------------------------------------------------------------------------------------
# Killed runs resume to the uninterrupted run's result


def _script_args(kind, data, model, out):
    common = ["--data", str(data), "--model", str(model), "--batch-size", "4", "--out", str(out / "results"),
              "--save-dir", str(out / "saved"), "--checkpoint-dir", str(out / "ck"), "--save-every", "2", "--no-progress"]
    if kind == "bert":
        return ["train_bert.py", *common, "--epochs", "1", "--max-length", "32"]
    return ["train_dpo.py", *common, "--max-pairs", "24", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8",
            "--eval-every", "3", "--max-new-tokens", "2", "--stream-examples", "1", "--lr", "1e-3",
            "--ref-cache", str(out / "ref-cache")]


def _outcome(out, kind):
    from safetensors.torch import load_file

    name = "bert" if kind == "bert" else "llama"
    r = json.loads((out / "results" / "steam" / f"{name}.json").read_text())
    log = [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_second")}
           for line in (out / "results" / "steam" / f"{name}_metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(out / "saved" / ("model.safetensors" if kind == "bert" else "adapter_model.safetensors")))
    return r, log, weights


@pytest.mark.slow
@pytest.mark.parametrize("kind,fault", [("bert", "SIGKILL"), ("bert", "SIGTERM"), ("dpo", "SIGKILL"), ("dpo", "SIGTERM")])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_steam, tiny_bert, tiny_llama, kind, fault):
    model = tiny_bert if kind == "bert" else tiny_llama
    whole = run(_script_args(kind, tiny_steam, model, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    killed = run(_script_args(kind, tiny_steam, model, out), MINILAB_FAULT=f"{fault}:5")  # after step 5; saved at 4
    assert killed.returncode == (-9 if fault == "SIGKILL" else 143), killed.stderr[-2000:]
    assert (out / "ck" / "latest").read_text() == ("step-000004" if fault == "SIGKILL" else "step-000005")
    assert not (out / "results" / "steam").exists() or not list((out / "results" / "steam").glob("*.json"))
    if fault == "SIGTERM":
        assert "interrupted: SIGTERM at step 5: checkpoint saved in" in killed.stderr
    resumed = run(_script_args(kind, tiny_steam, model, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    r0, log0, w0 = _outcome(tmp_path / "whole", kind)
    r1, log1, w1 = _outcome(out, kind)
    assert r1["predictions"] == r0["predictions"] and r1["fine_tuned"] == r0["fine_tuned"]
    assert r1["training"]["steps"] == r0["training"]["steps"] and r1["dev_best"] == r0["dev_best"]
    assert log1 == log0
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w0)  # bitwise
    if kind == "dpo":
        assert "read from" in resumed.stdout  # the reference log-probs were kept, not recomputed


def test_resume_with_a_changed_option_is_refused_by_name(tmp_path, tiny_steam, tiny_bert):
    args = _script_args("bert", tiny_steam, tiny_bert, tmp_path)
    first = run(args + ["--max-steps", "2"])
    assert first.returncode == 0, first.stderr[-2000:]
    again = run(args + ["--max-steps", "2", "--lr", "3e-4", "--resume"])
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: the checkpoint in ")
    assert "lr: None -> 0.0003" in again.stderr and "train.lr: 0.0001 -> 0.0003" in again.stderr


def _on_a_cpu(fast_bf16: bool, args):
    """A script run as if on a CPU with (or without) oneDNN bf16 matmuls: `--precision auto` resolves accordingly."""
    code = (f"import runpy, sys; import minilab.precision as p; p.cpu_has_fast_bf16 = lambda: {fast_bf16}; "
            f"sys.argv = {args!r}; sys.exit(runpy.run_path({args[0]!r}, run_name='__main__'))")
    return run(["-c", code])


def test_resume_on_a_cpu_where_auto_means_another_precision_is_refused_by_name(tmp_path, tiny_steam, tiny_bert):
    """A run checkpointed where auto meant bf16 and resumed where it means fp32 would go on in another
    precision than it started in: refused by name, as any changed option is."""
    args = _script_args("bert", tiny_steam, tiny_bert, tmp_path) + ["--max-steps", "2"]
    first = _on_a_cpu(True, args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "precision bf16-autocast, seed" in first.stdout
    again = _on_a_cpu(False, args + ["--resume"])
    assert again.returncode == 2, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1].startswith("error: the checkpoint in ")
    assert "autocast: 'bf16' -> 'fp32' (--precision bf16 goes on" in again.stderr and "precision:" not in again.stderr
    named = _on_a_cpu(False, args + ["--precision", "bf16", "--resume"])  # the dtype it started in, by name
    assert named.returncode == 0, named.stderr[-2000:]
    assert "precision bf16-autocast, seed" in named.stdout
    fresh = _on_a_cpu(False, _script_args("bert", tiny_steam, tiny_bert, tmp_path / "fp32") + ["--max-steps", "2"])
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "precision fp32 (auto: this CPU has no oneDNN bf16 matmul" in fresh.stdout
    assert json.loads((tmp_path / "fp32" / "results" / "steam" / "bert.json").read_text())["dtype"] == "fp32"


@pytest.mark.slow
def test_train_dpo_head_objective(tmp_path, tiny_steam, tiny_llama):
    """--objective head: a K-way head on the last prompt token, no reference pass and no generation;
    the adapter folder holds the head beside LoRA (task SEQ_CLS, modules_to_save score)."""
    res = run([str(REPO / "train_dpo.py"), "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "16",
               "--batch-size", "4", "--epochs", "1", "--test-limit", "8", "--eval-limit", "8", "--eval-every", "2",
               "--objective", "head", "--lr", "1e-3", "--out", str(tmp_path), "--no-progress",
               "--ref-cache", str(tmp_path / "ref")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[6/10] head: cross-entropy of 2 logits on the last prompt token" in res.stdout
    assert not (tmp_path / "ref").exists()
    r = json.loads((tmp_path / "steam" / "llama-head.json").read_text())
    assert r["training"]["objective"] == "head" and r["fine_tuned"]["n"] == 8 and "generation_accuracy" not in r["fine_tuned"]
    adapter = tmp_path / "runs" / "steam" / "llama-head-adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    from safetensors.torch import load_file

    assert load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.score.weight"].shape[0] == 2
    bad = run([str(REPO / "train_dpo.py"), "--data", str(tiny_steam), "--objective", "head", "--fsdp"], cwd=tmp_path)
    assert bad.returncode == 2 and "DDP only" in bad.stderr


def test_zero_shot_scores_are_evaluated_once_per_task_and_prompt_across_seeds_and_objectives(tmp_path, tiny_steam,
                                                                                             tiny_llama):
    """Label scoring of the untrained model depends on neither the seed nor the objective (a fresh
    LoRA adds exactly zero), so --ref-cache keeps it: a DPO run with another seed reads what an SFT
    run evaluated, and gets what it would have computed itself; another --max-new-tokens is another
    key, evaluated again."""
    def go(name, cache, *extra):
        res = run(["train_dpo.py", "--data", str(tiny_steam), "--model", str(tiny_llama), "--max-pairs", "8",
                   "--batch-size", "4", "--max-steps", "1", "--test-limit", "8", "--eval-limit", "4",
                   "--stream-examples", "0", "--max-new-tokens", "3", "--out", str(tmp_path / "results"),
                   "--name", name, "--save-dir", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / f"ck-{name}"),
                   "--ref-cache", str(tmp_path / cache), "--no-progress", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        r = json.loads((tmp_path / "results" / "steam" / f"{name}.json").read_text())
        line = next(x for x in res.stdout.splitlines() if "zero-shot on test" in x)
        # a zero-shot read back from the cache is not an evaluation: its seconds are left out
        assert ("zero_shot_seconds" in r["evaluation"]) == ("read from" not in line), r["evaluation"]
        return (r["zero_shot"], r["generation_accuracy"]["zero_shot"]), line

    def kept(cache):
        return sorted(p.name for p in (tmp_path / cache).glob("steam-zero-shot-*.json"))

    sft, line = go("sft", "ref", "--objective", "sft", "--seed", "0")
    assert "read from" not in line and len(kept("ref")) == 1
    dpo, line = go("dpo", "ref", "--seed", "1")
    assert f"read from {tmp_path / 'ref' / kept('ref')[0]}" in line
    assert dpo == sft
    fresh, line = go("fresh", "ref-fresh", "--seed", "1")  # the same run with nothing kept: computes it
    assert "read from" not in line and fresh == dpo and kept("ref-fresh") == kept("ref")
    _, line = go("shorter", "ref", "--max-new-tokens", "2")
    assert "read from" not in line and len(kept("ref")) == 2


def test_zero_shot_evaluates_the_base_model_with_the_adapters_off(tmp_path, tiny_steam, tiny_llama, monkeypatch):
    """Step 5 streams and scores with every adapter off (as the reference pass does), whatever the
    adapters hold, and puts them back on for training. A fresh adapter adds exactly zero, so this
    changes no score (test_lmclassifier checks that to the bit); it skips the adapters' matmuls."""
    monkeypatch.syspath_prepend(str(REPO))
    import train_dpo
    from minilab.lora import lora_layers

    args = train_dpo.parse_args(["--data", str(tiny_steam), "--model", str(tiny_llama), "--test-limit", "4",
                                 "--stream-examples", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "out"),
                                 "--checkpoint-dir", str(tmp_path / "ck"), "--ref-cache", str(tmp_path / "ref"),
                                 "--no-progress"])
    run = train_dpo.setup(args)
    train_dpo.load_model(run)
    train_dpo.add_lora(run)
    train_dpo.prepare(run)
    layers = list(lora_layers(run.model).values())
    seen = []

    def spy(real):
        def f(r, model, *a):
            seen.append((real.__name__, [layer.disabled for layer in layers]))
            return real(r, model, *a)
        return f

    monkeypatch.setattr(train_dpo, "stream_examples", spy(train_dpo.stream_examples))
    monkeypatch.setattr(train_dpo, "evaluate_test", spy(train_dpo.evaluate_test))
    train_dpo.zero_shot(run)
    assert [name for name, _ in seen] == ["stream_examples", "evaluate_test"] and len(layers) > 0
    assert all(all(off) for _, off in seen), seen
    assert not any(layer.disabled for layer in layers)  # on again for training

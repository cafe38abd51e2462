"""Checkpoints that survive their own recovery: a missing or stale `latest`, a damaged file, a new run
over an old run's checkpoints, and DPO's reference cache. Nothing is lost, and every failure is one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilab.checkpoint import CheckpointError, Checkpointer
from minilab.train import TrainingInterrupted
from test_train import _ckpt_run, _log_without_time

REPO = Path(__file__).resolve().parents[1]
FILES = ("trainable.safetensors", "state.pt", "best.safetensors", "trainer.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run stopped by SIGTERM at step 8 (checkpoints at 3, 6 and 8: the
    last two kept), copied afresh for each test by `interrupted`."""
    root = tmp_path_factory.mktemp("runs")
    whole = _ckpt_run(root / "whole")
    with pytest.raises(TrainingInterrupted):
        _ckpt_run(root / "cut", interrupt_call=13)
    return root, whole


@pytest.fixture
def interrupted(runs, tmp_path):
    root, whole = runs
    shutil.copytree(root / "cut", tmp_path / "cut")
    return tmp_path / "cut", whole


def _steps(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if p.name.startswith("step-"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same_as_uninterrupted(model, ck, whole):
    ref_model, ref, ref_ck = whole
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # bitwise
    assert _log_without_time(ck.metrics_log) == _log_without_time(ref_ck.metrics_log)


def test_the_previous_complete_checkpoint_is_kept_beside_the_newest(interrupted):
    run, _ = interrupted
    assert _steps(run / "ck") == ["step-000006", "step-000008"]
    assert (run / "ck" / "latest").read_text() == "step-000008"


def test_missing_latest_resumes_from_the_newest_step_folder(interrupted, capsys):
    run, whole = interrupted
    (run / "ck" / "latest").unlink()
    model, res, ck = _ckpt_run(run, resume=True)
    out = capsys.readouterr().out
    assert "latest is missing: resuming from the newest complete checkpoint, step-000008" in out
    assert res.resumed_from == 8
    _same_as_uninterrupted(model, ck, whole)


@pytest.mark.parametrize("name", FILES)
def test_latest_pointing_at_a_damaged_checkpoint_falls_back_with_a_note(interrupted, capsys, name):
    run, whole = interrupted
    _truncate(run / "ck" / "step-000008" / name)
    model, res, ck = _ckpt_run(run, resume=True)
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith(f"note: {run / 'ck' / 'step-000008' / name} is damaged")]
    assert len(note) == 1
    assert "resuming from the earlier complete checkpoint step-000006" in note[0]
    assert res.resumed_from == 6
    _same_as_uninterrupted(model, ck, whole)  # the earlier checkpoint resumes to the same end
    assert _steps(run / "ck") == ["step-000012", "step-000014"]  # the damaged one went once newer ones were whole


@pytest.mark.parametrize("legacy", [False, True], ids=["checksummed", "without-sizes"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_only_checkpoint_is_one_line_naming_the_file_and_nothing_is_deleted(interrupted, name, legacy):
    run, _ = interrupted
    ck = run / "ck"
    shutil.rmtree(ck / "step-000006")
    if legacy:  # a checkpoint written before sizes and checksums were recorded: structural checks
        tj = ck / "step-000008" / "trainer.json"
        tj.write_text(json.dumps({k: v for k, v in json.loads(tj.read_text()).items() if k != "files"}))
    _truncate(ck / "step-000008" / name)
    before = sorted(str(p.relative_to(ck)) for p in ck.rglob("*"))
    with pytest.raises(CheckpointError) as e:
        Checkpointer(ck, {"lr": 1e-2}, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint file {ck / 'step-000008' / name} is damaged")
    assert "no complete checkpoint is left" in msg and "delete it" in msg
    assert sorted(str(p.relative_to(ck)) for p in ck.rglob("*")) == before  # nothing lost
    with pytest.raises(CheckpointError, match="unfinished run"):  # and a new run may not replace it either
        Checkpointer(ck, {"lr": 1e-2})
    assert sorted(str(p.relative_to(ck)) for p in ck.rglob("*")) == before


def test_a_changed_checkpoint_file_of_the_right_size_is_caught_by_its_checksum(interrupted, capsys):
    run, _ = interrupted
    f = run / "ck" / "step-000008" / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one weight's byte: the header still reads, the size is right
    f.write_bytes(bytes(data))
    ck = Checkpointer(run / "ck", {"lr": 1e-2}, resume=True)
    assert ck.folder.name == "step-000006"
    assert "trainable.safetensors is damaged (its checksum differs" in capsys.readouterr().out


def test_a_step_saved_twice_keeps_the_checkpoint_before_it(tmp_path):
    ck = Checkpointer(tmp_path / "ck", {})
    w, state = {"w": torch.zeros(2)}, {"x": 1}
    meta = dict(epoch=0, position=0, examples=0, train_seconds=0.0, best_metric=None, best_step=None, nonfinite=0,
                nonfinite_in_row=0, metrics_lines=0)
    for step in (3, 6, 6):
        ck.save({**meta, "step": step}, w, None, state)
    assert _steps(tmp_path / "ck") == ["step-000003", "step-000006"]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp")]


def test_a_new_run_over_an_unfinished_runs_checkpoints_is_refused(interrupted):
    run, _ = interrupted
    before = sorted(str(p) for p in (run / "ck").rglob("*"))
    with pytest.raises(CheckpointError) as e:
        _ckpt_run(run)
    msg = str(e.value)
    assert "\n" not in msg and "unfinished run (newest: step-000008)" in msg
    assert "pass --resume to continue it, or another --checkpoint-dir (or delete the folder)" in msg
    assert sorted(str(p) for p in (run / "ck").rglob("*")) == before


def test_a_new_run_over_a_finished_runs_checkpoints_replaces_them_with_a_note(tmp_path, capsys):
    _, _, ck = _ckpt_run(tmp_path, steps=6)
    ck.finish()
    assert (tmp_path / "ck" / "finished").is_file()
    capsys.readouterr()
    model, res, ck2 = _ckpt_run(tmp_path, steps=6)
    assert "holds the checkpoints of a finished run (its results and model are written): replacing them" in capsys.readouterr().out
    assert res.resumed_from is None and res.steps == 6
    assert not (tmp_path / "ck" / "finished").exists()  # the new run has not finished (yet)
    assert _steps(tmp_path / "ck") == ["step-000003", "step-000006"]


def test_a_folder_with_no_step_checkpoint_is_free_for_a_new_run(tmp_path):
    (tmp_path / "ck" / ".tmp-step-000003-1").mkdir(parents=True)  # killed mid-save of the first checkpoint
    (tmp_path / "ck" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    _, res, _ = _ckpt_run(tmp_path, steps=3)
    assert res.steps == 3 and _steps(tmp_path / "ck") == ["step-000003"]


def test_resume_of_a_finished_run_keeps_its_checkpoints(tmp_path):
    _, _, ck = _ckpt_run(tmp_path, steps=6)
    ck.finish()
    _, res, _ = _ckpt_run(tmp_path, steps=6, resume=True)
    assert res.resumed_from == 6 and _steps(tmp_path / "ck") == ["step-000003", "step-000006"]


def test_a_script_refuses_an_unfinished_checkpoint_at_startup_in_one_line(tmp_path, interrupted, tiny_steam):
    run, _ = interrupted
    res = subprocess.run([sys.executable, "train_bert.py", "--data", str(tiny_steam), "--model", str(tmp_path / "none"),
                          "--checkpoint-dir", str(run / "ck"), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={"WANDB_MODE": "disabled",
                                                                                   "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(f"error: --checkpoint-dir {run / 'ck'} holds the checkpoints of an unfinished run")
    assert "[3/9]" not in res.stdout  # before the model
    assert _steps(run / "ck") == ["step-000006", "step-000008"]


# --------------------------------------------------------------------------------------------
# DPO's reference cache: a damaged file is computed again, with a note


@pytest.fixture(scope="module")
def caches():
    from minilab import caches

    return caches


def _refs():
    return [torch.randn(4), torch.randn(6)]


@pytest.mark.parametrize("damage", ["truncated", "empty", "other-run"])
def test_a_damaged_reference_cache_is_computed_again_with_a_note(tmp_path, capsys, caches, damage):
    path = tmp_path / "ref" / "steam-abc.safetensors"
    refs = _refs()
    calls = []
    compute = lambda: calls.append(1) or [t.clone() for t in refs]  # noqa: E731
    got, cached = caches.cached_tensor_list(path, [4, 6], compute)  # none yet: computed and kept
    assert not cached and len(calls) == 1 and path.is_file()
    got, cached = caches.cached_tensor_list(path, [4, 6], compute)  # kept: read
    assert cached and len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(got, refs))
    capsys.readouterr()
    if damage == "truncated":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        caches.save_tensor_list([torch.randn(4)], path)  # a list of another shape
    got, cached = caches.cached_tensor_list(path, [4, 6], compute)
    out = capsys.readouterr().out
    assert not cached and len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(got, refs))
    assert out.startswith(f"note: the reference cache {path} is ") and "computing the reference log-probs again" in out
    assert len(out.strip().splitlines()) == 1
    again = caches.load_tensor_list(path, [4, 6])  # rewritten whole
    assert again is not None and all(torch.equal(a, b) for a, b in zip(again, refs))
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left


def test_a_damaged_kept_zero_shot_file_is_evaluated_again_with_a_note(tmp_path, capsys, caches):
    path = tmp_path / "zero_shot.json"
    assert caches.read_kept_json(path) is None  # none kept yet
    path.write_text(json.dumps([{"accuracy": 0.5}, {"accuracy": 0.25}]))
    assert caches.read_kept_json(path) == [{"accuracy": 0.5}, {"accuracy": 0.25}]
    capsys.readouterr()
    path.write_text('[{"accuracy": 0.5}, {"accur')  # cut off mid-write by an older version
    assert caches.read_kept_json(path) is None
    out = capsys.readouterr().out
    assert out.startswith(f"note: {path} is damaged (JSONDecodeError") and out.strip().endswith("evaluating again")


def test_a_checkpoint_from_before_an_option_existed_still_resumes():
    """A checkpoint written before --objective and --simpo-gamma existed was made with their first
    values (dpo, 0.5): resuming it with those values is no change; with others it is one, by name."""
    from minilab.checkpoint import config_differences

    old = {"lr": 5e-4, "loss_type": "sigmoid"}
    now = {"lr": 5e-4, "loss_type": "sigmoid", "objective": "dpo", "simpo_gamma": 0.5}
    assert config_differences(old, now) == []
    assert config_differences(old, {**now, "objective": "sft"}) == ["objective: 'dpo' -> 'sft'"]
    assert config_differences(old, {**now, "other": 1}) == ["other: None -> 1"]


def test_a_checkpoint_from_before_autocast_was_recorded_resumes_in_what_it_ran():
    """Checkpoints record the autocast dtype that --precision resolved to (auto can mean bf16 on one
    CPU and fp32 on another), and that is what a resume compares, not the name it was asked by. One
    written before that was recorded ran under auto in bf16 on a CPU (auto meant bf16 on every CPU
    then) and in what auto still means on CUDA (bf16, or fp16 on a card without bf16); under any
    other --precision in that dtype."""
    from minilab.checkpoint import config_differences

    auto, fp32 = {"train.precision": "auto", "precision": None}, {"train.precision": "fp32", "precision": "fp32"}
    assert config_differences(auto, {**auto, "autocast": "bf16"}) == []
    assert config_differences(auto, {**auto, "autocast": "fp16"}) == []  # auto on a CUDA card without bf16
    assert config_differences(auto, {**auto, "autocast": "fp32"}) == [
        "autocast: 'bf16' -> 'fp32' (--precision bf16 goes on in the precision it started in)"]
    assert config_differences(auto, {"train.precision": "bf16", "precision": "bf16", "autocast": "bf16"}) == []
    assert config_differences(fp32, {**fp32, "autocast": "fp32"}) == []
    assert config_differences({**auto, "autocast": "bf16"}, {"train.precision": "bf16", "precision": "bf16",
                                                             "autocast": "bf16"}) == []
    assert config_differences({**auto, "autocast": "bf16"}, {**auto, "autocast": "fp32"}) == [
        "autocast: 'bf16' -> 'fp32' (--precision bf16 goes on in the precision it started in)"]
    # a config without "autocast" (the Trainer's own checkpoints) still compares the names
    assert config_differences({"train.precision": "auto"}, {"train.precision": "fp32"}) == ["train.precision: 'auto' -> 'fp32'"]

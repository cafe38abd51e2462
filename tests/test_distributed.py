"""Several processes (torchrun, gloo on the CPU): N processes with accumulation A train like one
process with accumulation N*A; only rank 0 writes; a lost rank stops the others with one line;
FSDP2 on the LLaMA path; resuming under both.

Each run is a real script in real subprocesses (torchrun, or two ranks started by hand with the
environment torchrun would give them, where a test must watch each rank on its own). Every
process, the one-process reference included, runs with OMP_NUM_THREADS=1 (torchrun's default for
N > 1), so that the matmuls themselves round the same way.

Tolerances. With the same micro-batches, the same dropout (seeded per micro-batch) and the loss
divided by the same global count, the only numerical difference left is the order of the sums:
each rank's gradient is summed across ranks instead of accumulated one after the other, and
under FSDP the prefix is joined to every prompt instead of shared through a KV cache.
In fp32 on these tiny runs that is a few 1e-8 in the weights (1e-6 allowed) and a few 1e-7 in the
logged numbers (1e-5 allowed, absolute, since rewards near 0 make relative differences large).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minilab.strategy import rank_share

REPO = Path(__file__).resolve().parents[1]
ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

# A sitecustomize that records every file or folder a process creates, opens for writing, renames or
# removes under WATCH, one line per event, in WATCH_LOG/rank<RANK>.txt (torchrun's launcher: rank "-").
AUDIT = '''
import os, sys
_watch, _log = os.environ.get("WATCH"), os.environ.get("WATCH_LOG")
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not (isinstance(mode, str) and any(c in mode for c in "wax+")) and not (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
    elif event not in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile"):
        return
    paths = [os.fspath(a) for a in args[: 2 if event in ("os.rename", "shutil.copyfile") else 1]
             if isinstance(a, (str, os.PathLike))]
    if any(p.startswith(_watch) and not p.startswith(_log) for p in paths):
        with open(os.path.join(_log, "rank" + os.environ.get("RANK", "-") + ".txt"), "a") as f:
            f.write(event + " " + " ".join(paths) + "\\n")
if _watch and _log:
    sys.addaudithook(_hook)
'''


def _env(tmp_path: Path, **extra) -> dict:
    """The environment of a run, with the write audit on for everything under tmp_path."""
    site = tmp_path / "audit-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    log = tmp_path / "writes"
    log.mkdir(exist_ok=True)
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **ENV, "PYTHONPATH": path, "WATCH": str(tmp_path), "WATCH_LOG": str(log), **extra}


def one_process(args, tmp_path, **extra):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(tmp_path, **extra), capture_output=True,
                          text=True, timeout=300)


def torchrun(args, tmp_path, n=2, **extra):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args],
                          cwd=REPO, env=_env(tmp_path, **extra), capture_output=True, text=True, timeout=300)


def by_hand(args, tmp_path, wait_for_rank0=90, **extra):
    """Two ranks started as torchrun would start them, but with no agent to stop the survivors:
    (rank 0's return code, its stderr, seconds until it exited, rank 1's return code)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _env(tmp_path, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    try:
        _, err0 = procs[0].communicate(timeout=wait_for_rank0)
        seconds = time.time() - t0
    except subprocess.TimeoutExpired:
        err0, seconds = "rank 0 did not exit", float("inf")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        procs[0].communicate()
        procs[1].communicate()
    return procs[0].returncode, err0, seconds, procs[1].returncode


def _args(kind, data, model, out):
    common = ["--data", str(data), "--model", str(model), "--out", str(out / "results"), "--save-dir", str(out / "saved"),
              "--checkpoint-dir", str(out / "ck"), "--save-every", "2", "--log-every", "1", "--precision", "fp32",
              "--no-progress"]
    if kind == "bert":  # 64 texts in micro-batches of 6: 11 per epoch, so every epoch ends on a leftover step of 1
        return ["train_bert.py", *common, "--batch-size", "6", "--epochs", "1", "--max-length", "32", "--eval-every", "3"]
    # 20 pairs in micro-batches of 4: 5 per epoch, 3 steps each, the last a leftover of 1
    return ["train_dpo.py", *common, "--batch-size", "4", "--max-pairs", "20", "--epochs", "2", "--test-limit", "8",
            "--eval-limit", "8", "--eval-every", "2", "--max-new-tokens", "2", "--stream-examples", "1", "--lr", "1e-3",
            "--ref-cache", str(out / "ref-cache")]


def _outcome(out, kind):
    from safetensors.torch import load_file

    name = "bert" if kind == "bert" else "llama"
    r = json.loads((out / "results" / "steam" / f"{name}.json").read_text())
    log = [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_second", "config")}
           for line in (out / "results" / "steam" / f"{name}_metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(out / "saved" / ("model.safetensors" if kind == "bert" else "adapter_model.safetensors")))
    return r, log, weights


def _assert_close_runs(a, b, kind, atol_weights=1e-6, atol_log=1e-5):
    (ra, la, wa), (rb, lb, wb) = _outcome(a, kind), _outcome(b, kind)
    assert ra["training"]["steps"] == rb["training"]["steps"] and ra["predictions"] == rb["predictions"]
    assert ra["dev_best"] == pytest.approx(rb["dev_best"], abs=atol_log)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol_weights, msg=k)
    assert [(x["kind"], x["step"]) for x in la] == [(x["kind"], x["step"]) for x in lb]
    for x, y in zip(la, lb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=0, abs=atol_log), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)


def _writes(tmp_path):
    """{rank: [event path, ...]} recorded by the audit, paths relative to tmp_path."""
    out = {}
    for f in (tmp_path / "writes").glob("rank*.txt"):
        out[f.stem[4:]] = [line.replace(str(tmp_path) + "/", "") for line in f.read_text().splitlines()]
    return out


def _only_rank0_wrote(tmp_path, run: str, saved: str):
    """Rank 1 wrote nothing under the run's folder; rank 0 wrote its results, checkpoints and model."""
    writes = _writes(tmp_path)
    assert [w for w in writes.get("1", []) if f" {run}/" in w] == []
    mine = [w for w in writes.get("0", []) if f" {run}/" in w]
    for part in (f"{run}/results/steam/", f"{run}/ck/", f"{run}/{saved}"):
        assert any(part in w for w in mine), (part, mine[:20])


# --------------------------------------------------------------------------------------------


def test_rank_share_gives_every_micro_batch_to_one_rank_and_the_last_to_rank_0():
    for n in range(1, 9):
        for size in (1, 2, 3, 4):
            shares = [rank_share(n, r, size) for r in range(size)]
            assert sorted(j for s in shares for j in s) == list(range(n))
            assert shares[0][-1] == n - 1  # rank 0 logs the metrics of the step's last micro-batch
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert rank_share(1, 1, 2) == []  # a leftover step of one micro-batch leaves rank 1 without any


@pytest.mark.slow
def test_bert_two_processes_equal_one_with_double_accumulation_and_resume_after_a_lost_rank(tmp_path, tiny_steam, tiny_bert):
    one = one_process(_args("bert", tiny_steam, tiny_bert, tmp_path / "one") + ["--grad-accum", "2"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(_args("bert", tiny_steam, tiny_bert, tmp_path / "two"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[9/9] results written" in two.stdout and two.stdout.count("[1/9]") == 1  # rank 0 alone prints
    _assert_close_runs(tmp_path / "one", tmp_path / "two", "bert")
    _only_rank0_wrote(tmp_path, "two", "saved")

    # Rank 1 is killed after step 5; rank 0 (no torchrun agent to stop it) notices at step 6's
    # all-reduce and exits with one line; the checkpoint of step 4 resumes to the same end.
    args = _args("bert", tiny_steam, tiny_bert, tmp_path / "lost")
    rc, err, seconds, rc1 = by_hand(args, tmp_path, MINILAB_FAULT="SIGKILL:5:rank1")
    assert rc1 == -9 and rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: lost contact with the other processes during step 6"), last
    assert (tmp_path / "lost" / "ck" / "latest").read_text() == "step-000004"
    resumed = torchrun(args + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_close_runs(tmp_path / "two", tmp_path / "lost", "bert", atol_weights=0, atol_log=0)  # bitwise


@pytest.mark.slow
def test_a_hung_rank_makes_the_other_give_up_after_the_timeout(tmp_path, tiny_steam, tiny_bert):
    args = _args("bert", tiny_steam, tiny_bert, tmp_path / "hung") + ["--dist-timeout", "5"]
    rc, err, seconds, _ = by_hand(args, tmp_path, MINILAB_FAULT="SIGSTOP:4:rank1")  # stopped, not dead
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: lost contact with the other processes during step 5"), last
    assert "Timed out" in last and "--resume" in last
    assert seconds < 60


@pytest.mark.slow
def test_dpo_two_processes_and_fsdp_equal_one_with_double_accumulation(tmp_path, tiny_steam, tiny_llama):
    one = one_process(_args("dpo", tiny_steam, tiny_llama, tmp_path / "one") + ["--grad-accum", "2"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(_args("dpo", tiny_steam, tiny_llama, tmp_path / "two"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_close_runs(tmp_path / "one", tmp_path / "two", "dpo")
    _only_rank0_wrote(tmp_path, "two", "saved")

    # FSDP2 on the CPU with gloo: killed (rank 1, after step 3), then resumed; it ends where the
    # one-process run does (a resume that lost the optimizer state would be 1e-4 away, not 1e-7).
    args = _args("dpo", tiny_steam, tiny_llama, tmp_path / "fsdp") + ["--fsdp"]
    rc, err, _, rc1 = by_hand(args, tmp_path, MINILAB_FAULT="SIGKILL:3:rank1")
    assert rc1 == -9 and rc == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: rank 0 of 2: lost contact with the other processes during step 4")
    assert (tmp_path / "fsdp" / "ck" / "latest").read_text() == "step-000002"
    resumed = torchrun(args + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "read from" in resumed.stdout  # reference log-probs kept
    _assert_close_runs(tmp_path / "one", tmp_path / "fsdp", "dpo")
    _only_rank0_wrote(tmp_path, "fsdp", "saved")


def test_fsdp_needs_several_processes(tmp_path, tiny_steam, tiny_llama):
    res = one_process(_args("dpo", tiny_steam, tiny_llama, tmp_path / "x") + ["--fsdp", "--max-pairs", "4"], tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --fsdp shards the model")


def test_a_parameter_without_a_gradient_on_every_rank_keeps_none():
    """The by-hand all-reduce fills missing gradients with zeros to sum them; a parameter that got no
    gradient anywhere must stay None afterwards, as with one process (else AdamW decays it)."""
    from types import SimpleNamespace

    from minilab.strategy import sum_across_ranks

    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.full((3,), 2.0)
    fake = SimpleNamespace(params=[used, unused], fsdp=False, device=torch.device("cpu"), signal=None, step=0)
    loss, examples, _ = sum_across_ranks(fake.params, 1.5, 4, fake.signal, fake.device, "step 1")  # one process: the sums are the inputs
    assert (loss, examples) == (1.5, 4)
    assert torch.equal(used.grad, torch.full((3,), 2.0))
    assert unused.grad is None

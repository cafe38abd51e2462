"""Every numeric option of every script is checked as it is parsed: 0 and negatives get argparse's
own one-line error naming the option (exit 2), not a traceback, nor a silent default, minutes later."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilab import cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import baseline  # noqa: E402
import train_bert  # noqa: E402
import train_dpo  # noqa: E402
from minilab import predict  # noqa: E402

SCRIPTS = {"train_bert.py": train_bert.parse_args, "train_dpo.py": train_dpo.parse_args, "baseline.py": baseline.parse_args,
           "minilab-predict": predict.main}
ZERO_OK = {cli.nonneg_int, cli.nonneg_float, cli.fraction, cli.seed_int, train_dpo._below_half}
CHECKED = ZERO_OK | {cli.positive_int, cli.positive_float}


class _Caught(Exception):
    pass


def _parser(script) -> argparse.ArgumentParser:
    """The parser a script builds (caught just before it parses)."""
    seen = {}

    def grab(self, *a, **k):
        seen["p"] = self
        raise _Caught

    orig = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_intermixed_args = grab
    try:
        SCRIPTS[script]([])
    except _Caught:
        pass
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args = orig
    return seen["p"]


def _numeric_options():
    for script in SCRIPTS:
        for a in _parser(script)._actions:
            if a.option_strings and a.type is not None and a.type is not cli.device_arg:
                yield script, a.option_strings[0], a.type


NUMERIC = list(_numeric_options())


def test_every_numeric_option_has_a_checked_type():
    loose = [(s, o, t) for s, o, t in NUMERIC if t not in CHECKED]
    assert loose == [], "options with a bare int/float type (a 0 or -1 would slip through)"
    assert len(NUMERIC) >= 45


def _cases():
    for script, opt, kind in NUMERIC:
        values = ["-1"] if kind in ZERO_OK else ["0", "-1"]
        values += ["nan"] if kind not in (cli.positive_int, cli.nonneg_int, cli.seed_int) else ["1.5"]
        for v in values:
            yield pytest.param(script, opt, v, id=f"{script}{opt}={v}")


@pytest.mark.parametrize("script,opt,value", list(_cases()))
def test_zero_and_negative_values_are_one_line_naming_the_option(script, opt, value, capsys):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script]([opt, value])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f": error: argument {opt}: " in last and last.count("\n") == 0, last
    assert "pass " in last  # and it says what to pass


@pytest.mark.parametrize("script,opt,value", [
    ("train_bert.py", "--eval-every", "0"), ("train_bert.py", "--save-every", "0"), ("train_bert.py", "--keep-tail", "0"),
    ("train_bert.py", "--max-grad-norm", "0"), ("train_bert.py", "--warmup-ratio", "0"), ("train_bert.py", "--weight-decay", "0"),
    ("train_dpo.py", "--stream-examples", "0"), ("train_dpo.py", "--rpo-alpha", "0"), ("train_dpo.py", "--lora-dropout", "0"),
    ("train_dpo.py", "--label-smoothing", "0.1"), ("train_dpo.py", "--seed", "0"), ("baseline.py", "--show-wrong", "0"),
])
def test_zero_where_it_has_a_meaning_is_accepted(script, opt, value):
    assert SCRIPTS[script]([opt, value]) is not None


@pytest.mark.parametrize("argv,message", [
    (["--warmup-ratio", "1"], "argument --warmup-ratio: 1 is out of range: pass a number in [0, 1)"),
    (["--epochs", "inf"], "argument --epochs: inf is out of range: pass a number > 0"),
    (["--batch-size", "8.5"], "argument --batch-size: '8.5' is not an integer: pass an integer >= 1"),
    (["--seed", str(2**32)], "argument --seed: 4294967296 is out of range"),
    (["--keep-tail", "200"], "argument --keep-tail: 200 is more than the --max-length of 128"),
    (["--max-length", "16", "--keep-tail", "17"], "argument --keep-tail: 17 is more than the --max-length of 16"),
])
def test_train_bert_ranges(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_bert.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--label-smoothing", "0.5"], "argument --label-smoothing: 0.5 is out of range: pass a number in [0, 0.5)"),
    (["--label-smoothing", "0.1", "--loss-type", "ipo"], "applies to --loss-type sigmoid and simpo only, not ipo"),
    (["--lora-dropout", "1"], "argument --lora-dropout: 1 is out of range: pass a number in [0, 1)"),
    (["--objective", "sft", "--beta", "0.5"], "argument --beta/--rpo-alpha: apply to --objective dpo only"),
    (["--objective", "head", "--rpo-alpha", "0.1"], "argument --beta/--rpo-alpha: apply to --objective dpo only"),
    (["--objective", "head", "--loss-type", "simpo"], "argument --loss-type/--label-smoothing: apply to --objective dpo only"),
])
def test_train_dpo_ranges(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_dpo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_grid_value_of_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        baseline.parse_args(["--grid", "1", "0"])
    assert "argument --grid: 0 is out of range: pass a number > 0" in capsys.readouterr().err


def test_special_meanings_are_in_the_help():
    helps = {s: {a.option_strings[0]: a.help or "" for a in _parser(s)._actions if a.option_strings} for s in SCRIPTS}
    assert "0: once per epoch" in helps["train_bert.py"]["--eval-every"]
    assert "0: no clipping" in helps["train_dpo.py"]["--max-grad-norm"]
    assert "0: at each evaluation" in helps["train_bert.py"]["--save-every"]
    assert "0: none" in helps["train_dpo.py"]["--stream-examples"] and "0: none" in helps["baseline.py"]["--show-wrong"]
    assert "0 = pure DPO" in helps["train_dpo.py"]["--rpo-alpha"]


# --------------------------------------------------------------------------------------------
# --device


@pytest.mark.parametrize("bad", ["bogus", "gpu", "cuda:x", "cuda:-1", "cpu:abc", "meta", "mps", ""])
@pytest.mark.parametrize("script", list(SCRIPTS)[:2] + ["minilab-predict"])
def test_a_bad_device_string_is_one_line(script, bad, capsys):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script](["--device", bad])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f": error: argument --device: {bad} is not a device (cpu, cuda, cuda:N)"), last


def test_cuda_without_cuda_says_use_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"^--device cuda: this PyTorch build has no CUDA .*use --device cpu"):
        cli.check_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"^--device cuda:0: no CUDA GPU is visible .*use --device cpu"):
        cli.check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine shows 2 GPU\(s\), cuda:0 to cuda:1"):
        cli.check_device("cuda:2")
    assert cli.check_device("cuda:1") == torch.device("cuda", 1)


def test_pick_device_checks_too():
    from minilab.distributed import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device tpu is not a device"):
        pick_device("tpu")


@pytest.mark.skipif(torch.backends.cuda.is_built() and torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_cuda_on_this_machine_is_refused_at_parse_time():
    with pytest.raises(SystemExit):
        train_bert.parse_args(["--device", "cuda"])


def test_a_training_config_built_in_code_is_checked_too():
    from minilab.train import TrainConfig, Trainer

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"training config out of range: grad_accum 0, log_every 0"):
        Trainer(model, lambda e: [[0]], None, TrainConfig(grad_accum=0, log_every=0, progress=False), torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# As a user types them: exit 2, one line at the end, before any work


@pytest.mark.parametrize("argv", [
    ["train_bert.py", "--batch-size", "0"], ["train_bert.py", "--log-every", "0"], ["train_bert.py", "--device", "cuda:x"],
    ["train_dpo.py", "--max-steps", "-1"], ["train_dpo.py", "--grad-accum", "0"], ["baseline.py", "--threads", "0"],
    ["-m", "minilab.predict", "--batch-size", "-1"],
])
def test_as_typed(argv):
    res = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert ": error: argument " in last and argv[-2] in last and "Traceback" not in res.stderr


def test_each_objective_gets_its_own_preset_and_the_command_line_still_wins():
    """The CPU preset's lr for SFT is the probes' 1e-3 (train_dpo.OBJECTIVE_PRESETS); DPO, SimPO and
    the head keep 5e-4, the gpu preset is untouched, and --lr overrides any of them. The config is
    the one `train_dpo.setup` trains with (`preset_and_config`), and --lr's help names both values."""
    def lr(argv):
        return train_dpo.preset_and_config(train_dpo.parse_args(argv))[1].lr

    assert lr(["--objective", "sft"]) == 1e-3
    assert lr([]) == lr(["--loss-type", "simpo"]) == lr(["--objective", "head"]) == 5e-4
    assert lr(["--objective", "sft", "--preset", "gpu"]) == train_dpo.PRESETS["gpu"]["lr"] == 1e-4
    assert lr(["--objective", "sft", "--lr", "3e-4"]) == 3e-4
    helps = {a.option_strings[0]: a.help or "" for a in _parser("train_dpo.py")._actions if a.option_strings}
    assert "(preset: 0.0005; --objective sft: 0.001)" in helps["--lr"]

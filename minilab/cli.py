"""What every script does at its edge: bad input becomes one line, not a stack trace."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from .data import DataError
from .hub import HubError


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run a script's main(). A data, Hub or checkpoint problem (DataError, HubError, ValueError,
    OSError, or training that keeps going non-finite) prints `error: <what is wrong and how to fix it>` on
    stderr and exits with status 2; an interrupted training run (SIGINT/SIGTERM) says where its checkpoint is;
    results are written atomically at the very end, so nothing already written is lost. Under torchrun, a
    lost peer process is one line too (`distributed.PeerLost`), and the process group is left on the way out."""
    from .distributed import PeerLost, shutdown
    from .train import NonFiniteError, TrainingInterrupted

    lost = False
    try:
        code = main()
    except (DataError, HubError, ValueError, OSError, NonFiniteError, PeerLost) as e:
        print(f"error: {e}", file=sys.stderr)
        code, lost = 2, isinstance(e, PeerLost)
    except TrainingInterrupted as e:  # the loop saved a checkpoint first
        print(f"interrupted: {e}", file=sys.stderr)
        code = 143 if "SIGTERM" in str(e) else 130
    finally:
        if not lost:
            shutdown()
    if lost:
        # The process group is broken: leaving it, or the interpreter's own teardown, can meet gloo's
        # background threads still talking to the dead peer and abort ("terminate called without an
        # active exception", exit -6). Everything this run writes is written atomically already, so
        # flush and leave at once, with the exit code the message promised.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# Options checked when they are parsed: argparse `type=` validators shared by every script, so a
# 0 or a negative count is argparse's own one-line error naming the option (exit 2), not a
# traceback (or a silent default) after minutes of work.


def _number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            hi_open: bool = False, what: str | None = None) -> Callable[[str], int | float]:
    """An argparse `type=` that reads an int or a finite float in [lo, hi] (or an open end)."""
    import argparse
    import math

    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
    bounds = " and ".join(b for b in (left, right) if b)
    what = what or f"{'an integer' if kind is int else 'a number'}{' ' + bounds if bounds else ''}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}: "
                                             f"pass {what}") from None
        if (kind is float and not math.isfinite(v)) or (lo is not None and (v < lo or (lo_open and v == lo))) \
                or (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(f"{text} is out of range: pass {what}")
        return v

    parse.__name__ = what
    return parse


positive_int = _number(int, 1, what="an integer >= 1")
nonneg_int = _number(int, 0, what="an integer >= 0")
seed_int = _number(int, 0, 2**32 - 1, what="an integer in [0, 2**32 - 1]")  # numpy's seeds
positive_float = _number(float, 0, lo_open=True, what="a number > 0")
nonneg_float = _number(float, 0, what="a number >= 0")
fraction = _number(float, 0, 1, hi_open=True, what="a number in [0, 1)")


def check_device(name: str):
    """`name` as a torch.device that this machine and this PyTorch build have, else a ValueError
    saying what to pass instead."""
    import torch

    try:
        d = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name} is not a device (cpu, cuda, cuda:N)")
    if d.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {name}: this PyTorch build has no CUDA (torch {torch.__version__}): "
                             "use --device cpu, or install a CUDA build of PyTorch")
        n = torch.cuda.device_count()
        if n == 0:
            import os

            raise ValueError(f"--device {name}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use --device cpu")
        if d.index is not None and d.index >= n:
            raise ValueError(f"--device {name}: this machine shows {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return d


def device_arg(text: str) -> str:
    """argparse `type=` for --device: a device this machine has (the string itself is kept)."""
    import argparse

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None  # argparse names the option
    return text

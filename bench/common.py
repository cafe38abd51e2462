"""Helpers shared by the speed benchmarks: timing rounds, the machine, and the JSON record (the
Markdown table, memory and data defaults are the package's: minilab.report, .results, .data).

A benchmark here compares two stacks that train the same model on the same batches. The CPU may
be shared with other work, so a slow second hits whichever stack happens to be running: the
benchmarks therefore run the stacks in alternating rounds inside one process (A B, B A, A B, ...)
and add up each stack's time, so that background noise is spread over both.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/bench_x.py` from anywhere
    sys.path.insert(0, str(REPO))


def load_warning(threads: int) -> str | None:
    """A warning when other processes keep the CPU busy: timings are then noisy, multi-threaded ones badly."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"warning: the 1-minute load average is {load:.1f} on {cores} cores: other work shares the CPU, "
                f"so timings are noisy" + (" (with several threads, badly: try --threads 1)" if threads > 1 else ""))
    return None


class Stopwatch:
    """Total wall time and work counted over many rounds."""

    def __init__(self):
        self.seconds = 0.0
        self.steps = 0
        self.examples = 0
        self.rounds: list[float] = []  # examples/s of each round, to show the spread

    def add(self, seconds: float, steps: int, examples: int) -> None:
        self.seconds += seconds
        self.steps += steps
        self.examples += examples
        self.rounds.append(examples / max(seconds, 1e-9))

    @property
    def rate(self) -> float:
        return self.examples / max(self.seconds, 1e-9)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path

"""Helpers shared by the speed benchmarks: timing rounds, a Markdown table, and the JSON record.

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


def default_data(task: str) -> str | None:
    """$MINILAB_DATA/<task>, else ../shared/data/<task> beside the repository, else None."""
    roots = [os.environ.get("MINILAB_DATA"), str(REPO.parent / "shared" / "data")]
    for root in roots:
        if root and (Path(root) / task).is_dir():
            return str(Path(root) / task)
    return None


def current_rss_mb() -> float:
    """Resident memory of this process right now (Linux /proc), in MiB; 0.0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class PeakRss:
    """Highest resident memory seen while the `with` block runs, sampled by a background thread.

    torch allocates outside Python's allocator, so tracemalloc sees nothing; the process RSS
    does. `growth_mb` is the peak minus the RSS at entry: what the block needed on top of what
    was already resident (models, data). Sampling every 5 ms can miss a very short spike.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = current_rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, current_rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


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


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


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

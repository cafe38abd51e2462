"""The results contract: every run writes `results/<task>/<name>.json`, and the report reads only these.

A results file is the single source of truth for a row in the comparison table, so it records not
just the scores but everything needed to trust and reproduce them: split sizes, time, throughput,
memory, device, precision, seed and the exact command line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
from pathlib import Path

from .files import atomic_folder, atomic_write  # noqa: F401  (atomic_folder: re-exported for older imports)

REQUIRED = ("task", "model", "split_sizes", "zero_shot", "fine_tuned", "train_seconds", "examples_per_second",
            "peak_rss_mb", "device", "dtype", "seed", "command")


# --------------------------------------------------------------------------------------------
# Memory: the resident set (RSS) of this process, in MiB. torch allocates outside Python's
# allocator, so tracemalloc sees nothing of a model; the RSS does.


def current_rss_mb() -> float:
    """Resident memory of this process right now (Linux /proc); 0.0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def reset_peak_rss() -> bool:
    """Reset the high-water mark (Linux VmHWM) to the current RSS, so `peak_rss_mb()` measures from
    here (Linux >= 4.0: writing 5 to clear_refs); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(whole_process: bool = False) -> float:
    """Peak resident memory of this process: since the last `reset_peak_rss()` or else since it
    started (Linux VmHWM), or with `whole_process` over its whole life, which no reset touches
    (getrusage's ru_maxrss; also the fallback where /proc is missing)."""
    if not whole_process:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 if platform.system() != "Darwin" else kib / 2**20


class PeakRss:
    """The peak resident memory while a `with` block runs (`peak_mb`), and `growth_mb`: the peak
    minus the RSS at entry, i.e. what the block needed on top of what was already resident (models,
    data). The high-water mark is reset at entry; where that is not possible (`exact` False) the
    peak is the process's so far, which can only overstate the block's."""

    def __enter__(self):
        self.start_mb = current_rss_mb()
        self.exact = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        self.peak_mb = max(peak_rss_mb(), current_rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


# --------------------------------------------------------------------------------------------
# Writing and reading results files


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def results_path(task: str, name: str, root: str | Path = "results") -> Path:
    return Path(root) / task / f"{name}.json"


def write_results(payload: dict, name: str, root: str | Path = "results") -> Path:
    """Write the results file atomically (temp file + rename), so a crash never leaves half a file
    and an earlier good result is only replaced by a complete new one."""
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"results for {name!r} lack {', '.join(missing)}")
    return atomic_write(results_path(payload["task"], name, root), json.dumps(payload, indent=2) + "\n")


def read_results(path: str | Path) -> dict:
    """Read and validate one results file; a missing or malformed file raises one clear ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file {path} does not exist: run its step first (e.g. `make lab`)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path} is not valid JSON ({e}): delete it and rerun its step") from e
    if not isinstance(payload, dict):
        raise ValueError(f"results file {path} does not hold a JSON object: delete it and rerun its step")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"results file {path} lacks {', '.join(missing)}: delete it and rerun its step")
    return payload


def fmt_score(block: dict | None) -> str:
    """'0.812 [0.741, 0.867]' for a metrics block."""
    if not block:
        return "-"
    lo, hi = block["accuracy_ci95"]
    return f"{block['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"

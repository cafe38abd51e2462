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


def add_precision_arg(parser) -> None:
    """--precision: the autocast every stack of a benchmark runs in, the same for all of them."""
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="autocast of every stack (default auto: what train_bert.py and train_dpo.py pick on this "
                             "CPU, bf16 where oneDNN runs bf16 matmuls, else fp32; minilab/precision.py)")


def bench_amp(precision: str) -> torch.dtype | None:
    """The CPU autocast dtype of a benchmark's --precision (None: fp32), as the lab's scripts resolve it."""
    from minilab.precision import resolve_precision

    return resolve_precision(precision, torch.device("cpu"))[0]


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


# --------------------------------------------------------------------------------------------
# The project's goals, and `make lab`'s stage timings from its results files

BERT_GOAL = 1.4  # minilab's BERT fine-tuning: examples/s at least 1.4x the transformers loop's
DPO_STEADY_GOAL = 5.0  # minilab's DPO steps (reference pass excluded): pairs/s at least 5x TRL's


def goal_line(claim: str, goal: float, measured: float | None, detail: str = "") -> str:
    """'goal: <claim>: measured 1.52x (detail): PASS' (FAIL below the goal; 'not measured' without a value)."""
    if measured is None:
        return f"goal: {claim}: not measured{f' ({detail})' if detail else ''}"
    verdict = "PASS" if measured >= goal else "FAIL"
    return f"goal: {claim}: measured {measured:.2f}x{f' ({detail})' if detail else ''}: {verdict}"


LAB_STAGES = ("baseline", "bert", "llama")  # results/<task>/<name>.json, as `make lab` writes them


def _seconds(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _eval_parts(d: dict) -> dict[str, float]:
    """{"zero-shot": s, "dev": s, "test": s} from a results file's `evaluation` block (empty without one)."""
    sub = d.get("evaluation")
    if not isinstance(sub, dict):
        return {}
    return {k[: -len("_seconds")].replace("_", "-"): _seconds(v) for k, v in sub.items()
            if k.endswith("_seconds") and _seconds(v) is not None}


def lab_stages(task: str, root: str | Path | None = None) -> dict | None:
    """Stage seconds of the last `make lab` on `task` from results/<task>/{baseline,bert,llama}.json
    (those that exist; None when none does): baseline (features + fit, and the C search), BERT
    (script wall time, training), the DPO reference pass and steps, evaluation where recorded."""
    folder = Path(root or REPO / "results") / task
    runs = {}
    for name in LAB_STAGES:
        try:
            runs[name] = json.loads((folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            pass
    if not runs:
        return None
    out: dict = {"task": task}
    if "baseline" in runs:
        b = runs["baseline"]
        out["baseline"] = _seconds(b.get("train_seconds"))
        out["baseline_search"] = _seconds(b.get("search_seconds"))
    if "bert" in runs:
        b = runs["bert"]
        out["bert_wall"] = _seconds(b.get("wall_seconds"))
        out["bert_train"] = _seconds(b.get("train_seconds"))
        out["bert_eval_parts"] = _eval_parts(b)
    if "llama" in runs:
        b = runs["llama"]
        ref = b.get("reference_logps") or {}
        out["reference"] = _seconds(ref.get("seconds"))
        out["reference_cached"] = bool(ref.get("cached"))
        out["dpo_train"] = _seconds(b.get("train_seconds"))
        out["dpo_wall"] = _seconds(b.get("wall_seconds"))
        out["dpo_eval_parts"] = _eval_parts(b)
    return out


def lab_stage_line(stages: dict) -> str:
    """'make lab stages (steam): baseline 2.1s (C search 6.0s), BERT 512s (training 470s), reference pass 202s, DPO steps 640s, ...'"""
    def s(x):
        return f"{x:.0f}s" if x >= 10 else f"{x:.1f}s"

    parts = []
    if stages.get("baseline") is not None:
        parts.append(f"baseline {s(stages['baseline'])}"
                     + (f" (C search {s(stages['baseline_search'])})" if stages.get("baseline_search") is not None else ""))
    if stages.get("bert_wall") is not None:
        parts.append(f"BERT {s(stages['bert_wall'])}"
                     + (f" (training {s(stages['bert_train'])})" if stages.get("bert_train") is not None else ""))
    elif stages.get("bert_train") is not None:
        parts.append(f"BERT training {s(stages['bert_train'])}")
    if stages.get("reference") is not None:
        parts.append(f"reference pass {s(stages['reference'])}" + (" (read from the cache)" if stages.get("reference_cached") else ""))
    if stages.get("dpo_train") is not None:
        parts.append(f"DPO steps {s(stages['dpo_train'])}")
    if stages.get("dpo_wall") is not None:
        parts.append(f"DPO script {s(stages['dpo_wall'])}")
    for key, name in (("bert_eval_parts", "BERT"), ("dpo_eval_parts", "DPO")):
        each = stages.get(key) or {}
        if each:
            named = ", ".join(f"{k} {s(v)}" for k, v in each.items())
            parts.append(f"{name} evaluation {s(sum(each.values()))} ({named})")
    missing = [n for n, k in (("baseline", "baseline"), ("bert", "bert_train"), ("llama", "dpo_train")) if k not in stages]
    if missing:
        parts.append(f"no {', '.join(f'{m}.json' for m in missing)}")
    return f"make lab stages ({stages['task']}): " + ", ".join(parts)


def lab_stage_lines(tasks: list[str] | None = None, root: str | Path | None = None) -> list[str]:
    """One `lab_stage_line` per task with results (by default every results/<task>/ but bench/), or a note."""
    root = Path(root or REPO / "results")
    if tasks is None:
        tasks = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "bench") if root.is_dir() else []
    lines = [lab_stage_line(st) for st in (lab_stages(t, root) for t in tasks) if st is not None]
    return lines or [f"make lab stages: skipped, no {root.name}/<task>/{{{','.join(LAB_STAGES)}}}.json yet (run `make lab`)"]

"""The lab report: one Markdown page per task, built only from the results files and metrics logs.

    python -m minilab.report --task steam [--results results] [--wandb]

It writes `results/<task>/REPORT.md` with the pictures beside it and prints the comparison table.
Nothing is recomputed: every number comes from `results/<task>/<name>.json` (see results.py) and
every curve from the JSONL metrics log the run wrote (see tracking.py), so the report can be
rebuilt at any time, and a row cannot show a number its run did not measure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write
from .metrics import one_label_warning
from .results import read_results
from .tasks import get_task

PICTURES = ("training_curve.png", "dpo_rewards.png", "eval_metrics.png")  # plus confusion_<name>.png
ORDER = ("baseline", "bert", "llama")  # the table's first rows; other results files follow by name


@dataclass
class Run:
    """One results file and the metrics log its run wrote."""

    name: str
    path: Path
    data: dict
    log: list[dict] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def is_baseline(self) -> bool:
        return self.name == "baseline"

    @property
    def objective(self) -> str | None:
        """dpo, simpo (a reference-free preference loss), sft, head, or None for a plain classifier."""
        t = self.data.get("training") or {}
        if t.get("objective") in ("sft", "head"):
            return t["objective"]
        if t.get("loss_type") == "simpo":
            return "simpo"
        return "dpo" if self.data.get("kind") in ("llama", "dpo") or "beta" in t else None

    @property
    def is_dpo(self) -> bool:
        """A preference loss against a reference model (DPO, IPO, hinge): its rewards are log-ratios."""
        return self.objective == "dpo"


# --------------------------------------------------------------------------------------------
# Reading


def read_metrics_log(path: str | Path) -> list[dict]:
    """The records of a JSONL metrics log; a line that is not a JSON object is a clear error."""
    path = Path(path)
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"metrics log {path} line {i} is not valid JSON ({e}): delete it and rerun its step") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"metrics log {path} line {i} is not a metrics record (a JSON object with a step)")
        records.append(record)
    return records


def _find_log(folder: Path, name: str, recorded: str | None) -> Path | None:
    """The log beside the results file first (the results folder may have moved since the run),
    then the path the run recorded, then the conventional name."""
    candidates = []
    if recorded:
        candidates += [folder / Path(recorded).name, Path(recorded)]
    candidates.append(folder / f"{name}_metrics.jsonl")
    return next((p for p in candidates if p.is_file()), None)


def _check_block(path: Path, payload: dict, key: str, optional: bool) -> None:
    block = payload.get(key)
    if block is None and optional:
        return
    if not isinstance(block, dict) or any(k not in block for k in ("accuracy", "accuracy_ci95", "macro_f1")):
        raise ValueError(f"results file {path}: `{key}` is not a metrics block (accuracy, accuracy_ci95, macro_f1): "
                         "delete it and rerun its step")


def load_rows(task: str, root: str | Path = "results") -> list[tuple[str, dict]]:
    """(name, results) of every results file of a task, baseline, bert and llama first."""
    folder = Path(root) / task
    names = [n for n in ORDER if (folder / f"{n}.json").is_file()]
    names += sorted(p.stem for p in folder.glob("*.json") if p.stem not in ORDER)
    return [(n, read_results(folder / f"{n}.json")) for n in names]


def load_runs(task: str, root: str | Path = "results") -> list[Run]:
    """Every results file of a task (baseline, bert, llama first), each with its metrics log."""
    folder = Path(root) / task
    rows = load_rows(task, root) if folder.is_dir() else []
    if not rows:
        raise ValueError(f"no results files in {folder}: run `make lab TASK={task}` first "
                         f"(or some steps: `make baseline bert llama TASK={task}`)")
    runs = []
    for name, data in rows:
        path = folder / f"{name}.json"
        _check_block(path, data, "fine_tuned", optional=False)
        _check_block(path, data, "zero_shot", optional=True)
        log_path = _find_log(folder, name, data.get("metrics_log"))
        runs.append(Run(name, path, data, read_metrics_log(log_path) if log_path else [], log_path))
    return runs


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} pts"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _short_model(model_id: str) -> str:
    """A local folder deep inside site-packages reads better as its last two parts."""
    parts = Path(model_id).parts
    return "…/" + "/".join(parts[-2:]) if model_id.startswith("/") and len(parts) > 3 else model_id


def _cell(text, limit: int | None = None) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, optionally cut."""
    text = " ".join(str(text).split())
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table padded into columns, so the same text reads well in a terminal (the lab's
    one table maker: the report, predict and the benchmarks). A float cell gets 2 decimals (none
    from 1000 up); anything else is printed as str() gives it."""
    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[text(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])])


def label_names(run: Run, task: str) -> list[str]:
    names = run.data.get("label_names")
    if names:
        return list(names)
    spec = get_task(task)
    k = len(run.data["fine_tuned"].get("confusion") or [])
    return list(spec.label_names) if spec and len(spec.label_names) == k else [str(i) for i in range(k)]


def majority_share(block: dict) -> float | None:
    """The accuracy of always answering the most common test label: the level 'chance' means here."""
    cm = block.get("confusion")
    if not cm:
        return None
    counts = [sum(row) for row in cm]
    return max(counts) / sum(counts) if sum(counts) else None


# --------------------------------------------------------------------------------------------
# The table


def _versus_chance(block: dict, chance: float | None) -> str:
    """'at' chance (no better than always answering the most common label), 'near' it (the 95%
    interval still reaches down to it: a test split this small cannot tell) or 'above' it."""
    if chance is None:
        return "above"
    if block["accuracy"] <= chance + 1e-9:
        return "at"
    return "near" if block["accuracy_ci95"][0] <= chance else "above"


def comment(run: Run, base: Run | None, chance: float | None) -> str:
    """The lab's one-line verdict on a row."""
    if run.is_baseline:
        predictor = (run.data.get("zero_shot") or {}).get("predictor")
        return "the baseline (reference)" + (f"; its zero-shot is the {predictor}" if predictor else "")
    parts = []
    zero, tuned = run.data.get("zero_shot"), run.data["fine_tuned"]
    words = {"at": "at chance level", "near": "not clearly above chance", "above": "above chance"}
    if zero:
        where = _versus_chance(zero, chance)
        if run.data.get("kind") == "bert" or run.name == "bert":  # the lab's words for a random head
            parts.append("head untrained: chance level" if where == "at" else f"head untrained, {words[where]}")
        else:
            parts.append(f"zero-shot {words[where]}")
    if one_label_warning(tuned, [str(k) for k in range(len(tuned.get("confusion") or []))]):
        parts.append("COLLAPSED: one label for every test text")
    where = _versus_chance(tuned, chance)
    if where != "above":
        parts.append(f"after training {words[where]}")
    if base is None:
        parts.append("no baseline run yet")
    else:
        diff = 100 * (tuned["accuracy"] - base.data["fine_tuned"]["accuracy"])
        b_lo, b_hi = base.data["fine_tuned"]["accuracy_ci95"]
        lo, hi = tuned["accuracy_ci95"]
        overlap = " (95% intervals overlap)" if lo <= b_hi and b_lo <= hi else ""
        if abs(diff) < 0.05:
            parts.append("ties the baseline" + overlap)
        elif diff > 0:
            parts.append(f"beats the baseline by {diff:.1f} points{overlap}")
        else:
            parts.append(f"{-diff:.1f} points below the baseline{overlap}")
    return "; ".join(parts)


def _memory(d: dict) -> str:
    text = f"{d['peak_rss_mb']:.0f} MB RSS" if isinstance(d.get("peak_rss_mb"), (int, float)) else "-"
    for key in ("peak_gpu_mb", "peak_cuda_mb", "peak_vram_mb"):
        if isinstance(d.get(key), (int, float)):
            text += f", {d[key]:.0f} MB GPU"
    return text


TABLE_HEADER = ["model", "zero-shot", "after fine-tuning", "change", "comment", "macro-F1", "95% interval",
                "vs baseline", "train time", "examples/s", "peak memory", "device", "precision"]


def table_rows(runs: list[Run], chance: float | None) -> list[list[str]]:
    base = next((r for r in runs if r.is_baseline), None)
    rows = []
    for run in runs:
        d = run.data
        zero, tuned = d.get("zero_shot"), d["fine_tuned"]
        lo, hi = tuned["accuracy_ci95"]
        vs_base = tuned["accuracy"] - base.data["fine_tuned"]["accuracy"] if base and not run.is_baseline else None
        eps = d.get("examples_per_second")
        rows.append([
            run.name,
            _pct(zero["accuracy"]) if zero else "-",
            _pct(tuned["accuracy"]),
            _points(tuned["accuracy"] - zero["accuracy"]) if zero else "-",
            comment(run, base, chance),
            f"{tuned['macro_f1']:.3f}",
            f"[{100 * lo:.1f}, {100 * hi:.1f}]%",
            _points(vs_base),
            _seconds(d.get("train_seconds")),
            f"{eps:.1f}" if isinstance(eps, (int, float)) else "-",
            _memory(d),
            str(d.get("device", "-")),
            str(d.get("dtype", "-")),
        ])
    return rows


DETAILS_HEADER = ["run", "model id", "steps", "epochs", "batch", "learning rate", "LoRA rank / alpha", "beta",
                  "loss", "max length", "parameters", "seed"]


def details_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        t = run.data.get("training") or {}
        get = lambda k: "-" if t.get(k) is None else str(t[k])  # noqa: E731
        batch = get("batch_size")
        if t.get("grad_accum", 1) not in (None, 1):
            batch += f" x {t['grad_accum']} accum"
        lora = "-" if t.get("lora_rank") is None else f"{t['lora_rank']} / {t.get('lora_alpha', '-')}"
        params = t.get("params")
        trainable = t.get("trainable_params")
        params_text = "-" if params is None else f"{params / 1e6:.1f}M"
        if trainable is not None:
            params_text += f" ({trainable / 1e6:.2f}M trained)"
        lr = t.get("lr")
        loss = run.objective if run.objective in ("sft", "head") else get("loss_type")  # they have no loss_type of their own
        rows.append([run.name, _cell(_short_model(str(run.data.get("model", "-")))), get("steps"), get("epochs"), batch,
                     "-" if lr is None else f"{lr:g}", lora, get("beta"), loss, get("max_length"),
                     params_text, str(run.data.get("seed", "-"))])
    return rows


# --------------------------------------------------------------------------------------------
# Pictures


def start_loss(run: Run, task: str) -> tuple[float, str] | None:
    """The loss of a model that knows nothing, and its name: ln k for a uniform guess among k
    labels (a classifier, the LLaMA's head); ln 2 for the sigmoid DPO loss, whose margin is 0 while
    the policy equals the reference; SimPO's -log sigmoid(-gamma) at equal rewards; none for SFT
    (it starts at the untrained model's own answer NLL)."""
    training = run.data.get("training") or {}
    if run.objective == "dpo":
        return (math.log(2), "policy = reference, ln 2") if training.get("loss_type") in (None, "sigmoid") else None
    if run.objective == "simpo":
        g = training.get("simpo_gamma", 0.5)
        return (math.log1p(math.exp(g)), f"equal rewards, -log sigmoid(-{g:g})")
    if run.objective == "sft":
        return None
    k = len(label_names(run, task))
    return (math.log(k), f"uniform guess, ln {k}") if k > 1 else None


def draw_pictures(task: str, runs: list[Run], out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Draw every picture whose inputs exist; return {file name: path} and notes on those skipped."""
    pictures: dict[str, Path] = {}
    notes: list[str] = []
    try:
        from . import plots
    except ImportError as e:
        return pictures, [f"pictures skipped: matplotlib is not installed ({e})"]

    def attempt(name: str, draw) -> None:
        try:
            pictures[name] = draw(out_dir / name)
        except Exception as e:  # one bad picture must not cost the whole report
            notes.append(f"`{name}` skipped: drawing failed ({type(e).__name__}: {e})")

    loss_names = {"dpo": "DPO loss", "simpo": "SimPO loss", "sft": "answer cross-entropy"}
    curves = [(f"{r.name}: {_short_model(str(r.data.get('model', '')))}", loss_names.get(r.objective, "cross-entropy loss"),
               r.log, start_loss(r, task)) for r in runs if any(x.get("kind") == "train" and "loss" in x for x in r.log)]
    if curves:
        attempt("training_curve.png", lambda p: plots.training_curves(curves, p))
    else:
        notes.append("`training_curve.png` skipped: no run has a metrics log with training loss yet "
                     f"(`make bert TASK={task}` writes one)")

    # the rewards of a reference-based DPO run (SimPO's are not log-ratios against a reference)
    dpo = next((r for r in runs if r.is_dpo and any("rewards/chosen" in x for x in r.log)), None)
    if dpo:
        beta = (dpo.data.get("training") or {}).get("beta")
        title = f"DPO implicit rewards ({dpo.name}" + (f", β = {beta})" if beta is not None else ")")
        attempt("dpo_rewards.png", lambda p: plots.dpo_rewards(dpo.log, p, title=title))
    else:
        notes.append(f"`dpo_rewards.png` skipped: no DPO run with reward metrics yet (`make llama TASK={task}` writes one)")

    base = next((r for r in runs if r.is_baseline), None)
    models = [(r.name, r.data.get("zero_shot"), r.data["fine_tuned"]) for r in runs if not r.is_baseline]
    if models:
        chance = majority_share(runs[0].data["fine_tuned"])
        attempt("eval_metrics.png", lambda p: plots.eval_metrics(
            models, p, baseline=base.data["fine_tuned"] if base else None, chance=chance,
            title=f"{task}: test accuracy, zero-shot vs fine-tuned"))
    else:
        notes.append(f"`eval_metrics.png` skipped: only the baseline has run (`make bert TASK={task}`)")

    for r in runs:
        cm = r.data["fine_tuned"].get("confusion")
        name = f"confusion_{r.name}.png"
        if cm:
            attempt(name, lambda p, r=r, cm=cm: plots.confusion(
                cm, label_names(r, task), p, title=f"{task}: {r.name} after {'training' if r.is_baseline else 'fine-tuning'} (test)"))
        else:
            notes.append(f"`{name}` skipped: {r.path} has no confusion matrix")
    # A picture left from an earlier report whose input is gone now would mislead: remove it.
    for stale in [out_dir / n for n in PICTURES] + list(out_dir.glob("confusion_*.png")):
        if stale.name not in pictures and stale.is_file():
            stale.unlink()
    return pictures, notes


# --------------------------------------------------------------------------------------------
# The page


def _judged(answer: str | None, true: str | None, task: str) -> str:
    """The answer, marked ✓ or ✗ when its first word is one of the task's answer words (or the
    whole answer a label name), so a reader sees at once which answers training fixed."""
    if answer is None:
        return "-"
    spec = get_task(task)
    if spec is None or true not in spec.label_names:
        return answer
    said = answer.strip().lower().strip(".,:;!?\"' ")
    first = said.split()[0].strip(".,:;!?\"'") if said.split() else ""
    right = spec.label_names.index(true)
    for i, (name, word) in enumerate(zip(spec.label_names, spec.answers)):
        if said == name.lower() or first == word.lower():
            return f"{answer} {'✓' if i == right else '✗'}"
    return answer


def examples_section(runs: list[Run], task: str, n: int) -> list[str]:
    out = ["## Examples", ""]
    llama = [r for r in runs if r.data.get("examples")]
    if llama:
        for r in llama:
            out += [f"### {r.name}: the answer before and after training", "",
                    markdown_table(["text", "true label", "before", "after"],
                                   [[_cell(e.get("text", ""), 160), _cell(e.get("true", "-")),
                                     _cell(_judged(e.get("before"), e.get("true"), task), 80),
                                     _cell(_judged(e.get("after"), e.get("true"), task), 80)]
                                    for e in r.data["examples"][:n]]), ""]
    else:
        out += [f"*No answers before/after training yet: `make llama TASK={task}` writes them.*", ""]
    for r in runs:
        wrong = r.data.get("wrong_examples", r.data.get("test_texts_wrong"))
        if wrong is None:
            continue
        out += [f"### Texts {r.name} got wrong", ""]
        if not wrong:
            out += ["*None: every test text was right.*", ""]
            continue
        out += [markdown_table(["text", "true label", "predicted"],
                               [[_cell(w.get("text", ""), 200), _cell(w.get("true", "-")),
                                 _cell(w.get("pred", w.get("predicted", "-")), 80)] for w in wrong[:n]]), ""]
    return out


SEED_HEADER = ["method", "seeds", "accuracy per seed", "accuracy mean ± std", "macro-F1 mean ± std",
               "train time (mean)", "peak memory (max)"]


def _config_words(command: str) -> list[str]:
    """A run's command line without what may differ between seeds of one method (seed, name, resume)."""
    words, out = (command or "").split(), []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w in ("--seed", "--name"):
            skip = True
        elif w not in ("--resume", "--no-progress"):
            out.append(w)
    return out


def _same_run(a: Run, b: Run) -> bool:
    """Whether two runs trained the same way, seed and name apart."""
    def settings(r: Run) -> dict:
        return {k: v for k, v in (r.data.get("training") or {}).items() if k != "best_step"}
    return (_config_words(a.data.get("command")) == _config_words(b.data.get("command"))
            and settings(a) == settings(b) and a.data.get("world_size") == b.data.get("world_size"))


def seed_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs named <method>-seed<k> (`make lab SEEDS=0,1,2`), grouped by method, seeds in order.

    A plain run named <method> joins its method's group as the seed it ran with, when no
    <method>-seed<k> run has that seed and it ran what the seed runs ran: the same command line apart
    from seed and name, the same resolved training settings (a preset may have moved since) and the
    same number of processes. So `make llama-sft` then `make llama-sft-seed1 llama-sft-seed2` is three
    seeds of one method."""
    import re

    groups: dict[str, list[tuple[int, Run]]] = {}
    for r in runs:
        m = re.fullmatch(r"(.+)-seed(\d+)", r.name)
        if m:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), r))
    for r in runs:
        group, seed = groups.get(r.name), r.data.get("seed")
        if group and isinstance(seed, int) and seed not in {s for s, _ in group} and _same_run(r, group[0][1]):
            group.append((seed, r))
    return {k: [r for _, r in sorted(v, key=lambda t: t[0])] for k, v in groups.items()}


def _seed_of(r: Run) -> str:
    return str(r.data.get("seed", r.name.rsplit("seed", 1)[-1]))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def seeds_section(runs: list[Run]) -> list[str]:
    """Mean ± std over seeds per method, beside each seed's accuracy, and which methods the seeds
    and the test split can tell apart. Two methods are called distinguishable only when their mean
    accuracies differ by more than twice the standard error of that difference over seeds AND by
    more than the half-width of one run's 95% Wilson interval (the test set is a sample too)."""
    groups = seed_groups(runs)
    if not groups:
        return []
    rows, stats = [], {}
    for method, rs in groups.items():
        acc = [r.data["fine_tuned"]["accuracy"] for r in rs]
        f1 = [r.data["fine_tuned"]["macro_f1"] for r in rs]
        (ma, sa), (mf, sf) = mean_std(acc), mean_std(f1)
        lo, hi = rs[0].data["fine_tuned"]["accuracy_ci95"]
        stats[method] = (ma, sa, len(rs), (hi - lo) / 2)
        secs = [r.data.get("train_seconds") or 0.0 for r in rs]
        rows.append([method, ", ".join(_seed_of(r) for r in rs), ", ".join(_pct(a) for a in acc),
                     f"{_pct(ma)} ± {100 * sa:.1f}", f"{mf:.3f} ± {sf:.3f}", _seconds(sum(secs) / len(secs)),
                     _memory({"peak_rss_mb": max(r.data.get("peak_rss_mb") or 0.0 for r in rs)})])
    lines = ["## Over seeds", "",
             "Each method once per seed (`make lab SEEDS=...`); standard deviations are over seeds (n - 1).", "",
             markdown_table(SEED_HEADER, rows), ""]
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (ma, sa, na, ha), (mb, sb, nb, hb) = stats[a], stats[b]
            diff, se = ma - mb, math.sqrt(sa ** 2 / na + sb ** 2 / nb)
            told = abs(diff) > 2 * se and abs(diff) > max(ha, hb)
            verdict = "distinguishable" if told else "not distinguishable"
            lines.append(f"- {a} vs {b}: {100 * diff:+.1f} points (2 standard errors over seeds: {200 * se:.1f}; "
                         f"one run's 95% interval: ±{100 * max(ha, hb):.1f}): **{verdict}**")
    return lines + [""]


def build_report(task: str, root: str | Path = "results", examples: int = 5) -> tuple[str, str, dict[str, Path], list[str]]:
    """(Markdown page, printed table, pictures, notes) for one task; also draws the pictures."""
    runs = load_runs(task, root)
    out_dir = Path(root) / task
    chance = majority_share(runs[0].data["fine_tuned"])
    table = markdown_table(TABLE_HEADER, table_rows(runs, chance))
    pictures, notes = draw_pictures(task, runs, out_dir)

    first = runs[0].data
    sizes = first.get("split_sizes", {})
    tests = {r.name: r.data.get("split_sizes", {}).get("test") for r in runs}
    lines = [f"# minilab report: {task}", "",
             f"Built from the results files in `{out_dir}` by `python -m minilab.report --task {task}`.",
             f"Splits: {', '.join(f'{k} {v}' for k, v in sizes.items())}; labels: {', '.join(label_names(runs[0], task))}.",
             ""]
    for r in runs:
        collapsed = one_label_warning(r.data["fine_tuned"], label_names(r, task))
        if collapsed:
            lines += [f"**Warning:** {r.name}: {collapsed}.", ""]
    if len(set(tests.values())) > 1:
        lines += [f"**Warning:** the runs were tested on different splits ({tests}); their rows are not comparable.", ""]
    lines += ["## Results", "",
              "Test accuracy before (zero-shot) and after fine-tuning; macro-F1, the 95% Wilson interval and "
              "the difference from the baseline are for the fine-tuned model."
              + (f" Chance level: {_pct(chance)} (always the most common label)." if chance is not None else ""), "",
              table, "",
              *seeds_section(runs),
              "## Training details", "",
              markdown_table(DETAILS_HEADER, details_rows(runs)), "",
              "Commands:", "", "```", *[f"{r.name}: {r.data.get('command', '-')}" for r in runs], "```", "",
              "## Pictures", ""]
    captions = {"training_curve.png": "Training loss (left axis) and dev accuracy (right axis) against step",
                "dpo_rewards.png": "DPO implicit rewards of the chosen and rejected answers, and their margin",
                "eval_metrics.png": "Test accuracy with 95% intervals; the dashed line is the baseline"}
    for name, path in pictures.items():
        caption = captions.get(name, f"Confusion matrix of {name[len('confusion_'):-4]} on test (counts)")
        lines += [f"**{caption}.**", "", f"![{caption}]({path.name})", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += examples_section(runs, task, examples)
    return "\n".join(lines).rstrip() + "\n", table, pictures, notes


def log_to_wandb(task: str, root: str | Path, pictures: dict[str, Path]) -> str:
    """Log the pictures to one W&B run (offline unless logged in; WANDB_MODE wins)."""
    from .tracking import Tracker

    tracker = Tracker(Path(root) / task / "report_metrics.jsonl", run_name=f"report-{task}", group=task,
                      config={"task": task, "pictures": sorted(pictures)})
    try:
        tracker.log_images({f"report/{Path(name).stem}": path for name, path in pictures.items()})
        return (f"W&B: logged {len(pictures)} pictures (mode {tracker.mode})" if tracker.run is not None
                else f"W&B: not logged (mode {tracker.mode}, or wandb not installed)")
    finally:
        tracker.finish()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write results/<task>/REPORT.md with its pictures and print the table")
    p.add_argument("--task", default="steam")
    p.add_argument("--results", default="results", help="the folder holding <task>/<name>.json")
    p.add_argument("--examples", type=int, default=5, help="example texts shown per table")
    p.add_argument("--wandb", action="store_true", help="also log the pictures to one Weights & Biases run")
    args = p.parse_args(argv)
    try:
        text, table, pictures, notes = build_report(args.task, args.results, args.examples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.results) / args.task / "REPORT.md"
    atomic_write(path, text)  # a kill mid-write leaves the previous report whole
    print(table)
    seeds = seeds_section(load_runs(args.task, args.results))
    if seeds:
        print("\n".join(seeds))
    for n in notes:
        print(f"note: {n.replace('`', '')}")
    print(f"report written to {path} with {len(pictures)} pictures")
    if args.wandb:
        print(log_to_wandb(args.task, args.results, pictures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

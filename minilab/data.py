"""Loading a labelled text-classification dataset, from a local folder or the Hugging Face Hub.

Every script reads data the same way: `--data` names a folder holding split files (`train`, `dev`
or `validation`, `test`, each `.csv`, `.tsv`, `.jsonl` or `.parquet`) or a Hub dataset id, whose
split files are downloaded with huggingface_hub. The result is a `TaskData`: three splits of
(text, integer label) plus the label names. Everything that can be wrong with the input is checked
here, once, and reported as one `DataError` line that says how to fix it, so that a training run
never dies an hour in on a typo.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import DEFAULT_TASK, TaskSpec, TaskSpecError, get_task, read_task_file, split_list

EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}


class DataError(ValueError):
    """The dataset is missing or malformed; the message says what to do."""


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    task: str
    source: str  # the folder or Hub id it came from
    label_names: list[str]
    train: Split
    dev: Split
    test: Split
    spec: TaskSpec  # the resolved task spec (registry, task file and flags; label names filled in)
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. a carved dev split)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def metric(self) -> str:
        """The dev metric that picks the best checkpoint: the spec's, else macro-F1 when train is imbalanced."""
        return self.spec.metric or ("macro_f1" if is_imbalanced(self.train.labels, self.num_labels) else "accuracy")

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


# --------------------------------------------------------------------------------------------
# Finding the split files


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # beside the repository, as in the Makefile


def data_root() -> Path | None:
    """The folder holding one data folder per task: $MINILAB_DATA, else shared/data beside the
    repository; None when it does not exist. The scripts, the benchmarks and the tests all use it."""
    root = Path(os.environ.get("MINILAB_DATA") or SHARED_DATA).expanduser()
    return root if root.is_dir() else None


def default_data(task: str | TaskSpec, hub: bool = True) -> str | None:
    """Where `--data` points when it is not given: <data_root()>/<task>, else the task's Hub id
    (with `hub=False`, as the benchmarks want: None instead of the Hub id or the error)."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    task = task.name if isinstance(task, TaskSpec) else task
    root = data_root()
    if root and (root / task).is_dir():
        return str(root / task)
    if not hub:
        return None
    if spec and spec.hub_id:
        return spec.hub_id
    raise DataError(f"no data for task {task!r}: pass --data DIR (a folder with train/dev/test files) or set MINILAB_DATA")


def _split_of(filename: str) -> str | None:
    stem = filename.lower()
    for ext in EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    else:
        return None
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)  # sharded parquet: train-00000-of-00001
    for split, names in SPLIT_NAMES.items():
        if stem in names:
            return split
    return None


def find_split_files(names: list[str]) -> dict[str, list[str]]:
    """Group file paths (relative names) by split; files that are not a split are ignored."""
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        split = _split_of(Path(name).name)
        if split:
            found.setdefault(split, []).append(name)
    return found


def _hub_split_files(repo_id: str, config: str | None) -> tuple[Path, dict[str, list[str]]]:
    """List a Hub dataset repository, pick its split files, and download them."""
    from .hub import HubError, hub_snapshot

    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    except Exception as e:  # offline, unknown or gated: turn it into one line
        kind = type(e).__name__
        if "NotFound" in kind:
            raise HubError(f"Hub dataset {repo_id!r} does not exist: check the id, or pass --data DIR with a local folder") from e
        if "Gated" in kind:
            raise HubError(f"Hub dataset {repo_id!r} is gated: accept its terms on the Hub and run `huggingface-cli login`, or pass --data DIR") from e
        raise HubError(f"cannot reach the Hugging Face Hub to list dataset {repo_id!r} ({kind}): pass --data DIR with a local folder") from e
    if config:
        files = [f for f in files if f.split("/")[0] == config or f"/{config}/" in f"/{f}"]
    by_split = find_split_files(files)
    if "train" not in by_split:
        raise HubError(f"Hub dataset {repo_id!r} has no train split file ({', '.join(EXTENSIONS)}); pass --data DIR")
    wanted = [f for fs in by_split.values() for f in fs]
    root = Path(hub_snapshot(repo_id, repo_type="dataset", allow_patterns=wanted))
    return root, by_split


# --------------------------------------------------------------------------------------------
# Reading one file into rows


def read_rows(path: Path) -> list[dict]:
    """Rows of a .csv/.tsv/.jsonl/.parquet file as dicts (column name -> value)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            # utf-8-sig: a byte-order mark (Excel writes one) would otherwise stick to the first column's name
            with open(path, newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise DataError(f"{path} is a parquet file and pyarrow is not installed: pip install pyarrow") from e
            return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a valid {suffix[1:]} file ({e}): fix or replace it") from e
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")


def _as_label(value, path: Path, row: int):
    """A label is an integer (int, integral float, bool, or a string of digits) or a name (any other
    non-empty string); anything else (empty, 0.5, a list) cannot be a class."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        v = value.strip()
        return int(v) if re.fullmatch(r"[-+]?\d+", v) else v
    raise DataError(f"{path}, row {row + 2}: label {value!r} is not a class (an integer or a name); fix or remove the row")


def _read_split(paths: list[Path], text_col: str, label_col: str):
    texts, labels, names = [], [], {}
    for path in paths:
        rows = read_rows(path)
        if not rows:
            raise DataError(f"{path} has no rows")
        columns = list(rows[0].keys())
        for col, flag in ((text_col, "--text-col"), (label_col, "--label-col")):
            if col not in columns:
                raise DataError(f"{path} has no column {col!r} (columns: {', '.join(columns)}); pass {flag} NAME")
        for i, row in enumerate(rows):
            text = row.get(text_col)
            if text is None or not str(text).strip():
                raise DataError(f"{path}, row {i + 2}: empty text in column {text_col!r}; remove the row or fill it in")
            label = _as_label(row.get(label_col), path, i)
            texts.append(str(text))
            labels.append(label)
            if "label_text" in row and isinstance(label, int) and row["label_text"] not in (None, ""):
                names[label] = str(row["label_text"])
    return texts, labels, names


# --------------------------------------------------------------------------------------------
# Labels: values -> ids 0..K-1, with names


def is_imbalanced(labels: list[int], num_labels: int, ratio: float = 1.5) -> bool:
    """True when the most common train label is at least `ratio` times as frequent as the rarest
    one: accuracy then rewards answering the majority, so the best checkpoint is picked by macro-F1."""
    counts = [labels.count(k) for k in range(num_labels)]
    return min(counts) == 0 or max(counts) >= ratio * min(counts)


def map_labels(values: list, names: tuple[str, ...] | None, label_text: dict, where: str) -> tuple[list[str], dict]:
    """(label names, value -> id) for the train split's label values.

    * Integer values: the distinct values, sorted, become ids 0..K-1, named by the given names in that
      order, else by a `label_text` column, else by their own numbers (1/2 -> two classes "1" and "2").
      With more names than values, values 0..K-1 index the names directly (a small train split may
      lack a class; it is noted).
    * String values: the names themselves when every value is one of the given names (in the names'
      order); else the distinct values, sorted, renamed by the given names in that order.
    * A mix of integers and strings, or fewer than two classes, is an error.
    """
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        ints = sorted({v for v in values if isinstance(v, int)})[:3]
        strs = sorted({v for v in values if isinstance(v, str)})[:3]
        raise DataError(f"{where}: labels mix numbers ({', '.join(map(str, ints))}, ...) and names ({', '.join(strs)}, ...): "
                        "use one kind for every row")
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise DataError(f"{where}: train has only one class ({', '.join(map(str, distinct))}); a classifier needs at least two: "
                        "check --label-col and the file")
    if kinds == {int}:
        if names and len(names) != len(distinct) and all(0 <= v < len(names) for v in distinct):
            return list(names), {i: i for i in range(len(names))}  # ids index the names; some classes absent here
        if names and len(names) != len(distinct):
            raise DataError(f"{where}: {len(names)} label names ({', '.join(names)}) for {len(distinct)} label values "
                            f"({', '.join(map(str, distinct))}): give one name per value, in sorted order")
        label_names = list(names) if names else [label_text.get(v, str(v)) for v in distinct]
        return label_names, {v: i for i, v in enumerate(distinct)}
    if names and all(v in names for v in distinct):
        return list(names), {n: i for i, n in enumerate(names)}
    if names and len(names) != len(distinct):
        raise DataError(f"{where}: label(s) {', '.join(v for v in distinct if v not in names)} not among the label names "
                        f"({', '.join(names)}): give one name per value, in sorted order ({', '.join(distinct)})")
    if names:  # as many names as values: they rename the sorted values ("False", "True" -> "no", "yes")
        return list(names), {v: i for i, v in enumerate(distinct)}
    return list(distinct), {v: i for i, v in enumerate(distinct)}


# --------------------------------------------------------------------------------------------
# The public entry point


def resolve_spec(task: str | None = None, data: str | None = None, task_file: str | None = None, **overrides) -> TaskSpec:
    """The task spec a run uses: a task file, else the registry entry for `task`, else a bare spec named
    after the data folder; then every non-None override (text_col, label_names, answers, question, metric)."""
    try:
        if task_file:
            spec = read_task_file(task_file)
            if task and task != spec.name:
                spec = spec.with_overrides(name=task)
        else:
            if task is None:
                task = Path(data).name if data and Path(data).expanduser().is_dir() else DEFAULT_TASK
            spec = get_task(task) or TaskSpec(name=task)
        return spec.with_overrides(**overrides)
    except TaskSpecError as e:
        raise DataError(str(e)) from e


def load_task(
    data: str | None = None,
    task: str | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    seed: int = 0,
    dev_fraction: float = 0.1,
    spec: TaskSpec | None = None,
) -> TaskData:
    """Load a dataset: `data` is a folder or a Hub dataset id; `spec` the task spec (default: the
    registry entry for `task`, itself defaulting to the folder's name, else "steam")."""
    if spec is None:
        spec = resolve_spec(task, data, text_col=text_col, label_col=label_col)
    task = spec.name
    if data is None:
        data = default_data(spec)
    text_col, label_col = spec.text_col, spec.label_col

    path = Path(data).expanduser()
    if path.is_dir():
        root = path
        by_split = find_split_files([str(p.relative_to(root)) for p in root.iterdir() if p.is_file()])
        if "train" not in by_split:
            raise DataError(
                f"{root} has no train file: expected train{{{','.join(EXTENSIONS)}}} (plus dev/validation and test)"
            )
    elif path.exists():
        raise DataError(f"--data {data} is a file: pass the folder that holds the train/dev/test files")
    elif data.startswith((".", "/", "~")) or data.count("/") > 1:
        raise DataError(f"data folder {data} does not exist: check the path (or pass a Hub dataset id)")
    else:
        root, by_split = _hub_split_files(data, spec.hub_config)

    notes: list[str] = []
    splits, label_text = {}, {}
    for split in ("train", "dev", "test"):
        if split in by_split:
            texts, labels, names = _read_split([root / f for f in by_split[split]], text_col, label_col)
            splits[split] = (texts, labels)
            label_text.update(names)
    if "test" not in splits:
        raise DataError(f"{data} has no test split file (test{{{','.join(EXTENSIONS)}}}): add one")

    train_labels = splits["train"][1]
    label_names, to_id = map_labels(train_labels, spec.label_names, label_text, where=f"train split of {data}")
    for split, (texts, labels) in splits.items():
        unseen = sorted({str(y) for y in labels if y not in to_id})
        if unseen:
            raise DataError(
                f"{split} split of {data} has label(s) {', '.join(unseen)} never seen in train "
                f"(train labels: {', '.join(sorted(map(str, set(train_labels))))}); fix the labels or the split"
            )
    result = {s: Split(t, [to_id[y] for y in l]) for s, (t, l) in splits.items()}
    if not spec.label_names and all(n.lstrip("+-").isdigit() for n in label_names):
        notes.append(f"the labels are bare numbers ({', '.join(label_names)}): name them with --label-names "
                     f"{','.join(f'NAME_{n}' for n in label_names)} (in this order), and for the LLaMA say what they mean "
                     "with --question and --answers")
    renamed = {str(v): label_names[i] for v, i in to_id.items() if str(v) != label_names[i]}
    if renamed:
        notes.append("label values named: " + ", ".join(f"{v} = {n!r}" for v, n in renamed.items()))
    absent = [label_names[k] for k in range(len(label_names)) if k not in result["train"].labels]
    if absent:
        notes.append(f"label(s) {', '.join(absent)} have no train examples: the model cannot learn them")
    spec = spec.with_overrides(label_names=tuple(label_names))

    if "dev" not in result:
        rng = random.Random(seed)
        order = list(range(len(result["train"])))
        rng.shuffle(order)
        n_dev = max(1, int(round(dev_fraction * len(order))))
        tr = result["train"]
        result["dev"] = Split([tr.texts[i] for i in order[:n_dev]], [tr.labels[i] for i in order[:n_dev]])
        result["train"] = Split([tr.texts[i] for i in order[n_dev:]], [tr.labels[i] for i in order[n_dev:]])
        notes.append(f"no dev split in {data}: carved {n_dev} examples ({dev_fraction:.0%}) from train with seed {seed}")

    return TaskData(task=task, source=str(data), label_names=label_names, spec=spec, notes=notes, **result)


def add_data_args(parser) -> None:
    """The data and task-spec options every script shares (see minilab/tasks.py for the fields)."""
    parser.add_argument("--data", default=None, help="a folder of train/dev/test files or a Hub dataset id (default: $MINILAB_DATA/<task>, else ../shared/data/<task>, else the task's Hub id)")
    parser.add_argument("--task", default=None, help="task registry name (steam, sst2, emotion) or a new name; default: the data folder's name, else steam")
    parser.add_argument("--task-file", default=None, help="a TOML or JSON task spec (columns, label names, answers, question, metric)")
    parser.add_argument("--text-col", default=None, help="the column holding the text (default from the task, else 'text')")
    parser.add_argument("--label-col", default=None, help="the column holding the label (default from the task, else 'label')")
    parser.add_argument("--label-names", default=None, help="comma-separated names of the labels, in the sorted order of their values")
    parser.add_argument("--answers", default=None, help="comma-separated short answers the LLaMA should say, one per label")
    parser.add_argument("--question", default=None, help="the question the LLaMA is asked about each text")
    parser.add_argument("--metric", choices=["accuracy", "macro_f1"], default=None,
                        help="dev metric that picks the best checkpoint (default: the task's; else macro_f1 when train is imbalanced)")


def spec_from_args(args) -> TaskSpec:
    return resolve_spec(args.task, args.data, args.task_file, text_col=args.text_col, label_col=args.label_col,
                        label_names=split_list(args.label_names), answers=split_list(args.answers),
                        question=args.question, metric=args.metric)


def load_task_from_args(args) -> TaskData:
    data = load_task(args.data, seed=getattr(args, "seed", 0), spec=spec_from_args(args))
    for note in data.notes:
        print(f"note: {note}")
    return data

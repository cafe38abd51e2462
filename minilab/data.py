"""Loading a labelled text-classification dataset, from a local folder or the Hugging Face Hub.

Every script reads data the same way: `--data` names a folder holding split files (`train`, `dev`
or `validation`, `test`, each `.csv`, `.tsv`, `.jsonl` or `.parquet`) or a Hub dataset id, whose
split files are downloaded with huggingface_hub. The result is a `TaskData`: three splits of
(text, integer label) plus the label names. Everything that can be wrong with the input is checked
here, once, and reported as one `DataError` line that names the file and line (parquet: row) and says
how to fix it, so that a training run never dies an hour in on a typo, nor trains on rows read wrong
(see `read_table` for the rules, `locate_data` for how `--data` is read, `map_labels` for labels).
"""

from __future__ import annotations

import csv
import difflib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .datafiles import EXTENSIONS, DataError, Table, read_rows, read_table  # noqa: F401 (re-exported)
from .tasks import DEFAULT_TASK, TaskSpec, TaskSpecError, get_task, read_task_file, split_list

SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}


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


SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})(?P<ext>\.[^.]+)", re.IGNORECASE)


def check_split_files(by_split: dict[str, list[str]], where: str, hint: str = "") -> None:
    """One file per split, or every shard of one sharded file (train-00000-of-00002.parquet and
    train-00001-of-00002.parquet); two files for one split (train.csv and train.jsonl, dev.csv and
    validation.csv) would be read as one split twice over, so they are refused."""
    for split, files in by_split.items():
        shards = [SHARD.fullmatch(Path(f).name) for f in files]
        series = {(str(Path(f).parent), m["stem"].lower(), m["ext"].lower(), m["total"]) if m else None
                  for f, m in zip(files, shards)}
        if len(series) == 1 and None not in series:  # shards of one file: all of them?
            total = int(shards[0]["total"])
            have = {int(m["index"]) for m in shards}
            missing, extra = sorted(set(range(total)) - have), sorted(have - set(range(total)))
            if missing or extra:
                what = (f"shard(s) {', '.join(f'{i:05d}' for i in missing)} missing" if missing
                        else f"shard(s) {', '.join(f'{i:05d}' for i in extra)} beyond -of-{total:05d}")
                raise DataError(f"{where}: the {split} split is sharded into {total} file(s) ({', '.join(files)}) with "
                                f"{what}: add or remove shards so that all {total} are there")
            continue
        if len(files) > 1:
            raise DataError(f"{where} holds {len(files)} files for the {split} split ({' and '.join(files)}): keep one, "
                            f"or rename the others (e.g. {files[-1]}.bak){hint}")


def _hub_split_files(repo_id: str, config: str | None) -> tuple[Path, dict[str, list[str]], list[str]]:
    """List a Hub dataset repository, pick its split files, and download them. Without a connection
    (HF_HUB_OFFLINE, or no answer from the Hub within seconds) a cached copy is used, else one line."""
    from .hub import HubError, cached_snapshot, hub_snapshot, hub_unreachable, quiet_hub

    notes: list[str] = []
    root: Path | None = None
    why = hub_unreachable()
    if why:
        root = cached_snapshot(repo_id, repo_type="dataset")
        if root is None:
            raise HubError(f"cannot reach the Hugging Face Hub to list dataset {repo_id!r} ({why}) and it is not in the "
                           "local cache: connect to the internet, or pass --data DIR with a local folder")
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        notes.append(f"the Hub is not reachable ({why}): using the cached copy of {repo_id} in {root}")
    else:
        try:
            from huggingface_hub import HfApi

            with quiet_hub():  # its retry warnings would only precede the one line below
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
    check_split_files(by_split, f"Hub dataset {repo_id!r}", hint="; or pick one folder of it with hub_config in a task file")
    if root is None:
        wanted = [f for fs in by_split.values() for f in fs]
        root = Path(hub_snapshot(repo_id, repo_type="dataset", allow_patterns=wanted))
    return root, by_split, notes


HUB_PREFIX = "hf://datasets/"


def _no_folder(data: str, why: str = "") -> DataError:
    """"data folder X does not exist", with the nearest folder names beside it (or in the data root)."""
    path = Path(data).expanduser()
    places = [path.parent] + ([data_root()] if path.parent == Path(".") and data_root() else [])
    near = []
    for place in places:
        if place.is_dir():
            names = [p.name for p in place.iterdir() if p.is_dir() and not p.name.startswith(".")]
            near += [str(place / n) if place != Path(".") else n for n in difflib.get_close_matches(path.name, names, n=2)]
    guess = f" (did you mean {' or '.join(near)}?)" if near else ""
    return DataError(f"data folder {data} does not exist{guess}{why}: check the path; a Hub dataset id is OWNER/NAME "
                     f"(or {HUB_PREFIX}OWNER/NAME)")


def locate_data(data: str, typed: bool = True) -> tuple[str, str]:
    """("folder", path) or ("hub", repo id) for a `--data` value, read by these rules:

    * an existing folder is a local dataset; an existing file is an error (pass its folder);
    * `hf://datasets/OWNER/NAME` is that Hub dataset, always;
    * a path that does not exist is "data folder ... does not exist" (with the nearest folder names):
      anything starting with `.`, `/` or `~`, holding a backslash or more than one `/`, ending in `/`,
      or a bare name without a `/` (Hub dataset ids are OWNER/NAME);
    * `OWNER/NAME` where OWNER is a local folder is the same error: most likely a mistyped sub-folder
      (`data/stema`); for the Hub dataset, write hf://datasets/OWNER/NAME;
    * any other `OWNER/NAME` is a Hub dataset id.

    With `typed=False` (the task's own Hub id, when --data is not given) an OWNER/NAME is the Hub's."""
    if data.startswith(HUB_PREFIX):
        return "hub", data[len(HUB_PREFIX):]
    path = Path(data).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.exists():
        raise DataError(f"--data {data} is a file: pass the folder that holds the train/dev/test files")
    if not typed:
        return "hub", data
    parts = data.split("/")
    if data.startswith((".", "/", "~")) or "\\" in data or len(parts) != 2 or not all(parts):
        raise _no_folder(data)
    if Path(parts[0]).expanduser().is_dir():
        raise _no_folder(data, f"; its parent {parts[0]}/ does, so it is not read as a Hub id (for the Hub dataset, "
                               f"pass {HUB_PREFIX}{data})")
    return "hub", data


def _as_label(value, where: str):
    """A label is an integer (int, integral float, bool, or a string of digits) or a name (any other
    non-empty string); anything else (empty, 0.5, a list) cannot be a class."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        v = value.strip()
        return int(v) if re.fullmatch(r"[-+]?\d+", v) else v
    raise DataError(f"{where}: label {value!r} is not a class (an integer or a name); fix or remove the row")


def _merged_rows_note(table: Table, label_col: str, labels: set[str]) -> list[str]:
    """A note when a quoted text over several lines holds a line that reads as a whole row (its field in
    the label column a known label): the mark of a quote left open that was closed, much later, by a
    stray one, swallowing the rows between. A legitimate text can look like that, so it is a note."""
    if not table.spans:
        return []
    delimiter = "\t" if table.path.suffix.lower() == ".tsv" else ","
    k = table.columns.index(label_col)
    hits = []
    for i, (first, last) in table.spans.items():
        row = table.rows[i]
        for c, col in enumerate(table.columns):
            pieces = re.split(r"\r\n|\r|\n", row[col])
            for j, piece in enumerate(pieces[:-1]):
                fields = [row[x] for x in table.columns[:c]] if j == 0 else []
                fields += next(csv.reader([piece], delimiter=delimiter), [])
                if len(fields) == len(table.columns) and fields[k].strip() in labels:
                    hits.append((first, last, piece))
                    break
            if hits and hits[-1][:2] == (first, last):
                break
    if not hits:
        return []
    first, last, piece = hits[0]
    more = f" (and {len(hits) - 1} more such text(s))" if len(hits) > 1 else ""
    return [f"{table.path}, lines {first}-{last}: one quoted text holds a line that reads as a whole row ({piece[:60]!r}){more}: "
            f"if a quote is left open on line {first}, the rows up to line {last} were merged into one text; close it"]


def _read_split(paths: list[Path], text_col: str, label_col: str):
    """(texts, label values, label_text names, where each row sits, notes) for one split's files."""
    texts, labels, names, where, notes = [], [], {}, [], []
    for path in paths:
        table = read_table(path)
        if not table.rows:
            raise DataError(f"{path} has no rows")
        for col, flag in ((text_col, "--text-col"), (label_col, "--label-col")):
            if col not in table.columns:
                raise DataError(f"{path} has no column {col!r} (columns: {', '.join(table.columns)}); pass {flag} NAME")
        first = len(labels)
        for row, at in zip(table.rows, table.where):
            here = f"{path}, {at}"
            for col in (text_col, label_col):
                if col not in row:  # a JSONL line without the key
                    raise DataError(f"{here}: no {col!r} key (this row has: {', '.join(row)}); every row needs "
                                    f"{text_col!r} and {label_col!r}")
            text = row[text_col]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{here}: the text in column {text_col!r} is {type(text).__name__} {text!r:.40}, not a "
                                "string: check --text-col, or fix the row")
            if text is None or not text.strip():
                raise DataError(f"{here}: empty text in column {text_col!r}; remove the row or fill it in")
            label = _as_label(row[label_col], here)
            texts.append(text)
            labels.append(label)
            where.append(here)
            if "label_text" in row and isinstance(label, int) and row["label_text"] not in (None, ""):
                names[label] = str(row["label_text"])
        notes += _merged_rows_note(table, label_col, {str(v) for v in labels[first:]})
    return texts, labels, names, where, notes


# --------------------------------------------------------------------------------------------
# Labels: values -> ids 0..K-1, with names


def is_imbalanced(labels: list[int], num_labels: int, ratio: float = 1.5) -> bool:
    """True when the most common train label is at least `ratio` times as frequent as the rarest
    one: accuracy then rewards answering the majority, so the best checkpoint is picked by macro-F1."""
    counts = [labels.count(k) for k in range(num_labels)]
    return min(counts) == 0 or max(counts) >= ratio * min(counts)


def map_labels(values: list, names: tuple[str, ...] | None, label_text: dict, where: str,
               absent: tuple[str, ...] | None = None, rows_at: list[str] | None = None) -> tuple[list[str], dict]:
    """(label names, value -> id) for the train split's label values.

    * Integer values: the distinct values, sorted, become ids 0..K-1, named by the given names in that
      order, else by a `label_text` column, else by their own numbers (1/2 -> two classes "1" and "2").
    * String values: the names themselves when every value is one of the given names (in the names'
      order); else the distinct values, sorted, renamed by the given names in that order.
    * More names than train classes (integer values 0..N-1 indexing N names, or string values among
      the names) is an error, since the extra names would be classes that never occur and macro-F1
      would average over them, unless each name without train examples is declared in `absent`
      (`--absent-labels` / a task file's `absent_labels`): a class that exists but this train split lacks.
    * A mix of integers and strings, or fewer than two classes, is an error (`rows_at`, where each value
      sits, names the first row of the rarer kind).
    """
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        ints = sorted({v for v in values if isinstance(v, int)})[:3]
        strs = sorted({v for v in values if isinstance(v, str)})[:3]
        rare = int if sum(isinstance(v, int) for v in values) * 2 < len(values) else str
        first = f" (the first {'number' if rare is int else 'name'} at {rows_at[[type(v) for v in values].index(rare)]})" if rows_at else ""
        raise DataError(f"{where}: labels mix numbers ({', '.join(map(str, ints))}, ...) and names ({', '.join(strs)}, ...)"
                        f"{first}: use one kind for every row")
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise DataError(f"{where}: train has only one class ({', '.join(map(str, distinct))}); a classifier needs at least two: "
                        "check --label-col and the file")

    def names_indexed(present: set[int]) -> None:
        """More names than train classes: fine only for the declared absent ones."""
        missing = [n for k, n in enumerate(names) if k not in present]
        undeclared = [n for n in missing if n not in (absent or ())]
        if undeclared:
            raise DataError(
                f"{where}: {len(names)} label names ({', '.join(names)}) but train has {len(distinct)} classes "
                f"({', '.join(map(str, distinct))}): {', '.join(undeclared)} would be class(es) with no train example that "
                f"macro-F1 averages over; give one name per train class (--label-names or --task), or, if the class exists "
                f"and this train split lacks it, declare it: --absent-labels {','.join(undeclared)} "
                f"(absent_labels in a task file)")

    if kinds == {int}:
        if names and len(names) > len(distinct) and all(0 <= v < len(names) for v in distinct):
            names_indexed(set(distinct))
            return list(names), {i: i for i in range(len(names))}  # ids index the names; the absent ones declared
        if names and len(names) != len(distinct):
            raise DataError(f"{where}: {len(names)} label names ({', '.join(names)}) for {len(distinct)} label values "
                            f"({', '.join(map(str, distinct))}): give one name per value, in sorted order")
        label_names = list(names) if names else [label_text.get(v, str(v)) for v in distinct]
        return label_names, {v: i for i, v in enumerate(distinct)}
    if names and all(v in names for v in distinct):
        names_indexed({names.index(v) for v in distinct})
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
    after the data folder; then every non-None override (text_col, label_names, absent_labels, answers, question, metric)."""
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


def _label_notes(spec: TaskSpec, label_names: list[str], to_id: dict, train_ids: list[int]) -> list[str]:
    """What the user should know about the labels: bare numbers, renamed values, declared-absent classes."""
    notes: list[str] = []
    if not spec.label_names and all(n.lstrip("+-").isdigit() for n in label_names):
        notes.append(f"the labels are bare numbers ({', '.join(label_names)}): name them with --label-names "
                     f"{','.join(f'NAME_{n}' for n in label_names)} (in this order), and for the LLaMA say what they mean "
                     "with --question and --answers")
    renamed = {str(v): label_names[i] for v, i in to_id.items() if str(v) != label_names[i]}
    if renamed:
        notes.append("label values named: " + ", ".join(f"{v} = {n!r}" for v, n in renamed.items()))
    absent = [label_names[k] for k in range(len(label_names)) if k not in train_ids]
    if absent:
        notes.append(f"label(s) {', '.join(absent)} have no train examples (declared absent): the model cannot learn them, "
                     "and macro-F1 counts them")
    present = [n for n in spec.absent_labels or () if n in label_names and n not in absent]
    if present:
        notes.append(f"label(s) {', '.join(present)} are declared absent but train has examples of them: drop them from "
                     "--absent-labels / absent_labels")
    return notes


def _carve_dev(result: dict, seed: int, dev_fraction: float, data: str) -> str:
    """No dev split: carve `dev_fraction` of train (seeded) into one; returns the note saying so."""
    rng = random.Random(seed)
    order = list(range(len(result["train"])))
    rng.shuffle(order)
    n_dev = max(1, int(round(dev_fraction * len(order))))
    tr = result["train"]
    result["dev"] = Split([tr.texts[i] for i in order[:n_dev]], [tr.labels[i] for i in order[:n_dev]])
    result["train"] = Split([tr.texts[i] for i in order[n_dev:]], [tr.labels[i] for i in order[n_dev:]])
    return f"no dev split in {data}: carved {n_dev} examples ({dev_fraction:.0%}) from train with seed {seed}"


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
    typed = data is not None  # the user's own --data (not the task's Hub id): mistyped folders are caught
    if data is None:
        data = default_data(spec)
    text_col, label_col = spec.text_col, spec.label_col

    root, by_split, where, notes = _split_files(data, spec, typed)
    splits, label_text, rows_at = {}, {}, {}
    for split in ("train", "dev", "test"):
        if split in by_split:
            texts, labels, names, at, read_notes = _read_split([root / f for f in by_split[split]], text_col, label_col)
            splits[split] = (texts, labels)
            rows_at[split] = at
            label_text.update(names)
            notes += read_notes
    if "test" not in splits:
        raise DataError(f"{data} has no test split file (test{{{','.join(EXTENSIONS)}}}): add one")

    train_labels = splits["train"][1]
    label_names, to_id = map_labels(train_labels, spec.label_names, label_text, where=f"train split of {data}",
                                    absent=spec.absent_labels, rows_at=rows_at["train"])
    _check_labels_seen(splits, to_id, rows_at, data)
    result = {s: Split(t, [to_id[y] for y in l]) for s, (t, l) in splits.items()}
    notes += _label_notes(spec, label_names, to_id, result["train"].labels)
    spec = spec.with_overrides(label_names=tuple(label_names))

    if "dev" not in result:
        notes.append(_carve_dev(result, seed, dev_fraction, data))
    return TaskData(task=task, source=str(data), label_names=label_names, spec=spec, notes=notes, **result)


def _split_files(data: str, spec: TaskSpec, typed: bool) -> tuple[Path, dict, str, list[str]]:
    """(root folder, split name -> its files, where the data was found, notes) for a local folder or
    a Hub dataset id (downloaded)."""
    kind, where = locate_data(data, typed=typed)
    if kind != "folder":
        root, by_split, notes = _hub_split_files(where, spec.hub_config)
        return root, by_split, where, notes
    root = Path(where)
    by_split = find_split_files([p.name for p in root.iterdir() if p.is_file()])
    if "train" not in by_split:
        raise DataError(f"{root} has no train file: expected train{{{','.join(EXTENSIONS)}}} (plus dev/validation and test)")
    check_split_files(by_split, str(root))
    return root, by_split, where, []


def _check_labels_seen(splits: dict, to_id: dict, rows_at: dict, data) -> None:
    """A dev or test label that train never shows is an error that names its first row."""
    train_labels = splits["train"][1]
    for split, (texts, labels) in splits.items():
        unseen = sorted({str(y) for y in labels if y not in to_id})
        if unseen:
            first = next(rows_at[split][i] for i, y in enumerate(labels) if y not in to_id)
            raise DataError(
                f"{split} split of {data} has label(s) {', '.join(unseen)} never seen in train (the first at {first}; "
                f"train labels: {', '.join(sorted(map(str, set(train_labels))))}); fix the labels or the split"
            )


def add_data_args(parser) -> None:
    """The data and task-spec options every script shares (see minilab/tasks.py for the fields)."""
    parser.add_argument("--data", default=None, help="a folder of train/dev/test files or a Hub dataset id (default: $MINILAB_DATA/<task>, else ../shared/data/<task>, else the task's Hub id)")
    parser.add_argument("--task", default=None, help="task registry name (steam, sst2, emotion) or a new name; default: the data folder's name, else steam")
    parser.add_argument("--task-file", default=None, help="a TOML or JSON task spec (columns, label names, answers, question, metric)")
    parser.add_argument("--text-col", default=None, help="the column holding the text (default from the task, else 'text')")
    parser.add_argument("--label-col", default=None, help="the column holding the label (default from the task, else 'label')")
    parser.add_argument("--label-names", default=None, help="comma-separated names of the labels, in the sorted order of their values")
    parser.add_argument("--absent-labels", default=None, metavar="NAME,...",
                        help="label names that are real classes but have no train examples (a small slice); without it, "
                             "more label names than train classes is an error")
    parser.add_argument("--answers", default=None, help="comma-separated short answers the LLaMA should say, one per label")
    parser.add_argument("--question", default=None, help="the question the LLaMA is asked about each text")
    parser.add_argument("--metric", choices=["accuracy", "macro_f1"], default=None,
                        help="dev metric that picks the best checkpoint (default: the task's; else macro_f1 when train is imbalanced)")


def spec_from_args(args) -> TaskSpec:
    return resolve_spec(args.task, args.data, args.task_file, text_col=args.text_col, label_col=args.label_col,
                        label_names=split_list(args.label_names), absent_labels=split_list(getattr(args, "absent_labels", None)),
                        answers=split_list(args.answers),
                        question=args.question, metric=args.metric)


def load_task_from_args(args) -> TaskData:
    data = load_task(args.data, seed=getattr(args, "seed", 0), spec=spec_from_args(args))
    for note in data.notes:
        print(f"note: {note}")
    return data

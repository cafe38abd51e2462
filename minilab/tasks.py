"""Task specs: what a labelled text dataset means, for any dataset.

A task is just a labelled text dataset plus a few words about it: which columns hold the text and
the label, what the labels are called, and, for the generative classifier, the short answer the
language model should say for each label and the question it is asked. The same fields come from
three places, resolved in this order (later wins):

1. the registry below (`--task steam|sst2|emotion`), written exactly as a task file would be,
2. a task file (`--task-file my_task.toml`, TOML or JSON with the same fields),
3. command-line flags (`--label-names`, `--absent-labels`, `--answers`, `--question`, `--metric`, `--text-col`, `--label-col`).

Anything left unset is filled from the data: label names from the label values (or a `label_text`
column), answers from the label names, a generic question from the answers, and the metric that
picks the best dev checkpoint from the label balance (macro-F1 when train is imbalanced).

A task file, e.g. `reviews.toml`:

    name = "reviews"
    text_col = "review"
    label_col = "voted_up"
    label_names = ["not recommended", "recommended"]   # in the sorted order of the label values
    # absent_labels = ["mixed"]   # names that are real classes but have no train examples (else an error)
    answers = ["no", "yes"]                            # one short answer per label
    question = "Does the author of this Steam review recommend the game?"
    metric = "macro_f1"                                # or "accuracy"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

METRICS = ("accuracy", "macro_f1")


class TaskSpecError(ValueError):
    """A task file or task flag is malformed; the message says what to fix."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_col: str = "text"
    label_col: str = "label"
    label_names: tuple[str, ...] | None = None  # one per label id 0..K-1 (label values in sorted order)
    # label names that are real classes but absent from train (a small slice): without this, more label
    # names than train classes is an error, since macro-F1 would average over classes that never occur
    absent_labels: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None  # one short answer per label, for the LM classifier
    question: str | None = None  # the instruction the LM classifier is given
    metric: str | None = None  # picks the best dev checkpoint; None: macro_f1 if train is imbalanced, else accuracy
    truncate: str | None = None  # which part of a long text the LM keeps: head | tail | middle (default head)
    hub_id: str | None = None
    hub_config: str | None = None  # a sub-folder of the Hub dataset (e.g. tweet_eval's "emotion")

    @classmethod
    def from_dict(cls, d: dict, source: str = "task spec") -> "TaskSpec":
        """A spec from a task file's fields, every field checked, with one clear line on error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TaskSpecError(f"{source}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(known))}")
        if not isinstance(d.get("name"), str) or not d["name"].strip():
            raise TaskSpecError(f"{source}: needs a `name` (a short word, used for results/<name>/)")
        values = dict(d)
        for key in ("label_names", "absent_labels", "answers"):
            if values.get(key) is not None:
                v = values[key]
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, int)) for x in v):
                    raise TaskSpecError(f"{source}: `{key}` must be a list of strings, got {v!r}")
                values[key] = tuple(str(x).strip() for x in v)
        for key in ("name", "text_col", "label_col", "question", "metric", "truncate", "hub_id", "hub_config"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise TaskSpecError(f"{source}: `{key}` must be a string, got {values[key]!r}")
        spec = cls(**values)
        spec.check(source)
        return spec

    def check(self, source: str = "task spec") -> None:
        if self.metric is not None and self.metric not in METRICS:
            raise TaskSpecError(f"{source}: metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.truncate is not None and self.truncate not in ("head", "tail", "middle"):
            raise TaskSpecError(f"{source}: truncate {self.truncate!r} is not one of head, tail, middle")
        for key in ("label_names", "answers"):
            v = getattr(self, key)
            if v is None:
                continue
            if len(v) < 2 or any(not x for x in v):
                raise TaskSpecError(f"{source}: `{key}` needs at least two non-empty entries, got {list(v)}")
            if len({x.lower() for x in v}) != len(v):
                raise TaskSpecError(f"{source}: `{key}` has duplicates ({', '.join(v)}): each label needs its own")
        if self.absent_labels:
            if not self.label_names:
                raise TaskSpecError(f"{source}: `absent_labels` ({', '.join(self.absent_labels)}) needs `label_names` "
                                    "(--label-names) that hold them")
            unknown = [n for n in self.absent_labels if n not in self.label_names]
            if unknown:
                raise TaskSpecError(f"{source}: absent label(s) {', '.join(unknown)} are not among the label names "
                                    f"({', '.join(self.label_names)})")
        if self.label_names and self.answers and len(self.label_names) != len(self.answers):
            raise TaskSpecError(f"{source}: {len(self.label_names)} label names but {len(self.answers)} answers: give one answer per label")

    def with_overrides(self, **kw) -> "TaskSpec":
        """This spec with every non-None keyword replacing its field (command-line flags over a file)."""
        spec = replace(self, **{k: v for k, v in kw.items() if v is not None})
        spec.check("command line")
        return spec


def read_task_file(path: str | Path) -> TaskSpec:
    """A TaskSpec from a .toml or .json file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskSpecError(f"task file {path} does not exist: check the path")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            d = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        elif path.suffix.lower() == ".json":
            d = json.loads(path.read_text(encoding="utf-8-sig"))
        else:
            raise TaskSpecError(f"task file {path}: use a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, TaskSpecError):
            raise
        raise TaskSpecError(f"task file {path} is not valid {path.suffix[1:].upper()} ({e}): fix it") from e
    if not isinstance(d, dict):
        raise TaskSpecError(f"task file {path} must hold one table/object of task fields")
    d.setdefault("name", path.stem)
    return TaskSpec.from_dict(d, source=f"task file {path}")


# The registry: the lab's three datasets, written as task files would be.
REGISTRY: dict[str, dict] = {
    "steam": {
        "name": "steam",
        "label_names": ["not constructive", "constructive"],
        "answers": ["no", "yes"],
        "question": "Is this Steam review constructive, i.e. does it give helpful, specific feedback about the game?",
        # The review's metadata (playtime, votes) sits at the end of each text: keep both ends.
        "truncate": "middle",
        "hub_id": "abullard1/steam-reviews-constructiveness-binary-label-annotations-1.5k",
    },
    "sst2": {
        "name": "sst2",
        "label_names": ["negative", "positive"],
        "answers": ["negative", "positive"],
        "question": "Is the sentiment of this movie review negative or positive?",
        "metric": "accuracy",
        "hub_id": "SetFit/sst2",
    },
    "emotion": {
        "name": "emotion",
        "label_names": ["anger", "joy", "optimism", "sadness"],
        "answers": ["anger", "joy", "optimism", "sadness"],
        "question": "Which emotion does this tweet express: anger, joy, optimism or sadness?",
        "metric": "macro_f1",  # TweetEval's official metric
        "hub_id": "cardiffnlp/tweet_eval",
        "hub_config": "emotion",
    },
}
TASKS: dict[str, TaskSpec] = {name: TaskSpec.from_dict(d, source=f"registry task {name!r}") for name, d in REGISTRY.items()}

DEFAULT_TASK = "steam"


def get_task(name: str | None) -> TaskSpec | None:
    """The registry entry for `name`, or None for a dataset the registry does not know."""
    return TASKS.get(name) if name else None


def split_list(value: str | None) -> tuple[str, ...] | None:
    """'a, b,c' -> ('a', 'b', 'c'); None stays None."""
    if value is None:
        return None
    return tuple(x.strip() for x in value.split(","))

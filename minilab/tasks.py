"""The task registry: defaults for the datasets this lab knows by name.

A task is just a labelled text dataset; the registry only saves typing. It says which columns hold
the text and the label, what the labels are called, the Hub dataset that holds the same data, and,
for the generative classifier, the short answer word the language model should say for each label
and the question it is asked. Any other folder or Hub dataset works too: pass `--text-col` and
`--label-col` and the label names come from the data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_col: str
    label_col: str
    label_names: tuple[str, ...]
    answers: tuple[str, ...]  # one short answer word per label, for the LM classifier
    question: str  # the instruction the LM classifier is given
    hub_id: str | None = None
    hub_config: str | None = None  # a sub-folder of the Hub dataset (e.g. tweet_eval's "emotion")
    metric: str = "accuracy"  # the headline metric the task's literature reports


TASKS: dict[str, TaskSpec] = {
    "steam": TaskSpec(
        name="steam",
        text_col="text",
        label_col="label",
        label_names=("not constructive", "constructive"),
        answers=("no", "yes"),
        question="Is this Steam review constructive, i.e. does it give helpful, specific feedback about the game?",
        hub_id="abullard1/steam-reviews-constructiveness-binary-label-annotations-1.5k",
    ),
    "sst2": TaskSpec(
        name="sst2",
        text_col="text",
        label_col="label",
        label_names=("negative", "positive"),
        answers=("negative", "positive"),
        question="Is the sentiment of this movie review negative or positive?",
        hub_id="SetFit/sst2",
    ),
    "emotion": TaskSpec(
        name="emotion",
        text_col="text",
        label_col="label",
        label_names=("anger", "joy", "optimism", "sadness"),
        answers=("anger", "joy", "optimism", "sadness"),
        question="Which emotion does this tweet express: anger, joy, optimism or sadness?",
        hub_id="cardiffnlp/tweet_eval",
        hub_config="emotion",
        metric="macro_f1",
    ),
}

DEFAULT_TASK = "steam"


def get_task(name: str | None) -> TaskSpec | None:
    """The registry entry for `name`, or None for a dataset the registry does not know."""
    return TASKS.get(name) if name else None

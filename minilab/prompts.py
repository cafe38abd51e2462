"""Classification prompts as token ids: the question, the text, the label answers, padding.

A text becomes a chat: the instruction (the task's question and its answer words) in the system
turn, the text alone in the user turn, then the assistant header. So every prompt starts with the
same tokens, and `PromptBuilder` splits them into one shared `prefix` (run once per batch, not
once per text: `scoring.run_prefix`) and each example's own ids (the text, cut to a token
budget, plus the end of the template). `answer_token_ids` are the label answers as the model
should write them. `pad` makes a batch of either: prompts padded on the LEFT, so that they all
end in one column and answers (or new tokens) follow at once; answers on the RIGHT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import TaskSpec


@dataclass
class PromptFormat:
    """How a text becomes a prompt, and which answer stands for each label."""

    question: str
    answers: list[str]
    max_text_tokens: int = 256
    keep: str = "head"  # which part of a long text survives the cut: head, tail, or middle (= both ends)

    @classmethod
    def for_task(cls, spec: TaskSpec, label_names: list[str], keep: str | None = None, **kw) -> "PromptFormat":
        """The spec's answers and question; missing ones are made from the label names
        (answers = the names themselves; "Which of these labels fits the text: a or b?")."""
        answers = list(spec.answers) if spec and spec.answers else list(label_names)
        if len(answers) != len(label_names):
            raise ValueError(f"{len(answers)} answers ({', '.join(answers)}) for {len(label_names)} labels "
                             f"({', '.join(label_names)}): give one answer per label with --answers")
        options = ", ".join(answers[:-1]) + " or " + answers[-1]
        question = spec.question if spec and spec.question else f"Which of these labels fits the text: {options}?"
        return cls(question=question, answers=answers, keep=keep or (spec.truncate if spec else None) or "head", **kw)

    def options(self) -> str:
        return " or ".join(self.answers) if len(self.answers) == 2 else ", ".join(self.answers)

    def messages(self, text: str) -> list[dict]:
        """The instruction goes in the system turn and the text alone in the user turn, so that every
        prompt starts with the same tokens: that shared prefix is run once, not once per text."""
        return [{"role": "system", "content": f"{self.question} Answer with one word: {self.options()}."},
                {"role": "user", "content": text}]


MARKER = "\x00TEXT\x00"


def split_template(tokenizer, fmt: PromptFormat) -> tuple[list[int], str]:
    """(ids of the prefix every prompt shares, the template text that follows each text)."""
    rendered = tokenizer.apply_chat(fmt.messages(MARKER), add_generation_prompt=True)
    head, tail = rendered.split(MARKER)
    return tokenizer.encode(head), tail


def truncate_text(tokenizer, text: str, max_tokens: int, keep: str) -> list[int]:
    """The text's ids, cut to `max_tokens`: keeping its head, its tail, or both ends ("middle":
    two thirds from the start, one third from the end, so a review's closing metadata survives)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return ids
    if keep == "head":
        return ids[:max_tokens]
    if keep == "tail":
        return ids[-max_tokens:]
    tail = max_tokens // 3
    return ids[: max_tokens - tail] + ids[len(ids) - tail:]


class PromptBuilder:
    """Token ids of classification prompts: one shared prefix + (text, end of the template) per example."""

    def __init__(self, tokenizer, fmt: PromptFormat):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.prefix, tail = split_template(tokenizer, fmt)
        self.tail = tokenizer.encode(tail)

    def example(self, text: str) -> list[int]:
        return truncate_text(self.tokenizer, text, self.fmt.max_text_tokens, self.fmt.keep) + self.tail


def answer_token_ids(tokenizer, fmt: PromptFormat) -> list[list[int]]:
    """Each label's answer as the model should write it: the word, then the end-of-turn token."""
    eot = tokenizer.eot_ids[0]
    return [tokenizer.encode(a) + [eot] for a in fmt.answers]


def pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, T), mask 1 = real token. side="left": every sequence ends in the last
    column (prompts: what follows them starts in one column for all rows); "right": every sequence
    starts in the first (answers)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return ids, mask

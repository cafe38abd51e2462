"""The training progress display: a redrawn bar on a terminal, plain lines when output goes to a file."""

from __future__ import annotations

import sys
import time


class Progress:
    """A redrawn bar on a terminal; a plain line every `log_every` steps when the output is a file.
    A context manager: the bar closes at the end of the block."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.t0, self.start = total, time.perf_counter(), start
        self.bar = None
        self.plain = enabled and not sys.stdout.isatty()
        if enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, record: dict | None) -> None:
        """One step done; `record`, the training log's record when the step made one."""
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_second']:.1f}")
        elif self.plain and record:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(1, step - self.start) * (self.total - step)
            print(f"step {step}/{self.total} | loss {record['loss']:.4f} | {record['examples_per_second']:.1f} ex/s | "
                  f"{_clock(elapsed)} elapsed, {_clock(left)} left", flush=True)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"

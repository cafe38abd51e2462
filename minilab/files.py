"""Writing files and folders so that nothing is half-written and nothing of the user's is lost.

Two rules, used by every script and module that writes:

* **Atomic.** A file is written to a temporary name beside it and renamed into place
  (`atomic_write`), and a folder is built in a temporary folder beside it and swapped in
  (`atomic_folder`): a kill at any instant leaves the old version or the new one, whole.
* **Only replace what minilab wrote.** Every folder minilab writes carries a `minilab.json`. An
  output folder that exists, is not empty and has no `minilab.json` holds someone else's files, so
  writing there is refused (`check_output_folder`) rather than emptying it; so is a target that is,
  or contains, a folder the run reads (its data, its base model, its adapter, its checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

MARKER = "minilab.json"  # written into every folder minilab makes; its presence means "ours to replace"


class OutputError(ValueError):
    """An output path would destroy something minilab did not write; the message says what to do."""


class MetaError(ValueError):
    """A folder's `minilab.json` cannot be read; the message says what to do."""


def write_meta(folder: str | Path, meta: dict) -> None:
    """`minilab.json` in a saved model's folder: what the folder holds (`kind`), its label names, and
    how its run turned a text into model input, so that `minilab.predict` does the same."""
    (Path(folder) / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | Path) -> dict:
    """The `minilab.json` that `write_meta` wrote into `folder`."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise MetaError(f"{Path(folder) / MARKER} is corrupt ({e}): retrain, or restore the folder") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename, with the
    permissions a plain `open(path, "w")` would give (mkstemp's own are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a file to `dst` atomically (never half a copy under the real name)."""
    return atomic_write(dst, Path(src).read_bytes())


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_folder(path: str | Path, protect: Iterable[str | Path | None] = (), flag: str = "--save-dir",
                        outputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, with one line, an output folder whose replacement would lose files minilab did not
    write: an existing file, a non-empty folder without `minilab.json`, or a folder that is (or
    contains) one of `protect` (the run's data, base model, adapter or checkpoint folder; a name
    that is not on disk, such as a Hub id, is skipped) or one of `outputs` (folders the run will
    write besides this one, its checkpoints or results: refused even before they exist, so that a
    run is refused at its start, not after its training). Returns the resolved path."""
    target = Path(path).expanduser().resolve()
    for p, must_exist in [*((p, True) for p in protect), *((p, False) for p in outputs)]:
        if p is None or not str(p):
            continue
        q = Path(p).expanduser().resolve()
        if (q.exists() or not must_exist) and _is_within(q, target):
            what = "is" if q == target else "contains"
            raise OutputError(f"{flag} {path} {what} {q}, which this run {'reads' if must_exist else 'writes'}: "
                              f"writing there would delete it; pass another {flag}")
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise OutputError(f"{flag} {path} is a file, not a folder: pass a folder path")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise OutputError(f"{flag} {path} is not empty and was not written by minilab (no {MARKER}): "
                          f"its files would be lost; pass an empty or new folder as {flag}")
    return target


@contextlib.contextmanager
def atomic_folder(path: str | Path, protect: Iterable[str | Path | None] = (), flag: str = "--save-dir"):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path`.

    `path` is checked first (`check_output_folder`), so a folder minilab did not write is never
    replaced. A kill at any point leaves either the old folder or the new one whole, never a mix
    (at worst a stray `.tmp-*`/`.old-*` folder beside it). The block must write `minilab.json`
    into the folder, so that a later run may replace it."""
    check_output_folder(path, protect, flag)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MARKER).is_file():
            raise RuntimeError(f"atomic_folder({path}): the block wrote no {MARKER}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".old-{path.name}-{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

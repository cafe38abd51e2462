"""Run the lab's notebooks top to bottom (nbclient), or strip their outputs.

    python notebooks/execute.py                      # baseline, bert, llama: outputs written into each .ipynb
    python notebooks/execute.py --out-dir DIR bert   # executed copies in DIR, the stored notebooks untouched
    python notebooks/execute.py --strip              # remove outputs and execution counts again

`make notebooks` runs the first form. The notebooks are stored without outputs (tests/test_notebooks.py
checks what git holds), so a run's outputs stay on your machine until you strip them or commit them.
A cell that raises stops the run with the cell's error and exit status 1; the notebook is still
written, with the outputs up to that cell. The notebooks read TASK, DATA, MINILAB_NOTEBOOK_ARGS and
MINILAB_NOTEBOOK_WORK from the environment (their first cell says how), which this passes on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["baseline", "bert", "llama"]  # llama's last cell compares all three: it runs last


def strip(book) -> bool:
    """Remove outputs, execution counts and the kernel's version details in place; True if there were any."""
    had = book.metadata.get("language_info") != {"name": "python"}
    book.metadata["language_info"] = {"name": "python"}  # the kernel writes its Python version here
    for cell in book.cells:
        if cell.cell_type == "code":
            had |= bool(cell.outputs) or cell.execution_count is not None
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return had


def execute(path: Path, out: Path, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    t0 = time.time()
    try:
        client.execute()
    except CellExecutionError:
        nbformat.write(book, out)
        raise
    nbformat.write(book, out)
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=ORDER, help=f"notebooks to run, in order (default: {' '.join(ORDER)})")
    p.add_argument("--out-dir", default=None, help="write the executed notebooks here instead of in place")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take (default 3600)")
    p.add_argument("--strip", action="store_true", help="remove the outputs instead of running")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if not (HERE / f"{n}.ipynb").is_file()]
    if unknown:
        p.error(f"no notebook {', '.join(unknown)} in {HERE} (there are: {', '.join(ORDER)})")
    import nbformat

    for name in args.names:
        path = HERE / f"{name}.ipynb"
        if args.strip:
            book = nbformat.read(path, as_version=4)
            if strip(book):
                nbformat.write(book, path)
                print(f"{path}: outputs removed")
            continue
        out = Path(args.out_dir) / path.name if args.out_dir else path
        if out != path and out.exists():  # a file of the user's: refuse rather than replace it
            p.error(f"--out-dir {args.out_dir} already holds {path.name}: pass an empty or new folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {name}.ipynb", flush=True)
        try:
            seconds = execute(path, out, args.timeout)
        except Exception as e:  # CellExecutionError holds the cell's source and traceback
            print(f"error: {path.name} failed (the executed notebook, up to the failing cell, is {out}):\n{e}", file=sys.stderr)
            return 1
        print(f"   executed in {seconds:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

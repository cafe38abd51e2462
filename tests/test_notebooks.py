"""The lab's three notebooks: stored without outputs, built on the scripts' step functions in the
scripts' order, and executed top to bottom on a tiny setting (nbclient, as `make notebooks` runs them)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SCRIPTS = {"baseline": "baseline.py", "bert": "train_bert.py", "llama": "train_dpo.py"}

nbformat = pytest.importorskip("nbformat")


def stored(name: str) -> dict:
    """The notebook as git holds it (its staged version), else the file: a local `make notebooks`
    writes outputs into the working copy, and that is allowed; committing them is not."""
    rel = f"notebooks/{name}.ipynb"
    res = subprocess.run(["git", "show", f":{rel}"], cwd=REPO, capture_output=True, text=True)
    return json.loads(res.stdout if res.returncode == 0 else (REPO / rel).read_text())


def code_cells(book: dict) -> list[str]:
    return ["".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code"]


def script_steps(script: str) -> list[str]:
    """The step functions the script's main() calls, in order (every public top-level function it
    calls; `_helpers` format its printed lines)."""
    tree = ast.parse((REPO / script).read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    defined -= {"main", "parse_args"}
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = [n for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in defined]
    return [c.func.id for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


@pytest.mark.parametrize("name", SCRIPTS)
def test_notebook_is_stored_without_outputs(name):
    book = stored(name)
    dirty = [i for i, c in enumerate(book["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"notebooks/{name}.ipynb is stored with outputs in cells {dirty}: "
                       f"run `python notebooks/execute.py --strip {name}` before committing")


@pytest.mark.parametrize("name", SCRIPTS)
def test_notebook_calls_the_scripts_steps_in_order(name):
    """Every step main() calls appears as `lab.<step>(` in the code cells, in main()'s order, one
    markdown cell before each step's cell: the notebook runs the script's functions, not a copy."""
    book = stored(name)
    steps = script_steps(SCRIPTS[name])
    assert len(steps) >= 5, steps
    source = "\n".join(code_cells(book))
    assert f"import {SCRIPTS[name][:-3]} as lab" in source
    found = [m.group(1) for m in re.finditer(r"\blab\.(\w+)\(", source) if m.group(1) != "parse_args"]
    assert found == steps, f"notebook steps {found} != {SCRIPTS[name]}'s main() {steps}"
    kinds = [c["cell_type"] for c in book["cells"]]
    for i, c in enumerate(book["cells"]):
        if c["cell_type"] == "code" and "lab." in "".join(c["source"]):
            assert kinds[i - 1] == "markdown", f"cell {i} of {name}.ipynb has no explanation before it"


@pytest.mark.slow
def test_notebooks_execute_top_to_bottom(tmp_path, tiny_steam, tiny_bert, tiny_llama, monkeypatch):
    """baseline, bert, llama in `make notebooks`' order, on tiny models and the tiny steam slice,
    writing into tmp_path: no cell fails, each writes its results file, the pictures are shown
    inline, and the LLaMA notebook's last cell shows the table with all three models."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    tiny = {"baseline": "",
            "bert": f"--model {tiny_bert} --epochs 1 --batch-size 8 --no-progress",
            "llama": f"--model {tiny_llama} --max-pairs 16 --batch-size 4 --epochs 1 --test-limit 8 --eval-limit 8 "
                     f"--eval-every 2 --max-new-tokens 3 --stream-examples 1 --no-progress"}
    monkeypatch.setenv("TASK", "steam")
    monkeypatch.setenv("DATA", str(tiny_steam))
    monkeypatch.setenv("MINILAB_NOTEBOOK_WORK", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import execute
    finally:
        sys.path.remove(str(NOTEBOOKS))
    before = {n: (NOTEBOOKS / f"{n}.ipynb").read_bytes() for n in SCRIPTS}
    out = tmp_path / "executed"
    out.mkdir()
    for name in SCRIPTS:
        monkeypatch.setenv("MINILAB_NOTEBOOK_ARGS", tiny[name])
        execute.execute(NOTEBOOKS / f"{name}.ipynb", out / f"{name}.ipynb", timeout=600)
        assert (tmp_path / "results" / "steam" / f"{name}.json").is_file()
    for name, least in (("baseline", 1), ("bert", 2), ("llama", 3)):
        book = nbformat.read(out / f"{name}.ipynb", as_version=4)
        images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(images) >= least, f"{name}.ipynb showed {len(images)} pictures"
    last = nbformat.read(out / "llama.ipynb", as_version=4).cells[-1]
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs)
    for row in ("baseline", "bert", "llama"):
        assert row in shown, f"the final table lacks {row}: {shown[:500]}"
    assert all((NOTEBOOKS / f"{n}.ipynb").read_bytes() == before[n] for n in SCRIPTS), "the stored notebooks changed"


def test_execute_refuses_to_replace_a_file_in_out_dir(tmp_path):
    """`execute.py --out-dir DIR`: a notebook already in DIR is the user's; it is refused, not overwritten."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import execute
    finally:
        sys.path.remove(str(NOTEBOOKS))
    (tmp_path / "bert.ipynb").write_text("my own notes")
    with pytest.raises(SystemExit) as e:
        execute.main(["--out-dir", str(tmp_path), "bert"])
    assert e.value.code == 2 and (tmp_path / "bert.ipynb").read_text() == "my own notes"

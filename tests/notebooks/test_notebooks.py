"""The notebooks: each runs end to end at tiny size, and the committed files stay small and output-free.

Each notebook is executed in a fresh Jupyter kernel (nbclient) from the notebooks/ folder with
NOTEBOOK_SIZE=tiny; any cell error fails the test. OMP_NUM_THREADS=1 keeps torch to one thread per
process: the tiny models are too small to gain from more, and on a shared 2-core machine extra threads
only contend (several times slower). A tiny notebook writes its runs to a temporary folder and removes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_BYTES = 50_000  # committed notebook size
NOTEBOOK_TIMEOUT_S = 300  # a whole notebook at tiny size (about 10-40 s on a loaded 2-core CPU)
CELL_TIMEOUT_S = 240
# Modules of optional extras: a notebook that imports one is skipped when it is not installed.
OPTIONAL = ("transformers",)


def _ids(path: Path) -> str:
    return path.stem


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 5, f"expected the five notebooks in {NOTEBOOK_DIR}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_notebook_is_small_and_has_no_outputs(path: Path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes (limit {MAX_BYTES})"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them "
                       "before committing (see notebooks/README.md)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_opens_with_a_summary_and_a_size_switch(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), \
        f"{path.name} should open with a markdown title and what it shows"
    setup = _code(nb)[0]
    assert 'os.environ.get("NOTEBOOK_SIZE", "tiny")' in setup, f"{path.name}: first code cell lacks the size switch"
    for size in ("tiny", "realistic"):
        assert f'"{size}"' in setup, f"{path.name}: no {size} settings in the first code cell"


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_at_tiny_size(path: Path, monkeypatch):
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(_code(nb))
    for module in OPTIONAL:
        if f"import {module}" in source:
            pytest.importorskip(module)
    monkeypatch.setenv("NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, json.dumps(errors, indent=1)[:2000]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    if "figures." in source:
        assert images, f"{path.name} draws figures but none was displayed inline"

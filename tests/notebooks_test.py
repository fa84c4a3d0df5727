"""Executes every notebook in notebooks/ and fails on the first cell that raises. Notebooks that
train read RINGATTN_NOTEBOOK_SMALL=1 and run with small settings."""

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "ringattn-test-python"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter, on a private JUPYTER_PATH (searched first), so the
    test needs no kernel installed beforehand and never picks up another environment's python3."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ringattn test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv(
        "JUPYTER_PATH",
        os.pathsep.join(
            [str(tmp_path / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])]
        ),
    )
    # Notebooks that train shrink to a smoke test (a tiny model, a few steps, a small grid), and
    # compile with the same cheap LLVM settings as the tests (conftest.py).
    monkeypatch.setenv("RINGATTN_NOTEBOOK_SMALL", "1")
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    monkeypatch.setenv("XLA_FLAGS", " ".join(filter(None, [os.environ.get("XLA_FLAGS"), fast])))
    # The kernel imports this checkout even when the package is not installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    return KERNEL_NAME


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks in notebooks/"


# Notebooks that train a model (a few steps under RINGATTN_NOTEBOOK_SMALL, still ~30 s each), or
# compile a 30-layer pretrained one.
SLOW = {"needle", "streaming", "real_model"}
# Notebooks that need SmolLM2 fetched (python experiments/fetch_model.py, the install step): the
# tests never download.
NEEDS_MODEL = {"real_model"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_runs(path, kernel_name):
    if path.stem in NEEDS_MODEL:
        from ringattn.hf import fetch

        if not fetch.is_imported():
            pytest.skip(
                f"SmolLM2 not fetched into {fetch.default_dir()} (experiments/fetch_model.py)"
            )
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is stored with outputs; clear them before committing"
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised:\n{e}")
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs: {errors}"

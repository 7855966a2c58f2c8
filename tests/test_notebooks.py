"""Both notebooks run top to bottom in a real Jupyter kernel (nbclient) on the tiny config, so they
never rot: the quickstart's tiny checkpoint must give transformers' greedy tokens, and the placement
ablation must give the same greedy tokens under every placement (each asserts it in a cell) and draw
its plot."""

import os

import nbclient
import nbformat
import pytest

from glinthawk_jax.config import REPO_ROOT

NOTEBOOKS = os.path.join(REPO_ROOT, "notebooks")


@pytest.mark.parametrize("name", ["quickstart", "placement_ablation"])
def test_notebook_runs(name, monkeypatch):
  for var in ("GLINTHAWK_NOTEBOOK_INSTALL", "GLINTHAWK_CHECKPOINT"):  # the kernel inherits the env
    monkeypatch.delenv(var, raising=False)
  notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
  outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
  text = "\n".join(out.get("text", "") for out in outputs)
  want = {"quickstart": "greedy tokens match transformers for 2 prompts",
          "placement_ablation": "same greedy tokens under local, callback, pipelined"}[name]
  assert want in text
  if name == "placement_ablation":
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot drawn"

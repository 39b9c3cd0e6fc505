"""The Colab notebook users come from runs top to bottom (here with tiny on the shipped sample,
in place of a Korean preset on NSMC), so that it cannot rot."""

import os

import pytest
from conftest import ROOT, SAMPLE


def test_the_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel")
    import nbformat

    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "nsmc_colab.ipynb"), as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    # the parameter cell chooses the model and data; the repository is this checkout
    small = (
        f"--data_dir {SAMPLE} --pretrain_epochs 0 --max_train_samples 600 "
        f"--max_eval_samples 200 --total_epochs 1 --max_len 32 --cache_dir cache"
    )
    parameters.source = f'MODEL = "tiny"\nDATA_FLAGS = "{small}"\nREPO_URL = ""\nROOT = {ROOT!r}'
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    printed = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "run_b vs run_a on 200 test texts" in printed, printed[-3000:]
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "run_b" / "tensorboard").is_dir()

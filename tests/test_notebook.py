"""run_in_colab.ipynb runs top to bottom offline in QUICK mode, with either set of prompts, and every
section writes its figures."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "run_in_colab.ipynb"
EXPECTED_FIGURES = {
    "p2p": [
        "word_swaps.png",
        "injection_study.png",
        "cross_attention.png",
        "token_count_swap.png",
        "refinement.png",
        "reweighting.png",
        "local_blend.png",
        "attention_swap.png",
        "attention_refine.png",
        "attention_reweight.png",
        "own_photo.png",
    ],
    "textual_inversion": ["evaluation.png", "two_concepts.png"],
    "vae": [
        "samples_epoch000.png",
        "samples_epoch001.png",
        "loss.png",
        "latent_manifold.png",
        "reconstructions.png",
    ],
    "practice": ["schedulers.png", "negative_prompt.png"],
}


def test_committed_notebook_has_no_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code_cells)


# "shapes" runs the prompts in the offline model's vocabulary; "tiny" (random weights, the real CLIP
# tokenizer) runs the Stable Diffusion prompts and settings that Colab users get.
@pytest.mark.parametrize("model", ["shapes", "tiny"])
def test_notebook_runs_in_quick_mode_and_writes_every_figure(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("NOTEBOOK_MODEL", model)
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest (see conftest)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    for section, names in EXPECTED_FIGURES.items():
        for name in names:
            assert (tmp_path / section / name).is_file(), f"{section}/{name} was not written"

"""Colab notebooks: paired with their jupytext text copies, stripped of outputs, and executed top
to bottom at smoke size (HS_SMOKE=1)."""

import glob
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))


def test_there_are_four_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_figure1.ipynb", "03_toy_model.ipynb",
                     "04_spectra.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_paired_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    text = jupytext.read(path[: -len(".ipynb")] + ".py")
    assert [c.source for c in nb.cells] == [c.source for c in text.cells]
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first_code.source and "install" in first_code.source
    assert "colab.research.google.com" in nb.cells[0].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_at_smoke_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HS_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    # Run from a scratch copy of the repository root so results land in tmp_path.
    os.symlink(os.path.join(REPO, "launch"), tmp_path / "launch")
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_names_its_one_setting_and_invents_no_url(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    install = next(c for c in nb.cells if c.cell_type == "code").source
    assert "hessian-subspace/hessian_subspace" not in "".join(c.source for c in nb.cells)
    assert "HESSIAN_SUBSPACE_SOURCE" in install
    # Where the package is importable (here, CI), the cell does nothing.
    exec(compile(install, path, "exec"), {})
    # Where it is not and no source is set, it stops with a message naming the setting.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hessian_subspace" else real(name, *a))
    monkeypatch.delenv("HESSIAN_SUBSPACE_SOURCE", raising=False)
    with pytest.raises(RuntimeError, match="set HESSIAN_SUBSPACE_SOURCE"):
        exec(compile(install, path, "exec"), {})


def test_install_cells_are_one_cell_repeated():
    # Each notebook must stand alone on Colab, so the install cell is repeated; it stays one.
    cells = {next(c for c in nbformat.read(p, as_version=4).cells
                  if c.cell_type == "code").source for p in NOTEBOOKS}
    assert len(cells) == 1

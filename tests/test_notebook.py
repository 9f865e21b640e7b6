"""notebooks/qcjax_colab.ipynb: committed clean, and runs end to end in offline mode (CPU, no network)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "qcjax_colab.ipynb")


def _read():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs():
    nb = _read()
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"code cells {dirty} carry outputs: clear them before committing"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "QCJAX_OFFLINE" in params[0].source


def _kernelspec(tmp_path, monkeypatch) -> str:
    """A kernel on this interpreter (a user-level "python3" kernelspec may point at another one)."""
    import json

    spec = tmp_path / "jupyter" / "kernels" / "qcjax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qcjax test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "qcjax-test"


@pytest.mark.slow  # ~1 min: a kernel, a tokenizer, conversion, sampling, 4 train steps, export, transformers
def test_notebook_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    nb = _read()
    kernel = _kernelspec(tmp_path, monkeypatch)
    env = dict(os.environ, QCJAX_OFFLINE="1", QCJAX_WORKDIR=str(tmp_path / "work"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    client = NotebookClient(nb, timeout=600, kernel_name=kernel,
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "offline mode" in text
    assert "tokens/s" in text
    assert "step 4: loss" in text
    assert "the next-token argmax agrees" in text or "torch is not installed" in text
    assert os.path.isfile(tmp_path / "work" / "export" / "config.json")

"""The example notebooks: stripped of outputs in git, in sync with notebooks/_build.py, and
executing end to end (offline, in a temporary working directory, warnings as errors)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = (
    "01_quickstart.ipynb",
    "02_reproducible_figures.ipynb",
    "03_attribution.ipynb",
    "04_circuit_search.ipynb",
    "05_delta_xai.ipynb",
)

# Prepended to each notebook when executed here: warnings raised by mechdelta, torch,
# TransformerLens or plotly fail the cell; the Jupyter machinery's own deprecation notices do not.
WARNINGS_CELL = """\
import warnings
warnings.simplefilter("error")
for _m in ("jupyter_client", "ipykernel", "IPython", "zmq", "tornado", "traitlets", "comm", "debugpy"):
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=_m)
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning, module=_m)
"""


def _build_module():
    spec = importlib.util.spec_from_file_location("_nb_build", NOTEBOOK_DIR / "_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_stripped(text: str, where: str) -> None:
    nb = json.loads(text)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{where} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{where} cell {i} has an execution_count"


def _git_versions(path: Path) -> list[tuple[str, str]]:
    """The notebook as committed (HEAD) and as staged (index), where git knows it."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return []
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for rev in (f"HEAD:{rel}", f":{rel}"):
        proc = subprocess.run(
            [git, "show", rev], cwd=ROOT, capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            out.append((rev, proc.stdout))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped_and_matches_its_source(name):
    path = NOTEBOOK_DIR / name
    text = path.read_text("utf-8")
    _assert_stripped(text, name)
    for rev, committed in _git_versions(path):
        _assert_stripped(committed, rev)
    assert text == _build_module().render(name), (
        f"{name} differs from notebooks/_build.py: run .venv/bin/python notebooks/_build.py"
    )


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A "python3" kernelspec running this interpreter, found first on JUPYTER_PATH, so the
    notebooks run in the venv under test whatever kernels the user has installed."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (mechdelta tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return "python3"


def _assert_png_fallback(data: dict) -> None:
    """A plotly output carries a PNG of the figure at its export size (GitHub shows the PNG; an
    HTML/JS rendering would be preferred there and shown blank, so there is none)."""
    import base64
    import struct

    assert "image/png" in data, "a figure without its static PNG copy"
    assert "text/html" not in data
    png = base64.b64decode(data["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    layout = data["application/vnd.plotly.v1+json"]["layout"]
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (layout["meta"]["export_width"], layout["height"])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, venv_kernel):
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(WARNINGS_CELL))
    client = NotebookClient(
        nb,
        kernel_name=venv_kernel,
        timeout=300,
        allow_errors=False,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in streams
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "the notebook should show plotly figures inline"
    for fig in figures:  # and a static PNG beside each, at the figure's own size, no text/html
        _assert_png_fallback(fig["data"])
    if name.startswith("02"):
        assert (work / "runs" / "notebook" / "manifest.json").is_file()
        assert (work / "runs" / "notebook" / "report.html").is_file()
        assert "figures rebuilt; figure JSON identical" in streams
    if name.startswith("03"):
        assert "Pearson vs exact" in streams and "layer 1 keys, ig" in streams
    if name.startswith("04"):
        assert "L0H3 -> L1H1.k" in streams and "ceiling, all" in streams
        assert "step 1500: shift" in streams


def test_progress_shows_a_widget_bar_in_a_kernel(tmp_path, venv_kernel):
    """mechdelta.core.progress in Jupyter: tqdm's notebook widget, items unchanged, and no
    warning (tqdm.auto's TqdmExperimentalWarning would fail the cell here)."""
    from nbclient import NotebookClient

    code = (
        "from mechdelta.core.progress import progress\n"
        "items = [object() for _ in range(12)]\n"
        'out = list(progress(items, desc="sweep"))\n'
        "assert len(out) == 12 and all(a is b for a, b in zip(out, items))\n"
        'assert list(progress(range(3), desc="few")) == [0, 1, 2]  # auto: no bar for 3 items\n'
        'print("ok")'
    )
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(WARNINGS_CELL), nbformat.v4.new_code_cell(code)]
    )
    NotebookClient(
        nb, kernel_name=venv_kernel, timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = nb.cells[1].outputs
    widgets = [
        o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert len(widgets) == 1  # one bar (the 3-item loop shows none)
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert streams == "ok\n"  # no plain-line or carriage-return progress on stderr

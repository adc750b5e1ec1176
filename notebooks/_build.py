"""Write the example notebooks from the cells below, without outputs.

    .venv/bin/python notebooks/_build.py          # rewrite notebooks/*.ipynb
    .venv/bin/python notebooks/_build.py --check  # exit 1 if a notebook differs from its source

Edit the cells here, not the .ipynb files: tests/test_notebooks.py checks the committed notebooks
match this script, carry no outputs, and execute end to end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# First code cell of each notebook: figures are interactive where plotly.js runs and also carry a
# static PNG (GitHub renders notebooks without running JavaScript). Set here, for this notebook's
# kernel only; the package itself never changes plotly's renderers.
STATIC_FALLBACK = (
    "import plotly.io as pio\n"
    "\n"
    "from mechdelta.plotting import StaticFallbackRenderer\n"
    "\n"
    "# Show each figure interactively (JupyterLab, VS Code) plus a static PNG copy for viewers that\n"
    "# cannot run plotly (GitHub, nbviewer). The PNG needs Chromium; without it, figures stay\n"
    "# interactive only. This changes plotly's setting for this notebook's kernel only.\n"
    'pio.renderers["mechdelta_png"] = StaticFallbackRenderer()\n'
    'pio.renderers.default = "plotly_mimetype+mechdelta_png"'
)

QUICKSTART = [
    new_markdown_cell(
        "# Quickstart: where did the model's behaviour shift?\n\n"
        "mechdelta compares a **reference** and an **intervened** checkpoint of one architecture "
        "by patching activations *across* the two models. This notebook loads the `induction` "
        "pair from the offline zoo, measures how much the behaviour shifted, and localises the "
        "shift by patching single sites and sweeping every attention head. Figures are plotly: "
        "hover over them (each also carries a static PNG, for viewers such as GitHub that do not "
        "run plotly)."
    ),
    new_code_cell(STATIC_FALLBACK),
    new_code_cell(
        "import mechdelta as md\n"
        "from mechdelta import zoo\n"
        "\n"
        'entry = zoo.load("induction")  # offline: built from a seed, no download\n'
        "pair, task = entry.pair, entry.task\n"
        "pair"
    ),
    new_code_cell("entry.card"),
    new_markdown_cell(
        "## 1. The shift\n\n"
        "The task's metric on both models, per prompt, and the mean shift with a bootstrap "
        "confidence interval over prompts. Patching scores below are fractions of this shift."
    ),
    new_code_cell(
        "shift = md.measure_shift(pair, task, n_boot=1000, seed=0)\nprint(shift)\nshift.figure()"
    ),
    new_markdown_cell(
        "## 2. Sweep every head, in both directions\n\n"
        "- **reference → intervened**: restore one head's reference output inside the intervened "
        "model. Score = the fraction of the shift this *undoes*.\n"
        "- **intervened → reference**: put one head's intervened output into the reference model. "
        "Score = the fraction of the shift it *carries*."
    ),
    new_code_cell(
        'heads = md.sweep(pair, task, "head_out", direction="both", n_boot=1000, seed=0)\n'
        "heads.figure()"
    ),
    new_code_cell("heads.reference_to_intervened.top(5)"),
    new_code_cell('heads.to_dataframe().sort_values("score", ascending=False).head(8)'),
    new_markdown_cell(
        "## 3. Patch single sites interactively\n\n"
        'Sites are written in shorthand: `"L1H2"` is head 2 of layer 1 (its write into the '
        'residual stream), `"L0.resid_pre"` the residual stream entering block 0. Patch the top '
        "head alone, then the top three jointly."
    ),
    new_code_cell(
        "best = heads.reference_to_intervened.top(1)[0].site\n"
        'single = md.patch(pair, task, best, direction="both", n_boot=1000, seed=0)\n'
        "print(single)\n"
        "single.figure()"
    ),
    new_code_cell(
        "top3 = [s.site for s in heads.reference_to_intervened.top(3)]\n"
        "joint = md.patch(pair, task, top3, n_boot=1000, seed=0)\n"
        "print(joint)\n"
        "joint.figure()"
    ),
    new_markdown_cell(
        "## 4. What the zoo says really changed\n\n"
        "Zoo pairs come with ground truth: compare it with the sweep above, and with where the "
        "weights changed (changing weights is not the same as mattering for the behaviour)."
    ),
    new_code_cell("entry.ground_truth"),
    new_code_cell("pair.weight_diff().figure()"),
]

EXPERIMENT_TOML = """\
%%writefile experiment.toml
name = "induction-notebook"
description = "Shift, weight changes and a head sweep in both directions on the induction zoo pair."

[pair]
zoo = "induction"

[run]
seed = 0
n_boot = 1000

[output]
figures = ["html"]   # add "png" / "svg" / "pdf" for static images (needs Chromium)

[[analyses]]
kind = "shift"

[[analyses]]
kind = "weight_diff"

[[analyses]]
kind = "sweep"
component = "head_out"
direction = "both"
"""

REPRODUCIBLE = [
    new_markdown_cell(
        "# Reproducible figures: run an experiment file, rebuild its figures\n\n"
        "An experiment is a TOML file: the pair, the task (the zoo entry's by default), the "
        "analyses, the seeds and the outputs. `run_experiment` (or `mechdelta run FILE --out "
        "DIR`) writes a run directory: `manifest.json` with versions, weight and prompt hashes, "
        "seeds and the resolved configuration; each analysis' results (safetensors + JSON + a "
        "parquet table); and its figures."
    ),
    new_code_cell(STATIC_FALLBACK),
    new_code_cell(EXPERIMENT_TOML),
    new_code_cell(
        "from pathlib import Path\n"
        "\n"
        "from mechdelta import write_report\n"
        "from mechdelta.runs.run import regenerate_figures, run_experiment\n"
        "\n"
        'run_dir = Path("runs/notebook")\n'
        'result = run_experiment("experiment.toml", run_dir, quiet=True, overwrite=True)\n'
        "print(result)\n"
        'print(sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()))'
    ),
    new_markdown_cell(
        "The manifest records what produced the results: the models' weight content hashes, the "
        "prompt-set hash, the seeds and the software versions."
    ),
    new_code_cell('m = result.manifest\n{k: m[k] for k in ("models", "task", "seeds", "timings")}'),
    new_markdown_cell(
        "## Rebuild every figure from the stored results alone\n\n"
        "No model is loaded: the figures come from the saved tensors, and the same results always "
        "give the same figure JSON (`mechdelta figures runs/NAME` does the same from a shell)."
    ),
    new_code_cell(
        'figures = run_dir / "figures"\n'
        'before = {p.name: p.read_text() for p in figures.glob("*.json")}\n'
        "regenerate_figures(run_dir, quiet=True)\n"
        'after = {p.name: p.read_text() for p in figures.glob("*.json")}\n'
        "assert before == after\n"
        'print(f"{len(after)} figures rebuilt; figure JSON identical")'
    ),
    new_code_cell('result.load("sweep-head_out-both").figure()'),
    new_code_cell(
        "# a stored figure, straight from its JSON\n"
        'pio.from_json((figures / "shift.json").read_text())'
    ),
    new_markdown_cell(
        "## Resume, and the report\n\n"
        "Running the same experiment into the same directory resumes it: complete analyses are "
        "skipped once the configuration and weight hashes are checked. The transition report "
        "(`mechdelta report runs/NAME`) is Markdown plus one self-contained HTML file."
    ),
    new_code_cell(
        'again = run_experiment("experiment.toml", run_dir, quiet=True)\n'
        "print(again.computed, again.skipped)\n"
        "assert again.computed == ()"
    ),
    new_code_cell(
        "from IPython.display import Markdown\n"
        "\n"
        "md_path, html_path = write_report(run_dir)\n"
        'print(html_path, f"{html_path.stat().st_size / 1e6:.1f} MB")\n'
        'Markdown(md_path.read_text().split("## Provenance")[0])'
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_reproducible_figures.ipynb": REPRODUCIBLE,
}


def build(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives the same bytes
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if "--check" in argv:
            if not path.is_file() or path.read_text("utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, "utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/_build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

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

ATTRIBUTION = [
    new_markdown_cell(
        "# Attribution: a whole sweep from a few passes, and when to trust it\n\n"
        "An exact sweep (`md.sweep`) runs one patched forward pass per site. `md.attribute` "
        "*estimates* the same numbers (the target model's metric with the source model's "
        "activation spliced in at one site) from both models' clean runs and one backward pass "
        "of the target, whatever the number of sites. With `a_S`, `a_T` the site's activations "
        "in the source and target runs and `g = ∂metric/∂a` in the target's run:\n\n"
        '- `"atp"` (attribution patching): `m_T + (a_S − a_T) · g`, first order.\n'
        '- `"atp*"`: as `"atp"`, but for query/key sites the attention pattern is recomputed '
        "exactly and only the step from the pattern onwards is linearised.\n"
        '- `"ig"`: integrated gradients from `a_T` to `a_S`, one layer at a time (`steps` '
        "forward and backward passes per layer).\n\n"
        "This notebook runs AtP on the `planted` zoo pair, checks it against exact patches, and "
        "then builds a pair where plain AtP fails."
    ),
    new_code_cell(STATIC_FALLBACK),
    new_code_cell(
        "import pandas as pd\n"
        "import torch\n"
        "\n"
        "import mechdelta as md\n"
        "\n"
        'entry = md.zoo.load("planted")  # offline: built from a seed, no download\n'
        "pair, task = entry.pair, entry.task\n"
        "entry.ground_truth  # the only components whose weights were fine-tuned"
    ),
    new_markdown_cell(
        "## 1. Estimate a head sweep in both directions\n\n"
        'The same grid and directions as `md.sweep(pair, task, "head_out", direction="both")`; '
        "scores are fractions of the shift (undone for reference → intervened, carried for "
        "intervened → reference), with bootstrap intervals over prompts."
    ),
    new_code_cell(
        'atp = md.attribute(pair, task, "head_out", direction="both", method="atp", n_boot=200)\n'
        "for result in atp:\n"
        '    top = ", ".join(f"{s.site} {s.score:+.3f}" for s in result.top(3))\n'
        '    print(f"{result.direction.value}: {top}")\n'
        "atp.figure()"
    ),
    new_markdown_cell(
        "Both directions put the planted head L1H1 first. Now the exact sweep of the same grid "
        "(one patched pass per head and direction), and the estimate against it: "
        "`verify(k, random=0)` with `k` the whole grid runs the exact patch of every site (the "
        "sweep's numbers) and pairs each with its estimate. In the scatter the dotted diagonal "
        "is `estimate = exact`; points below it are underestimates."
    ),
    new_code_cell(
        'exact = md.sweep(pair, task, "head_out", direction="both", n_boot=200)\n'
        "for est, ex in zip(atp, exact, strict=True):\n"
        '    l1h1 = est.sites.index(md.Site("head_out", 1, head=1))\n'
        "    print(\n"
        '        f"{est.direction.value}: top exact {ex.top(1)[0].site}; L1H1 estimated "\n'
        '        f"{est.scores.flatten()[l1h1]:+.3f}, exact {ex.scores.flatten()[l1h1]:+.3f}"\n'
        "    )\n"
        "r2i = atp.reference_to_intervened\n"
        "whole = r2i.verify(len(r2i.sites), random=0)\n"
        "print(whole)\n"
        'print(f"Pearson (atp vs exact, all {len(r2i.sites)} heads): {whole.pearson:.3f}")\n'
        "whole.figure()"
    ),
    new_markdown_cell(
        "The ranking is right: every other head has exactly zero effect (layer 0 is identical "
        "in the two models, and so are the other heads of layer 1 and their inputs), so AtP and "
        "exact patching agree there, and with one site carrying everything Pearson is close to "
        "1. The *size* of L1H1's effect is not right: fine-tuning changed the head a lot, and a "
        "first-order estimate is only exact for small activation changes (or a metric linear "
        "in the site). Use AtP to *rank* sites cheaply; read effect sizes off exact patches."
    ),
    new_markdown_cell(
        "## 2. A by-position grid, verified\n\n"
        "Per position the grid grows (layers × positions × heads), which is where an estimate "
        "pays off: one backward pass instead of one patched pass per site. `verify(k)` then "
        "runs exact patches of\n\n"
        "- the **top `k` sites by |estimate|** (the ones you would report), and\n"
        "- **`k` random others** (drawn with `seed`): controls for what the ranking left out.\n\n"
        "How to read it: `pearson` / `spearman` compare estimated and exact scores over the "
        "verified sites; `recall(k)` is the fraction of the `k` largest exact effects among "
        "them that are also among the `k` largest estimates; `max_error` is the largest "
        "|estimated − exact| (a fraction of the shift); `top(k)` ranks the verified sites by "
        "their *exact* score. A random control with a large exact effect means the estimate "
        "missed a site; a top site whose exact effect is small means it invented one."
    ),
    new_code_cell(
        'by_pos = md.attribute(pair, task, "head_out", per_position=True, n_boot=200)\n'
        "check = by_pos.verify(5)  # 5 top sites + 5 random controls: 10 exact patches\n"
        'print(f"{len(by_pos.sites)} sites estimated; {check}")\n'
        "check.to_dataframe()"
    ),
    new_markdown_cell(
        "Only L1H1 at the last position (where the metric reads the answer) carries the "
        'shift, estimated and exact alike; the other four "top" sites are ties at zero, and '
        "the random controls are zero too, so the estimate missed nothing here. `check.figure()` "
        "draws the same estimated-against-exact scatter as above."
    ),
    new_markdown_cell(
        "## 3. When AtP fails: saturated attention\n\n"
        "AtP linearises the metric in the site's activation. A key (or query) acts through a "
        "softmax; when attention is sharp (saturated), the gradient of the pattern with "
        "respect to a key is nearly zero even though changing the key moves the attention "
        "a lot. Build such a pair: two copies of one small random model with every layer's "
        "query weights scaled by 12 (sharp attention), and in the intervened copy one head's "
        "keys changed (head 1 of layer 1: rows 16:32 of `W_K`). The task contrasts the token "
        "the intervened model promotes most with the one it demotes most."
    ),
    new_code_cell(
        "from transformer_lens.config import TransformerBridgeConfig\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "\n"
        "\n"
        "def tiny_model():\n"
        "    cfg = TransformerBridgeConfig(\n"
        "        n_layers=3, d_model=64, n_heads=4, d_head=16, d_vocab=50, n_ctx=16, "
        'act_fn="gelu", seed=0\n'
        "    )\n"
        "    return TransformerBridge.boot_native(cfg).eval()\n"
        "\n"
        "\n"
        "def key_edit_pair(q_scale):\n"
        '    """Two copies of one model, queries scaled by q_scale; L1H1\'s keys changed in the '
        'second."""\n'
        "    ref, itv = tiny_model(), tiny_model()\n"
        "    with torch.no_grad():\n"
        "        for model in (ref, itv):\n"
        "            for layer in range(3):\n"
        "                model.blocks[layer].attn.q.weight.mul_(q_scale)\n"
        "        w_k = itv.blocks[1].attn.k.weight  # [n_heads * d_head, d_model]: head 1 = rows 16:32\n"
        "        w_k[16:32] += torch.randn(16, w_k.shape[1], generator=torch.Generator().manual_seed(1))\n"
        "    return md.ModelPair(ref, itv)\n"
        "\n"
        "\n"
        "def contrast_task(pair, prompts):\n"
        '    """logit_diff of the token the intervened model promotes most over the one it demotes '
        'most."""\n'
        "    with torch.no_grad():\n"
        "        delta = pair.intervened(prompts)[:, -1] - pair.reference(prompts)[:, -1]\n"
        '    return md.Task(prompts, answers=delta.argmax(-1), wrong=delta.argmin(-1), name="key edit")\n'
        "\n"
        "\n"
        "prompts = torch.randint(1, 50, (16, 8), generator=torch.Generator().manual_seed(0))\n"
        "sat = key_edit_pair(12.0)\n"
        "sat_task = contrast_task(sat, prompts)\n"
        "print(md.measure_shift(sat, sat_task, n_boot=200))"
    ),
    new_markdown_cell(
        'Every key, at every layer and position, exactly, then estimated by `"atp"` and '
        '`"atp*"`; and the same comparison on the unsaturated pair (queries not scaled) for '
        "contrast. Pearson is over the whole grid (3 layers × 8 positions × 4 heads)."
    ),
    new_code_cell(
        "def pearson(a, b):\n"
        "    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()\n"
        "\n"
        "\n"
        "rows, results = [], {}\n"
        "for q_scale in (1.0, 12.0):\n"
        "    p = key_edit_pair(q_scale)\n"
        "    t = contrast_task(p, prompts)\n"
        '    ex = md.sweep(p, t, "head_k", per_position=True, n_boot=200)\n'
        '    results[q_scale, "exact"] = ex\n'
        '    for method in ("atp", "atp*"):\n'
        '        est = md.attribute(p, t, "head_k", method=method, per_position=True, n_boot=200)\n'
        "        results[q_scale, method] = est\n"
        "        err = (est.scores - ex.scores).abs().max().item()\n"
        "        rows.append((q_scale, method, pearson(est.scores, ex.scores), err))\n"
        'columns = ["query scale", "method", "Pearson vs exact", "max |error|"]\n'
        "table = pd.DataFrame(rows, columns=columns)\n"
        "print(table.round(3).to_string(index=False))"
    ),
    new_markdown_cell(
        "Without saturation plain AtP tracks the exact key patches; with it, its correlation "
        'collapses while `"atp*"` (the pattern recomputed exactly from the source\'s keys) '
        "stays close to exact. `verify` shows the same from 10 exact patches instead of the "
        "full sweep, which is what you can afford on a real model (the scatter: plain AtP on "
        "the saturated pair):"
    ),
    new_code_cell(
        'for method in ("atp", "atp*"):\n'
        "    print(results[12.0, method].verify(5))\n"
        'results[12.0, "atp"].verification.to_dataframe().round(3)'
    ),
    new_code_cell('results[12.0, "atp"].verification.figure()'),
    new_markdown_cell(
        "Plain AtP still finds the right head (L1H1), but inside it some positions' effects "
        "come out with the wrong sign and keys that barely matter rank among the top: Pearson "
        "and Spearman over the verified sites drop, the largest error is a sizeable fraction "
        "of the shift. `recall(5)` stays at 1 for both methods here only because the five "
        "random controls have near-zero effects, so the five largest exact effects among the "
        "ten verified sites are the five top ones whatever their order: read recall together "
        "with the correlations and `max_error`."
    ),
    new_markdown_cell(
        'The other option is integrated gradients, `method="ig"`: it moves every site of a '
        "layer together from the target's activation to the source's along a straight line "
        "and averages the gradient over `steps` points, so it costs `steps` forward and "
        "backward passes *per layer* (run one layer here). Its per-site numbers split the "
        "layer's *joint* change, which is not the same as patching one site alone when the "
        "sites interact (keys at different positions compete in one softmax)."
    ),
    new_code_cell(
        "ig = md.attribute(\n"
        '    sat, sat_task, "head_k", method="ig", per_position=True, layers=[1], steps=8, n_boot=200\n'
        ")\n"
        'exact_l1 = results[12.0, "exact"].scores[1]  # [position, head] of layer 1\n'
        'print(f"layer 1 keys, ig (8 steps): Pearson vs exact {pearson(ig.scores[0], exact_l1):.3f}")\n'
        'for method in ("atp", "atp*"):\n'
        "    r = pearson(results[12.0, method].scores[1], exact_l1)\n"
        '    print(f"layer 1 keys, {method}: Pearson vs exact {r:.3f}")'
    ),
    new_markdown_cell(
        "## When to trust which method\n\n"
        '- **AtP (`"atp"`) is first order.** It is exact where the metric is linear in the '
        "site (for example a last-layer head's write, with no normalisation after it), and its "
        "error grows quadratically with the activation change otherwise. Large changes "
        "(fine-tuned components, section 1) keep the ranking but shrink or inflate the sizes.\n"
        "- **Saturated softmax breaks it for query and key sites**: the pattern's gradient "
        'vanishes where attention is sharp. Use `"atp*"` for `head_q` / `head_k` grids; it '
        "costs little more than AtP.\n"
        '- **IG (`"ig"`)** follows the path instead of its start: better on strongly '
        "non-linear layers, `steps` passes per layer, and it attributes a layer's joint change "
        "rather than single-site patches.\n"
        "- **Always verify the top of the ranking with exact patches** (`verify(k)` or "
        "`verify=k`): the estimate picks *where to look*, exact patches say *how much*. The "
        "random controls check what the ranking left out."
    ),
]

CIRCUITS = [
    new_markdown_cell(
        "# Circuit search across two checkpoints: the induction circuit across the phase change\n\n"
        "A sweep ranks single sites; `md.search_circuit` finds the smallest *set* of components "
        "(nodes) or connections (edges) that carries the behavioural shift between a source "
        "model S and a target model T, and says how much of it the set carries. Between two "
        'checkpoints, "put S\'s circuit into T" can mean three different things; this notebook '
        "runs each on the zoo's `induction` pair, in both directions, says which question each "
        "answers, and then follows the circuit along the training run across the phase change."
    ),
    new_code_cell(STATIC_FALLBACK),
    new_code_cell(
        "import warnings\n"
        "\n"
        "import mechdelta as md\n"
        "from mechdelta.circuits import CircuitNotFaithfulWarning\n"
        "from mechdelta.plotting import membership_figure\n"
        "from mechdelta.zoo.series import load_series\n"
        "\n"
        'entry = md.zoo.load("induction")  # offline: built from a seed, no download\n'
        "pair, task = entry.pair, entry.task\n"
        "pair"
    ),
    new_markdown_cell(
        "## 1. The pair and the shift\n\n"
        "Two checkpoints of one training run of a 2-layer attention-only model with 4 heads per "
        "layer: the **reference** is step 400, before the induction phase change, the "
        "**intervened** step 1500, after it. The task repeats a random token sequence; the metric "
        "is the loss on the second copy, which only a model with induction heads predicts well. "
        "Every weight differs between the two checkpoints, so the question is not *which* "
        "weights changed but which changes matter."
    ),
    new_code_cell("shift = md.measure_shift(pair, task, n_boot=1000, seed=0)\nprint(shift)"),
    new_markdown_cell(
        "## 2. Three semantics\n\n"
        '`direction` names source → target as everywhere: `"reference->intervened"` puts '
        "step 400's circuit into step 1500 (what *breaks* induction), "
        '`"intervened->reference"` puts step 1500\'s circuit into step 400 (what *gives* it '
        "induction).\n\n"
        "| semantics | what runs | a circuit member carries | answers |\n"
        "|---|---|---|---|\n"
        "| `\"splice\"` (today's `patch`) | T's parameters | the *source run's cached* activation "
        "(node) or sender write (edge); everything else recomputes | along which paths does S's "
        "*activity* have to reach T for T to behave like S? |\n"
        '| `"ablate"` (ACDC-style, edges) | S\'s parameters | its own live value; every edge '
        "*outside* the circuit carries T's cached sender write | which part of S's own "
        "computation does S need to keep its behaviour when the rest is replaced by T's? |\n"
        '| `"graft"` (nodes) | both | the member\'s *parameters* from S, recomputed on the '
        "hybrid's own inputs | which components' *weights* must be S's for T to behave like S? |\n\n"
        "A circuit's **faithfulness** is the fraction of the mean shift its hybrid run moves "
        "(0 = T's metric, 1 = S's); it *reaches* the target (0.9 here) when it lies in "
        "`[0.9, 1.1]` (overshoot is not faithful). Every search ends with a pruning pass, so "
        "dropping any one member loses the target: each member's **drop-one loss** is printed "
        "beside it."
    ),
    new_markdown_cell(
        "## 3. Node level, graft, both directions\n\n"
        "Nodes: `embed`, the 8 heads and `unembed` (final norm + unembedding). First "
        "**reference → intervened**: which of step 400's components, transplanted into step "
        "1500 (weights and all, recomputed on the hybrid's inputs), undo the shift? "
        '`method="greedy"` adds, one exact graft run per candidate and step, the node that '
        "brings the hybrid closest to step 400:"
    ),
    new_code_cell(
        "graft_r2i = md.search_circuit(\n"
        "    pair,\n"
        "    task,\n"
        '    level="node",\n'
        '    method="greedy",\n'
        '    direction="reference->intervened",\n'
        '    semantics="graft",\n'
        ")\n"
        "print(graft_r2i)"
    ),
    new_markdown_cell(
        'Why not `method="attribution"`? It ranks nodes by a first-order estimate (the '
        "member's write with the source's parameters minus the target's, times the gradient), "
        "and a phase change is far from linear: every estimate is a fraction of a percent, while "
        "one exact graft of L0H3 undoes almost everything. Compare:"
    ),
    new_code_cell(
        "attr = md.search_circuit(\n"
        "    pair,\n"
        "    task,\n"
        '    level="node",\n'
        '    method="attribution",\n'
        '    direction="reference->intervened",\n'
        '    semantics="graft",\n'
        ")\n"
        "print(attr)\n"
        'for name, estimate in attr.provenance["estimates"].items():\n'
        '    print(f"{name:>7}  first-order estimate {estimate:+.3f}")\n'
        'print(md.graft(pair, task, ["L0H3"], "reference->intervened", n_boot=200))'
    ),
    new_markdown_cell(
        "The attribution search still returns a minimal circuit that reaches the target (here "
        "`{embed}`: step 400's embeddings alone also undo 92% of the shift; `unembed` is ranked "
        "by its exact single graft), but which of several "
        "minimal circuits it finds follows a ranking that is poor here; the greedy search is "
        "exact at every step and affordable at node level."
    ),
    new_markdown_cell(
        "One head: with layer-0 head L0H3 put back to its step-400 weights, the trained model "
        "loses nearly all of its induction. Now **intervened → reference**: which of step 1500's "
        'components give step 400 induction? `method="acdc"` starts from the full graph and '
        "drops nodes from the logits backwards while the target holds (one exact graft run per "
        "node), then prunes; `curve` lists the circuits it left on the way, by size:"
    ),
    new_code_cell(
        "graft_i2r = md.search_circuit(\n"
        "    pair,\n"
        "    task,\n"
        '    level="node",\n'
        '    method="acdc",\n'
        '    direction="intervened->reference",\n'
        '    semantics="graft",\n'
        ")\n"
        "print(graft_i2r)\n"
        'n_nodes = graft_i2r.provenance["n_members"]\n'
        'print(f"\\n{len(graft_i2r)} of {n_nodes} nodes; curve (size: faithfulness):")\n'
        'print(", ".join(f"{s}: {f:.2f}" for s, f in graft_i2r.curve))'
    ),
    new_markdown_cell(
        "Nearly the whole model. The two directions ask different questions: *breaking* "
        "induction takes one component (L0H3, whose output the layer-1 heads' keys read), "
        "*creating* it takes nearly all of them, because the phase change is co-adapted: step "
        "1500's L0H3 only works together with step 1500's layer-1 heads, embedding and "
        "unembedding. That is a finding about the training run, not a failure of the search "
        '(`method="greedy"`, exact forward selection, costs several times as many runs '
        "here and tells the same story). `md.graft` checks single transplants with a bootstrap "
        "interval: L0H3 in both directions, and the obvious induction circuit (L0H3 and the "
        "four layer-1 heads) into step 400:"
    ),
    new_code_cell(
        'for result in md.graft(pair, task, ["L0H3"], "both", n_boot=1000, seed=0):\n'
        "    print(result)\n"
        'heads = ["L0H3", "L1H0", "L1H1", "L1H2", "L1H3"]\n'
        'print(md.graft(pair, task, heads, "intervened->reference", n_boot=1000, seed=0))'
    ),
    new_markdown_cell(
        "## 4. Edge level: splice and ablate\n\n"
        "Edges go from a sender (`embed`, a head) to a receiver input: a head's q, k or v, or the "
        '`logits` (the final residual). (Edge-level graft exists too, `semantics="graft"`, '
        "at about 1.8x the cost of a splice per circuit; see the README.) "
        "**Splice, reference → intervened**: step 1500 runs with its own weights, and only the "
        "circuit's edges carry step 400's cached sender writes. Which of step 400's signals break "
        "induction?"
    ),
    new_code_cell(
        "splice_r2i = md.search_circuit(\n"
        "    pair,\n"
        "    task,\n"
        '    level="edge",\n'
        '    method="attribution",\n'
        '    direction="reference->intervened",\n'
        '    semantics="splice",\n'
        ")\n"
        "print(splice_r2i)\n"
        "splice_r2i.figure()"
    ),
    new_markdown_cell(
        "K-composition: L0H3's step-400 write, read by the *keys* of layer-1 heads, is enough to "
        "break induction (the layer-1 heads can no longer find the previous occurrence), plus one "
        "direct path to the logits. The node graft above found L0H3 for the same reason.\n\n"
        "**Splice, intervened → reference** cannot reach 0.9: under splice the target's final "
        "norm and unembedding (and the attention output biases `b_O`) always run, so even the "
        "full graph gives step 1500's residual stream read out by *step 400's* unembedding, which "
        "changed in training too. The search warns and reports that ceiling (faithfulness of "
        "the full graph); `max_size` stops the growing early, since no circuit can reach the "
        "target:"
    ),
    new_code_cell(
        "with warnings.catch_warnings(record=True) as caught:\n"
        '    warnings.simplefilter("always", CircuitNotFaithfulWarning)\n'
        "    splice_i2r = md.search_circuit(\n"
        "        pair,\n"
        "        task,\n"
        '        level="edge",\n'
        '        method="attribution",\n'
        '        direction="intervened->reference",\n'
        '        semantics="splice",\n'
        "        max_size=4,\n"
        "    )\n"
        'print(f"reached: {splice_i2r.reached}")\n'
        'print(f"best circuit of <= 4 edges: {splice_i2r.faithfulness:.3f}")\n'
        "print(f\"ceiling, all {splice_i2r.provenance['n_members']} edges: {splice_i2r.ceiling:.3f}\")\n"
        'print(f"warning: {caught[0].message}")'
    ),
    new_markdown_cell(
        "Node-level graft has no such ceiling: `unembed` is a node there, and the intervened → "
        "reference graft circuit above includes it, with a large drop-one loss.\n\n"
        "**Ablate**: now the *source* model runs, and every edge *outside* the circuit carries "
        "the target's cached sender write. **Intervened → reference** this is ACDC on the "
        "trained model, with step 400's run as the ablation: which of step 1500's own "
        "connections does its induction need? The search "
        "returns a few dozen edges including every `L0H3 -> L1Hx.k` K-composition edge (README, "
        '"Circuits across two checkpoints"); with one exact run per candidate in the pruning '
        "pass it takes minutes on a CPU, so it is not run here. Two exact `md.patch_edges` runs "
        "show the K-composition edges' role instead: the full graph (which reproduces step "
        "1500), and the full graph without the four `L0H3 -> L1Hx.k` edges:"
    ),
    new_code_cell(
        "graph = md.Graph.from_model(pair)\n"
        'k_comp = [e for e in graph.edges if str(e).startswith("L0H3 -> L1") and str(e).endswith(".k")]\n'
        "rest = [e for e in graph.edges if e not in k_comp]\n"
        'for name, edges in [("all edges", graph.edges), ("all but " + ", ".join(map(str, k_comp)), rest)]:\n'
        "    r = md.patch_edges(\n"
        '        pair, task, edges, "intervened->reference", semantics="ablate", n_boot=1000, seed=0\n'
        "    )\n"
        '    print(f"{len(edges)} edges ({name}): {r.score:.3f} of the shift")'
    ),
    new_markdown_cell(
        "## 5. Across the phase change\n\n"
        "The zoo ships the training run the pair comes from: 10 checkpoints, steps 0 to 1500 "
        "(`load_series()`); load six of them, around the phase change, and use the first 16 "
        "of the task's 32 prompts to keep this section fast. Against step 0, patch "
        "each head's output from step *k* into step 0 (intervened → reference, one pair per "
        "step). `emergence` reports, per head, the first "
        "step whose effect's confidence interval lies beyond 10% of the whole run's shift "
        '(`scale="series"`: every pair in the unit of the last-vs-first shift):'
    ),
    new_code_cell(
        "series = load_series(steps=[0, 400, 750, 800, 850, 1500])  # step 0 is the reference\n"
        "print(series)\n"
        "few = task.subset(range(16))\n"
        'head_series = series.sweep(few, "head_out", "intervened->reference", n_boot=500, seed=0)\n'
        'print(head_series.emergence(0.05, threshold=0.1, scale="series"))\n'
        'head_series.figure(top=4, scale="series")'
    ),
    new_markdown_cell(
        "The layer-1 heads become large all at once, at the phase change; no layer-0 head "
        "carries much on its own (its output matters through the layer-1 keys, not directly). "
        "Now the node-level graft circuit reference → intervened, with step 400 as the "
        "reference, at a few steps across the phase change: which of step 400's components "
        "break step *k*'s behaviour?"
    ),
    new_code_cell(
        "steps = [400, 800, 850, 1500]\n"
        "models = [series.models[series.labels.index(step)] for step in steps]\n"
        "run = md.CheckpointSeries(models, labels=steps)  # step 400 is the reference\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        '    warnings.simplefilter("always", CircuitNotFaithfulWarning)\n'
        "    circuits = run.search_circuit(\n"
        "        few,\n"
        '        level="node",\n'
        '        method="greedy",\n'
        '        direction="reference->intervened",\n'
        '        semantics="graft",\n'
        "    )\n"
        "for step, c in circuits.items():\n"
        '    status = "reached" if c.reached else "NOT reached"\n'
        "    print(\n"
        '        f"step {step}: shift {c.shift.shift:+.2f}, {list(c.names)}, "\n'
        '        f"faithfulness {c.faithfulness:.2f} ({status})"\n'
        "    )\n"
        'md.circuit_membership(circuits, values="minimality")'
    ),
    new_code_cell("membership_figure(circuits)"),
    new_markdown_cell(
        "Read the membership table column by column: a circuit undoes the shift *from step "
        "400 to that step*, so each column answers for its own pair. Once induction has formed, "
        "the circuit that breaks it settles on L0H3; at the start of the phase change the shift "
        "is smaller and partly of another kind, and so is its circuit (the search warns and "
        "marks a column NOT reached if it cannot reach the target)."
    ),
    new_markdown_cell(
        "## 6. Comparing two circuits\n\n"
        "`md.compare_circuits(a, b)`: node (and edge) Jaccard overlap, the overlap weighted by "
        "each member's share of the contribution, the rank correlation of shared members' "
        "drop-one losses, and what b gained or lost relative to a. Here the circuit just after "
        "the phase change against the trained model's (same semantics and direction, so each "
        "member is the same intervention in both):"
    ),
    new_code_cell(
        'cmp = md.compare_circuits(circuits[850], circuits[1500], labels=("step 850", "step 1500"))\n'
        "print(cmp)\n"
        "cmp.figure()"
    ),
    new_markdown_cell(
        "## Which semantics answers which question\n\n"
        "- **graft** (nodes) asks about *weights*: which components' parameters must come from "
        "S. Reference → intervened it localises what training changed that matters (L0H3); "
        "intervened → reference it measures how co-adapted the change is (here: nearly "
        "everything). It has an `unembed` node, so it can always reach the full shift.\n"
        "- **splice** asks about *activity*: which of S's signals, read by T's weights, carry the "
        "difference. Cheap and sharp (K-composition into layer-1 keys, reference → intervened), "
        "but T's unembedding always reads the result out, which caps what it can explain "
        "(check `.ceiling`).\n"
        "- **ablate** asks about *S's own computation*: the connections S needs when everything "
        "else is replaced by T's, ACDC with T as the baseline. It finds the full mechanism "
        "(intervened → reference: large, and built around the same K-composition edges), at the "
        "price of larger circuits and many exact runs.\n\n"
        "Report the semantics and the direction with every circuit: the same member is a "
        "different intervention under each."
    ),
]


def _delta_xai_cells() -> list[nbformat.NotebookNode]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nb_delta_xai", HERE / "_delta_xai.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.cells(STATIC_FALLBACK))


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_reproducible_figures.ipynb": REPRODUCIBLE,
    "03_attribution.ipynb": ATTRIBUTION,
    "04_circuit_search.ipynb": CIRCUITS,
    "05_delta_xai.ipynb": _delta_xai_cells(),
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

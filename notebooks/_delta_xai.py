"""Cells of ``05_delta_xai.ipynb`` (imported by ``_build.py``): the Δ-XAI pipeline on the
finetune zoo pair, read as an auditor would."""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell


def cells(static_fallback: str) -> list:
    return [
        new_markdown_cell(
            "# Δ-XAI: from a behavioural shift to an audit-ready transition report\n\n"
            "A model was fine-tuned and now behaves differently. An auditor has to say *what* "
            "changed, *where* it lives in the network, whether the localisation is *warranted*, "
            "and *what to watch* in the next checkpoint. `mechdelta.explain` runs the whole "
            "pipeline in one call: shift → weight diff → representation screen → cross-model "
            "patching in both directions → warranted claims → steering check → (small graphs) a "
            "graft circuit → transition report in Markdown, HTML, JSON and PDF.\n\n"
            "The pair here is the zoo's `finetune` entry: the key-value recall model fine-tuned "
            "with **all weights trainable** to answer the value's successor after a trigger token. "
            "Unlike `planted`, nobody knows where the change lives: this is the situation of a "
            "real audit."
        ),
        new_code_cell(static_fallback),
        new_code_cell(
            "import json\n"
            "import tempfile\n"
            "from pathlib import Path\n"
            "\n"
            "import mechdelta as md\n"
            "\n"
            'entry = md.zoo.load("finetune")\n'
            "pair, task = entry.pair, entry.task\n"
            'out = Path(tempfile.mkdtemp()) / "finetune-audit"\n'
            "explanation = md.explain(\n"
            "    pair,\n"
            "    task,\n"
            "    out=out,\n"
            "    n_boot=500,\n"
            "    intervention={\n"
            '        "kind": "full fine-tune",\n'
            '        "data": "recall prompts, half with a trigger token (answer: successor)",\n'
            '        "owner": "model team",\n'
            "    },\n"
            ")\n"
            "print(explanation)"
        ),
        new_markdown_cell(
            "## 1. Is there a shift at all?\n\n"
            "The first stage measures the task metric (`logit_diff`: correct minus wrong answer "
            "logit) on both checkpoints and the shift with a bootstrap interval over prompts. Had "
            "the interval contained 0, `explain` would have stopped here with a short report "
            "(`status == 'no_shift'`): nothing would be warranted downstream."
        ),
        new_code_cell("explanation.shift.figure()"),
        new_markdown_cell(
            "## 2. Which weights changed, and where do the representations diverge?\n\n"
            "Every weight changed (a full fine-tune), so the weight diff alone does not localise "
            "anything. The representation screen runs both models on the same prompts and "
            "compares them layer by layer: CKA (1 = the same geometry), the relative size of the "
            "activation change, the KL of each layer's logit-lens distribution, and the "
            "Jensen-Shannon divergence of each head's attention."
        ),
        new_code_cell("explanation.weights.figure()"),
        new_code_cell(
            "reps = explanation.representations\n"
            'print(*reps.candidates(4), sep="\\n")\n'
            "reps.figure()"
        ),
        new_markdown_cell(
            "## 3. Which components carry the shift? Patching in both directions\n\n"
            "*reference → intervened*: each head's (MLP's) output from the reference run is put "
            "into the intervened run; the score is the fraction of the shift this **undoes**. "
            "*intervened → reference*: the reverse; the score is the fraction of the shift the "
            "component **carries on its own**. The two questions differ: a component can be "
            "necessary without being sufficient."
        ),
        new_code_cell('explanation.patching["mlp_out"].figure()'),
        new_code_cell('explanation.patching["head_out"].figure()'),
        new_markdown_cell(
            "## 4. What is warranted?\n\n"
            "A claim is made only when the site's per-prompt effect passes a sign-flip test over "
            "prompts after Benjamini-Hochberg adjustment across the grid, and its effect is at "
            "least 5% of the shift. Each row says what was spliced, where, and in which direction."
        ),
        new_code_cell(
            'columns = ["component", "site", "direction", "effect", "ci_low", "ci_high", "q"]\n'
            "explanation.to_dataframe()[columns].head(10)"
        ),
        new_markdown_cell(
            "## 5. Validation: steering and the graft circuit\n\n"
            "Steering adds the mean difference of the two models' residual streams (at the "
            "located layer, estimated on half of the prompts) to the reference, and subtracts it "
            "from the intervened model, on the *other* half. A random direction of the same norm "
            "is the control: a constant vector moves a confident answer a little whatever its "
            "direction, so only what exceeds the control counts. Here the new answer depends on "
            "each prompt (the successor of *its* value): one constant vector cannot carry it, and "
            "the check says so instead of lending the localisation false support."
        ),
        new_code_cell("explanation.steering.figure()"),
        new_markdown_cell(
            "The circuit is a node-level search under *graft* semantics: the smallest set of "
            "components whose **parameters**, moved from the intervened model into the reference, "
            "reproduce 90% of the shift, every other component recomputing on the hybrid's inputs."
        ),
        new_code_cell("print(explanation.circuit)\nexplanation.circuit.figure()"),
        new_markdown_cell(
            "## 6. The transition report\n\n"
            "`out/` holds every stage (re-running the same call resumes) and the report in four "
            "formats. `report.json` follows a documented schema "
            "(`mechdelta.explain.schema.REPORT_SCHEMA`), so audit tooling can read the claims, "
            "the located components and the provenance without parsing prose."
        ),
        new_code_cell("sorted(p.name for p in out.iterdir())"),
        new_code_cell(
            'doc = json.loads((out / "report.json").read_text())\n'
            'print(json.dumps(doc["monitor"], indent=2))\n'
            'print(doc["intervention"])'
        ),
        new_code_cell('print((out / "report.md").read_text()[:2500])'),
    ]

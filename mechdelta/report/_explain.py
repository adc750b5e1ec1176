"""Transition-report section of explain analyses (``kind = "explain"``; registered with
:func:`register_section`): the explanation's summary (status, shift, the strongest warranted
claims, the steering verdict, the circuit, the located components) and where the analysis' own
audit report lies. A pair without a distinguishable shift gets the short form: the shift, and
that the pipeline stopped there.

The audit edition (``results/<id>/explanation/report.{html,pdf,md,json}``, written by
:func:`mechdelta.explain.audit.write_audit_report`) is the document for an auditor; this section
summarises it inside the run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechdelta.report._blocks import Block, Figure, Link, Section, Table, Text
from mechdelta.report._build import ReportContext, _ci, _num, register_section

__all__ = ["AUDIT_NOTE", "MAX_CLAIMS", "audit_blocks"]

#: The section lists at most this many claims (strongest |effect| first); the audit report has all.
MAX_CLAIMS = 8
#: Said under every explain section: which document goes to an auditor.
AUDIT_NOTE = (
    "The audit edition of this explanation (above) is the document to hand to an auditor: it "
    "states the declared intervention, the behaviour, where the shift lives, how it was "
    "validated, the warranted claims and their limits, what to monitor in future checkpoints "
    "and the full provenance. This section is its summary; report.json follows the documented "
    "schema (mechdelta.explain.schema)."
)
_FORMAT_TEXT = {
    "html": "self-contained page",
    "pdf": "printed (headless Chromium)",
    "md": "Markdown",
    "json": "machine-readable",
}


def _rel(ctx: ReportContext, path: Path) -> str:
    """``path`` relative to the run directory (where report.md and report.html lie)."""
    try:
        return Path(path).resolve().relative_to(ctx.run.path.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def audit_blocks(ctx: ReportContext, analysis_id: str, e: Any) -> list[Block]:
    """The audit report files of the analysis (paths relative to the run's report), why the
    PDF is missing when it is, and :data:`AUDIT_NOTE`."""
    from mechdelta.runs._explain import EXPLANATION_DIR, REPORT_FORMATS

    root = ctx.run.result_dir(analysis_id) / EXPLANATION_DIR
    reports = dict(e.reports)
    rows = tuple(
        (fmt, _rel(ctx, reports[fmt]), _FORMAT_TEXT[fmt])
        for fmt in REPORT_FORMATS
        if fmt in reports
    )
    blocks: list[Block] = [
        Table(
            ("format", "file (relative to this report)", "what"),
            rows,
            f"the audit edition of {analysis_id}, stored with the analysis",
        )
    ]
    blocks += [
        Link(f"{analysis_id}: audit report ({fmt})", _rel(ctx, reports[fmt]))
        for fmt in REPORT_FORMATS
        if fmt in reports
    ]
    if "pdf" not in reports:
        why = "not requested (pdf = false)"
        if ctx.run.experiment.analysis(analysis_id).pdf:  # asked for: report.json says why not
            try:
                doc = json.loads((root / "report.json").read_text("utf-8"))
                why = str(doc["provenance"]["pdf"])
            except (OSError, ValueError, KeyError, TypeError):
                why = "not written"
        blocks.append(Text(f"No report.pdf: {why.rstrip('.')}."))
    blocks.append(Text(AUDIT_NOTE))
    return blocks


def _shift_text(e: Any) -> str:
    s = e.shift
    level = round(100 * (1 - float(s.alpha)))
    return (
        f"Shift: {s.metric} moved from {s.reference_mean:.4g} (reference) to "
        f"{s.intervened_mean:.4g} (intervened) on {len(s.reference)} prompts, "
        f"{s.shift:+.4g} ({level}% bootstrap CI [{s.ci[0]:+.4g}, {s.ci[1]:+.4g}])."
    )


def _claims_blocks(e: Any) -> list[Block]:
    claims = e.all_claims()
    alpha, min_effect = e.params["alpha"], e.params["min_effect"]
    criteria = (
        f"alpha = {alpha:g} (the explanation's own; the report's alpha does not change it), "
        f"effects of at least {min_effect:.0%} of the shift"
    )
    if not claims:
        reasons = sorted({cl.reason for cl in e.claims.values() if cl.reason})
        return [
            Text(
                f"No site-level claim is warranted ({criteria})"
                + (f": {'; '.join(reasons)}." if reasons else ".")
            )
        ]
    comp_of = {id(c): comp for comp, cl in e.claims.items() for c in cl}
    rows = tuple(
        (
            comp_of.get(id(c), ""),
            c.label,
            c.direction.value,
            f"{_num(c.effect)} {_ci(*c.ci)}",
            f"{c.q:.2g}",
        )
        for c in claims[:MAX_CLAIMS]
    )
    more = (
        f"; {len(claims) - len(rows)} more in the audit report" if len(claims) > len(rows) else ""
    )
    return [
        Text(f"{len(claims)} warranted claim(s) at {criteria}. The strongest: {claims[0].text}."),
        Table(
            ("component", "site", "direction", "effect [CI]", "q"),
            rows,
            "effect: fraction of the shift (reference -> intervened: undone by restoring the site "
            "from the reference; intervened -> reference: carried by the site into the "
            f"reference); sorted by |effect|, largest first{more}",
        ),
    ]


def _plan_text(e: Any) -> str:
    plan = e.plan
    comps = ", ".join(plan.get("components", [])) or "none"
    layers = ", ".join(str(x) for x in plan.get("layers", [])) or "none"
    return (
        f"Localisation: {plan.get('method', 'n/a')} cross-model patching of {comps} at layers "
        f"{layers}, both directions ({plan.get('why', '')}). The maps below: one panel per "
        "direction, each site's score the fraction of the shift it explains."
    )


@register_section("explain")
def _explain_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.explain.audit import steering_lines

    e = result
    if not e.explained:
        blocks: list[Block] = [
            Text(f"Status: no shift to explain. {_shift_text(e)}"),
            Text(
                "The shift's interval contains 0, so the pipeline stopped after measuring it: no "
                "localisation, steering, circuit or claims were attempted (a claim about a shift "
                "that cannot be told from zero would not be warranted)."
            ),
            Figure(analysis_id),
            *audit_blocks(ctx, analysis_id, e),
        ]
        return Section("Explanation: no shift to explain", tuple(blocks), analysis_id)
    blocks = [
        Text(
            "Status: explained. The Δ-XAI pipeline ran in one call (mechdelta.explain): shift, "
            "weight changes, representation screen, cross-model patching in both directions, "
            "warranted claims, steering validation"
            + (", circuit search." if e.circuit is not None else ".")
        ),
        Text(_shift_text(e)),
        Figure(analysis_id),
        *_claims_blocks(e),
        Text(_plan_text(e)),
        *(Figure(f"{analysis_id}.{comp}") for comp in e.patching),
    ]
    if e.steering is not None:
        blocks.append(
            Text(
                "Steering with each located layer's vector v (mean of intervened minus reference "
                "activations): 'reproduced' is the fraction of the shift that reference + alpha v "
                "reproduces, 'removed' the fraction that intervened - alpha v removes, each "
                "against random directions of the same norm."
            )
        )
        blocks += [Text(line) for line in steering_lines(e.steering)]
        blocks.append(Figure(f"{analysis_id}.steering"))
    else:
        blocks.append(Text("Steering: not run (no located layer)."))
    if e.circuit is not None:
        blocks += [
            Text(f"Circuit: {str(e.circuit).splitlines()[0]}."),
            Figure(f"{analysis_id}.circuit"),
        ]
    located = e.located
    blocks.append(
        Text(
            "Located components (to monitor in future checkpoints): "
            f"{', '.join(located.get('components', [])) or 'none'} (basis: "
            f"{located.get('basis', 'n/a')})."
        )
    )
    blocks += audit_blocks(ctx, analysis_id, e)
    return Section(
        "Explanation: what changed, where, and how it was validated", tuple(blocks), analysis_id
    )

"""The transition report, audit edition, of an :class:`~mechdelta.explain.Explanation`.

``write_audit_report(explanation, out)`` writes ``out/report.md``, ``out/report.html`` (one
self-contained page), ``out/report.json`` (machine-readable; schema:
:data:`mechdelta.explain.schema.REPORT_SCHEMA`, documented there) and ``out/report.pdf`` (printed
by headless Chromium), plus ``out/figures/<name>.html`` (and ``.png`` when a browser is found).

Sections: summary; the intervention (as *declared by the user*: mechdelta cannot verify it); the
behaviour (the task metric on both models, the shift with its interval); where it lives (weight
changes, the representation screen, the patching maps in both directions); how (the circuit, when
searched); validation (steering and the circuit's faithfulness); warranted claims and their limits;
what to monitor in future checkpoints; provenance (weights, tokenizer, prompts, versions, seeds).
A pair without a distinguishable shift gets a short report that says so and stops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechdelta.errors import ExportError
from mechdelta.explain._render import Fig, print_pdf, render_html, render_md, write_text
from mechdelta.explain.explanation import Explanation
from mechdelta.report._blocks import Section, Table, Text

__all__ = ["report_document", "steering_lines", "write_audit_report"]

Blocks = list[Any]
_TOP = 8
_CANDIDATES = 4


def _num(x: float, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else format(float(x), fmt)


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.0f}%"


def _figures(e: Explanation) -> dict[str, tuple[Any, str]]:
    """name -> (plotly figure, caption) of every figure the report shows."""
    figs: dict[str, tuple[Any, str]] = {
        "shift": (e.shift.figure(), "the task metric per prompt on both models")
    }
    if not e.explained:
        return figs
    figs["weights"] = (e.weights.figure(), "relative weight change per component")
    if e.representations is not None:
        figs["representations"] = (e.representations.figure(), "representation screen")
    for comp, both in e.patching.items():
        figs[f"patching_{comp}"] = (
            both.figure(),
            f"{comp}: fraction of the shift, both directions",
        )
    if e.steering is not None:
        figs["steering"] = (e.steering.figure(), "steering dose-response vs random directions")
    if e.circuit is not None:
        figs["circuit"] = (e.circuit.figure(), "node-level graft circuit")
    return figs


def _sections(e: Explanation, have: set[str]) -> list[tuple[Section, Blocks]]:
    def fig(name: str, caption: str = "") -> list[Any]:
        return [Fig(name, caption)] if name in have else []

    s = e.shift
    level = round(100 * (1 - s.alpha))
    behaviour: Blocks = [
        Text(
            f"Task {s.task!r}, metric {s.metric}, {len(s.reference)} prompts. Reference mean "
            f"{s.reference_mean:.4g}, intervened mean {s.intervened_mean:.4g}; shift (intervened "
            f"- reference) {s.shift:+.4g} [{level}% bootstrap CI {s.ci[0]:+.4g}, {s.ci[1]:+.4g}]."
        ),
        *fig("shift"),
    ]
    out: list[tuple[Section, Blocks]] = [
        (Section("Summary", (), "summary"), _summary(e)),
        (Section("Intervention (declared)", (), "intervention"), _intervention(e)),
        (Section("Behaviour", (), "behaviour"), behaviour),
    ]
    if not e.explained:
        out.append((Section("Provenance", (), "provenance"), _provenance(e)))
        return out
    where: Blocks = [Text(_weights_text(e)), *fig("weights")]
    if e.representations is not None:
        where += [Text(_screen_text(e)), *fig("representations")]
    where.append(Text(f"Patching: {e.plan.get('why', '')}. " + _SPLICE))
    for comp in e.patching:
        where += [*fig(f"patching_{comp}", f"{comp}"), _top_table(e, comp)]
    out.append((Section("Where the shift lives", (), "where"), where))
    if e.circuit is not None:
        from mechdelta.report._circuits import (
            _faithfulness_sentence,
            _member_table,
            _semantics_sentence,
        )

        c = e.circuit
        how: Blocks = [
            Text(_semantics_sentence(c)),
            Text(_faithfulness_sentence(c)),
            *fig("circuit"),
            _member_table(c),
        ]
        out.append((Section("How: the circuit", (), "how"), how))
    out.append((Section("Validation", (), "validation"), _validation(e, fig)))
    out.append((Section("Warranted claims and their limits", (), "claims"), _claims(e)))
    out.append((Section("What to monitor", (), "monitor"), _monitor(e)))
    out.append((Section("Provenance", (), "provenance"), _provenance(e)))
    return out


_SPLICE = (
    "Each score is one site's splice: reference->intervened puts the site's activation from the "
    "reference run into the intervened run (score = fraction of the shift undone); "
    "intervened->reference puts the intervened run's activation into the reference run (score = "
    "fraction of the shift carried). 1 = the whole shift, 0 = none."
)


def _summary(e: Explanation) -> Blocks:
    if not e.explained:
        return [
            Text(
                f"No shift to explain: {e.shift}. The pipeline stopped after measuring the shift; "
                "no localisation, steering or claims were attempted (a claim about a shift that "
                "cannot be told from zero would not be warranted)."
            )
        ]
    claims = e.all_claims()
    text = [Text(str(e.shift))]
    if claims:
        text.append(
            Text(f"{len(claims)} warranted claim(s) at alpha = {e.params['alpha']}; the strongest:")
        )
        text += [Text(f"• {c.text}") for c in claims[:5]]
    else:
        reasons = {cl.reason for cl in e.claims.values() if cl.reason}
        text.append(
            Text(
                "No site-level claim is warranted"
                + (f": {'; '.join(sorted(reasons))}" if reasons else ".")
            )
        )
    if e.steering is not None:
        text += [Text(line) for line in steering_lines(e.steering)]
    if e.circuit is not None:
        text.append(Text(f"Circuit: {str(e.circuit).splitlines()[0]}"))
    return text


def _intervention(e: Explanation) -> Blocks:
    rows = e.intervention.rows()
    if not rows:
        return [
            Text(
                "Nothing was declared about the intervention (pass intervention= to "
                "explain, or --kind/--data/--date/--owner to `mechdelta explain`). The "
                "report describes the two checkpoints only."
            )
        ]
    return [
        Text("As declared by the user; mechdelta has not verified any of it."),
        Table(("field", "value"), tuple((k, v) for k, v in rows)),
    ]


def _weights_text(e: Explanation) -> str:
    w = e.weights
    changed = w.changed()
    top = sorted(changed, key=lambda r: -r.relative)[:5]
    names = ", ".join(f"{r.label} ({r.relative:.2g})" for r in top)
    return (
        f"Weights: {len(changed)} of {len(w.rows)} components changed (||Δ|| / ||W_ref|| per "
        f"component); largest: {names or 'none'}."
    )


def _screen_text(e: Explanation) -> str:
    found = e.representations.candidates(_CANDIDATES)
    text = (
        "Representation screen (the task's prompts through both models; each panel of the figure "
        "is one measure): "
    )
    if not found:
        return text + "no layer's residual stream diverges (relative activation change)."
    return text + "divergence starts at " + "; ".join(str(c) for c in found) + "."


def _top_table(e: Explanation, comp: str) -> Table:
    rows = []
    for part in e.patching[comp]:
        for sc in part.top(_TOP // 2):
            ci = getattr(sc, "ci", (math.nan, math.nan))
            rows.append(
                (
                    part.direction.value,
                    str(sc.site),
                    _num(sc.score),
                    f"[{_num(ci[0])}, {_num(ci[1])}]",
                )
            )
    return Table(
        ("direction", "site", "score", "CI"),
        tuple(rows),
        f"{comp}: strongest sites per direction by |score|",
    )


def _validation(e: Explanation, fig: Any) -> Blocks:
    out: Blocks = []
    if e.steering is not None:
        st = e.steering
        out.append(
            Text(
                f"Steering (mean of intervened minus reference activations over {len(st.vectors.fit_indices)} "
                f"prompts, evaluated on {len(st.shift.reference)} {st.evaluation}; each located layer's vector v on its own): reference "
                "+ alpha v should reproduce the shift, intervened - alpha v remove it; the control is "
                f"{st.n_random} random directions of the same norm. A fraction counts as beating the "
                "control only when its interval lies above every random direction's fraction."
            )
        )
        out += [Text(line) for line in steering_lines(st)]
        out += fig("steering")
    else:
        out.append(Text("Steering: not run (no located layer)."))
    if e.circuit is not None:
        c = e.circuit
        out.append(
            Text(
                f"Circuit faithfulness (exact hybrid runs): {_num(c.faithfulness)} of the mean shift, "
                f"{_num(c.faithfulness_per_prompt)} per prompt; "
                + ("reaches" if c.reached else "does NOT reach")
                + f" the target {c.target:g}."
            )
        )
    return out


def _q(q: float) -> str:
    """A q-value for a table cell: ``< 0.001`` below the Monte Carlo floor's display."""
    return "n/a" if not math.isfinite(q) else "< 0.001" if q < 0.001 else f"{q:.3f}"


def steering_lines(st: Any) -> list[str]:
    """One sentence per steered site at alpha = 1 (or the largest alpha)."""
    frame = st.to_dataframe()
    alpha = 1.0 if 1.0 in set(frame["alpha"]) else float(frame["alpha"].max())
    lines = []
    for site in dict.fromkeys(frame["site"]):
        parts = []
        for measure in ("reproduced", "removed"):
            r = frame[(frame["site"] == site) & (frame["measure"] == measure)
                      & (frame["alpha"] == alpha)].iloc[0]  # fmt: skip
            verdict = "beats" if bool(r["beats"]) else "does not beat"
            parts.append(
                f"{measure} {_pct(r['fraction'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] "
                f"(random directions: mean {_pct(r['control_mean'])}, max "
                f"{_pct(r['control_max'])}; {verdict} them)"
            )
        lines.append(f"Steering at {site}, alpha = {alpha:g}: " + "; ".join(parts) + ".")
    return lines


def _claims(e: Explanation) -> Blocks:
    rows = tuple(
        (
            c.label,
            c.direction.value,
            _pct(c.effect),
            f"[{_pct(c.ci[0])}, {_pct(c.ci[1])}]",
            _q(c.q),
            str(c.n_prompts),
        )
        for c in e.all_claims()
    )
    first = e.claims[next(iter(e.claims))] if e.claims else None
    out: Blocks = []
    if rows:
        out.append(
            Table(
                ("site", "direction", "effect", "CI", "q", "prompts"),
                rows,
                "effect = fraction of the shift (see the patching semantics above)",
            )
        )
    else:
        out.append(Text("No claim is warranted at this level."))
    test = first.test if first is not None else "sign-flip"
    out.append(
        Text(
            "Limits: claims hold for this task's prompts only (their distribution, their metric). "
            "Each site is tested over prompts on paired per-prompt differences "
            f"({test}); the Benjamini-Hochberg family is each component's grid in one direction "
            f"(no correction across components), level alpha = {e.params['alpha']}, effects below "
            f"{e.params['min_effect']:.0%} of the shift are not claimed. A splice score is one site "
            "at a time: scores do not add up (components interact), and a site can carry a shift it "
            "did not cause (downstream of the change). Gradient estimates are never claimed; only "
            "exact patches are. Steering and circuits are validations, not tests against chance."
        )
    )
    return out


def _monitor(e: Explanation) -> Blocks:
    loc = e.located
    comps = loc.get("components", [])
    s = e.shift
    return [
        Text(
            f"Track the task metric {s.metric} (reference {s.reference_mean:.4g}, this "
            f"intervened checkpoint {s.intervened_mean:.4g}) and the fraction of the shift each "
            f"located component carries: {', '.join(comps) or 'none located'} (basis: "
            f"{loc.get('basis', 'n/a')}). On each future checkpoint, re-run `mechdelta explain` "
            "with the same task against the same reference (or `patch` these sites in both "
            "directions) and flag a change of the located set or a claimed effect leaving its "
            "interval."
        )
    ]


def _provenance(e: Explanation) -> Blocks:
    p = e.provenance
    models = p.get("models", {})
    rows = [
        (f"{k} weights", f"{v.get('name', '')} [{v.get('weights_hash', '')}]")
        for k, v in models.items()
        if isinstance(v, dict)
    ]
    task = p.get("task", {})
    if isinstance(task, dict):
        rows += [(f"task {k}", str(v)) for k, v in sorted(task.items())]
    rows += [(f"param {k}", str(v)) for k, v in sorted(e.params.items())]
    env = e.shift.provenance
    rows += [
        (k, str(env[k]))
        for k in ("mechdelta", "transformer_lens", "torch", "transformers", "python", "created")
        if k in env
    ]
    if e.timings:
        rows += [(f"seconds {k}", f"{v:.1f}") for k, v in e.timings.items()]
    return [Table(("what", "value"), tuple(rows))]


def _title(e: Explanation) -> str:
    models = e.provenance.get("models", {})
    names = [str(models.get(k, {}).get("name", k)) for k in ("reference", "intervened")]
    return f"Transition report: {names[0]} → {names[1]} on task {e.shift.task!r}"


# --- the machine-readable report ----------------------------------------------------------------


def report_document(e: Explanation) -> dict[str, Any]:
    """``report.json``'s content (schema: :data:`mechdelta.explain.schema.REPORT_SCHEMA`)."""
    from mechdelta.explain.schema import SCHEMA_ID

    s = e.shift
    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "status": e.status,
        "intervention": {**e.intervention.to_dict(), "declared_by": "user"},
        "behaviour": {
            "task": s.task,
            "metric": s.metric,
            "n_prompts": len(s.reference),
            "reference_mean": s.reference_mean,
            "intervened_mean": s.intervened_mean,
            "shift": s.shift,
            "ci": list(s.ci),
            "alpha": s.alpha,
            "significant": s.significant,
        },
        "weights": None,
        "representations": None,
        "patching": {},
        "circuit": None,
        "steering": None,
        "claims": [],
        "monitor": None,
        "params": e.params,
        "provenance": {**e.provenance, "environment": e.shift.provenance},
    }
    if not e.explained:
        return doc
    doc["weights"] = [
        {"component": r.label, "relative_change": r.relative} for r in e.weights.changed()
    ]
    reps = e.representations
    if reps is not None:
        frame = reps.to_dataframe()
        doc["representations"] = {
            "candidates": e.plan.get("candidates", []),
            "measures": [
                {
                    "site": str(r["site"]),
                    "layer": _int(r["layer"]),
                    "head": _int(r["head"]),
                    "measure": str(r["measure"]),
                    "value": _float(r["value"]),
                }
                for r in frame.to_dict("records")
            ],
        }
    for comp, both in e.patching.items():
        doc["patching"][comp] = {
            "method": e.plan.get("method"),
            "layers": e.plan.get("layers"),
            "directions": {
                part.direction.value: [
                    {"site": str(sc.site), "score": _float(sc.score)} for sc in part.top(_TOP)
                ]
                for part in both
            },
        }
    if e.circuit is not None:
        c = e.circuit
        doc["circuit"] = {
            "level": c.level,
            "semantics": c.semantics,
            "direction": c.direction.value,
            "members": [str(m) for m in c.members],
            "faithfulness": _float(c.faithfulness),
            "faithfulness_per_prompt": _float(c.faithfulness_per_prompt),
            "reached": bool(c.reached),
            "target": c.target,
        }
    if e.steering is not None:
        doc["steering"] = _steering_doc(e.steering)
    doc["claims"] = [
        {
            "site": c.label,
            "direction": c.direction.value,
            "effect": _float(c.effect),
            "ci": [_float(c.ci[0]), _float(c.ci[1])],
            "p": _float(c.p),
            "q": _float(c.q),
            "n_prompts": c.n_prompts,
            "test": c.test,
            "text": c.text,
        }
        for c in e.all_claims()
    ]
    doc["monitor"] = {
        "metric": s.metric,
        "components": e.located.get("components", []),
        "basis": e.located.get("basis", ""),
        "baseline": {"reference": s.reference_mean, "intervened": s.intervened_mean},
    }
    return doc


def _steering_doc(st: Any) -> dict[str, Any]:
    frame = st.to_dataframe()
    return {
        "rows": [
            {k: (_float(v) if isinstance(v, float) else v) for k, v in r.items()}
            for r in frame.to_dict("records")
        ],
        "summary": str(st).splitlines()[0],
    }


def _int(x: Any) -> int | None:
    try:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else int(x)
    except (TypeError, ValueError):
        return None


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# --- writing ------------------------------------------------------------------------------------


def write_audit_report(e: Explanation, out: str | Path, *, pdf: bool = True) -> dict[str, Path]:
    """Write the four formats (and the figures) to ``out``; returns format -> path.

    Figures: ``figures/<name>.png`` (kaleido + Chromium), linked from the Markdown; the
    interactive versions are embedded once in ``report.html`` (a per-figure HTML file would
    inline plotly.js, ~5 MB, each time). Without a browser every figure is written as
    ``figures/<name>.html`` instead, there is no PDF, and ``report.json``'s ``provenance.pdf``
    says why."""
    import json

    from mechdelta.core._io import atomic_write_json
    from mechdelta.plotting._export import FigureWriter

    root = Path(out)
    figdir = root / "figures"
    figures = _figures(e)
    written: dict[str, Path] = {}
    static: dict[str, bytes] = {}
    note = ""
    with FigureWriter() as writer:
        for name, (fig, _) in figures.items():
            if not note:
                try:
                    png = writer.write(fig, figdir / name, ["png"])["png"]
                except ExportError as exc:
                    note = f"no static figures (so no PDF): {exc}"
                else:
                    written[f"{name}.png"] = png
                    static[name] = png.read_bytes()
                    continue
            written[f"{name}.html"] = writer.write(fig, figdir / name, ["html"])["html"]
    sections = _sections(e, set(figures))
    title = _title(e)
    paths = {
        "md": write_text(root / "report.md", render_md(title, sections, written)),
        "html": write_text(
            root / "report.html",
            render_html(title, sections, {k: f for k, (f, _) in figures.items()}),
        ),
    }
    doc = report_document(e)
    if pdf and not note:
        try:
            paths["pdf"] = print_pdf(
                render_html(title, sections, {}, static=static), root / "report.pdf"
            )
        except ExportError as exc:
            note = f"PDF skipped: {exc}"
    doc["provenance"]["pdf"] = "written" if "pdf" in paths else "not requested" if not pdf else note
    atomic_write_json(root / "report.json", json.loads(json.dumps(doc, default=str)))
    paths["json"] = root / "report.json"
    return paths

"""The transition report of a run: Markdown plus one self-contained HTML file.

``write_report(run_dir)`` reads a finished run directory (no model is loaded) and writes
``report.md`` (figures linked from ``figures/``) and ``report.html`` (figures embedded, plotly.js
inlined once, so the file opens offline on its own). The report says what shifted and by how much
(with its confidence interval), where the shift is localised (top sites, both directions, as
tables), shows the figures, and ends with the provenance from the manifest.

An interrupted run (manifest status ``running``: analyses or figures missing) gets no report:
:class:`~mechdelta.errors.RunIncompleteError` says so and names the ``mechdelta run`` command that
finishes it, rather than a report pointing at figures that do not exist. The directory's lock is
held while the report is written (:class:`~mechdelta.errors.RunLockedError` while a run writes
there).

Attribution analyses (``attribute``, ``attribute_edges``) say in their sections that their scores
are gradient-based estimates, and show an attribution's check against exact patching (summary
line, verified sites, estimated-vs-exact scatter) when it was run with ``verify = k``.

Every site analysis (sweep, attribution, joint patch) shows its warranted claims
(:func:`mechdelta.claims` at the report's ``alpha``: per-site tests over prompts, adjusted across
the grid; with the run's ``[control]`` pair, whether each effect exceeds seed variation) and the
split-half reliability of its site ranking (line and figure) the run stored; the summary at the
top states only these warranted claims.

Each analysis kind contributes a section through a registry: a new kind registers a function
``(context, analysis_id, result) -> Section`` with :func:`register_section`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechdelta.core._io import atomic_write_text
from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError
from mechdelta.report._blocks import (
    Block,
    Figure,
    Section,
    Table,
    Text,
    render_html,
    render_md,
)
from mechdelta.runs._lock import run_lock
from mechdelta.runs.rundir import AnalysisExtras, StoredRun, result_figures

__all__ = [
    "Figure",
    "ReportContext",
    "Section",
    "Table",
    "Text",
    "register_section",
    "top_sites_table",
    "write_report",
]


@dataclass(frozen=True)
class ReportContext:
    """What a section may read: the stored run and the report's settings (``alpha``: the level
    of the claims; :meth:`extra`: what the run stored besides an analysis' result)."""

    run: StoredRun
    top_k: int = 10
    results: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.05
    extras: dict[str, AnalysisExtras] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)  # analysis id -> Claims (computed once)
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def level(self) -> int:
        return round(100 * (1 - float(self.run.manifest["seeds"].get("alpha", 0.05))))

    @property
    def run_alpha(self) -> float:
        """The run's ``[run] alpha``: its intervals' level, and its stored figures' shading."""
        return float(self.run.manifest["seeds"].get("alpha", 0.05))

    def extra(self, analysis_id: str) -> AnalysisExtras:
        """The analysis' split-half reliability, control result and their record (empty for an
        id the run does not hold)."""
        if analysis_id not in self.extras:
            run = self.run
            if analysis_id in run.ids and run.is_complete(analysis_id):
                rec = run.record(analysis_id, verify=False)
                self.extras[analysis_id] = AnalysisExtras(
                    reliability=run.reliability(analysis_id, verify=False),
                    control=run.control(analysis_id, verify=False),
                    info={k: rec[k] for k in ("reliability", "control") if k in rec},
                    notes=tuple(rec.get("notes", ())),
                )
            else:
                self.extras[analysis_id] = AnalysisExtras()
        return self.extras[analysis_id]


SectionFn = Callable[[ReportContext, str, Any], Section]
_SECTIONS: dict[str, SectionFn] = {}


def register_section(kind: str) -> Callable[[SectionFn], SectionFn]:
    """Register the report section of an analysis kind (replacing any earlier one)."""

    def deco(fn: SectionFn) -> SectionFn:
        _SECTIONS[kind] = fn
        return fn

    return deco


# --- formatting helpers -------------------------------------------------------------------------


def _num(x: float, fmt: str = "+.3f") -> str:
    if x is None or math.isnan(x):
        return "n/a"
    text = format(x, fmt)
    return text.replace("-", "+", 1) if float(text) == 0.0 else text  # no "-0.000"


def _ci(lo: float, hi: float, fmt: str = "+.3f") -> str:
    return f"[{_num(lo, fmt)}, {_num(hi, fmt)}]"


def _score(score: float, ci: tuple[float, float]) -> str:
    return f"{_num(score)} {_ci(*ci)}"


_DIRECTION_TEXT = {
    Direction.REFERENCE_TO_INTERVENED: (
        "reference → intervened",
        "reference activations restored inside the intervened model: the fraction of the shift "
        "this undoes",
    ),
    Direction.INTERVENED_TO_REFERENCE: (
        "intervened → reference",
        "intervened activations put into the reference model: the fraction of the shift this "
        "carries",
    ),
}


def _shift_sentence(shift: Any, level: int) -> str:
    lo, hi = shift.ci
    verdict = (
        "The shift is significant: its interval excludes 0."
        if shift.significant
        else "The interval contains 0: the shift is not distinguishable from noise, and patching "
        "scores (fractions of it) are not meaningful."
    )
    return (
        f"The intervention moved {shift.metric} from {shift.reference_mean:.4g} (reference) to "
        f"{shift.intervened_mean:.4g} (intervened) on {len(shift.reference)} prompts: a shift of "
        f"{shift.shift:+.4g} ({level}% bootstrap CI [{lo:+.4g}, {hi:+.4g}]). {verdict}"
    )


#: What a table with no rows means: every site's score was exactly 0.
NO_SITE_CHANGED = "no site changed the metric (every site scored exactly 0)"


def top_sites_table(result: Any, k: int = 10, *, estimated: bool = False) -> Table:
    """Top sites of a sweep (a SweepResult or a BothDirections of sweeps) by |score|, largest
    first, leaving out sites whose score is exactly 0 (patching them did not move the metric at
    all); the table has no rows when no site did (see :data:`NO_SITE_CHANGED`).

    For both directions, sites are ranked by the larger |score| of the two, with one column per
    direction, and left out only when both scores are 0. The caption states the sort rule.
    ``estimated=True`` (attribution results) says in the headers and caption that the scores and
    patched metrics are estimates.
    """
    from mechdelta.patching.results import BothDirections

    est = "estimated " if estimated else ""

    if isinstance(result, BothDirections):
        first, second = result.reference_to_intervened, result.intervened_to_reference
        a = {s.site: s for s in first.top(len(first.sites))}
        b = {s.site: s for s in second.top(len(second.sites))}

        def key(site: Any) -> float:
            vals = [abs(x.score) for x in (a[site], b[site]) if not math.isnan(x.score)]
            return max(vals) if vals else -1.0

        kept = [s for s in a if a[s].score != 0.0 or b[s].score != 0.0]
        order = sorted(kept, key=lambda s: -key(s))[:k]
        rows = tuple(
            (str(s), _score(a[s].score, a[s].ci), _score(b[s].score, b[s].ci)) for s in order
        )
        return Table(
            (
                "site",
                est + _DIRECTION_TEXT[first.direction][0],
                est + _DIRECTION_TEXT[second.direction][0],
            ),
            rows,
            f"{est}score: fraction of the shift explained [CI]; sorted by the larger |score| of "
            "the two directions, largest first; sites scoring 0 in both left out",
        )
    top = [s for s in result.top(len(result.sites)) if s.score != 0.0][:k]
    rows = tuple((str(s.site), _score(s.score, s.ci), f"{s.patched:.4g}") for s in top)
    return Table(
        ("site", f"{est}score ({_DIRECTION_TEXT[result.direction][0]})", f"{est}patched metric"),
        rows,
        f"{est}score: fraction of the shift explained [CI]; sorted by |score|, largest first; "
        "sites scoring 0 left out",
    )


# --- sections ---------------------------------------------------------------------------------------


@register_section("shift")
def _shift_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    lo, hi = result.ci
    table = Table(
        (
            "metric",
            "prompts",
            "reference",
            "intervened",
            "shift",
            f"{ctx.level}% CI",
            "significant",
        ),
        (
            (
                result.metric,
                str(len(result.reference)),
                f"{result.reference_mean:.4g}",
                f"{result.intervened_mean:.4g}",
                f"{result.shift:+.4g}",
                f"[{lo:+.4g}, {hi:+.4g}]",
                "yes" if result.significant else "no",
            ),
        ),
    )
    text = Text(
        f"The metric on each prompt under both models, and the mean shift with its {ctx.level}% "
        "bootstrap interval (prompts resampled)."
    )
    return Section("What shifted", (text, table, Figure(analysis_id)), analysis_id)


@register_section("sweep")
def _sweep_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.patching.results import BothDirections

    first = result.reference_to_intervened if isinstance(result, BothDirections) else result
    grid = " × ".join(f"{len(first.coords[d])} {d}s" for d in first.dims)
    directions = (
        [r.direction for r in result] if isinstance(result, BothDirections) else [first.direction]
    )
    text = [
        f"Each site ({first.component.value}, {grid}) patched on its own, "
        + " and ".join(_DIRECTION_TEXT[d][0] for d in directions)
        + ". "
        + " ".join(f"{_DIRECTION_TEXT[d][0]}: {_DIRECTION_TEXT[d][1]}." for d in directions)
    ]
    table = top_sites_table(result, ctx.top_k)
    if table.rows:
        text.append(f"Top site: {table.rows[0][0]} ({'; '.join(table.rows[0][1:])}).")
        found: Block = table
    else:
        found = Text(NO_SITE_CHANGED[0].upper() + NO_SITE_CHANGED[1:] + ".")
    return Section(
        f"Where it is localised: {first.component.value} sweep",
        (
            Text(" ".join(text)),
            found,
            Figure(analysis_id),
            *claims_blocks(ctx, analysis_id, result),
        ),
        analysis_id,
    )


@register_section("patch")
def _patch_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.patching.results import BothDirections

    parts = list(result) if isinstance(result, BothDirections) else [result]
    sites = ", ".join(str(s) for s in parts[0].sites)
    rows = tuple(
        (
            _DIRECTION_TEXT[r.direction][0],
            _score(r.score, r.ci),
            f"{r.patched:.4g}",
            f"{r.shift.reference_mean:.4g}",
            f"{r.shift.intervened_mean:.4g}",
        )
        for r in parts
    )
    table = Table(
        ("direction", "score [CI]", "patched", "reference", "intervened"),
        rows,
        f"joint patch of {sites}",
    )
    text = Text(
        f"The sites {sites} patched jointly. A score near 1 means these sites together account "
        "for the whole shift in that direction; near 0, for none of it."
    )
    return Section(
        f"Joint patch: {sites}",
        (text, table, Figure(analysis_id), *claims_blocks(ctx, analysis_id, result)),
        analysis_id,
    )


@register_section("weight_diff")
def _weight_diff_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    changed = sorted(result.changed(), key=lambda r: -r.relative)
    rows = tuple(
        (r.label, f"{r.relative:.4g}", f"{r.delta_norm:.4g}", f"{r.reference_norm:.4g}")
        for r in changed[: ctx.top_k]
    )
    text = Text(
        f"{len(changed)} of {len(result.rows)} weight components changed. Weights changing is "
        "not the same as a component mattering for the behaviour: compare with the sweeps."
    )
    table = Table(("component", "‖ΔW‖/‖W‖", "‖ΔW‖", "‖W‖"), rows, "largest relative changes")
    return Section("Weight changes", (text, table, Figure(analysis_id)), analysis_id)


@register_section("factorial")
def _factorial_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    lo, hi = result.interaction_ci
    rows = tuple(
        (model, f"{result.mean(model, 'clean'):.4g}", f"{result.mean(model, 'corrupted'):.4g}")
        for model in ("reference", "intervened")
    )
    text = Text(
        f"Model effect (clean inputs) {result.model_effect:+.4g}; input effect (reference) "
        f"{result.input_effect:+.4g}; interaction {result.interaction:+.4g} ({ctx.level}% CI "
        f"[{lo:+.4g}, {hi:+.4g}]). A non-zero interaction means the intervention changed how the "
        "model responds to the input manipulation; zero means it moved the metric uniformly."
    )
    table = Table(("model", "clean", "corrupted"), rows, f"mean {result.metric}")
    return Section("Model × input (factorial)", (text, table, Figure(analysis_id)), analysis_id)


# --- the report ---------------------------------------------------------------------------------------


def _summary(ctx: ReportContext, results: dict[str, Any]) -> list[Block]:
    from mechdelta.patching.results import BothDirections, PatchResult, SweepResult

    m = ctx.run.manifest
    exp = m["config"]
    models = m["models"]
    blocks: list[Block] = []
    if exp.get("description"):
        blocks.append(Text(exp["description"]))
    blocks.append(
        Text(
            f"Reference: {models['reference']['name']}. Intervened: {models['intervened']['name']}. "
            f"Task: {m['task']['name']} ({m['task']['metric']}, {m['task']['n_prompts']} prompts)."
        )
    )
    shift = next((r for r in results.values() if type(r).__name__ == "ShiftResult"), None)
    if shift is None:
        shift = next((r.shift for r in results.values() if hasattr(r, "shift")), None)
    if shift is not None:
        blocks.append(Text(_shift_sentence(shift, ctx.level)))
    for analysis_id, r in results.items():
        parts = list(r) if isinstance(r, BothDirections) else [r]
        if all(isinstance(s, SweepResult | PatchResult) for s in parts):
            blocks += summary_blocks(ctx, analysis_id, r)
            exact = all(type(s) is SweepResult for s in parts)  # not estimates, not a patch
            if exact and not top_sites_table(r, 1).rows:  # an exact fact, not a tested claim
                blocks.append(Text(f"In {analysis_id}, {NO_SITE_CHANGED}."))
    if ctx.alpha != ctx.run_alpha:
        blocks.append(
            Text(
                f"Claims here are at alpha = {ctx.alpha:g}; the run's figure files (figures/) "
                f"grey the sites not significant at its own alpha = {ctx.run_alpha:g} (the "
                "figures embedded in report.html use this report's alpha)."
            )
        )
    return blocks


def write_report(
    run_dir: str | os.PathLike[str], *, alpha: float | None = None
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into a finished run directory; returns both paths.

    ``alpha``: the level of the report's claims (a site is claimed when its adjusted p-value
    ``q < alpha``; :func:`mechdelta.claims`); default the run's ``[run] alpha`` (0.05 unless
    set). Raises :class:`~mechdelta.errors.ConfigError` for an alpha outside (0, 1),
    :class:`~mechdelta.errors.RunIncompleteError` for a partial or interrupted run (the
    message names the ``mechdelta run`` command that finishes it; no report is written),
    :class:`~mechdelta.errors.RunCorruptError` for damaged results and
    :class:`~mechdelta.errors.RunLockedError` while another process writes the directory.
    """
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0
    ):
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1), e.g. 0.05")
    with run_lock(run_dir, "mechdelta report"):
        return _write_report(StoredRun.open(run_dir), alpha)


def _write_report(run: StoredRun, alpha: float | None = None) -> tuple[Path, Path]:
    run.require_finished()
    exp = run.experiment
    results = {i: run.load(i) for i in run.ids}
    level = float(exp.run.alpha) if alpha is None else float(alpha)
    ctx = ReportContext(run, exp.output.top_k, results, alpha=level)
    sections: list[Section] = []
    for spec in exp.analyses:
        fn = _SECTIONS.get(spec.kind)
        if fn is None:
            sections.append(
                Section(spec.id, (Text(f"(no report section for kind {spec.kind!r})"),), spec.id)
            )
            continue
        section = fn(ctx, spec.id, results[spec.id])
        if spec.name is not None or sum(a.kind == spec.kind for a in exp.analyses) > 1:
            section = Section(f"{section.title} ({spec.id})", section.blocks, section.anchor)
        sections.append(section)
    sections.append(provenance_section(ctx))
    title = f"Transition report: {exp.name}"
    intro = _summary(ctx, results)
    figures = {
        n: f
        for i, r in results.items()
        for n, f in result_figures(
            i, r, reliability=ctx.extra(i).reliability, alpha=ctx.alpha
        ).items()
    }
    md_path, html_path = run.path / "report.md", run.path / "report.html"
    atomic_write_text(md_path, render_md(run, title, intro, sections))
    atomic_write_text(html_path, render_html(run, title, intro, sections, figures))
    return md_path, html_path


# sections of other modules register themselves on import
from mechdelta.report import _attribution, _circuits, _explain, _series  # noqa: E402, F401
from mechdelta.report._claims import claims_blocks, summary_blocks  # noqa: E402
from mechdelta.report._provenance import provenance_section  # noqa: E402

"""The claims part of a transition report's analysis sections: which statements about the
shift's parts the data warrant (:func:`mechdelta.claims` at the report's ``alpha``), with the
control pair's seed-variation check and the split-half reliability of the site ranking; and the
lines of the report's summary, which states only these warranted claims."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mechdelta.errors import AttributionError, MechDeltaError
from mechdelta.report._blocks import Block, Figure, Table, Text

if TYPE_CHECKING:
    from mechdelta.report._build import ReportContext

__all__ = ["claims_blocks", "claims_for", "summary_blocks"]

#: Claims shown in a section's table, at least (``[output] top_k`` if larger).
_MIN_ROWS = 10
#: Claim sentences per analysis in the report's summary.
_SUMMARY_CLAIMS = 3


def _parts(result: Any) -> list[Any]:
    from mechdelta.patching.results import BothDirections

    return list(result) if isinstance(result, BothDirections) else [result]


def _is_attribution(result: Any) -> bool:
    from mechdelta.attribution.results import AttributionResult

    return isinstance(_parts(result)[0], AttributionResult)


def _untested(result: Any) -> bool:
    """An attribution none of whose directions was verified: no p-values, so no claims."""
    return _is_attribution(result) and all(p.verification is None for p in _parts(result))


def claims_for(ctx: ReportContext, analysis_id: str, result: Any) -> Any:
    """The :class:`~mechdelta.Claims` of one analysis at the report's alpha (with its control
    result when the run stored one), computed once per report; None for an untested attribution.
    A control that cannot be used is reported in ``ctx.notes`` and left out."""
    from mechdelta.stats.claims import claims

    if analysis_id in ctx.claims:
        return ctx.claims[analysis_id]
    out = None
    if not _untested(result):
        control = ctx.extra(analysis_id).control
        try:
            out = claims(result, ctx.alpha, control=control)
        except AttributionError:  # one direction verified, the other not
            out = None
        except MechDeltaError as exc:
            if control is None:
                raise
            ctx.notes.setdefault(analysis_id, []).append(
                f"the control pair's result could not be used: {exc}"
            )
            out = claims(result, ctx.alpha)
    ctx.claims[analysis_id] = out
    return out


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 100:+.0f}%"


def _q(q: float) -> str:
    if math.isnan(q):
        return "n/a"
    return "< 0.001" if q < 0.001 else f"{q:.3f}" if q < 0.1 else f"{q:.2f}"


def _direction(d: Any) -> str:
    from mechdelta.report._build import _DIRECTION_TEXT

    return str(_DIRECTION_TEXT[d][0])


def claims_blocks(ctx: ReportContext, analysis_id: str, result: Any) -> list[Block]:
    """The claims of one site analysis (sweep, attribution, joint patch): the criteria, the
    table of warranted claims (or why there are none), the control's seed-variation check, and
    the split-half reliability line and figure."""
    blocks: list[Block] = []
    found = claims_for(ctx, analysis_id, result)
    if found is None:
        blocks.append(
            Text(
                "Warranted claims: none can be made. Attribution estimates are not tested (a "
                "first-order estimate is no evidence that a splice changes the metric); set "
                "verify = k to patch the top k sites and k random others exactly, which tests "
                "them."
            )
        )
    else:
        blocks += _claims_table(ctx, analysis_id, result, found)
    blocks += _reliability_blocks(ctx, analysis_id, result)
    return blocks


def _claims_table(ctx: ReportContext, analysis_id: str, result: Any, found: Any) -> list[Block]:
    criteria = (
        f"Criteria: q < {found.alpha:g} ({found.test}; {found.n_tests} tests) and |effect| >= "
        f"{found.min_effect:.0%} of the shift."
    )
    what = "Warranted claims (statements about the shift that the data support). "
    if _is_attribution(result):
        what += (
            "Only the sites patched exactly by the verification are tested, and a claim's "
            "effect and interval are those of the exact patch; the other sites of the grid "
            "count as tests that are not rejected. "
        )
    blocks: list[Block] = [Text(f"{what}Shift: {found.shift_summary}."), Text(criteria)]
    has_control = any(c.exceeds_control is not None for c in found.items)
    if found.items:
        shown = found.items[: max(_MIN_ROWS, ctx.top_k)]
        headers = ["site", "direction", "effect [95% CI]", "q", "prompts"]
        if has_control:
            headers.append("beyond seed variation")
        rows = []
        for c in shown:
            row = [
                c.label,
                _direction(c.direction),
                f"{_pct(c.effect)} [{_pct(c.ci[0])}, {_pct(c.ci[1])}]",
                _q(c.q),
                str(c.n_prompts),
            ]
            if has_control:
                row.append("yes" if c.exceeds_control else "no")
            rows.append(tuple(row))
        more = f"; the {len(shown)} strongest shown" if len(shown) < len(found.items) else ""
        blocks.append(
            Table(
                tuple(headers),
                tuple(rows),
                f"{len(found.items)} warranted claim{'s' if len(found.items) != 1 else ''}, by "
                f"|effect|, largest first{more}; effect: "
                "fraction of the shift (undone by restoring the site from the reference, or "
                "carried by the intervened site into the reference); q: adjusted p-value",
            )
        )
        blocks.append(Text(f"Strongest claim: {found.items[0].text}."))
    else:
        blocks.append(Text(f"No warranted claims: {found.reason}."))
    if has_control:
        threshold = found.items[0].control_threshold
        pair = ctx.extra(analysis_id).info.get("control", {}).get("pair", "the control pair")
        blocks.append(
            Text(
                f"Seed-variation control: the same analysis on the control pair ({pair}). A "
                "claim's effect is beyond seed variation when its |mean change of the metric| "
                f"exceeds the control's {1 - found.alpha:.0%} quantile over the sites whose "
                f"splice moves the control's metric at all ({threshold:.3g} in metric units)."
            )
        )
    for note in (*found.notes, *ctx.notes.get(analysis_id, [])):
        blocks.append(Text(f"Note: {note}."))
    return blocks


def _reliability_blocks(ctx: ReportContext, analysis_id: str, result: Any) -> list[Block]:
    from mechdelta.patching.results import PatchResult

    if isinstance(_parts(result)[0], PatchResult):
        return [Text("Reliability: not applicable (a joint patch ranks no sites).")]
    extra = ctx.extra(analysis_id)
    rel = extra.reliability
    if rel is None:
        why = (extra.info.get("reliability") or {}).get("skipped")
        return [
            Text(
                "Reliability (split halves): not computed"
                + (f": {why}." if why else " (not stored with this run).")
            )
        ]
    info = extra.info.get("reliability") or {}
    of = "estimated scores" if info.get("of") == "estimates" else "scores"
    how = (
        f"two disjoint random halves of the prompts ({info['prompts_per_half']} each, seed "
        f"{info['seed']})"
        if "prompts_per_half" in info
        else "two disjoint random halves of the prompts"
    )
    if isinstance(rel, dict):
        lines = "; ".join(
            f"{_direction_name(d)}: {r.summary.split(' (')[0]}" for d, r in rel.items()
        )
    else:
        lines = rel.summary.split(" (")[0]
    from mechdelta.runs.rundir import reliability_figure_name

    return [
        Text(
            f"Reliability (split halves): the analysis' site {of} on {how}, compared: {lines}. "
            "A claims table is only as good as the ranking it comes from: a low Spearman "
            "correlation or top-k overlap means the ranking depends on the prompts."
        ),
        Figure(reliability_figure_name(analysis_id), "split-half reliability"),
    ]


def _direction_name(value: str) -> str:
    from mechdelta.core.directions import Direction

    try:
        return _direction(Direction(value))
    except (ValueError, KeyError):
        return value


def summary_blocks(ctx: ReportContext, analysis_id: str, result: Any) -> list[Block]:
    """The report summary's line about one site analysis: its warranted claims only."""
    found = claims_for(ctx, analysis_id, result)
    if found is None:
        method = _parts(result)[0].method
        return [
            Text(
                f"In {analysis_id}, estimated scores ({method}, not exact patches) warrant no "
                "claims: estimates are not tested (verify = k patches the top sites exactly)."
            )
        ]
    rule = f"q < {found.alpha:g}, |effect| >= {found.min_effect:.0%} of the shift"
    if _is_attribution(result):
        method = _parts(result)[0].method
        rule += (
            "; only the verified sites are tested, by their exact patches: the grid's "
            f"estimated scores ({method}, not exact patches) only chose them"
        )
    if not found.items:
        return [Text(f"No warranted claims in {analysis_id} ({rule}): {found.reason}.")]
    shown = found.items[:_SUMMARY_CLAIMS]
    more = len(found.items) - len(shown)
    texts = "; ".join(c.text for c in shown) + (f" (and {more} more)" if more else "")
    return [Text(f"Warranted claims in {analysis_id} ({rule}): {texts}.")]

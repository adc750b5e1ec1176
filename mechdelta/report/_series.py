"""Transition-report section of series analyses (``kind = "series"``; registered with
:func:`register_section`): which pairs of the checkpoint series were compared, each pair's
shift, the score trajectories (per pair, and on the whole series' scale), the emergence table
(per site, the first checkpoint whose CI excludes 0) stated in words, and for circuit searches the
circuit of every pair and its membership over the checkpoints."""

from __future__ import annotations

import math
from typing import Any

from mechdelta.report._blocks import Block, Figure, Section, Table, Text
from mechdelta.report._build import _DIRECTION_TEXT, ReportContext, _num, _score, register_section
from mechdelta.report._circuits import _NO_CLAIMS, SEMANTICS_TEXT

__all__ = ["MAX_LISTED", "emergence_sentence"]

#: A sentence lists at most this many sites per group ("and N more" after).
MAX_LISTED = 12

_MODE_TEXT = {
    "reference": "each checkpoint against the reference checkpoint {ref} (the pair's reference "
    "model = checkpoint {ref}, its intervened model = the other checkpoint; a pair is labelled "
    "by that other checkpoint)",
    "consecutive": "each checkpoint against the one before it (reference model = the earlier "
    "checkpoint; a pair is labelled by the later one)",
}


def _names(items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f" and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return ", ".join(shown) + more


def _groups(first: dict[str, Any], order: tuple[Any, ...]) -> list[tuple[Any, list[str]]]:
    """(label, sites whose first hit it is) in series order, then (None, sites never hit)."""
    out = [(lab, [s for s, f in first.items() if f == lab]) for lab in order]
    return [(lab, sites) for lab, sites in out if sites] + [
        (None, [s for s, f in first.items() if f is None])
    ]


def emergence_sentence(first: dict[str, Any], labels: tuple[Any, ...], what: str) -> str:
    """``first`` (site -> label of its first hit, or None) in words, grouped by checkpoint."""
    parts = []
    for lab, sites in _groups(first, labels):
        if lab is None:
            if sites:
                parts.append(f"never: {_names(sites)}")
        else:
            parts.append(f"at checkpoint {lab}: {_names(sites)}")
    return f"First checkpoint whose {what}: " + ("; ".join(parts) or "no sites") + "."


def _intro(ctx: ReportContext, result: Any, what: str) -> str:
    series = ctx.run.manifest.get("series") or {}
    ref = series.get("reference", result.pair_labels[0][0])
    checkpoints = ", ".join(str(x) for x in result.checkpoints)
    return (
        f"{what} on every pair of the checkpoint series (checkpoints {checkpoints}): "
        + _MODE_TEXT[result.mode].format(ref=ref)
        + ". Each pair is a comparison of its own, with its own shift."
    )


def _trajectory_blocks(ctx: ReportContext, analysis_id: str, result: Any, spec: Any) -> list[Block]:
    from mechdelta.runs._series import series_figure_name

    r0 = result.results[0]
    estimated = result.kind == "attribution"
    d_text, d_means = _DIRECTION_TEXT[result.direction]
    method = r0.provenance.get("method", "") if estimated else ""
    how = (
        f"estimated by gradients ({method}; attribution, not exact patching)"
        if estimated
        else "measured by patching the site on its own"
    )
    text = _intro(
        ctx, result, f"A {result.kind} of {r0.component.value} ({len(result.sites)} sites)"
    ) + (
        f" A site's score is the fraction of its pair's shift in {r0.shift.metric} it explains, "
        f"{how}, {d_text} ({d_means}), with a {ctx.level}% bootstrap CI over prompts."
    )
    rows = []
    for lab, pl, r in zip(result.labels, result.pair_labels, result.results, strict=True):
        best = r.top(1)[0]
        rows.append(
            (
                str(lab),
                f"{pl[0]} → {pl[1]}",
                f"{r.shift.shift:+.4g} [{r.shift.ci[0]:+.4g}, {r.shift.ci[1]:+.4g}]",
                str(best.site),
                _score(best.score, best.ci),
            )
        )
    table = Table(
        ("pair", "reference → intervened", "shift [CI]", "top site", "score [CI]"),
        tuple(rows),
        f"each pair's shift (intervened − reference mean {r0.shift.metric}) and its top site "
        f"by |{'estimated ' if estimated else ''}score|",
    )
    return [
        Text(text),
        table,
        Figure(analysis_id),
        Text(
            "The same effects on one scale: each site's effect (the score's numerator, in metric "
            "units) divided by the whole series' shift, the mean metric at the last checkpoint "
            "minus at the first, so that pairs whose own shift is small do not look large."
        ),
        Figure(series_figure_name(analysis_id)),
    ]


def _emergence_blocks(ctx: ReportContext, result: Any, spec: Any) -> list[Block]:
    alpha, level = ctx.alpha, round(100 * (1 - ctx.alpha))
    first = result.emergence(alpha)
    threshold = getattr(spec, "threshold", None)
    large = (
        None if threshold is None else result.emergence(alpha, threshold=threshold, scale="series")
    )
    where = (
        "patching the site between that checkpoint and the reference moves a significant part "
        "of that pair's shift (either sign; the reference itself is never a candidate)"
        if result.mode == "reference"
        else "the site significantly carries that step's own change"
    )
    blocks: list[Block] = [
        Text(
            emergence_sentence(first, result.labels, f"{level}% CI of the score excludes 0")
            + f" That is the first checkpoint, in series order, at which {where}. Significance "
            "is not size: a site carrying a small but consistent part of an early, small shift "
            "is listed early."
        )
    ]
    if large is not None:
        blocks.append(
            Text(
                emergence_sentence(
                    large,
                    result.labels,
                    f"effect's {level}% CI lies beyond ±{threshold:g} of the whole series' shift "
                    "(when the site's effect first becomes large)",
                )
            )
        )
    scores, cis = result.scored(alpha)
    key = scores.abs().nan_to_num(nan=-1.0).amax(0)
    order = sorted(range(len(result.sites)), key=lambda j: (-float(key[j]), j))[: ctx.top_k]
    headers = ["site", f"first CI excluding 0 ({level}%)"]
    if large is not None:
        headers.append(f"first beyond ±{threshold:g} of the series' shift")
    headers.append(f"score at {result.labels[-1]} [CI]")
    rows = []
    for j in order:
        site = result.sites[j]
        row = [site, "never" if first[site] is None else str(first[site])]
        if large is not None:
            row.append("never" if large[site] is None else str(large[site]))
        row.append(_score(float(scores[-1, j]), (float(cis[-1, j, 0]), float(cis[-1, j, 1]))))
        rows.append(tuple(row))
    blocks.append(
        Table(
            tuple(headers),
            tuple(rows),
            f"emergence of the top {len(rows)} sites by largest |score| at any pair",
        )
    )
    return blocks


def _circuit_blocks(ctx: ReportContext, analysis_id: str, result: Any) -> list[Block]:
    c0 = result.circuits[0]
    how = SEMANTICS_TEXT.get(c0.semantics, c0.semantics)
    text = _intro(
        ctx,
        result,
        f"A {c0.level}-level circuit search ({c0.method}, target {c0.target:g})",
    ) + (
        f" Semantics {c0.semantics}: {how} (the source is each pair's {c0.direction.source} "
        f"model, the target its {c0.direction.target} model). Faithfulness: the fraction of that "
        "pair's mean shift the hybrid run with the circuit moves (0: the target's own run, 1: "
        "the source's)."
    )
    rows = []
    for lab, pl, c in zip(result.labels, result.pair_labels, result.circuits, strict=True):
        rows.append(
            (
                str(lab),
                f"{pl[0]} → {pl[1]}",
                str(len(c)),
                _num(c.faithfulness),
                _num(c.faithfulness_per_prompt),
                "yes" if c.reached else "NO",
                _names(list(c.names)) or "(empty)",
            )
        )
    table = Table(
        (
            "pair",
            "reference → intervened",
            "size",
            "faithfulness",
            "per prompt",
            "reached",
            "members",
        ),
        tuple(rows),
        f"the circuit of every pair; reached: faithfulness within [{c0.target:g}, "
        f"{2 - c0.target:g}]",
    )
    member = result.membership()
    labels = [str(x) for x in result.labels]
    always = [m for m in member.index if bool((member.loc[m] == 1.0).all())]
    words = []
    for m in member.index:
        if m in always:
            continue
        at = [lab for lab, v in zip(labels, member.loc[m].tolist(), strict=True) if v == 1.0]
        words.append(f"{m} at {', '.join(at)}")
    sentence = "Circuit membership over the checkpoints: " + (
        f"in every pair's circuit: {_names(always)}" if always else "no member is in every circuit"
    )
    if words:
        shown = words[: ctx.top_k * 2]
        more = f"; and {len(words) - len(shown)} more" if len(words) > len(shown) else ""
        sentence += "; only in some: " + "; ".join(shown) + more
    return [Text(text), table, Text(sentence + "."), Figure(analysis_id), Text(_NO_CLAIMS)]


@register_section("series")
def _series_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.circuits.series_result import SeriesCircuits

    spec = ctx.run.experiment.analysis(analysis_id)
    if isinstance(result, SeriesCircuits):
        c0 = result.circuits[0]
        title = f"Circuit over the series: {c0.level} level, {c0.semantics} ({c0.method})"
        return Section(title, tuple(_circuit_blocks(ctx, analysis_id, result)), analysis_id)
    blocks = _trajectory_blocks(ctx, analysis_id, result, spec)
    blocks += _emergence_blocks(ctx, result, spec)
    if result.kind == "attribution":
        blocks.append(
            Text(
                "These scores are gradient estimates: check a site by an exact sweep or patch "
                "of the pair before claiming it."
            )
        )
    component = result.results[0].component.value
    title = f"Over the series: {component} {result.kind} ({result.mode} mode)"
    if not math.isfinite(float(result.scores.abs().max())):
        blocks.append(Text("Some pairs have no finite scores (their shift is 0)."))
    return Section(title, tuple(blocks), analysis_id)

"""Transition-report sections of attribution analyses: estimated site grids with their
verification, and edge attributions (registered with :func:`register_section`)."""

from __future__ import annotations

import math
from typing import Any

from mechdelta.report._blocks import Block, Figure, Section, Table, Text
from mechdelta.report._build import (
    _DIRECTION_TEXT,
    ReportContext,
    _num,
    register_section,
    top_sites_table,
)
from mechdelta.report._claims import claims_blocks

_METHOD_TEXT = {
    "atp": "AtP, first order: the target's metric plus (source activation − target activation) · "
    "∂metric/∂activation in the target's clean run",
    "atp*": "AtP*: first order, except that query/key sites recompute the attention probabilities "
    "exactly from the source's queries/keys and linearise only from the pattern on",
    "ig": "integrated gradients: the activation difference times the gradient averaged over {steps} "
    "points of the straight path from the target's to the source's activation (layer by layer)",
}


def _verification_blocks(ctx: ReportContext, analysis_id: str, parts: list[Any]) -> list[Block]:
    """The verification summary line, verified-site table and scatter of each direction."""
    from mechdelta.runs.rundir import verification_figure_name

    checked = [(p, p.verification) for p in parts if p.verification is not None]
    if not checked:
        return [
            Text(
                "Not verified against exact patching: set verify = k to patch the top k sites "
                "by |estimate| and k random others exactly, or run a sweep of the top sites."
            )
        ]
    blocks: list[Block] = [
        Text(
            "Verification: the top sites by |estimate| (by GradDrop magnitude when computed) and "
            "as many random others were patched exactly; the estimated and exact scores "
            "(fractions of the shift) are compared: Pearson and Spearman correlation, top-5 "
            "recall (of the 5 largest exact scores, the fraction also among the 5 largest "
            "estimates) and the largest |estimated − exact|."
        )
    ]
    for part, v in checked:
        rows = tuple(
            (
                str(v.sites[i]),
                v.selected[i],
                _num(float(v.estimated_scores[i])),
                _num(float(v.exact_scores[i])),
                _num(float(v.estimated_scores[i] - v.exact_scores[i])),
            )
            for i in _by_abs(v.exact_scores.tolist())[: ctx.top_k]
        )
        blocks += [
            Text(str(v) + "."),
            Table(
                ("site", "selected", "estimated", "exact", "error"),
                rows,
                f"verified sites, {_DIRECTION_TEXT[part.direction][0]}: scores (fractions of "
                "the shift), sorted by |exact score|, largest first",
            ),
            Figure(verification_figure_name(analysis_id, part.direction, len(parts) > 1)),
        ]
    return blocks


def _by_abs(values: list[float]) -> list[int]:
    """Indices sorted by |value|, largest first (NaN last; ties keep their order)."""
    return sorted(
        range(len(values)),
        key=lambda i: -abs(values[i]) if not math.isnan(values[i]) else math.inf,
    )


@register_section("attribute")
def _attribute_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.patching.results import BothDirections

    parts = list(result) if isinstance(result, BothDirections) else [result]
    first = parts[0]
    grid = " × ".join(f"{len(first.coords[d])} {d}s" for d in first.dims)
    method = _METHOD_TEXT.get(first.method, first.method).format(steps=first.steps)
    order = "path-integrated" if first.method == "ig" else "first-order"
    graddrop = (
        " GradDrop magnitudes were computed and rank the sites chosen for verification."
        if first.graddrop is not None
        else ""
    )
    text = (
        f"Estimated effect of splicing the source model's activation at each site "
        f"({first.component.value}, {grid}), method {first.method}: {method}. These are "
        f"gradient-based estimates ({order}) from a few passes, not patches: verify them "
        "against exact patching."
        + graddrop
        + " "
        + " ".join(
            f"{_DIRECTION_TEXT[p.direction][0]} (estimated): {_DIRECTION_TEXT[p.direction][1]}."
            for p in parts
        )
    )
    table = top_sites_table(result, ctx.top_k, estimated=True)
    blocks: list[Block] = [Text(text)]
    if table.rows:
        blocks.append(
            Text(f"Top site by estimate: {table.rows[0][0]} ({'; '.join(table.rows[0][1:])}).")
        )
        blocks.append(table)
    else:
        blocks.append(
            Text(
                "No site's estimate differs from the target's metric (every estimated score is "
                "exactly 0)."
            )
        )
    blocks.append(Figure(analysis_id))
    blocks += _verification_blocks(ctx, analysis_id, parts)
    blocks += claims_blocks(ctx, analysis_id, result)
    return Section(
        f"Attribution estimate: {first.component.value} ({first.method})",
        tuple(blocks),
        analysis_id,
    )


def _edge_rows(result: Any, k: int) -> Table:
    """Top edges by |score| (metric units), largest first, edges scoring exactly 0 left out;
    for both directions ranked by the larger |score| of the two."""
    from mechdelta.errors import ResultFormatError
    from mechdelta.patching.results import BothDirections

    parts = list(result) if isinstance(result, BothDirections) else [result]
    scores = [p.scores.tolist() for p in parts]
    fractions = [p.fractions.tolist() for p in parts]
    edges = parts[0].edges
    if any(p.edges != edges for p in parts[1:]):
        raise ResultFormatError("the two directions of an edge attribution have other edges")
    size = [max(abs(s[i]) for s in scores) for i in range(len(edges))]
    kept = [i for i in _by_abs(size) if any(s[i] != 0.0 for s in scores)][:k]
    rows = tuple(
        (
            str(edges[i]),
            *(
                x
                for s, f in zip(scores, fractions, strict=True)
                for x in (_num(s[i], "+.4g"), _num(f[i]))
            ),
        )
        for i in kept
    )
    headers = ["edge"]
    for p in parts:
        label = _DIRECTION_TEXT[p.direction][0]
        headers += [f"score ({label})", f"fraction ({label})"]
    rule = (
        "sorted by the larger |score| of the two directions, largest first; edges scoring 0 in "
        "both left out"
        if len(parts) > 1
        else "sorted by |score|, largest first; edges scoring 0 left out"
    )
    return Table(
        tuple(headers),
        rows,
        f"score: estimated metric change (metric units); fraction: of the shift; {rule}",
    )


@register_section("attribute_edges")
def _edges_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.patching.results import BothDirections
    from mechdelta.runs.rundir import figure_names

    parts = list(result) if isinstance(result, BothDirections) else [result]
    first = parts[0]
    if first.method == "eap-ig":
        how = (
            f"EAP-IG: the gradient averaged over {first.steps} points of the straight path on "
            "which every sender's write moves from the target's to the source's"
        )
    else:
        how = "EAP: one gradient pass at the target's clean run (first order)"
    text = (
        f"Every edge sender → receiver input of the graph ({len(first.edges)} edges) scored as "
        "edge score = (source write − target write) · ∂metric/∂(receiver input) in the target "
        f"run, summed over positions and averaged over prompts, in metric units; method "
        f"{first.method} ({how}). The source is the model whose writes are spliced in: "
        + " ".join(
            f"{_DIRECTION_TEXT[p.direction][0]}: {_DIRECTION_TEXT[p.direction][1]}." for p in parts
        )
        + " fraction: the score as that fraction of the shift. Estimates, not patches, and "
        "without intervals: check the top edges by patching their senders."
    )
    table = _edge_rows(result, ctx.top_k)
    blocks: list[Block] = [Text(text)]
    if table.rows:
        blocks.append(Text(f"Top edge: {table.rows[0][0]} ({'; '.join(table.rows[0][1:])})."))
        blocks.append(table)
    else:
        blocks.append(Text("No edge's score differs from 0."))
    blocks += [Figure(name) for name in figure_names(analysis_id, result)]
    blocks.append(
        Text(
            "Warranted claims: none. Edge scores are estimates without per-edge tests; claim "
            "an edge's sender by an exact patch or a sweep of its component."
        )
    )
    return Section(f"Edge attribution ({first.method})", tuple(blocks), analysis_id)

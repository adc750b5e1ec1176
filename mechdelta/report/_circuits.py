"""Transition-report section of circuit analyses (``kind = "circuit"``; registered with
:func:`register_section`): what the hybrid run is under the search's semantics, the circuit's
faithfulness (mean and per prompt), whether it reached its target, its members with their
drop-one losses, its graph and its faithfulness curve."""

from __future__ import annotations

import math
from typing import Any

from mechdelta.report._blocks import Block, Figure, Section, Table, Text
from mechdelta.report._build import _DIRECTION_TEXT, ReportContext, _num, register_section

__all__ = ["MAX_MEMBER_ROWS", "SEMANTICS_TEXT"]

#: semantics -> what the hybrid run with the circuit is, in words.
SEMANTICS_TEXT = {
    "splice": "the target runs; circuit members carry the source run's cached activations",
    "ablate": "the source runs; every edge outside the circuit carries the target's cached write",
    "graft": "circuit members' parameters come from the source, recomputed on the hybrid's inputs",
}
#: The member table lists at most this many members (largest drop-one loss first).
MAX_MEMBER_ROWS = 100

_NO_CLAIMS = (
    "Warranted claims: none tested. A circuit is a search result: its faithfulness is measured "
    "exactly (every number here is an exact hybrid run, not an estimate), but the circuit is "
    "not a hypothesis tested against chance; claim a component by an exact patch or a sweep, "
    "or check the circuit on held-out prompts."
)


def _semantics_sentence(c: Any) -> str:
    how = SEMANTICS_TEXT.get(c.semantics, c.semantics)
    return (
        f"Semantics {c.semantics}: {how} (here the source is the {c.direction.source} model, the "
        f"target the {c.direction.target} model)."
    )


def _faithfulness_sentence(c: Any) -> str:
    text = (
        f"{_DIRECTION_TEXT[c.direction][0]}: {len(c)} {c.level}s, faithfulness "
        f"{_num(c.faithfulness)} of the mean shift (per prompt {_num(c.faithfulness_per_prompt)}). "
    )
    if c.reached:
        text += f"It reaches the target {c.target:g} (faithfulness within [{c.target:g}, "
        text += f"{2 - c.target:g}])"
        if not math.isnan(c.ceiling):
            text += f"; the full graph gives {_num(c.ceiling)}"
        return text + "."
    text += f"It does NOT reach the target {c.target:g}"
    if not math.isnan(c.ceiling):
        text += (
            f": the full graph itself gives only {_num(c.ceiling)} under these semantics (the "
            "ceiling), so no circuit can"
            if not c.target <= c.ceiling <= 2 - c.target
            else f" (the full graph gives {_num(c.ceiling)})"
        )
    return (
        text
        + "; the circuit shown is the best found (the full graph, or the best within max_size)."
    )


def _member_table(c: Any) -> Table:
    frame = c.to_dataframe()
    order = sorted(
        range(len(frame)),
        key=lambda i: (
            -abs(float(frame["minimality"][i])) if math.isfinite(frame["minimality"][i]) else 1.0
        ),
    )
    if c.level == "edge":
        headers: tuple[str, ...] = ("member", "sender", "receiver", "input", "drop-one loss")

        def row(i: int) -> tuple[str, ...]:
            r = frame.iloc[i]
            return (
                str(r["member"]),
                str(r["sender"]),
                str(r["receiver"]),
                "" if r["input"] is None else str(r["input"]),
                _num(float(r["minimality"])),
            )
    else:
        headers = ("member", "kind", "layer", "head", "drop-one loss")

        def row(i: int) -> tuple[str, ...]:
            r = frame.iloc[i]

            def part(v: Any) -> str:
                return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))

            return (
                str(r["member"]),
                str(r["kind"]),
                part(r["layer"]),
                part(r["head"]),
                _num(float(r["minimality"])),
            )

    shown = order[:MAX_MEMBER_ROWS]
    more = f"; {len(order) - len(shown)} more not shown" if len(order) > len(shown) else ""
    return Table(
        headers,
        tuple(row(i) for i in shown),
        f"members, {_DIRECTION_TEXT[c.direction][0]}: drop-one loss = faithfulness lost when the "
        "member alone is dropped (minimality; n/a when the circuit was not pruned); sorted by "
        f"|drop-one loss|, largest first{more}",
    )


@register_section("circuit")
def _circuit_section(ctx: ReportContext, analysis_id: str, result: Any) -> Section:
    from mechdelta.patching.results import BothDirections
    from mechdelta.runs.rundir import circuit_figure_name

    parts = list(result) if isinstance(result, BothDirections) else [result]
    first = parts[0]
    intro = (
        f"A {first.level}-level circuit searched ({first.method}) for the smallest set of "
        f"{first.level}s whose hybrid run moves at least {first.target:g} of the shift. "
        + " ".join(_semantics_sentence(c) for c in parts)
        + " Faithfulness: the fraction of the mean shift the hybrid run with the circuit moves "
        "(0: the target model's own run, 1: the source model's); per prompt: 1 − Σ|hybrid − "
        "source| / Σ|target − source| over prompts, which effects cancelling across prompts "
        "cannot inflate."
    )
    blocks: list[Block] = [Text(intro)]
    for c in parts:
        name = circuit_figure_name(analysis_id, c.direction, len(parts) > 1)
        n_exact = c.provenance.get("n_exact")
        found = f" The search ran {n_exact} exact hybrid evaluations." if n_exact else ""
        blocks += [
            Text(_faithfulness_sentence(c) + found),
            _member_table(c)
            if len(c)
            else Text(f"The circuit is empty ({_DIRECTION_TEXT[c.direction][0]})."),
            Figure(name),
            Text(
                f"Faithfulness vs circuit size along the search's ranking (area under the curve "
                f"{_num(c.curve_area, '.3f')}: 1 would be the whole shift from the first member "
                "on)."
            ),
            Figure(f"{name}.curve"),
        ]
    blocks.append(Text(_NO_CLAIMS))
    title = f"Circuit: {first.level} level, {first.semantics} ({first.method})"
    return Section(title, tuple(blocks), analysis_id)

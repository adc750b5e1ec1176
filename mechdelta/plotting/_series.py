"""Figures of checkpoint series and circuit comparisons (pure functions of stored results).

- :func:`trajectory_figure`: score vs checkpoint, one line per top site, with its CI as a band.
- :func:`membership_figure`: circuit members (rows) x checkpoints (columns), 1 where a member.
- :func:`comparison_figure`: each member's contribution share in circuit a and in b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from mechdelta.plotting._style import TEMPLATE, _finish, _nested

if TYPE_CHECKING:
    from mechdelta.circuits.circuit import Circuit
    from mechdelta.circuits.compare import CircuitComparison
    from mechdelta.circuits.series import Label, SeriesResult

__all__ = ["comparison_figure", "membership_figure", "trajectory_figure"]

_PALETTE = (
    "#4477AA", "#CC6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#EE6677",
    "#117733", "#882255",
)  # fmt: skip


def _x(labels: tuple[Any, ...]) -> list[Any]:
    """Numeric labels (steps) on a numeric axis, anything else as categories."""
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in labels):
        return list(labels)
    return [str(x) for x in labels]


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _clean(values: Any) -> list[Any]:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def trajectory_figure(
    result: SeriesResult, top: int = 6, alpha: float | None = None, scale: str = "pair"
) -> go.Figure:
    """Score trajectories of the ``top`` sites by largest |score| over the pairs."""
    (scores, cis), sites = result.scored(alpha, scale), result.sites
    key = scores.abs().nan_to_num(nan=-1.0).amax(0)
    order = sorted(range(len(sites)), key=lambda j: (-float(key[j]), j))[: max(1, top)]
    x = _x(result.labels)
    fig = go.Figure()
    for rank, j in enumerate(order):
        colour = _PALETTE[rank % len(_PALETTE)]
        lo, hi = _clean(cis[:, j, 0].tolist()), _clean(cis[:, j, 1].tolist())
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor=_rgba(colour, 0.18),
                line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=sites[j],
            )
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=x, y=_clean(scores[:, j].tolist()), mode="lines+markers", name=sites[j],
                line={"color": colour}, legendgroup=sites[j],
                customdata=[[a, b] for a, b in zip(lo, hi, strict=True)],
                hovertemplate=f"{sites[j]} at %{{x}}<br>score %{{y:+.3f}}<br>CI "
                "[%{customdata[0]:+.3f}, %{customdata[1]:+.3f}]<extra></extra>",
            )
        )  # fmt: skip
    fig.add_hline(y=0.0, line={"color": "#888888", "width": 1, "dash": "dot"})
    against = (
        f"against checkpoint {result.pair_labels[0][0]}"
        if result.mode == "reference"
        else "each checkpoint against the previous one"
    )
    unit = (
        "fraction of each pair's shift the site explains"
        if scale == "pair"
        else "site's effect / the series' shift (last minus first checkpoint)"
    )
    level = round(100 * (1 - (alpha if alpha is not None else result.results[0].shift.alpha)))
    fig.update_layout(
        template=TEMPLATE,
        title={
            "text": f"{result.kind} score over the series ({result.direction.value}, {against})"
            f"<br><sup>{unit}; bands: {level}% CI</sup>"
        },
        xaxis_title="checkpoint",
        yaxis_title="score",
        legend_title_text=f"top {len(order)} sites",
    )
    return _finish(fig, {"text": fig.layout.title.text}, 450, 800)


def membership_figure(circuits: Mapping[Label, Circuit]) -> go.Figure:
    """Heat map of circuit membership: members (rows, by first appearance) x labels."""
    from mechdelta.circuits.series import circuit_membership

    member = circuit_membership(circuits, "member")
    minimality = circuit_membership(circuits, "minimality")
    cols = [str(c) for c in member.columns]
    fig = go.Figure(
        go.Heatmap(
            z=_nested(member.to_numpy()), x=cols, y=list(member.index),
            customdata=_nested(minimality.to_numpy()),
            colorscale=[[0.0, "#F4F4F4"], [1.0, "#4477AA"]], zmin=0.0, zmax=1.0, showscale=False,
            xgap=1, ygap=1,
            hovertemplate="%{y} at %{x}<br>member %{z}<br>drop-one loss %{customdata:+.3f}"
            "<extra></extra>",
        )
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", tickmode="linear", title_text="member")
    fig.update_xaxes(type="category", title_text="checkpoint")
    sizes = ", ".join(f"{lab}: {len(c)}" for lab, c in circuits.items())
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"circuit membership over the series<br><sup>sizes {sizes}</sup>"},
        height=max(300, 22 * len(member.index) + 160),
    )
    return _finish(
        fig, {"text": fig.layout.title.text}, max(300, 22 * len(member.index) + 160), 800
    )


def comparison_figure(cmp: CircuitComparison) -> go.Figure:
    """Grouped bars: each member's share of its circuit's contribution, in a and in b."""
    members = list(cmp.members)
    status = {**dict.fromkeys(cmp.shared, "both"), **dict.fromkeys(cmp.lost, "lost"),
              **dict.fromkeys(cmp.gained, "gained")}  # fmt: skip
    ticks = [f"{m} ({status[m]})" for m in members]
    fig = go.Figure()
    for k, colour in ((0, "#4477AA"), (1, "#CC6677")):
        fig.add_trace(
            go.Bar(
                x=ticks, y=[cmp.shares[k].get(m, 0.0) for m in members], name=cmp.labels[k],
                marker_color=colour,
                hovertemplate=f"%{{x}}<br>share in {cmp.labels[k]} %{{y:.3f}}<extra></extra>",
            )
        )  # fmt: skip

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.2f}"

    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        title={
            "text": f"{cmp.labels[0]} vs {cmp.labels[1]} ({cmp.level} level)<br><sup>node "
            f"Jaccard {fmt(cmp.node_jaccard)}, edge Jaccard {fmt(cmp.edge_jaccard)}, weighted "
            f"overlap {fmt(cmp.weighted_overlap)}, rank correlation "
            f"{fmt(cmp.rank_correlation)}</sup>"
        },
        xaxis_title="member",
        yaxis_title="share of the circuit's contribution",
    )
    return _finish(fig, {"text": fig.layout.title.text}, 450, 800)

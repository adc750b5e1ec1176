"""Split-half reliability: the scores of one half of the prompts against the other's, per site."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.errors import ConfigError
from mechdelta.plotting._style import _finish, _nested, _title

if TYPE_CHECKING:
    from mechdelta.stats.reliability import Reliability

__all__ = ["reliability_figure"]

_GROUPS = (  # (name, colour) of the points by membership in the two halves' top k
    ("top-{k} in both halves", "#CC3311"),
    ("top-{k} in one half", "#EE9944"),
    ("other sites", "#7F7F7F"),
)
_DIRECTION_NAMES = {
    "reference->intervened": "reference → intervened",
    "intervened->reference": "intervened → reference",
}


def _top(scores: np.ndarray, k: int) -> set[int]:
    """The indices of the ``k`` largest |scores| (ties in site order, as the statistic)."""
    order = np.argsort(-np.abs(scores), kind="stable")
    return set(order[:k].tolist())


def _summary(rel: Reliability) -> str:
    rho = "n/a" if math.isnan(rel.spearman) else f"{rel.spearman:.2f}"
    overlap = "n/a" if math.isnan(rel.top_k_overlap) else f"{rel.top_k_overlap:.0%}"
    return f"Spearman {rho} over {rel.n_sites} sites, top-{rel.k} overlap {overlap}"


def _panel(fig: go.Figure, rel: Reliability, col: int, legend: bool) -> tuple[float, float]:
    """One scatter (half A on x, half B on y) with the identity line; returns its value range."""
    a = rel.scores_a.double().numpy()
    b = rel.scores_b.double().numpy()
    top_a, top_b = _top(a, rel.k), _top(b, rel.k)
    member = [
        0 if (i in top_a and i in top_b) else 1 if (i in top_a or i in top_b) else 2
        for i in range(len(a))
    ]
    for g, (name, colour) in enumerate(_GROUPS):
        idx = [i for i, m in enumerate(member) if m == g]
        fig.add_trace(
            go.Scatter(
                x=_nested(a[idx]),
                y=_nested(b[idx]),
                mode="markers",
                name=name.format(k=rel.k),
                legendgroup=str(g),
                showlegend=legend,
                text=[rel.sites[i] for i in idx],
                hovertemplate=f"<b>%{{text}}</b><br>{rel.labels[0]} %{{x:+.3f}}"
                f"<br>{rel.labels[1]} %{{y:+.3f}}<extra></extra>",
                marker={"color": colour, "size": 8, "opacity": 0.85},
            ),
            row=1,
            col=col,
        )
    values = np.concatenate([a, b])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    lo, hi = lo - pad, hi + pad
    fig.add_trace(
        go.Scatter(
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            name="half A = half B",
            legendgroup="identity",
            showlegend=legend,
            line={"color": "grey", "dash": "dot"},
            hoverinfo="skip",
        ),
        row=1,
        col=col,
    )
    fig.update_xaxes(
        title_text=f"score, {rel.labels[0]}", range=[lo, hi], zeroline=False, row=1, col=col
    )
    fig.update_yaxes(
        title_text=f"score, {rel.labels[1]}" if col == 1 else None,
        range=[lo, hi],
        zeroline=False,
        row=1,
        col=col,
    )
    return lo, hi


def reliability_figure(rel: Reliability | Mapping[str, Reliability]) -> go.Figure:
    """Per site, its score (fraction of the shift) on one half of the prompts against the other
    half's, with the identity line: a reliable ranking lies along it. The title gives the
    Spearman correlation and the top-k overlap; points are coloured by whether the site is among
    the top k (by |score|) of both halves, one, or neither.

    ``rel``: a :class:`~mechdelta.Reliability`, or a mapping direction -> Reliability (what
    :func:`~mechdelta.split_half` returns for both directions): one panel per direction.
    """
    from mechdelta.stats.reliability import Reliability

    if isinstance(rel, Reliability):
        items: list[tuple[str | None, Reliability]] = [(None, rel)]
    elif isinstance(rel, Mapping) and rel and all(isinstance(r, Reliability) for r in rel.values()):
        items = list(rel.items())
    else:
        raise ConfigError(
            "reliability_figure takes a Reliability or a mapping direction -> Reliability "
            f"(from mechdelta.reliability / split_half), got {type(rel).__name__}"
        )
    titles = None
    if len(items) > 1:
        titles = [
            f"{_DIRECTION_NAMES.get(str(d), str(d))}<br><sup>{_summary(r)}</sup>" for d, r in items
        ]
    fig = make_subplots(rows=1, cols=len(items), subplot_titles=titles, horizontal_spacing=0.1)
    for col, (_, r) in enumerate(items, start=1):
        _panel(fig, r, col, legend=col == 1)
    first = items[0][1]
    subs = [f"{first.labels[0]} vs {first.labels[1]}: disjoint sets of prompts"]
    if len(items) == 1:
        subs.insert(0, _summary(first))
    subs.append("score: fraction of the shift explained per site; dotted: equal scores")
    title = _title("Split-half reliability of the site ranking", *subs)
    width = 200 + 460 * len(items)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0.0})
    return _finish(fig, title, 520, width)

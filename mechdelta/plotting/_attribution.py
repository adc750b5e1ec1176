"""Figures of attribution results: estimated against exact scores of verified sites."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from mechdelta.plotting._style import _finish, _title

if TYPE_CHECKING:
    from mechdelta.attribution.results import Verification

__all__ = ["verification_figure"]


def verification_figure(v: Verification) -> go.Figure:
    """Scatter of estimated against exact scores (fractions of the shift), the diagonal for
    reference; verified top sites and random controls in two colours."""
    est, exact = v.estimated_scores.tolist(), v.exact_scores.tolist()
    fig = go.Figure()
    for kind, colour in (("top", "#d62728"), ("random", "#1f77b4")):
        idx = [i for i, s in enumerate(v.selected) if s == kind]
        if not idx:
            continue
        fig.add_trace(
            go.Scatter(
                x=[exact[i] for i in idx],
                y=[est[i] for i in idx],
                mode="markers",
                name="top by |estimate|" if kind == "top" else "random others",
                text=[str(v.sites[i]) for i in idx],
                hovertemplate="%{text}<br>exact %{x:.3f}<br>estimated %{y:.3f}<extra></extra>",
                marker={"color": colour, "size": 8},
            )
        )
    values = [x for x in est + exact if x == x]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    fig.add_trace(
        go.Scatter(
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            name="estimate = exact",
            line={"color": "grey", "dash": "dot"},
            hoverinfo="skip",
        )
    )
    fig.update_layout(xaxis_title="exact score", yaxis_title="estimated score")
    title = _title(
        f"{v.method} vs exact patching, {v.direction.value}",
        f"{len(v.sites)} of {v.grid_size} sites; Pearson {v.pearson:.3f}, "
        f"Spearman {v.spearman:.3f}; score = fraction of the shift",
    )
    return _finish(fig, title, 520, 760)

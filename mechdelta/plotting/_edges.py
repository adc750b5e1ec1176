"""Edge attribution heat map: senders (rows) x receiver inputs (columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from mechdelta.plotting._style import (
    SCORE_SCALE,
    _direction_label,
    _finish,
    _nested,
    _score_meaning,
    _shift_line,
    _sym_max,
    _title,
)

if TYPE_CHECKING:
    from mechdelta.attribution._edge_result import EdgeAttribution

__all__ = ["edge_figure"]


def edge_figure(result: EdgeAttribution) -> go.Figure:
    """Heat map of every edge's fraction of the shift (sender x receiver input; blank where
    there is no edge), hover showing the score in metric units."""
    senders = list(dict.fromkeys(str(e.sender) for e in result.edges))
    receivers = list(result.receivers)
    row = {s: i for i, s in enumerate(senders)}
    col = {r: j for j, r in enumerate(receivers)}
    frac = np.full((len(senders), len(receivers)), np.nan)
    score = np.full_like(frac, np.nan)
    for e, f, s in zip(
        result.edges, result.fractions.tolist(), result.scores.tolist(), strict=True
    ):
        i, j = row[str(e.sender)], col[e.receiver_input]
        frac[i, j], score[i, j] = f, s
    bound = _sym_max(frac)
    heat = go.Heatmap(
        z=_nested(frac),
        x=receivers,
        y=senders,
        customdata=_nested(score),
        colorscale=SCORE_SCALE,
        zmin=-bound,
        zmax=bound,
        zmid=0.0,
        colorbar={"title": {"text": "fraction"}},
        hovertemplate="%{y} → %{x}<br>fraction %{z:+.3f}<br>score %{customdata:+.4g}"
        "<extra></extra>",
        xgap=1,
        ygap=1,
    )
    fig = go.Figure(heat)
    # every label shown (plotly thins dense category ticks), sized so they do not collide
    fig.update_xaxes(
        title_text="receiver input",
        tickangle=-60,
        type="category",
        tickmode="array",
        tickvals=receivers,
        ticktext=receivers,
        tickfont={"size": 10},
    )
    fig.update_yaxes(
        title_text="sender",
        autorange="reversed",
        type="category",
        tickmode="array",
        tickvals=senders,
        ticktext=senders,
        tickfont={"size": 10},
    )
    steps = f", {result.steps} steps" if result.steps else ""
    title = _title(
        f"Edge attribution ({result.method}{steps}), {_direction_label(result.direction)}",
        _score_meaning(result.direction).replace("site", "edge"),
        _shift_line(result.shift),
    )
    height = int(min(max(300, 16 * len(senders) + 220), 2400))
    width = int(min(max(600, 16 * len(receivers) + 220), 2000))
    return _finish(fig, title, height, width)

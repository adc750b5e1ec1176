"""Steering dose-response figure: fraction of the shift reproduced / removed against alpha."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.plotting._style import _finish, _level, _nested, _shift_line, _title

if TYPE_CHECKING:
    from mechdelta.steering.result import SteeringResult

_PALETTE = ("#4477AA", "#CC6677", "#228833", "#AA3377", "#66CCEE", "#CCBB44", "#BBBBBB", "#EE6677")


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _band(
    fig: go.Figure,
    x: list[float],
    lo: np.ndarray,
    hi: np.ndarray,
    colour: str,
    col: int,
    group: str,
) -> None:
    """A filled band between ``lo`` and ``hi`` (NaN ends leave a gap)."""
    fig.add_trace(
        go.Scatter(
            x=x + x[::-1],
            y=_nested(np.concatenate([hi, lo[::-1]])),
            mode="lines",
            fill="toself",
            fillcolor=colour,
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=group,
        ),
        row=1,
        col=col,
    )


def steering_figure(result: SteeringResult) -> go.Figure:
    """Two panels, fraction of the shift against alpha: reproduced by the reference with
    ``alpha * v`` added (left), removed from the intervened model by subtracting it (right).

    One line per site with its bootstrap interval as a band; dashed, the random-direction
    control (same norm as ``v``): its mean over directions, the band its mean +- one standard
    deviation. Dotted guides at 0 (no effect) and 1 (the whole shift).
    """
    level = _level(result.shift.alpha)
    x = [float(a) for a in result.alphas]
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        subplot_titles=[
            "reference + α·v<br><span style='font-size:11px'>fraction of the shift reproduced"
            "</span>",
            "intervened − α·v<br><span style='font-size:11px'>fraction of the shift removed</span>",
        ],
    )
    panels = (
        (result.reproduced, result.ci_reproduced, result.control_reproduced),
        (result.removed, result.ci_removed, result.control_removed),
    )
    for col, (frac, ci, ctrl) in enumerate(panels, start=1):
        for i, site in enumerate(result.sites):
            colour = _PALETTE[i % len(_PALETTE)]
            name = str(site)
            f = frac[i].double().numpy()
            c = ci[i].double().numpy()
            _band(fig, x, c[:, 0], c[:, 1], _rgba(colour, 0.18), col, name)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=_nested(f),
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": colour, "width": 2},
                    customdata=np.stack([c[:, 0], c[:, 1]], axis=1).tolist(),
                    hovertemplate=f"{name}, α=%{{x:g}}<br>fraction %{{y:.3f}} "
                    f"({level}% CI [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}}])"
                    "<extra></extra>",
                ),
                row=1,
                col=col,
            )
            if result.n_random == 0:
                continue
            r = ctrl[i].double().numpy()  # [alpha, random]
            mean, std = r.mean(-1), r.std(-1)
            control = f"{name} random control"
            _band(fig, x, mean - std, mean + std, _rgba(colour, 0.08), col, control)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=_nested(mean),
                    mode="lines",
                    name=f"{name}: {result.n_random} random directions, same norm",
                    legendgroup=control,
                    showlegend=col == 1,
                    line={"color": colour, "width": 1.5, "dash": "dash"},
                    hovertemplate=f"{name} random control, α=%{{x:g}}<br>mean fraction "
                    "%{y:.3f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        for y in (0.0, 1.0):
            fig.add_hline(y=y, line={"color": "grey", "width": 1, "dash": "dot"}, row=1, col=col)
        fig.update_xaxes(title_text="α (steering coefficient)", row=1, col=col)
    fig.update_yaxes(title_text="fraction of the shift", row=1, col=1)
    v = result.vectors
    title = _title(
        f"steering with {v.method} vectors (intervened − reference), positions '{v.positions}'",
        f"evaluated on {len(result.shift.reference)} {result.evaluation}; bands: {level}% "
        "bootstrap CI (steering), mean ± 1 sd over random directions (control)",
        _shift_line(result.shift),
    )
    return _finish(fig, title, 520, 1200)

"""The behavioural shift and the 2x2 factorial design."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.patching.shift import FactorialResult, ShiftResult
from mechdelta.plotting._style import (
    _GREY,
    COLOURS,
    _finish,
    _jitter,
    _level,
    _nested,
    _shift_line,
    _title,
)

# --- shift, factorial ----------------------------------------------------------------------------


def shift_figure(result: ShiftResult) -> go.Figure:
    """Metric per prompt on both models (paired) and the mean shift with its CI."""
    ref, itv = result.reference.double().numpy(), result.intervened.double().numpy()
    n, jit = len(ref), _jitter(len(ref))
    lvl = _level(result.alpha)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        subplot_titles=[
            f"{result.metric} per prompt",
            f"shift (intervened − reference), {lvl}% CI",
        ],
        horizontal_spacing=0.12,
    )
    lx = np.stack([jit, 1 + jit, np.full(n, np.nan)], axis=1).ravel()
    ly = np.stack([ref, itv, np.full(n, np.nan)], axis=1).ravel()
    fig.add_trace(
        go.Scatter(
            x=_nested(lx), y=_nested(ly), mode="lines", line={"color": _GREY, "width": 1},
            hoverinfo="skip", showlegend=False,
        ),
        row=1, col=1,
    )  # fmt: skip
    for k, (name, vals) in enumerate((("reference", ref), ("intervened", itv))):
        fig.add_trace(
            go.Scatter(
                x=_nested(k + jit),
                y=_nested(vals),
                mode="markers",
                name=name,
                marker={"color": COLOURS[name], "size": 7, "opacity": 0.75},
                customdata=list(range(n)),
                hovertemplate=f"{name}, prompt %{{customdata}}<br>{result.metric} %{{y:.4g}}"
                "<extra></extra>",
            ),
            row=1,
            col=1,
        )
        mean = float(vals.mean()) if n else float("nan")
        fig.add_trace(
            go.Scatter(
                x=[k], y=_nested(np.array([mean])), mode="markers+text",
                text=[f"mean {mean:.3g}"], textposition="middle right",
                marker={"symbol": "line-ew-open", "size": 44, "line": {"width": 3},
                        "color": COLOURS[name]},
                showlegend=False, hovertemplate=f"{name} mean %{{y:.4g}}<extra></extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
    fig.update_xaxes(
        tickvals=[0, 1], ticktext=["reference", "intervened"], range=[-0.5, 1.9], row=1, col=1
    )
    fig.update_yaxes(title_text=result.metric, row=1, col=1)
    diffs = itv - ref
    fig.add_trace(
        go.Scatter(
            x=_nested(jit), y=_nested(diffs), mode="markers", name="per-prompt shift",
            marker={"color": "#777", "size": 6, "opacity": 0.6},
            customdata=list(range(n)),
            hovertemplate="prompt %{customdata}<br>shift %{y:+.4g}<extra></extra>",
        ),
        row=1, col=2,
    )  # fmt: skip
    lo, hi = result.ci
    fig.add_trace(
        go.Scatter(
            x=[0.45],
            y=[result.shift],
            mode="markers",
            name=f"mean shift ({lvl}% CI)",
            marker={"color": "#000", "size": 12, "symbol": "diamond"},
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [hi - result.shift],
                "arrayminus": [result.shift - lo],
                "thickness": 2.5,
                "width": 10,
                "color": "#000",
            },
            hovertemplate=f"mean shift %{{y:+.4g}}<br>{lvl}% CI [{lo:+.4g}, {hi:+.4g}]"
            "<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_hline(y=0, line={"color": "#888", "dash": "dash", "width": 1}, row=1, col=2)
    fig.update_xaxes(showticklabels=False, range=[-0.4, 0.8], zeroline=False, row=1, col=2)
    fig.update_yaxes(title_text=f"shift in {result.metric}", row=1, col=2)
    title = _title(f"behavioural shift on {result.task!r}, {n} prompts", _shift_line(result))
    return _finish(fig, title, 520, 900)


def factorial_figure(result: FactorialResult) -> go.Figure:
    """2x2 interaction plot: inputs on x, one line per model (means), per-prompt points behind."""
    fig = go.Figure()
    inputs = ["clean", "corrupted"]
    for k, model in enumerate(("reference", "intervened")):
        offset = -0.06 if k == 0 else 0.06
        for i, inp in enumerate(inputs):
            vals = result.cells[f"{model}/{inp}"].double().numpy()
            fig.add_trace(
                go.Scatter(
                    x=_nested(i + offset + _jitter(len(vals), 0.08)),
                    y=_nested(vals),
                    mode="markers",
                    marker={"color": COLOURS[model], "size": 6, "opacity": 0.35},
                    legendgroup=model,
                    showlegend=False,
                    customdata=list(range(len(vals))),
                    hovertemplate=f"{model}, {inp}, prompt %{{customdata}}<br>{result.metric} "
                    "%{y:.4g}<extra></extra>",
                )
            )
        means = [result.mean(model, inp) for inp in inputs]
        fig.add_trace(
            go.Scatter(
                x=[offset, 1 + offset],
                y=means,
                mode="lines+markers",
                name=model,
                legendgroup=model,
                line={"color": COLOURS[model], "width": 3},
                marker={"size": 11},
                hovertemplate=f"{model} mean %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_xaxes(tickvals=[0, 1], ticktext=inputs, range=[-0.4, 1.4], title_text="inputs")
    fig.update_yaxes(title_text=result.metric)
    lo, hi = result.interaction_ci
    title = _title(
        f"model × input design: {result.metric}",
        f"interaction {result.interaction:+.3g} ({_level(result.alpha)}% CI [{lo:+.3g}, {hi:+.3g}]);"
        f" model effect {result.model_effect:+.3g}, input effect {result.input_effect:+.3g}",
        "parallel lines: the intervention moved the metric uniformly; crossing or diverging "
        "lines: it changed the response to the input",
    )
    return _finish(fig, title, 520, 760)

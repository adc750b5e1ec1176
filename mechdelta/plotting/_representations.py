"""A representation screen: one panel per measure (and per-head heatmaps)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.plotting._style import COLOURS, _finish, _nested, _title

if TYPE_CHECKING:
    from mechdelta.representations.result import RepresentationDiff

__all__ = ["representation_figure"]

_LABELS = {
    "cka": "linear CKA (1 = same up to rotation/scale)",
    "cka_debiased": "debiased linear CKA",
    "delta_norm": "‖a_int − a_ref‖ / ‖a_ref‖",
    "logit_lens_kl": "logit-lens KL(ref ‖ int), nats",
    "kl": "next-token KL(ref ‖ int), nats",
    "attention_js": "attention Jensen–Shannon, nats",
    "weight_delta": "‖ΔW‖ / ‖W_ref‖",
}
_SITE_COLOURS = {
    "resid_post": COLOURS["reference"],
    "resid_pre": "#66CCEE",
    "resid_mid": "#228833",
    "attn_out": "#CCBB44",
    "mlp_out": COLOURS["intervened"],
    "embed": "#555555",
    "block": "#AA3377",
    "unembed": "#999999",
}
_TEXT_CELLS = 150


@dataclass(frozen=True)
class _Panel:
    measure: str
    site: str | None  # None: the layer-level panel of the measure (every site, one line each)


def _layer_label(site: str, layer: int | None) -> str:
    if site == "unembed" or layer is None:
        return "unembed"
    if site == "embed":
        return "embed"
    return f"L{layer}"


def representation_figure(diff: RepresentationDiff) -> go.Figure:
    """Every measure of a :class:`~mechdelta.representations.RepresentationDiff` in its own
    panel: layer-level measures as lines over layers (one line per site), ``kl`` as one bar,
    per-head measures (``attention_js``, per-head sites, per-head ``weight_delta``) as a
    layer × head heatmap each."""
    n = len(diff)
    panels: list[_Panel] = []
    for m in diff.measures:
        rows = [i for i in range(n) if diff.measure[i] == m]
        if any(diff.head[i] is None for i in rows):
            panels.append(_Panel(m, None))
        for site in dict.fromkeys(diff.site[i] for i in rows if diff.head[i] is not None):
            panels.append(_Panel(m, site))
    cols = 1 if len(panels) <= 1 else 2
    nrows = max(1, math.ceil(len(panels) / cols))
    titles = [
        _LABELS[p.measure] if p.site is None else f"{_LABELS[p.measure]}: {p.site} per head"
        for p in panels
    ]
    fig = make_subplots(
        rows=nrows,
        cols=cols,
        subplot_titles=titles or None,
        horizontal_spacing=0.16,
        vertical_spacing=min(0.12, 0.5 / nrows),
    )
    order = [f"L{x}" for x in sorted({x for x in diff.layer if x is not None})]
    for k, panel in enumerate(panels):
        row, col = k // cols + 1, k % cols + 1
        if panel.site is None:
            _line_panel(fig, diff, panel.measure, row, col, order)
        else:
            _head_panel(fig, diff, panel, row, col)
    if not panels:
        fig.add_annotation(
            text="no rows", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
        )
    prov = diff.provenance
    task = prov.get("task", {})
    models = prov.get("models", {})
    ref = models.get("reference", {}).get("weights_hash", "?")
    itv = models.get("intervened", {}).get("weights_hash", "?")
    rows_text = (
        "every real token of every prompt"
        if diff.positions == "all"
        else "each prompt's last token"
    )
    title = _title(
        "representation screen: where the intervened model diverges from the reference",
        f"task {task.get('name', '?')!s}: {diff.n_rows} token rows ({rows_text}); "
        f"reference {ref} → intervened {itv}",
    )
    fig = _finish(fig, title, 160 + 290 * nrows, 1100)
    # below the panels: the right column's colour bars sit where a side legend would go
    fig.update_layout(
        legend={"orientation": "h", "x": 0.0, "xanchor": "left", "y": 0.0, "yanchor": "top"},
        margin={"b": 110},
    )
    fig.update_layout(legend_y=-40 / (fig.layout.height - fig.layout.margin.t - 110))
    return fig


def _line_panel(
    fig: go.Figure, diff: RepresentationDiff, measure: str, row: int, col: int, order: list[str]
) -> None:
    idx = [i for i in range(len(diff)) if diff.measure[i] == measure and diff.head[i] is None]
    cats = (["embed"] if any(diff.site[i] == "embed" for i in idx) else []) + order
    if any(
        diff.site[i] == "unembed" or (diff.layer[i] is None and diff.site[i] != "logits")
        for i in idx
    ):
        cats.append("unembed")
    for site in dict.fromkeys(diff.site[i] for i in idx):
        mine = [i for i in idx if diff.site[i] == site]
        x = ["next token" if site == "logits" else _layer_label(site, diff.layer[i]) for i in mine]
        y = [float(diff.values[i]) for i in mine]
        colour = _SITE_COLOURS.get(site, "#000000")
        trace: go.Bar | go.Scatter
        if site == "logits":
            trace = go.Bar(
                x=x,
                y=_nested(np.array(y)),
                name=f"{measure}: logits",
                marker={"color": COLOURS["intervened"]},
                text=[f"{v:.3g}" for v in y],
                textposition="auto",
                hovertemplate=f"{measure}<br>%{{y:.4g}}<extra></extra>",
                showlegend=False,
            )
        else:
            trace = go.Scatter(
                x=x,
                y=_nested(np.array(y)),
                mode="lines+markers",
                name=site,
                legendgroup=site,
                showlegend=not any(t.name == site for t in fig.data),
                line={"color": colour},
                marker={"color": colour},
                hovertemplate=f"{site} %{{x}}<br>{measure} %{{y:.4g}}<extra></extra>",
            )
        fig.add_trace(trace, row=row, col=col)
    if measure != "kl":
        fig.update_xaxes(
            type="category", categoryorder="array", categoryarray=cats, row=row, col=col
        )
    if measure in ("cka", "cka_debiased"):
        lows = [float(diff.values[i]) for i in idx if math.isfinite(float(diff.values[i]))]
        fig.update_yaxes(range=[min([0.0, *lows]) - 0.02, 1.02], row=row, col=col)
    else:
        fig.update_yaxes(rangemode="tozero", row=row, col=col)


def _head_panel(
    fig: go.Figure, diff: RepresentationDiff, panel: _Panel, row: int, col: int
) -> None:
    idx = [
        i
        for i in range(len(diff))
        if diff.measure[i] == panel.measure
        and diff.site[i] == panel.site
        and diff.head[i] is not None
    ]
    layers = sorted({diff.layer[i] or 0 for i in idx})
    heads = sorted({diff.head[i] or 0 for i in idx})
    z = np.full((len(heads), len(layers)), np.nan)
    for i in idx:
        z[heads.index(diff.head[i] or 0), layers.index(diff.layer[i] or 0)] = float(diff.values[i])
    finite = z[np.isfinite(z)]
    similarity = panel.measure in ("cka", "cka_debiased")
    top = 1.0 if similarity else max(float(finite.max()) if finite.size else 0.0, 1e-12)
    x_axis = getattr(fig.get_subplot(row, col), "xaxis", None)
    y_axis = getattr(fig.get_subplot(row, col), "yaxis", None)
    xdom = tuple(x_axis.domain) if x_axis is not None else (0.0, 1.0)
    ydom = tuple(y_axis.domain) if y_axis is not None else (0.0, 1.0)
    text = z.size <= _TEXT_CELLS
    fig.add_trace(
        go.Heatmap(
            z=_nested(z),
            x=[f"L{layer}" for layer in layers],
            y=[f"H{h}" for h in heads],
            colorscale="Viridis",
            reversescale=similarity,
            zmin=min(0.0, float(finite.min())) if finite.size else 0.0,
            zmax=top,
            colorbar={
                "x": xdom[1] + 0.01,
                "y": (ydom[0] + ydom[1]) / 2,
                "len": (ydom[1] - ydom[0]) * 0.95,
                "thickness": 10,
            },
            texttemplate="%{z:.2g}" if text else None,
            textfont={"size": 9} if text else None,
            xgap=1,
            ygap=1,
            hovertemplate=f"{panel.site} %{{x}} %{{y}}<br>{panel.measure} %{{z:.4g}}<extra></extra>",
        ),
        row=row,
        col=col,
    )
    fig.update_xaxes(type="category", row=row, col=col)
    fig.update_yaxes(type="category", autorange="reversed", row=row, col=col)

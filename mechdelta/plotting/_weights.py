"""Relative weight change per component."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from mechdelta.core.weights import WeightDiff, WeightDiffRow
from mechdelta.plotting._style import (
    _finish,
    _title,
)

# --- weights -------------------------------------------------------------------------------------

_WEIGHT_GROUPS = {
    "head_q": "head Q",
    "head_k": "head K",
    "head_v": "head V",
    "head_o": "head O",
    "attn_o_bias": "attention bias",
    "mlp": "MLP",
    "embed": "embedding",
    "pos_embed": "embedding",
    "unembed": "unembedding",
}
_GROUP_COLOURS = {
    "head Q": "#4477AA",
    "head K": "#66CCEE",
    "head V": "#228833",
    "head O": "#CCBB44",
    "attention bias": "#AA3377",
    "MLP": "#EE6677",
    "embedding": "#555555",
    "unembedding": "#999999",
    "norm": "#BBBBBB",
    "other": "#000000",
}


def _group(row: WeightDiffRow) -> str:
    if row.component in _WEIGHT_GROUPS:
        return _WEIGHT_GROUPS[row.component]
    return "norm" if row.component.startswith("ln") else "other"


def weight_diff_figure(
    diff: WeightDiff, *, top: int | None = 30, log: bool | None = None
) -> go.Figure:
    """Relative weight change ``||ΔW|| / ||W||`` per component, largest first (horizontal bars).

    ``top``: how many changed components to show (None: all). ``log``: log x axis (default: when
    the shown values span more than two decades). Unchanged components are counted, not drawn.
    """
    changed = sorted(diff.changed(), key=lambda r: -r.relative)  # stable: ties keep model order
    shown = changed if top is None else changed[:top]
    finite = [r.relative for r in shown if np.isfinite(r.relative)]
    cap = 10 * max(finite) if finite else 1.0
    values = [r.relative if np.isfinite(r.relative) else cap for r in shown]
    if log is None:
        log = bool(values) and max(values) / min(values) > 100
    labels, seen = [], set()
    for i, r in enumerate(shown):
        lab = r.label if r.label not in seen else f"{r.label}#{i}"
        seen.add(lab)
        labels.append(lab)
    fig = go.Figure()
    for group in _GROUP_COLOURS:
        idx = [i for i, r in enumerate(shown) if _group(r) == group]
        if not idx:
            continue
        fig.add_trace(
            go.Bar(
                x=[values[i] for i in idx],
                y=[labels[i] for i in idx],
                orientation="h",
                name=group,
                marker={"color": _GROUP_COLOURS[group]},
                customdata=[
                    [
                        "∞ (reference norm 0)"
                        if not np.isfinite(shown[i].relative)
                        else f"{shown[i].relative:.4g}",
                        shown[i].delta_norm,
                        shown[i].reference_norm,
                    ]
                    for i in idx
                ],
                hovertemplate="<b>%{y}</b><br>relative change %{customdata[0]}"
                "<br>‖ΔW‖ %{customdata[1]:.4g}, ‖W‖ %{customdata[2]:.4g}<extra></extra>",
            )
        )
    fig.update_yaxes(
        type="category", categoryorder="array", categoryarray=labels, autorange="reversed"
    )
    fig.update_xaxes(type="log" if log else "linear", title_text="‖ΔW‖ / ‖W‖ (reference)")
    if not shown:
        fig.add_annotation(
            text="no weight changed: the two models are identical",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
    more = f"; showing the top {len(shown)}" if len(shown) < len(changed) else ""
    title = _title(
        "relative weight change per component",
        f"{len(changed)} of {len(diff.rows)} components changed{more}; "
        f"reference {diff.reference_hash} → intervened {diff.intervened_hash}",
    )
    fig.update_layout(barmode="overlay", legend={"title": {"text": "component"}})
    return _finish(fig, title, max(360, 160 + 20 * len(shown)), 900)

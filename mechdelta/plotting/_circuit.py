"""The figure of a :class:`~mechdelta.circuits.Circuit` (plotly): layers left to right.

Nodes sit at x = their layer (``embed`` left of layer 0, an MLP half a layer after its heads,
``logits`` / ``unembed`` right of the last layer), heads stacked by index, the MLP above them.
Edge level: one line per edge, from the sender to the receiver's input; a head receives on three
ports (q below, k at, v above its centre) and each input has its own colour and dash; the line
width is the edge's contribution (its drop-one loss, :attr:`~Circuit.minimality`). Node level:
circuit members are drawn as large markers whose size is their contribution, the rest of the
graph small and grey. An edge-level graft circuit holding the pseudo-member ``unembed`` (the
source's final norm + unembedding) labels the logits node ``unembed`` and sizes it by its loss.

:func:`circuit_curve_figure`: faithfulness vs circuit size along the search's ranking, with the
target band ``[target, 2 - target]``, the full graph's faithfulness (the ceiling) when evaluated,
and the returned circuit marked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mechdelta.core.graph import Node
from mechdelta.plotting._style import TEMPLATE, _finish

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechdelta.circuits.circuit import Circuit

__all__ = ["circuit_curve_figure", "circuit_figure"]

_INPUT_STYLE = {
    "q": ("#1f77b4", "solid", -0.22),
    "k": ("#ff7f0e", "dash", 0.0),
    "v": ("#2ca02c", "dot", 0.22),
    None: ("#555555", "solid", 0.0),
}


def _xy(node: Node, n_heads: int, n_layers: int) -> tuple[float, float]:
    if node.kind == "embed":
        return -1.0, (n_heads - 1) / 2
    if node.kind == "logits":
        return float(n_layers), (n_heads - 1) / 2
    assert node.layer is not None
    if node.kind == "mlp":
        return node.layer + 0.5, float(n_heads)
    return float(node.layer), float(node.head or 0)


def _label(node: Node, circuit: Circuit) -> str:
    """``unembed`` for the logits node when it is the graft member (node level, or an edge
    circuit holding the pseudo-member ``unembed``), else the node's name."""
    grafted = circuit.level == "node" or circuit.unembed
    return "unembed" if node.kind == "logits" and grafted else str(node)


def circuit_figure(circuit: Circuit) -> go.Figure:
    """Plotly figure of a circuit (see the module docstring)."""
    import plotly.graph_objects as go

    nodes = circuit.nodes
    heads = [n.head for n in nodes if n.head is not None]
    layers = [n.layer for n in nodes if n.layer is not None]
    n_heads = max(heads, default=0) + 1
    n_layers = max(layers, default=0) + 1
    shape = circuit.provenance.get("shape")
    if isinstance(shape, dict):
        n_heads, n_layers = int(shape.get("n_heads", n_heads)), int(shape.get("n_layers", n_layers))
    fig = go.Figure()
    loss = {m: v for m, v in zip(circuit.members, circuit.minimality, strict=True)}
    finite = [abs(v) for v in loss.values() if math.isfinite(v)]
    top = max(finite, default=0.0) or 1.0

    def scale(v: float, lo: float, hi: float) -> float:
        return lo + (hi - lo) * (abs(v) / top if math.isfinite(v) else 0.5)

    if circuit.level == "edge":
        shown: set[Any] = set()
        for e in circuit.edges:
            color, dash, dy = _INPUT_STYLE[e.input]
            x0, y0 = _xy(e.sender, n_heads, n_layers)
            x1, y1 = _xy(e.receiver, n_heads, n_layers)
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1],
                    y=[y0, y1 + dy],
                    mode="lines",
                    line={"color": color, "dash": dash, "width": scale(loss[e], 1.0, 8.0)},
                    name=f"into {e.input or 'MLP/logits'}",
                    legendgroup=str(e.input),
                    showlegend=e.input not in shown,
                    hovertext=f"{e}: drop-one loss {loss[e]:+.3f}",
                    hoverinfo="text",
                )
            )
            shown.add(e.input)
        members = list(nodes)
        sizes = [14.0] * len(members)
        if circuit.unembed:
            sizes = [scale(loss[n], 10.0, 30.0) if n in loss else 14.0 for n in members]
    else:
        members = list(nodes)
        sizes = [scale(loss[n], 10.0, 30.0) for n in members]
    xy = [_xy(n, n_heads, n_layers) for n in members]
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in xy],
            y=[p[1] for p in xy],
            mode="markers+text",
            text=[_label(n, circuit) for n in members],
            textposition="top center",
            marker={"size": sizes, "color": "#d62728", "line": {"width": 1, "color": "black"}},
            name="nodes",
            hovertext=[
                f"{_label(n, circuit)}" + (f": drop-one loss {loss[n]:+.3f}" if n in loss else "")
                for n in members
            ],
            hoverinfo="text",
        )
    )
    ticks = [-1.0, *[float(i) for i in range(n_layers)], float(n_layers)]
    labels = ["embed", *[f"layer {i}" for i in range(n_layers)], "logits"]
    fig.update_layout(
        title=(
            f"{circuit.level}-level {circuit.semantics} circuit ({circuit.method}, "
            f"{circuit.direction.value}): {len(circuit)} members, faithfulness "
            f"{circuit.faithfulness:.3f}"
        ),
        xaxis={"tickvals": ticks, "ticktext": labels, "title": "layer"},
        yaxis={"title": "head (MLP on top)", "zeroline": False},
        template=TEMPLATE,
    )
    return _finish(fig, {"text": fig.layout.title.text}, 500, 900)


def circuit_curve_figure(circuit: Circuit) -> go.Figure:
    """Faithfulness vs size along the ranking the search used (:attr:`Circuit.curve`), the
    target band, the ceiling (full graph) when evaluated and the returned circuit."""
    import plotly.graph_objects as go

    pts = sorted(circuit.curve)
    fig = go.Figure()
    n_members = int(circuit.provenance.get("n_members", 0)) or max((s for s, _ in pts), default=1)
    fig.add_hrect(
        y0=circuit.target,
        y1=2 - circuit.target,
        fillcolor="rgba(34,136,51,0.12)",
        line_width=0,
        layer="below",
    )
    fig.add_hline(y=1.0, line={"color": "#888888", "width": 1, "dash": "dot"})
    fig.add_trace(
        go.Scatter(
            x=[s for s, _ in pts],
            y=[f if math.isfinite(f) else None for _, f in pts],
            mode="lines+markers",
            name="along the ranking",
            line={"color": "#4477AA"},
            hovertemplate="size %{x}<br>faithfulness %{y:.3f}<extra></extra>",
        )
    )
    f = circuit.faithfulness
    fig.add_trace(
        go.Scatter(
            x=[len(circuit)],
            y=[f if math.isfinite(f) else None],
            mode="markers",
            name="returned circuit" + ("" if circuit.reached else " (target not reached)"),
            marker={"size": 14, "color": "#d62728", "symbol": "star"},
            hovertemplate="returned circuit: size %{x}<br>faithfulness %{y:.3f}<extra></extra>",
        )
    )
    if math.isfinite(circuit.ceiling):
        fig.add_trace(
            go.Scatter(
                x=[n_members],
                y=[circuit.ceiling],
                mode="markers",
                name="full graph (ceiling)",
                marker={"size": 11, "color": "#555555", "symbol": "diamond"},
                hovertemplate="full graph: size %{x}<br>faithfulness %{y:.3f}<extra></extra>",
            )
        )
    area = circuit.curve_area
    fig.update_layout(
        title={
            "text": f"faithfulness vs size: {circuit.level}-level {circuit.semantics} circuit "
            f"({circuit.method}, {circuit.direction.value})<br><sup>shaded: target band "
            f"[{circuit.target:g}, {2 - circuit.target:g}]; area under the curve "
            f"{area:.3f} (of {n_members} members)</sup>"
        },
        xaxis={"title": "circuit size (members)", "rangemode": "tozero"}
        | ({"dtick": 1} if n_members <= 30 else {}),  # whole members
        yaxis={"title": "faithfulness (fraction of the shift)"},
        template=TEMPLATE,
    )
    return _finish(fig, {"text": fig.layout.title.text}, 420, 720)

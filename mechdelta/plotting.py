"""Figures of mechdelta results: pure functions ``result -> plotly.graph_objects.Figure``.

Every figure is built from a stored result alone (no model), sets its own template
(``plotly_white``; the global plotly default is never touched) and is deterministic: the same
result gives the same ``fig.to_json()``. Patching scores use a diverging scale centred at 0 with a
symmetric range, so white means "explains none of the shift" in every figure. Export (HTML, PNG,
SVG, PDF) lives in :mod:`mechdelta._export` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mechdelta._export import FigureWriter, figure_size, find_browser, to_html, write_figure
from mechdelta.directions import Direction
from mechdelta.errors import ResultFormatError
from mechdelta.results import BothDirections, PatchResult, SweepResult
from mechdelta.shift import FactorialResult, ShiftResult
from mechdelta.sites import Component, Site
from mechdelta.weights import WeightDiff, WeightDiffRow

if TYPE_CHECKING:
    from mechdelta.pair import ModelPair

__all__ = [
    "FigureWriter",
    "attention_figure",
    "attention_figure_from_patterns",
    "attention_patterns",
    "both_directions_figure",
    "factorial_figure",
    "figure_size",
    "find_browser",
    "patch_figure",
    "position_labels",
    "shift_figure",
    "sweep_figure",
    "to_html",
    "weight_diff_figure",
    "write_figure",
]

TEMPLATE = "plotly_white"
SCORE_SCALE = "RdBu"  # positive scores blue, negative red, zero white
EPS = 1e-6
COLOURS = {"reference": "#4477AA", "intervened": "#CC6677", "patched": "#228833"}
_GREY = "rgba(120,120,120,0.35)"
_TEXT_CELLS = 150
_MAX_FACETS = 16  # beyond this many heads/neurons, by-position sweeps stack rows in one panel  # print values in heatmap cells up to this many cells per panel


# --- shared helpers ---------------------------------------------------------------------------


def _nested(a: np.ndarray) -> list[Any]:
    """Nested lists of Python floats, None where not finite (JSON-clean, no NaN)."""
    out = np.asarray(a, dtype=np.float64).astype(object)
    out[~np.isfinite(np.asarray(a, dtype=np.float64))] = None
    result: list[Any] = out.tolist()
    return result


def _sym_max(*arrays: Any) -> float:
    vals = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    allv = np.concatenate(vals) if vals else np.zeros(0)
    allv = np.abs(allv[np.isfinite(allv)])
    return max(float(allv.max()) if allv.size else 0.0, EPS)


def _jitter(n: int, width: float = 0.24) -> np.ndarray:
    """Deterministic, evenly spread offsets (golden-ratio sequence) in [-width/2, width/2)."""
    return ((np.arange(n) * 0.6180339887498949) % 1.0 - 0.5) * width


def _direction_label(d: Direction) -> str:
    return f"{d.source} → {d.target}"


def _level(alpha: float) -> int:
    return round(100 * (1 - alpha))


def _shift_line(shift: ShiftResult) -> str:
    lo, hi = shift.ci
    return (
        f"{shift.metric}: reference {shift.reference_mean:.3g} → intervened "
        f"{shift.intervened_mean:.3g}, shift {shift.shift:+.3g} "
        f"({_level(shift.alpha)}% CI [{lo:+.3g}, {hi:+.3g}])"
        + ("" if shift.significant else " — not distinguishable from 0")
    )


def _score_meaning(d: Direction) -> str:
    if d.toward_reference:
        return "score: fraction of the shift undone by restoring the site's reference activation"
    return "score: fraction of the shift carried by the site's intervened activation alone"


def _title(main: str, *subs: str) -> dict[str, Any]:
    text = main + "".join(f"<br><sup>{s}</sup>" for s in subs if s)
    return {"text": text, "x": 0.01, "xanchor": "left"}


def _finish(fig: go.Figure, title: dict[str, Any], height: int, width: int) -> go.Figure:
    # room for the title's lines and, above the panels, two-line subplot titles
    sub = max((a.text.count("<br>") + 1 for a in fig.layout.annotations), default=0)
    top = 50 + 22 * title["text"].count("<br>") + 26 * sub
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        height=int(height + max(0, top - 110)),
        meta={"export_width": int(min(max(width, 600), 2000))},
        margin={"t": top, "l": 80, "r": 40, "b": 70},
        font={"size": 12},
    )
    return fig


def _clean_token(tok: str) -> str:
    t = tok.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return t if t.strip() else repr(tok)


def position_labels(positions: Sequence[int], tokens: Sequence[str] | None) -> list[str]:
    """Axis labels ``"3: the"`` (position numbers alone without tokens); always unique."""
    if tokens is None:
        return [str(p) for p in positions]
    return [f"{p}: {_clean_token(tokens[p])}" if p < len(tokens) else str(p) for p in positions]


# --- sweeps --------------------------------------------------------------------------------------

_AXIS_PREFIX = {"layer": "L", "head": "H", "neuron": "N"}


@dataclass(frozen=True)
class _Panel:
    """One subplot of a sweep: a heatmap (rows = layers) or, for 1-D sweeps, bars."""

    kind: str  # "heatmap" | "bar"
    z: np.ndarray  # [rows, cols] (heatmap) or [n] (bar)
    custom: list[Any]
    x: list[str]
    y: list[str]
    xtitle: str
    ytitle: str
    title: str = ""
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def _labels(result: SweepResult, dim: str) -> list[str]:
    if dim == "position":
        return position_labels(result.coords[dim], result.tokens)
    return [f"{_AXIS_PREFIX[dim]}{v}" for v in result.coords[dim]]


def _custom(result: SweepResult) -> np.ndarray:
    """Grid of [site, score, ci_low, ci_high, patched, activation_delta] per site (objects)."""
    grid = result.grid_shape
    scores = result.scores.double().numpy()
    ci = result.ci.double().numpy()
    patched = result.patched.double().numpy()
    delta = (
        np.full(grid, np.nan)
        if result.activation_delta is None
        else result.activation_delta.double().numpy()
    )
    fields = np.stack([scores, ci[..., 0], ci[..., 1], patched, delta], axis=-1)
    numbers = np.asarray(_nested(fields.reshape(-1, 5)), dtype=object)
    sites = np.array([str(s) for s in result.sites], dtype=object)[:, None]
    return np.concatenate([sites, numbers], axis=1).reshape(*grid, 6)


def _sweep_panels(result: SweepResult, prefix: str = "") -> list[_Panel]:
    dims, scores, custom = result.dims, result.scores.double().numpy(), _custom(result)
    ys = _labels(result, "layer")
    if dims == ("layer",):
        ci = result.ci.double().numpy()
        return [
            _Panel(
                "bar", scores, custom.tolist(), ys, [], "layer", "score", prefix, ci[:, 0], ci[:, 1]
            )
        ]
    if len(dims) == 2:
        return [
            _Panel(
                "heatmap", scores, custom.tolist(), _labels(result, dims[1]), ys, dims[1], "layer",
                prefix,
            )
        ]  # fmt: skip
    if len(dims) == 3 and dims[:2] == ("layer", "position"):
        xs, facet = _labels(result, "position"), dims[2]
        sep = " · " if prefix else ""
        if len(result.coords[facet]) > _MAX_FACETS:  # one heatmap, a row per (layer, head/neuron)
            rows = [f"{y} {f}" for y in ys for f in _labels(result, facet)]
            z = scores.transpose(0, 2, 1).reshape(len(rows), len(xs))
            cd = custom.transpose(0, 2, 1, 3).reshape(len(rows), len(xs), -1).tolist()
            return [_Panel("heatmap", z, cd, xs, rows, "position", f"layer, {facet}", prefix)]
        return [
            _Panel(
                "heatmap", scores[:, :, k], custom[:, :, k].tolist(), xs, ys, "position", "layer",
                f"{prefix}{sep}{label}",
            )
            for k, label in enumerate(_labels(result, facet))
        ]  # fmt: skip
    raise ResultFormatError(f"no figure layout for a sweep over dims {dims}")


def _hover(metric: str, level: int) -> str:
    return (
        "<b>%{customdata[0]}</b><br>score %{customdata[1]:+.3f}"
        f"<br>{level}% CI [%{{customdata[2]:+.3f}}, %{{customdata[3]:+.3f}}]"
        f"<br>patched {metric} %{{customdata[4]:.4g}}"
        "<br>activation Δ %{customdata[5]:.3g}<extra></extra>"
    )


def _add_panel(
    fig: go.Figure, p: _Panel, at: tuple[int, int, bool], m: float, hover: str, first: bool
) -> None:
    row, col, bottom = at
    xtitle = p.xtitle if bottom else None
    if p.kind == "bar":
        assert p.lo is not None and p.hi is not None
        fig.add_trace(
            go.Bar(
                x=p.x,
                y=_nested(p.z),
                customdata=p.custom,
                hovertemplate=hover,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": _nested(p.hi - p.z),
                    "arrayminus": _nested(p.z - p.lo),
                    "color": "#444",
                },
                marker={
                    "color": _nested(p.z),
                    "colorscale": SCORE_SCALE,
                    "cmin": -m,
                    "cmax": m,
                    "cmid": 0.0,
                    "line": {"color": "#444", "width": 0.5},
                },
                showlegend=False,
            ),
            row=row,
            col=col,
        )
        fig.add_hline(y=0, line={"color": "#888", "width": 1}, row=row, col=col)
        fig.update_xaxes(type="category", title_text=xtitle, row=row, col=col)
        fig.update_yaxes(title_text=p.ytitle if col == 1 else None, row=row, col=col)
        return
    small = p.z.size <= _TEXT_CELLS
    fig.add_trace(
        go.Heatmap(
            z=_nested(p.z),
            x=p.x,
            y=p.y,
            customdata=p.custom,
            hovertemplate=hover,
            colorscale=SCORE_SCALE,
            zmid=0.0,
            zmin=-m,
            zmax=m,
            showscale=first,
            colorbar={"title": {"text": "score"}, "len": 0.8},
            texttemplate="%{z:.2f}" if small else None,
            textfont={"size": 10} if small else None,
            xgap=1,
            ygap=1,
        ),
        row=row,
        col=col,
    )
    dense = {"dtick": 1} if len(p.x) <= 64 else {}
    fig.update_xaxes(type="category", title_text=xtitle, row=row, col=col, **dense)
    fig.update_yaxes(
        type="category",
        autorange="reversed",
        title_text=p.ytitle if col == 1 else None,
        row=row,
        col=col,
        **({"dtick": 1} if len(p.y) <= 64 else {}),
    )


def _panel_figure(grid: list[list[_Panel]], m: float, hover: str) -> tuple[go.Figure, int, int]:
    """Panels on a grid of subplots; returns the figure and its suggested height and width."""
    nrows, ncols = len(grid), max(len(r) for r in grid)
    titles = [p.title for r in grid for p in r]
    p0 = grid[0][0]
    if p0.kind == "bar":
        panel_h, panel_w, ticks = 300, max(300, 40 * len(p0.x)), 30
    else:
        panel_h = max(120, 26 * len(p0.y))
        panel_w = max(260, (30 if len(p0.x) <= 40 else 14) * len(p0.x))
        longest = max(len(x) for x in p0.x)
        ticks = min(150, 15 + 6 * longest) if p0.xtitle == "position" else 30
    gap = ticks + (34 if any(titles) else 10)
    plot_h = nrows * panel_h + (nrows - 1) * gap
    fig = make_subplots(
        rows=nrows,
        cols=ncols,
        subplot_titles=titles if any(titles) else None,
        shared_yaxes=True,
        horizontal_spacing=0.06 if ncols < 4 else 0.04,
        vertical_spacing=gap / plot_h if nrows > 1 else 0.0,
    )
    first = True
    for i, row in enumerate(grid):
        for j, panel in enumerate(row):
            _add_panel(fig, panel, (i + 1, j + 1, i == nrows - 1), m, hover, first)
            first = False
    return fig, 110 + plot_h + ticks + 40, 200 + ncols * panel_w


def sweep_figure(result: SweepResult) -> go.Figure:
    """Score per site: a layer x head (x position tokens, x neuron) heatmap, bars per layer for a
    layer-only sweep, one layer x position heatmap per head for by-position head sweeps."""
    panels = _sweep_panels(result)
    ncols = 1 if len(panels) == 1 else min(4, len(panels))
    grid = [panels[i : i + ncols] for i in range(0, len(panels), ncols)]
    m = _sym_max(result.scores.double().numpy())
    fig, h, w = _panel_figure(grid, m, _hover(result.shift.metric, _level(result.shift.alpha)))
    title = _title(
        f"{result.component.value} patching, {_direction_label(result.direction)}",
        _shift_line(result.shift),
        _score_meaning(result.direction),
    )
    return _finish(fig, title, h, w)


def _patch_traces(result: PatchResult, fig: go.Figure, col: int, legend: bool) -> None:
    sh = result.shift
    cols = [sh.reference.double().numpy(), sh.intervened.double().numpy()]
    cols.append(result.per_prompt.double().numpy())
    names = ["reference", "intervened", "patched"]
    n, jit = len(cols[0]), _jitter(len(cols[0]))
    xs = np.stack([k + jit for k in range(3)], axis=1)
    ys = np.stack(cols, axis=1)
    lx = np.concatenate([xs, np.full((n, 1), np.nan)], axis=1).ravel()
    ly = np.concatenate([ys, np.full((n, 1), np.nan)], axis=1).ravel()
    fig.add_trace(
        go.Scatter(
            x=_nested(lx), y=_nested(ly), mode="lines", line={"color": _GREY, "width": 1},
            hoverinfo="skip", showlegend=False,
        ),
        row=1, col=col,
    )  # fmt: skip
    for k, name in enumerate(names):
        fig.add_trace(
            go.Scatter(
                x=_nested(xs[:, k]),
                y=_nested(ys[:, k]),
                mode="markers",
                name=name,
                legendgroup=name,
                showlegend=legend,
                marker={"color": COLOURS[name], "size": 7, "opacity": 0.75},
                customdata=list(range(n)),
                hovertemplate=f"{name}, prompt %{{customdata}}<br>{sh.metric} %{{y:.4g}}"
                "<extra></extra>",
            ),
            row=1,
            col=col,
        )
        mean = float(np.nanmean(ys[:, k])) if n else float("nan")
        fig.add_trace(
            go.Scatter(
                x=[k],
                y=_nested(np.array([mean])),
                mode="markers+text",
                text=[f"mean {mean:.3g}"],
                textposition="middle right",
                marker={
                    "symbol": "line-ew-open",
                    "size": 44,
                    "line": {"width": 3},
                    "color": COLOURS[name],
                },
                legendgroup=name,
                showlegend=False,
                hovertemplate=f"{name} mean %{{y:.4g}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    ticks = [*names[:2], f"patched<br><sup>({result.direction.target} run)</sup>"]
    fig.update_xaxes(
        tickvals=[0, 1, 2], ticktext=ticks, range=[-0.5, 2.9], row=1, col=col, zeroline=False
    )
    fig.update_yaxes(title_text=sh.metric if col == 1 else None, row=1, col=col)


def _sites_text(sites: tuple[Site, ...], most: int = 6) -> str:
    names = [str(s) for s in sites[:most]] or ["(no sites)"]
    more = f" … (+{len(sites) - most})" if len(sites) > most else ""
    return ", ".join(names) + more


def _patch_subtitle(r: PatchResult) -> str:
    lo, hi = r.ci
    lvl = _level(r.shift.alpha)
    return f"score {r.score:+.3f} ({lvl}% CI [{lo:+.3f}, {hi:+.3f}]), patched mean {r.patched:.3g}"


def patch_figure(result: PatchResult) -> go.Figure:
    """Reference, intervened and patched metric: per-prompt points (paired lines) and means."""
    fig = make_subplots(rows=1, cols=1)
    _patch_traces(result, fig, 1, legend=True)
    title = _title(
        f"patch {_direction_label(result.direction)} of {_sites_text(result.sites)}",
        _patch_subtitle(result),
        _shift_line(result.shift),
    )
    return _finish(fig, title, 520, 760)


def both_directions_figure(result: BothDirections[Any]) -> go.Figure:
    """The two directions side by side on one symmetric colour range (sweeps) or y axis (patches)."""
    first, second = result.reference_to_intervened, result.intervened_to_reference
    if isinstance(first, PatchResult):
        fig = make_subplots(
            rows=1,
            cols=2,
            shared_yaxes=True,
            subplot_titles=[
                f"{_direction_label(r.direction)}<br><sup>{_patch_subtitle(r)}</sup>"
                for r in (first, second)
            ],
        )
        _patch_traces(first, fig, 1, legend=True)
        _patch_traces(second, fig, 2, legend=False)
        title = _title(
            f"patch of {_sites_text(first.sites)}, both directions", _shift_line(first.shift)
        )
        return _finish(fig, title, 540, 1300)
    if not isinstance(first, SweepResult) or not isinstance(second, SweepResult):
        raise ResultFormatError(
            "both_directions_figure takes a BothDirections of sweeps or patches"
        )
    per_dir = [_sweep_panels(r, _direction_label(r.direction)) for r in (first, second)]
    grid = [list(pair) for pair in zip(*per_dir, strict=True)]  # one row per facet
    m = _sym_max(first.scores.double().numpy(), second.scores.double().numpy())
    fig, h, w = _panel_figure(grid, m, _hover(first.shift.metric, _level(first.shift.alpha)))
    title = _title(f"{first.component.value} patching, both directions", _shift_line(first.shift))
    return _finish(fig, title, h, w)


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


# --- attention patterns --------------------------------------------------------------------------


@torch.no_grad()
def attention_patterns(
    pair: ModelPair, tokens: torch.Tensor | Sequence[int], layer: int, head: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities of one head on both models: two ``[batch, query, key]`` tensors.

    One forward per model, caching only the head's pattern hook.
    """
    site = Site(Component.HEAD_PATTERN, layer, head=head)
    toks = torch.as_tensor(tokens, dtype=torch.long)
    if toks.dim() == 1:
        toks = toks[None]
    site.validate(pair.shape, seq_len=int(toks.shape[1]))
    index = site.index(pair.shape)
    out = []
    for model in (pair.reference, pair.intervened):
        _, cache = model.run_with_cache(toks.to(pair.device), names_filter=site.hook_name)
        out.append(cache[site.hook_name][index].detach().float().cpu())
    return out[0], out[1]


def _prompt_tokens(pair: ModelPair, tokens_or_task: Any, prompt: int) -> tuple[Any, list[str]]:
    from mechdelta.task import PreparedTask, Task

    src = tokens_or_task
    if isinstance(src, str):
        src = Task([src], name="prompt")
    if isinstance(src, Task):
        src = src.prepare(pair.tokenizer, n_ctx=pair.shape.n_ctx, d_vocab=int(pair.cfg.d_vocab))
    if isinstance(src, PreparedTask):
        n = int(src.lengths[prompt])
        return src.tokens[prompt, :n], src.str_tokens(prompt)
    toks = torch.as_tensor(src, dtype=torch.long)
    row = toks[prompt] if toks.dim() == 2 else toks
    tok = pair.tokenizer
    ids = [int(i) for i in row.tolist()]
    labels = [str(i) for i in ids] if tok is None else [tok.decode([i]) for i in ids]
    return row, labels


def attention_figure(
    pair: ModelPair, tokens_or_task: Any, layer: int, head: int, prompt: int = 0
) -> go.Figure:
    """Attention of head ``layer``/``head`` on one prompt: reference, intervened, difference.

    ``tokens_or_task``: a :class:`~mechdelta.Task` / ``PreparedTask`` (``prompt`` picks the
    prompt), a string, or token ids ``[pos]`` / ``[batch, pos]``.
    """
    toks, labels = _prompt_tokens(pair, tokens_or_task, prompt)
    ref, itv = attention_patterns(pair, toks, layer, head)
    return attention_figure_from_patterns(ref[0], itv[0], labels, layer, head)


def attention_figure_from_patterns(
    reference: Any, intervened: Any, labels: Sequence[str] | None, layer: int, head: int
) -> go.Figure:
    """The figure of :func:`attention_figure` from stored ``[query, key]`` patterns (no model)."""
    ref = np.asarray(torch.as_tensor(reference).double().cpu())
    itv = np.asarray(torch.as_tensor(intervened).double().cpu())
    if ref.shape != itv.shape or ref.ndim != 2 or ref.shape[0] != ref.shape[1]:
        raise ResultFormatError(
            f"attention patterns must be two square [query, key] arrays of one shape, got "
            f"{ref.shape} and {itv.shape}"
        )
    n = ref.shape[0]
    if labels is not None and len(labels) != n:
        raise ResultFormatError(f"{len(labels)} token labels for a {n}-token pattern")
    ticks = position_labels(range(n), labels)
    future = np.triu(np.ones((n, n), dtype=bool), k=1)  # causal: a query never sees later keys
    diff = itv - ref
    ref, itv, diff = (np.where(future, np.nan, a) for a in (ref, itv, diff))
    m = _sym_max(diff)
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=["reference", "intervened", "intervened − reference"],
        horizontal_spacing=0.05,
        shared_yaxes=True,
    )
    for col, (name, z, axis) in enumerate(
        (("reference", ref, "coloraxis"), ("intervened", itv, "coloraxis"), ("Δ", diff, "coloraxis2")),
        start=1,
    ):  # fmt: skip
        fig.add_trace(
            go.Heatmap(
                z=_nested(z),
                x=ticks,
                y=ticks,
                coloraxis=axis,
                xgap=1,
                ygap=1,
                hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{name} %{{z:.3f}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        dense = {"dtick": 1} if n <= 48 else {}
        fig.update_xaxes(type="category", title_text="key", row=1, col=col, **dense)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=col, **dense)
    fig.update_yaxes(title_text="query", row=1, col=1)
    fig.update_layout(
        coloraxis={
            "colorscale": "Blues",
            "cmin": 0.0,
            "cmax": 1.0,
            "colorbar": {"title": {"text": "attention"}, "len": 0.45, "y": 0.78, "x": 1.01},
        },
        coloraxis2={
            "colorscale": SCORE_SCALE,
            "cmid": 0.0,
            "cmin": -m,
            "cmax": m,
            "colorbar": {"title": {"text": "Δ"}, "len": 0.45, "y": 0.22, "x": 1.01},
        },
    )
    side = max(260, 22 * n + 120)
    title = _title(
        f"attention of head L{layer}H{head}: reference vs intervened",
        "rows: query token, columns: key token; blank: future keys (causal mask)",
    )
    return _finish(fig, title, side + 170, 3 * side + 220)

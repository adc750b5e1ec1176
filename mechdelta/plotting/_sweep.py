"""Sweep heatmaps and bars: one panel per facet, symmetric diverging colour scale.

With ``significance=True`` (the default) every site whose splice is not significant at ``alpha``
(its adjusted p-value ``q >= alpha``, :attr:`~mechdelta.SweepResult.q`) is greyed: a semi-
transparent grey heatmap layer over those cells (bars: faded and hatched), and each cell's hover
shows its ``p`` and ``q``. An attribution result has p-values only for the sites
:meth:`~mechdelta.AttributionResult.verify` patched exactly; before that there is no overlay and
the title says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.errors import AttributionError, ConfigError, ResultFormatError
from mechdelta.patching.results import SweepResult
from mechdelta.plotting._style import (
    _MAX_FACETS,
    _TEXT_CELL_PX,
    _TEXT_CELLS,
    _TEXT_COLUMNS,
    SCORE_SCALE,
    _direction_label,
    _export_width,
    _finish,
    _level,
    _nested,
    _score_meaning,
    _shift_line,
    _sym_max,
    _title,
    position_labels,
)
from mechdelta.stats.testing import format_p

# --- sweeps --------------------------------------------------------------------------------------

_AXIS_PREFIX = {"layer": "L", "head": "H", "neuron": "N"}
_SHORT_TITLE = 20  # characters of an x axis title that fit under a narrow panel
# the layer greying non-significant cells: light grey, partly transparent (the score's colour
# still shows through, faintly); bars are faded to this opacity and hatched instead
_NOT_SIGNIFICANT_SCALE = [[0.0, "rgb(200,200,200)"], [1.0, "rgb(200,200,200)"]]
_NOT_SIGNIFICANT_OPACITY = 0.8
_FADED_BAR_OPACITY = 0.35


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
    sig: np.ndarray | None = None  # same shape as z: True where significant (None: no overlay)


@dataclass(frozen=True)
class _Significance:
    """What the overlay of one result shows: ``mask`` (grid, True = significant at ``alpha``;
    None: no p-values, no overlay), each site's hover line, and the title's note."""

    mask: np.ndarray | None
    hover: np.ndarray  # grid of str
    note: str


def _significance(result: SweepResult, alpha: float, on: bool) -> _Significance | None:
    """The significance overlay of ``result`` at ``alpha`` (None when ``on`` is False)."""
    if not on:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1), e.g. 0.05")
    grid = result.grid_shape
    try:
        p, q = result.p.double().numpy(), result.q.double().numpy()
    except AttributionError:  # estimates before verify(): nothing was tested
        hover = np.full(grid, "p, q: none (an estimate, not tested: verify() tests sites)")
        note = (
            "no significance shading: attribution estimates carry no p-values "
            "(verify = k patches sites exactly and tests them)"
        )
        return _Significance(None, hover.astype(object), note)
    mask = np.nan_to_num(q, nan=1.0) < alpha
    tested = np.isfinite(p)
    hover = np.empty(grid, dtype=object)
    for idx in np.ndindex(*grid):
        hover[idx] = (
            f"{format_p(float(p[idx]), 'p')}, {format_p(float(q[idx]), 'q')}"
            + ("" if mask[idx] else f" (not significant at {alpha:g})")
            if tested[idx]
            else "p, q: not tested (not verified)"
        )
    n_sites = int(np.prod(grid))
    note = f"grey: not significant (q ≥ {alpha:g}; {result.testing.label} over {n_sites} sites)"
    if not bool(tested.all()):
        note += f"; only the {int(tested.sum())} verified sites were tested"
    return _Significance(mask, hover, note)


def _labels(result: SweepResult, dim: str) -> list[str]:
    if dim == "position":
        return _position_axis(result)[0]
    return [f"{_AXIS_PREFIX[dim]}{v}" for v in result.coords[dim]]


def _axis_title(result: SweepResult, dim: str) -> str:
    return _position_axis(result)[1] if dim == "position" else dim


def _position_axis(result: SweepResult) -> tuple[list[str], str]:
    """Labels and title of the position axis.

    Scores average over every prompt, so a position shows a token only where all prompts have
    that token (``shared_tokens``: one entry per position, ``None`` where the prompts differ);
    elsewhere its index. A result without ``shared_tokens`` (stored by an older version) has
    prompt 0's tokens only: they are shown as prompt 0's, in the axis title.
    """
    positions = result.coords["position"]
    n = int(result.per_prompt.shape[-1])
    shared: Sequence[str | None] | None = result.shared_tokens
    if shared is None and result.tokens is not None:
        if n != 1:
            title = f"position: prompt 0's token (scores: mean over {n} prompts)"
            return position_labels(positions, result.tokens), title
        shared = result.tokens  # one prompt: its tokens are every prompt's
    if shared is None:
        return position_labels(positions, None), "position"
    labels = position_labels(positions, shared)
    known = sum(0 <= p < len(shared) and shared[p] is not None for p in positions)
    if n == 1:
        title = "position: token" if known else "position"
    elif known == len(positions):
        title = f"position: token (the same in all {n} prompts)"
    elif known:
        title = f"position: token where all {n} prompts agree, else index"
    else:
        title = f"position (the {n} prompts' tokens differ at every position)"
    return labels, title


def _custom(result: SweepResult, sig: _Significance | None = None) -> np.ndarray:
    """Grid of [site, score, ci_low, ci_high, patched, activation_delta] per site (objects),
    plus the site's p/q hover line when ``sig`` is given."""
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
    columns = [sites, numbers]
    if sig is not None:
        columns.append(sig.hover.reshape(-1, 1))
    out = np.concatenate(columns, axis=1)
    return out.reshape(*grid, out.shape[1])


def _sweep_panels(
    result: SweepResult, prefix: str = "", sig: _Significance | None = None
) -> list[_Panel]:
    dims, scores, custom = result.dims, result.scores.double().numpy(), _custom(result, sig)
    mask = None if sig is None else sig.mask
    ys = _labels(result, "layer")
    if dims == ("layer",):
        ci = result.ci.double().numpy()
        return [
            _Panel(
                "bar", scores, custom.tolist(), ys, [], "layer", "score", prefix, ci[:, 0],
                ci[:, 1], mask,
            )
        ]  # fmt: skip
    if len(dims) == 2:
        return [
            _Panel(
                "heatmap", scores, custom.tolist(), _labels(result, dims[1]), ys,
                _axis_title(result, dims[1]), "layer", prefix, sig=mask,
            )
        ]  # fmt: skip
    if len(dims) == 3 and dims[:2] == ("layer", "position"):
        xs, facet = _labels(result, "position"), dims[2]
        xtitle = _axis_title(result, "position")
        sep = " · " if prefix else ""
        if len(result.coords[facet]) > _MAX_FACETS:  # one heatmap, a row per (layer, head/neuron)
            rows = [f"{y} {f}" for y in ys for f in _labels(result, facet)]
            z = scores.transpose(0, 2, 1).reshape(len(rows), len(xs))
            cd = custom.transpose(0, 2, 1, 3).reshape(len(rows), len(xs), -1).tolist()
            m = None if mask is None else mask.transpose(0, 2, 1).reshape(len(rows), len(xs))
            return [_Panel("heatmap", z, cd, xs, rows, xtitle, f"layer, {facet}", prefix, sig=m)]
        return [
            _Panel(
                "heatmap", scores[:, :, k], custom[:, :, k].tolist(), xs, ys, xtitle, "layer",
                f"{prefix}{sep}{label}", sig=None if mask is None else mask[:, :, k],
            )
            for k, label in enumerate(_labels(result, facet))
        ]  # fmt: skip
    raise ResultFormatError(f"no figure layout for a sweep over dims {dims}")


def _hover(metric: str, level: int, tested: bool = False) -> str:
    """The hover of a site; ``tested``: its customdata ends with the p/q line."""
    return (
        "<b>%{customdata[0]}</b><br>score %{customdata[1]:+.3f}"
        f"<br>{level}% CI [%{{customdata[2]:+.3f}}, %{{customdata[3]:+.3f}}]"
        f"<br>patched {metric} %{{customdata[4]:.4g}}"
        "<br>activation Δ %{customdata[5]:.3g}"
        + ("<br>%{customdata[6]}" if tested else "")
        + "<extra></extra>"
    )


def _add_panel(
    fig: go.Figure,
    p: _Panel,
    at: tuple[int, int, bool],
    m: float,
    hover: str,
    first: bool,
    text: bool = False,
) -> None:
    """Add one panel at ``at`` = (row, col, bottom row?); ``text``: print values in the cells."""
    row, col, bottom = at
    # a long axis title (the position axis' note on tokens) once, under the first column: repeated
    # under every panel of a row it would run into the next one
    xtitle = p.xtitle if bottom and (col == 1 or len(p.xtitle) <= _SHORT_TITLE) else None
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
                    **_faded_bars(p.sig),
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
            texttemplate="%{z:.2f}" if text else None,
            textfont={"size": 10} if text else None,
            xgap=1,
            ygap=1,
        ),
        row=row,
        col=col,
    )
    _add_overlay(fig, p, row, col)
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


def _faded_bars(sig: np.ndarray | None) -> dict[str, Any]:
    """Marker settings fading and hatching the bars of non-significant sites."""
    if sig is None or bool(sig.all()):
        return {}
    return {
        "opacity": [1.0 if s else _FADED_BAR_OPACITY for s in sig.tolist()],
        "pattern": {"shape": ["" if s else "/" for s in sig.tolist()], "fgcolor": "#666"},
    }


def _add_overlay(fig: go.Figure, p: _Panel, row: int, col: int) -> None:
    """Grey, semi-transparent cells over a heatmap's non-significant sites (no hover of its
    own: the score's hover below shows through, with p and q)."""
    if p.sig is None:
        return
    grey = ~p.sig & np.isfinite(p.z)
    if not bool(grey.any()):
        return
    fig.add_trace(
        go.Heatmap(
            z=_nested(np.where(grey, 1.0, np.nan)),
            x=p.x,
            y=p.y,
            colorscale=_NOT_SIGNIFICANT_SCALE,
            showscale=False,
            opacity=_NOT_SIGNIFICANT_OPACITY,
            hoverinfo="skip",
            name="not significant",
            xgap=1,
            ygap=1,
        ),
        row=row,
        col=col,
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
        ticks = min(150, 15 + 6 * longest) if p0.xtitle.startswith("position") else 30
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
    width = 200 + ncols * panel_w
    first = True
    for i, row in enumerate(grid):
        for j, panel in enumerate(row):
            text = _readable_cells(panel, (_export_width(width) - 200) / ncols)
            _add_panel(fig, panel, (i + 1, j + 1, i == nrows - 1), m, hover, first, text)
            first = False
    return fig, 110 + plot_h + ticks + 40, width


def _readable_cells(p: _Panel, panel_px: float) -> bool:
    """Whether a heatmap's values fit in its cells as text (else they run together: hover)."""
    if p.kind != "heatmap" or not p.x:
        return False
    cell_px = panel_px / len(p.x)
    return p.z.size <= _TEXT_CELLS and len(p.x) <= _TEXT_COLUMNS and cell_px >= _TEXT_CELL_PX


def sweep_figure(
    result: SweepResult, *, alpha: float = 0.05, significance: bool = True
) -> go.Figure:
    """Score per site: a layer x head (x position tokens, x neuron) heatmap, bars per layer for a
    layer-only sweep, one layer x position heatmap per head for by-position head sweeps.

    ``significance``: grey the sites not significant at ``alpha`` (``q >= alpha``) and show
    each site's p and q on hover (no overlay for an unverified attribution: it has no p-values).
    """
    sig = _significance(result, alpha, significance)
    panels = _sweep_panels(result, sig=sig)
    ncols = 1 if len(panels) == 1 else min(4, len(panels))
    grid = [panels[i : i + ncols] for i in range(0, len(panels), ncols)]
    m = _sym_max(result.scores.double().numpy())
    hover = _hover(result.shift.metric, _level(result.shift.alpha), sig is not None)
    fig, h, w = _panel_figure(grid, m, hover)
    title = _title(
        f"{result.component.value} patching, {_direction_label(result.direction)}",
        _shift_line(result.shift),
        _score_meaning(result.direction),
        "" if sig is None else sig.note,
    )
    return _finish(fig, title, h, w)

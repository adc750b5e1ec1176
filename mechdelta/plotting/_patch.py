"""Joint-patch figures and the two-direction layout."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdelta.core.sites import Site
from mechdelta.errors import ResultFormatError
from mechdelta.patching.results import BothDirections, PatchResult, SweepResult
from mechdelta.plotting._style import (
    _GREY,
    COLOURS,
    _direction_label,
    _finish,
    _jitter,
    _level,
    _nested,
    _score_meaning,
    _score_meaning_lines,
    _shift_line,
    _sym_max,
    _title,
)
from mechdelta.plotting._sweep import (
    _hover,
    _panel_figure,
    _significance,
    _sweep_panels,
)


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
        _score_meaning(result.direction),
        _shift_line(result.shift),
    )
    return _finish(fig, title, 520, 760)


def both_directions_figure(
    result: BothDirections[Any], *, alpha: float = 0.05, significance: bool = True
) -> go.Figure:
    """The two directions side by side on one symmetric colour range (sweeps) or y axis (patches).

    Sweeps: ``significance`` greys the sites not significant at ``alpha`` in each direction (its
    own grid's multiple-comparison family) and shows p and q on hover, as :func:`sweep_figure`.
    """
    first, second = result.reference_to_intervened, result.intervened_to_reference
    if isinstance(first, PatchResult):
        fig = make_subplots(
            rows=1,
            cols=2,
            shared_yaxes=True,
            subplot_titles=[
                f"{_direction_label(r.direction)}<br><sup>{_patch_subtitle(r)}</sup>"
                f"<br><sup>{_score_meaning(r.direction)}</sup>"
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
    sigs = [_significance(r, alpha, significance) for r in (first, second)]
    per_dir = []
    for r, sig in zip((first, second), sigs, strict=True):
        # the top panel of each direction says what its scores mean
        top, *rest = _sweep_panels(r, _direction_label(r.direction), sig)
        per_dir.append([replace(top, title=top.title + _score_meaning_lines(r.direction)), *rest])
    grid = [list(pair) for pair in zip(*per_dir, strict=True)]  # one row per facet
    m = _sym_max(first.scores.double().numpy(), second.scores.double().numpy())
    tested = sigs[0] is not None
    fig, h, w = _panel_figure(
        grid, m, _hover(first.shift.metric, _level(first.shift.alpha), tested)
    )
    fig.update_annotations(font_size=14)
    notes = list(dict.fromkeys(s.note for s in sigs if s is not None))
    if len(notes) > 1:  # e.g. another number of verified sites per direction
        notes = [
            f"{_direction_label(r.direction)}: {s.note}"
            for r, s in zip((first, second), sigs, strict=True)
            if s is not None
        ]
    title = _title(
        f"{first.component.value} patching, both directions", _shift_line(first.shift), *notes
    )
    return _finish(fig, title, h, w)

"""Shared style and label helpers of mechdelta's figures (no global plotly state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from mechdelta.core.directions import Direction
from mechdelta.patching.shift import ShiftResult

TEMPLATE = "plotly_white"
SCORE_SCALE = "RdBu"  # positive scores blue, negative red, zero white
EPS = 1e-6
COLOURS = {"reference": "#4477AA", "intervened": "#CC6677", "patched": "#228833"}
_GREY = "rgba(120,120,120,0.35)"
# Values are printed in heatmap cells only when they can be read: up to this many cells in a
# panel, this many columns, and cells at least this wide (px, at the figure's export width).
_TEXT_CELLS = 150
_TEXT_COLUMNS = 24
_TEXT_CELL_PX = 30
_MAX_FACETS = 16  # beyond this many heads/neurons, by-position sweeps stack rows in one panel


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


_MEANING = {
    True: ("score: fraction of the shift undone", "by restoring the site's reference activation"),
    False: ("score: fraction of the shift carried", "by the site's intervened activation alone"),
}


def _score_meaning(d: Direction) -> str:
    """What a score means in direction ``d``, one line (a figure title's subtitle)."""
    return " ".join(_MEANING[d.toward_reference])


def _score_meaning_lines(d: Direction) -> str:
    """:func:`_score_meaning` as two small lines, for a panel title over a narrow panel."""
    return "".join(
        f"<br><span style='font-size:11px'>{p}</span>" for p in _MEANING[d.toward_reference]
    )


def _title(main: str, *subs: str) -> dict[str, Any]:
    text = main + "".join(f"<br><sup>{s}</sup>" for s in subs if s)
    return {"text": text, "x": 0.01, "xanchor": "left"}


def _export_width(width: int | float) -> int:
    """The width a figure is exported at, from the width its layout suggests."""
    return int(min(max(width, 600), 2000))


def _finish(fig: go.Figure, title: dict[str, Any], height: int, width: int) -> go.Figure:
    # room for the title's lines and, above the panels, two-line subplot titles
    sub = max((a.text.count("<br>") + 1 for a in fig.layout.annotations), default=0)
    lines = title["text"].count("<br>")
    top = 50 + 22 * lines + 26 * sub
    if sub:
        # plotly puts the title's first baseline at the middle of the top margin, so each
        # subtitle line beyond what fits above the subplot titles (two over one-line subplot
        # titles, one over taller ones) needs twice its height there
        top += 40 * max(0, lines - (2 if sub == 1 else 1))
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        height=int(height + max(0, top - 110)),
        meta={"export_width": _export_width(width)},
        margin={"t": top, "l": 80, "r": 40, "b": 70},
        font={"size": 12},
    )
    return fig


def _clean_token(tok: str) -> str:
    t = tok.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return t if t.strip() else repr(tok)


def position_labels(positions: Sequence[int], tokens: Sequence[str | None] | None) -> list[str]:
    """Axis labels ``"3: the"``; the position number alone where ``tokens`` has no token for it
    (``None``: the prompts differ there, or no tokens at all). Always unique."""
    if tokens is None:
        return [str(p) for p in positions]
    out = []
    for p in positions:
        tok = tokens[p] if 0 <= p < len(tokens) else None
        out.append(str(p) if tok is None else f"{p}: {_clean_token(tok)}")
    return out

"""Figures of mechdelta results: pure functions ``result -> plotly.graph_objects.Figure``.

Every figure is built from a stored result alone (no model), sets its own template
(``plotly_white``; the global plotly default is never touched) and is deterministic: the same
result gives the same ``fig.to_json()``. Patching scores use a diverging scale centred at 0 with a
symmetric range, so white means "explains none of the shift" in every figure. Export (HTML, PNG,
SVG, PDF; a static PNG beside each figure a notebook shows) lives in
:mod:`mechdelta.plotting._export`; everything is re-exported here.
"""

from __future__ import annotations

from mechdelta.plotting._attention import (
    attention_figure,
    attention_figure_from_patterns,
    attention_patterns,
)
from mechdelta.plotting._behaviour import (
    factorial_figure,
    shift_figure,
)
from mechdelta.plotting._circuit import (
    circuit_curve_figure,
    circuit_figure,
)
from mechdelta.plotting._export import (
    FigureWriter,
    StaticFallbackRenderer,
    figure_size,
    find_browser,
    to_html,
    write_figure,
)
from mechdelta.plotting._patch import (
    both_directions_figure,
    patch_figure,
)
from mechdelta.plotting._reliability import (
    reliability_figure,
)
from mechdelta.plotting._representations import representation_figure
from mechdelta.plotting._series import (
    comparison_figure,
    membership_figure,
    trajectory_figure,
)
from mechdelta.plotting._steering import steering_figure
from mechdelta.plotting._style import (
    COLOURS,
    EPS,
    SCORE_SCALE,
    TEMPLATE,
    position_labels,
)
from mechdelta.plotting._sweep import (
    sweep_figure,
)
from mechdelta.plotting._weights import (
    weight_diff_figure,
)

__all__ = [
    "COLOURS",
    "EPS",
    "SCORE_SCALE",
    "TEMPLATE",
    "FigureWriter",
    "StaticFallbackRenderer",
    "attention_figure",
    "attention_figure_from_patterns",
    "attention_patterns",
    "both_directions_figure",
    "circuit_curve_figure",
    "circuit_figure",
    "comparison_figure",
    "factorial_figure",
    "figure_size",
    "find_browser",
    "membership_figure",
    "patch_figure",
    "position_labels",
    "reliability_figure",
    "representation_figure",
    "shift_figure",
    "steering_figure",
    "sweep_figure",
    "to_html",
    "trajectory_figure",
    "weight_diff_figure",
    "write_figure",
]

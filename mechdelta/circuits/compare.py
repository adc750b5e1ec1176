"""How two circuits overlap: :func:`compare_circuits` -> :class:`CircuitComparison`.

Members are compared at the circuits' level (node level: the nodes, ``unembed`` included; edge
level: the edges). With ``a`` the earlier / reference circuit and ``b`` the later one:

- ``node_jaccard``: ``|N_a ∩ N_b| / |N_a ∪ N_b|`` over the circuits' nodes (at edge level the nodes
  the edges touch, ``embed`` and ``logits`` included). NaN when both are empty.
- ``edge_jaccard``: the same over the edges (edge level); NaN at node level.
- ``weighted_overlap``: ``Σ_m min(w_a(m), w_b(m))`` over all members, where ``w_c(m)`` is the
  member's share of its circuit's contribution, ``|minimality_c(m)| / Σ |minimality_c|`` (0 for a
  non-member). 1 when both circuits have the same members with the same shares, 0 when they share
  none; equal to ``1 - total variation distance`` of the two shares. A circuit whose minimality
  is not all finite (a search that did not reach its target) or sums to 0 gets uniform shares
  ``1 / |C|`` instead (``weighted_by`` says which).
- ``rank_correlation``: Spearman's rho (average ranks for ties) of the shared members'
  minimality in ``a`` and in ``b``; NaN with fewer than 2 shared members with finite minimality,
  or when either side is constant.
- ``shared`` / ``gained`` / ``lost``: members in both / only in ``b`` / only in ``a``.

Circuits of different levels raise :class:`~mechdelta.errors.ConfigError` (a node circuit's
``unembed`` and an edge circuit's ``logits`` receiver are different things; compare
``a.nodes`` by hand if you mean it). Circuits of different semantics or directions are compared
(their members are the same kind of object) with a :class:`CircuitComparisonWarning`, since the
same member means a different intervention under each.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mechdelta.circuits.circuit import Circuit
from mechdelta.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["CircuitComparison", "CircuitComparisonWarning", "compare_circuits"]


class CircuitComparisonWarning(UserWarning):
    """Two circuits of different semantics or directions were compared."""


def _jaccard(a: set[Any], b: set[Any]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def _shares(c: Circuit) -> tuple[dict[str, float], str]:
    mags = [abs(x) for x in c.minimality]
    total = sum(mags)
    if c.names and all(math.isfinite(x) for x in mags) and total > 0:
        return {n: m / total for n, m in zip(c.names, mags, strict=True)}, "minimality"
    return {n: 1 / len(c.names) for n in c.names} if c.names else {}, "uniform"


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties (NaN for < 2 points or a constant side)."""
    if len(x) != len(y):
        raise ConfigError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


@dataclass(frozen=True, eq=False)
class CircuitComparison:
    """The overlap of circuits ``a`` and ``b`` (see the module docstring for each number)."""

    labels: tuple[str, str]
    level: str
    node_jaccard: float
    edge_jaccard: float
    weighted_overlap: float
    rank_correlation: float
    shared: tuple[str, ...]
    gained: tuple[str, ...]
    lost: tuple[str, ...]
    minimality: tuple[dict[str, float], dict[str, float]]
    shares: tuple[dict[str, float], dict[str, float]]
    weighted_by: tuple[str, str]

    @property
    def members(self) -> tuple[str, ...]:
        """Every member of either circuit: shared, then lost (only in a), then gained."""
        return (*self.shared, *self.lost, *self.gained)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per member: ``member, status ("both"|"lost"|"gained"), in_a, in_b,
        minimality_a, minimality_b, share_a, share_b``."""
        import pandas as pd

        status = {
            **dict.fromkeys(self.shared, "both"),
            **dict.fromkeys(self.lost, "lost"),
            **dict.fromkeys(self.gained, "gained"),
        }
        nan = math.nan
        rows = [
            {
                "member": m,
                "status": status[m],
                "in_a": m in self.minimality[0],
                "in_b": m in self.minimality[1],
                "minimality_a": self.minimality[0].get(m, nan),
                "minimality_b": self.minimality[1].get(m, nan),
                "share_a": self.shares[0].get(m, 0.0),
                "share_b": self.shares[1].get(m, 0.0),
            }
            for m in self.members
        ]
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        """Each member's share of the contribution in a and in b (grouped bars)."""
        from mechdelta.plotting._series import comparison_figure

        return comparison_figure(self)

    def __str__(self) -> str:
        a, b = self.labels

        def fmt(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{x:.3f}"

        lines = [
            f"{self.level}-level circuits {a} vs {b}: node Jaccard {fmt(self.node_jaccard)}, "
            f"edge Jaccard {fmt(self.edge_jaccard)}, weighted overlap "
            f"{fmt(self.weighted_overlap)}, rank correlation {fmt(self.rank_correlation)}",
            f"  shared ({len(self.shared)}): {', '.join(self.shared) or '-'}",
            f"  lost, only in {a} ({len(self.lost)}): {', '.join(self.lost) or '-'}",
            f"  gained, only in {b} ({len(self.gained)}): {', '.join(self.gained) or '-'}",
        ]
        return "\n".join(lines)


def compare_circuits(
    a: Circuit, b: Circuit, *, labels: tuple[str, str] = ("a", "b")
) -> CircuitComparison:
    """Compare circuit ``a`` (earlier / reference) with ``b`` (see the module docstring)."""
    for c in (a, b):
        if not isinstance(c, Circuit):
            raise ConfigError(f"compare_circuits takes two Circuits, got {type(c).__name__}")
    if a.level != b.level:
        raise ConfigError(
            f"cannot compare a {a.level}-level circuit with a {b.level}-level one: their members "
            "differ in kind; search both at one level"
        )
    shape_a, shape_b = a.provenance.get("shape"), b.provenance.get("shape")
    if shape_a is not None and shape_b is not None and shape_a != shape_b:
        raise ConfigError(
            f"the circuits come from models of different shapes: {shape_a} vs {shape_b}"
        )
    if a.semantics != b.semantics or a.direction is not b.direction:
        warnings.warn(
            f"comparing a {a.semantics} {a.direction.value} circuit with a {b.semantics} "
            f"{b.direction.value} circuit: the same member is a different intervention in each",
            CircuitComparisonWarning,
            stacklevel=2,
        )
    names_a, names_b = list(a.names), list(b.names)
    in_b, in_a = set(names_b), set(names_a)
    shared = tuple(n for n in names_a if n in in_b)
    min_a = dict(zip(names_a, a.minimality, strict=True))
    min_b = dict(zip(names_b, b.minimality, strict=True))
    (sh_a, by_a), (sh_b, by_b) = _shares(a), _shares(b)
    overlap = sum(min(sh_a.get(m, 0.0), sh_b.get(m, 0.0)) for m in in_a | in_b)
    finite = [m for m in shared if math.isfinite(min_a[m]) and math.isfinite(min_b[m])]
    edge_j = _jaccard(set(a.edges), set(b.edges)) if a.level == "edge" else math.nan
    return CircuitComparison(
        labels=(str(labels[0]), str(labels[1])),
        level=a.level,
        node_jaccard=_jaccard(set(a.nodes), set(b.nodes)),
        edge_jaccard=edge_j,
        weighted_overlap=overlap if (in_a or in_b) else math.nan,
        rank_correlation=spearman([min_a[m] for m in finite], [min_b[m] for m in finite]),
        shared=shared,
        gained=tuple(n for n in names_b if n not in in_a),
        lost=tuple(n for n in names_a if n not in in_b),
        minimality=(min_a, min_b),
        shares=(sh_a, sh_b),
        weighted_by=(by_a, by_b),
    )

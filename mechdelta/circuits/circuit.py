"""The result of a circuit search: :class:`Circuit`."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Node
from mechdelta.errors import ResultFormatError
from mechdelta.patching.results import fraction_explained
from mechdelta.patching.shift import _MALFORMED, ShiftResult

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["Circuit", "CircuitNotFaithfulWarning"]

_KIND = "circuit"


class CircuitNotFaithfulWarning(UserWarning):
    """A circuit search did not reach its target faithfulness: the returned circuit is the full
    graph (or the best circuit within ``max_size``) and :attr:`Circuit.reached` is False."""


def _name(member: Node | Edge, level: str) -> str:
    """A *member*'s name: ``Node("logits")`` as a member is always ``unembed``."""
    if isinstance(member, Node) and member.kind == "logits":
        return "unembed"
    return str(member)


def _node_name(node: Node, level: str) -> str:
    """A node of :attr:`Circuit.nodes`: ``unembed`` at node level, ``logits`` at edge level."""
    return "unembed" if level == "node" and node.kind == "logits" else str(node)


def _parse_node(text: str) -> Node:
    return Node("logits") if text == "unembed" else Node.parse(text)


@dataclass(frozen=True, eq=False)
class Circuit:
    """A circuit found by :func:`~mechdelta.circuits.search_circuit` and how faithful it is.

    - ``nodes``: at node level the members (``Node("logits")`` is the final norm + unembedding,
      shown as ``unembed``); at edge level every node an edge touches.
    - ``edges``: the edges among the members at edge level, empty at node level.
    - ``unembed``: whether the graft pseudo-member ``unembed`` (the source's final norm +
      unembedding, ``Node("logits")``) is a member (at node level it is also in ``nodes``; at
      edge level it is the last of :attr:`members`).
    - ``per_prompt``: the task metric per prompt of the hybrid run with the circuit.
    - ``curve``: ``(size, faithfulness)`` along the ranking the search used (greedy: its picks;
      attribution: prefixes of the ranking; acdc: the circuits left as it pruned), by size.
    - ``minimality``: per member, the faithfulness lost when it alone is dropped (NaN when the
      circuit does not reach the target and was not pruned).
    - ``reached``: whether :attr:`faithfulness` lies in ``[target, 2 - target]``.
    - ``ceiling``: faithfulness of the full graph under these semantics (NaN: not evaluated).
    - ``provenance``: models, task, counts of exact evaluations, timings, the ranking used.
    """

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    level: str
    semantics: str
    direction: Direction
    method: str
    target: float
    per_prompt: Float[Tensor, " batch"]
    shift: ShiftResult
    curve: tuple[tuple[int, float], ...]
    minimality: tuple[float, ...]
    reached: bool
    ceiling: float = float("nan")
    provenance: dict[str, Any] = field(default_factory=dict)
    unembed: bool = False

    def __post_init__(self) -> None:
        if len(self.minimality) != len(self.members):
            raise ResultFormatError(
                f"a circuit of {len(self.members)} members needs {len(self.members)} minimality "
                f"values, got {len(self.minimality)}"
            )

    # --- derived ------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[Node | Edge, ...]:
        """The circuit's members: its nodes at node level, its edges (then ``Node("logits")``
        when :attr:`unembed`) at edge level."""
        if self.level == "edge":
            return (*self.edges, Node("logits")) if self.unembed else self.edges
        return self.nodes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(_name(m, self.level) for m in self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def faithfulness(self) -> float:
        """Fraction of the mean shift the circuit's hybrid moves, in :attr:`direction`."""
        mean = self.per_prompt.double().mean()
        return float(fraction_explained(self.direction, self.shift, mean))

    @property
    def faithfulness_per_prompt(self) -> float:
        """``1 - Σ|m_hybrid - m_S| / Σ|m_T - m_S|`` over prompts (S = source, T = target):
        immune to effects that cancel across prompts."""
        toward_i = self.direction.target == "reference"
        src = (self.shift.intervened if toward_i else self.shift.reference).double()
        tgt = (self.shift.reference if toward_i else self.shift.intervened).double()
        denom = float((tgt - src).abs().sum())
        if denom == 0:
            return float("nan")
        return 1.0 - float((self.per_prompt.double() - src).abs().sum()) / denom

    @property
    def curve_area(self) -> float:
        """Area under faithfulness vs size / (number of members of the graph), trapezoidal,
        from size 0 to the curve's last point and flat from there to the whole graph."""
        n = int(self.provenance.get("n_members", 0)) or max((s for s, _ in self.curve), default=1)
        pts = sorted(self.curve)
        if not pts:
            return float("nan")
        area = 0.0
        for (s0, f0), (s1, f1) in itertools.pairwise(pts):
            area += (s1 - s0) / n * (f0 + f1) / 2
        return area + max(0, n - pts[-1][0]) / n * pts[-1][1]

    # --- views --------------------------------------------------------------------------------

    def to_dataframe(self) -> pd.DataFrame:
        """One row per member: name, its parts, and its minimality."""
        import pandas as pd

        rows = []
        for i, m in enumerate(self.members):
            row: dict[str, Any] = {"member": _name(m, self.level), "minimality": self.minimality[i]}
            if isinstance(m, Edge):
                row.update(sender=str(m.sender), receiver=str(m.receiver), input=m.input)
            else:
                row.update(kind="unembed" if m.kind == "logits" else m.kind, layer=m.layer)
                row["head"] = m.head
            rows.append(row)
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        from mechdelta.plotting._circuit import circuit_figure

        return circuit_figure(self)

    def __str__(self) -> str:
        status = "reaches" if self.reached else "does NOT reach"
        head = (
            f"{self.level}-level {self.semantics} circuit ({self.method}), {self.direction.value}: "
            f"{len(self)} members, faithfulness {self.faithfulness:.3f} (per prompt "
            f"{self.faithfulness_per_prompt:.3f}); {status} target {self.target:g}"
        )
        if not math.isnan(self.ceiling):
            head += f"; full graph {self.ceiling:.3f}"
        lines = [head]
        for name, loss in sorted(
            zip(self.names, self.minimality, strict=True), key=lambda x: -abs(x[1])
        ):
            lines.append(f"  {name:>18}  drop-one loss {loss:+.3f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    # --- storage ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the circuit to a directory (safetensors + JSON, never pickle)."""
        meta = {
            "nodes": [_node_name(n, self.level) for n in self.nodes],
            "edges": [str(e) for e in self.edges],
            "level": self.level,
            "semantics": self.semantics,
            "direction": self.direction.value,
            "method": self.method,
            "target": self.target,
            "curve": [[s, f] for s, f in self.curve],
            "minimality": list(self.minimality),
            "reached": self.reached,
            "ceiling": self.ceiling,
            "unembed": self.unembed,
            "provenance": self.provenance,
            "shift": self.shift._meta(),
        }
        tensors = {"per_prompt": self.per_prompt, **self.shift._tensors("shift_")}
        save_result(path, _KIND, meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        meta, tensors = load_result(path, _KIND)
        try:
            level = meta["level"]
            return cls(
                nodes=tuple(
                    _parse_node(n) if level == "node" else Node.parse(n) for n in meta["nodes"]
                ),
                edges=tuple(Edge.parse(e) for e in meta["edges"]),
                level=level,
                semantics=meta["semantics"],
                direction=Direction.coerce(meta["direction"]),
                method=meta["method"],
                target=float(meta["target"]),
                per_prompt=tensors["per_prompt"],
                shift=ShiftResult._from(meta["shift"], tensors, "shift_"),
                curve=tuple((int(s), float(f)) for s, f in meta["curve"]),
                minimality=tuple(float(x) for x in meta["minimality"]),
                reached=bool(meta["reached"]),
                ceiling=float(meta["ceiling"]),
                provenance=meta.get("provenance", {}),
                unembed=bool(meta.get("unembed", False)),
            )
        except (*_MALFORMED, ResultFormatError) as exc:
            raise ResultFormatError(f"{os.fspath(path)!r} is not a valid circuit: {exc!r}") from exc

"""The result of :func:`~mechdelta.attribute_edges`: one score per edge of the graph."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge
from mechdelta.errors import ConfigError, ResultFormatError, SiteError
from mechdelta.patching.shift import _MALFORMED, ShiftResult

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["METHODS", "EdgeAttribution", "EdgeScore"]

METHODS = ("eap", "eap-ig")


@dataclass(frozen=True)
class EdgeScore:
    """One row of :meth:`EdgeAttribution.top`."""

    edge: Edge
    score: float
    fraction: float

    def __repr__(self) -> str:
        return f"EdgeScore({self.edge}, score={self.score:+.4g}, fraction={self.fraction:+.4g})"

    def __str__(self) -> str:
        return f"{self.edge!s:>22}  score {self.score:+.4g}  fraction {self.fraction:+.3f}"


@dataclass(frozen=True, eq=False)
class EdgeAttribution:
    """Edge attribution scores in one direction.

    ``per_prompt[e, b]`` is edge ``edges[e]``'s estimated change of the metric on prompt ``b``
    when the sender's write along that edge alone is the source model's (see
    :mod:`mechdelta.attribution.edges`); :attr:`scores` is its mean over prompts, in metric units.
    :attr:`fractions` divides by the shift with mechdelta's sign convention (``-score / shift``
    for ``reference->intervened``: the fraction of the shift undone; ``score / shift`` for
    ``intervened->reference``: the fraction carried). ``bias[r, b]`` is receiver input
    ``receivers[r]``'s term of the change in the attention output biases, which are not nodes:
    incoming edges plus it sum to the node-level attribution of that input
    (:attr:`receiver_totals`).
    """

    edges: tuple[Edge, ...]
    per_prompt: Float[Tensor, "edge batch"]
    receivers: tuple[str, ...]
    bias: Float[Tensor, "receiver batch"]
    direction: Direction
    method: str
    shift: ShiftResult
    steps: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.per_prompt.shape[0] != len(self.edges) or self.bias.shape[0] != len(self.receivers):
            raise ResultFormatError(
                f"edge arrays do not match: {len(self.edges)} edges, per_prompt "
                f"{tuple(self.per_prompt.shape)}; {len(self.receivers)} receivers, bias "
                f"{tuple(self.bias.shape)}"
            )

    @property
    def scores(self) -> Float[Tensor, " edge"]:
        """Mean over prompts of each edge's estimated metric change (metric units)."""
        return self.per_prompt.double().mean(-1)

    @property
    def fractions(self) -> Float[Tensor, " edge"]:
        """:attr:`scores` as signed fractions of the shift (NaN when the shift is 0)."""
        shift = self.shift.shift
        if shift == 0:
            return torch.full_like(self.scores, float("nan"))
        sign = -1.0 if self.direction.toward_reference else 1.0
        return sign * self.scores / shift

    @property
    def receiver_totals(self) -> Float[Tensor, "receiver batch"]:
        """Per receiver input and prompt: its incoming edges' scores plus its bias term."""
        index = {r: i for i, r in enumerate(self.receivers)}
        rows = torch.tensor([index[e.receiver_input] for e in self.edges], dtype=torch.long)
        out = self.bias.double().clone()
        out.index_add_(0, rows, self.per_prompt.double())
        return out

    def incoming(self, receiver_input: str) -> list[int]:
        """Indices (into :attr:`edges`) of the edges into one receiver input (``"L1H0.q"``)."""
        if receiver_input not in self.receivers:
            raise SiteError(
                f"{receiver_input!r} is not a receiver input of this result; receivers are "
                f"named like {', '.join(self.receivers[:3])}, ..., logits"
            )
        return [i for i, e in enumerate(self.edges) if e.receiver_input == receiver_input]

    def score(self, edge: Edge | str) -> float:
        """The mean score of one edge (``"L0H1 -> logits"`` or an :class:`Edge`)."""
        e = Edge.parse(edge) if isinstance(edge, str) else edge
        try:
            i = self.edges.index(e)
        except ValueError:
            raise SiteError(f"{e} is not an edge of this result's graph") from None
        return float(self.scores[i])

    def top(self, k: int = 10, *, by: str = "abs") -> list[EdgeScore]:
        """The ``k`` edges with the largest |score| (``by="signed"``: largest signed score)."""
        if by not in ("abs", "signed"):
            raise ConfigError(f"top(by={by!r}): use 'abs' (largest magnitude) or 'signed'")
        scores, fractions = self.scores, self.fractions
        key = torch.nan_to_num(scores.abs() if by == "abs" else scores, nan=-float("inf"))
        order = torch.argsort(key, descending=True, stable=True)[:k].tolist()
        return [EdgeScore(self.edges[i], float(scores[i]), float(fractions[i])) for i in order]

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                "edge": [str(e) for e in self.edges],
                "sender": [str(e.sender) for e in self.edges],
                "receiver": [str(e.receiver) for e in self.edges],
                "input": [e.input for e in self.edges],
                "score": self.scores.tolist(),
                "fraction": self.fractions.tolist(),
            }
        )

    def figure(self) -> go.Figure:
        from mechdelta.plotting._edges import edge_figure

        return edge_figure(self)

    def __str__(self) -> str:
        best = "\n".join(f"  {row}" for row in self.top(5))
        steps = f", {self.steps} steps" if self.steps else ""
        return (
            f"edge attribution {self.method}{steps} {self.direction.value} over "
            f"{len(self.edges)} edges\n  {self.shift}\n{best}"
        )

    # --- storage ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {
            "per_prompt": self.per_prompt,
            "bias": self.bias,
            **self.shift._tensors("shift."),
        }
        meta = {
            "edges": [str(e) for e in self.edges],
            "receivers": list(self.receivers),
            "direction": self.direction.value,
            "method": self.method,
            "steps": self.steps,
            "shift": self.shift._meta(),
            "provenance": self.provenance,
        }
        save_result(path, "edge_attribution", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EdgeAttribution:
        meta, tensors = load_result(path, "edge_attribution")
        try:
            return cls(
                edges=tuple(Edge.parse(e) for e in meta["edges"]),
                per_prompt=tensors["per_prompt"],
                receivers=tuple(str(r) for r in meta["receivers"]),
                bias=tensors["bias"],
                direction=Direction(meta["direction"]),
                method=str(meta["method"]),
                shift=ShiftResult._from(meta["shift"], tensors, "shift."),
                steps=None if meta.get("steps") is None else int(meta["steps"]),
                provenance=meta.get("provenance", {}),
            )
        except ResultFormatError:
            raise
        except (*_MALFORMED, SiteError) as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid edge attribution result: {exc!r}"
            ) from exc

"""Rankings of a search's members for ``method="attribution"``: a first-order estimate of the
search's own semantics where one exists, else exact single-member evaluations.

Each ranking returns one value per member (the members' order), larger = include first:

- node ``"splice"``: AtP (:func:`~mechdelta.attribute`, ``"atp"``) of each node's write (heads'
  ``head_out``, MLPs' ``mlp_out``); ``embed`` by its exact single splice (one run).
- node ``"graft"``: the *exact* single-component graft of each node (a graft sweep: one target
  forward per node, cheap at node level), not a first-order estimate.
- edge ``"splice"``: EAP (:func:`~mechdelta.attribute_edges`, ``"eap"``) in the search direction:
  the estimated fraction of the shift each edge alone carries.
- edge ``"ablate"``: under ablate, ``ablate_{S->T}(C)`` is ``splice_{T->S}`` of the edges
  *outside* C (S runs, those edges carry T's cached writes), so EAP in the *opposite* direction
  estimates the faithfulness each edge's removal from the full graph costs; that loss ranks.
"""

from __future__ import annotations

import math
from typing import Any

from mechdelta.circuits._evaluate import Evaluator
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Node


def opposite(d: Direction) -> Direction:
    if d is Direction.INTERVENED_TO_REFERENCE:
        return Direction.REFERENCE_TO_INTERVENED
    return Direction.INTERVENED_TO_REFERENCE


def ranking(ev: Evaluator) -> tuple[list[float], str]:
    """One estimate per member of ``ev`` (larger = more needed) and how it was obtained."""
    if ev.level == "edge":
        from mechdelta.attribution.edges import attribute_edges

        ablate = ev.semantics == "ablate"
        d = opposite(ev.direction) if ablate else ev.direction
        result: Any = attribute_edges(ev.pair, ev.task, d, "eap", batch_budget=ev.engine.budget)
        by_edge = dict(zip(result.edges, result.fractions.tolist(), strict=True))
        how = (
            "eap in the opposite direction: the first-order loss of removing each edge from the "
            "full graph (ablate = splice of the complement the other way)"
            if ablate
            else "eap: the first-order fraction of the shift each edge alone carries"
        )
        return [_finite(by_edge[m]) for m in ev.members], how
    if ev.semantics == "graft":
        est = ev.faithfulness([[m] for m in ev.members])
        return [_finite(x) for x in est], "exact single-component graft scores (a graft sweep)"
    from mechdelta.attribution.nodes import attribute

    scores: dict[Any, float] = {}
    shape = ev.pair.shape
    comps = [("head_out", True)] + ([("mlp_out", False)] if shape.d_mlp is not None else [])
    for comp, per_head in comps:
        res: Any = attribute(
            ev.pair, ev.task, comp, ev.direction, "atp", batch_budget=ev.engine.budget
        )
        grid = res.scores
        for m in ev.members:
            if isinstance(m, Node) and m.kind == ("head" if per_head else "mlp"):
                scores[m] = float(grid[m.layer, m.head] if per_head else grid[m.layer])
    embeds = [m for m in ev.members if isinstance(m, Node) and m.kind == "embed"]
    for m, f in zip(embeds, ev.faithfulness([[m] for m in embeds]), strict=True):
        scores[m] = f
    how = "atp: first-order estimate of each node's splice (embed: its exact single splice)"
    return [_finite(scores[m]) for m in ev.members], how


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf

"""Rankings of a search's members for ``method="attribution"``: a first-order estimate of the
search's own semantics where one exists, else exact single-member evaluations.

Each ranking returns one value per member (the members' order), larger = include first:

- node ``"splice"``: AtP (:func:`~mechdelta.attribute`, ``"atp"``) of each node's write (heads'
  ``head_out``, MLPs' ``mlp_out``); ``embed`` by its exact single splice (one run).
- node ``"graft"``: a first-order estimate (it replaced the exact single-component graft sweep
  used before): each node's graft write on the target's clean inputs minus the target's write
  (``embed``: the source's embeddings; a head: the source's Q/K/V/O slices on the target's
  ``ln1``; an MLP: the source's ``ln2`` + MLP), dotted with the gradient of the metric at the
  node's write in the target's clean run (= the sum of its outgoing edges' estimates below),
  as a fraction of the shift; ``unembed`` by its exact single graft (one run). Not counted at
  first order: under grouped-query attention a node-level graft of one head also changes the
  keys and values of its group's other heads, and with tied embeddings grafting ``embed`` also
  grafts the unembedding.
- edge ``"splice"``: EAP (:func:`~mechdelta.attribute_edges`, ``"eap"``) in the search direction:
  the estimated fraction of the shift each edge alone carries.
- edge ``"graft"``: ``(graftwrite_X on the target's clean inputs - the target's write of X) ·
  ∂m/∂(R's input)`` in the target's clean run, per edge ``X -> R.input`` (EAP of
  :mod:`mechdelta.attribution.edges` with graft writes instead of the source's cached writes and
  no ``b_O`` term: the biases stay the target's), as a fraction of the shift; ``unembed`` by
  its exact single graft (one run).
- edge ``"ablate"``: under ablate, ``ablate_{S->T}(C)`` is ``splice_{T->S}`` of the edges
  *outside* C (S runs, those edges carry T's cached writes), so EAP in the *opposite* direction
  estimates the faithfulness each edge's removal from the full graph costs; that loss ranks.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from mechdelta.circuits._evaluate import Evaluator
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Node


def opposite(d: Direction) -> Direction:
    if d is Direction.INTERVENED_TO_REFERENCE:
        return Direction.REFERENCE_TO_INTERVENED
    return Direction.INTERVENED_TO_REFERENCE


def ranking(ev: Evaluator) -> tuple[list[float], str]:
    """One estimate per member of ``ev`` (larger = more needed) and how it was obtained."""
    if ev.semantics == "graft":
        by_edge, by_node = graft_estimates(ev)
        est: dict[Any, float] = {**by_edge, **by_node}
        unembed = Node("logits")
        if unembed in ev.index:
            est[unembed] = ev.faithfulness([[unembed]])[0]
        how = (
            "graft first order: (graft write on the target's clean inputs - the target's write) "
            "· the gradient at the receiver input (node: at its write) in the target's clean run;"
            " unembed: its exact single graft"
        )
        return [_finite(est[m]) for m in ev.members], how
    if ev.level == "edge":
        from mechdelta.attribution.edges import attribute_edges

        ablate = ev.semantics == "ablate"
        d = opposite(ev.direction) if ablate else ev.direction
        result: Any = attribute_edges(ev.pair, ev.task, d, "eap", batch_budget=ev.engine.budget)
        eap: dict[Any, float] = dict(zip(result.edges, result.fractions.tolist(), strict=True))
        how = (
            "eap in the opposite direction: the first-order loss of removing each edge from the "
            "full graph (ablate = splice of the complement the other way)"
            if ablate
            else "eap: the first-order fraction of the shift each edge alone carries"
        )
        return [_finite(eap[m]) for m in ev.members], how
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


def graft_estimates(ev: Evaluator) -> tuple[dict[Edge, float], dict[Node, float]]:
    """First-order graft estimates, as fractions of the shift in ``ev``'s direction: per graph
    edge, and per sender node (the sum over its outgoing edges = its write's difference dotted
    with the gradient at the write). See the module docstring."""
    from mechdelta.attribution.edges import _attribute
    from mechdelta.patching.edges import EdgePatcher

    patcher = ev._patcher or EdgePatcher(ev.pair, ev.task, engine=ev.engine)
    writes = partial(patcher.graft_writes, ev.direction)
    result = _attribute(ev.engine, ev.graph, ev.direction, "eap", 1, ev.shift, writes=writes)
    by_edge = dict(zip(result.edges, result.fractions.tolist(), strict=True))
    by_node: dict[Node, float] = {}
    for e, f in by_edge.items():
        by_node[e.sender] = by_node.get(e.sender, 0.0) + f
    return by_edge, by_node


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf

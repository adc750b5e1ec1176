"""Exact evaluation of candidate circuits for :func:`~mechdelta.circuits.search_circuit`.

An evaluator holds one pair, task, level, semantics and direction, and returns the metric per
prompt of the hybrid run of each circuit it is given (a circuit = a frozenset of members: graph
Nodes at node level, Edges at edge level), evaluating many circuits per call where the patching
API stacks them, and remembering each circuit's values so that no circuit is run twice.

- node ``"graft"``: the target model with the members' parameters from the source
  (:func:`~mechdelta.patching.graft.graft_values`; ``Node("logits")`` is the final norm + the
  unembedding, shown as ``unembed``); one target forward per circuit, from the first grafted layer.
- node ``"splice"``: the source run's cached writes of the members (``head_out``, ``mlp_out``,
  ``embed`` sites) spliced jointly into the target run (:class:`~mechdelta.patching._engine.
  PatchEngine`), circuits stacked along the batch.
- edge ``"splice"`` / ``"ablate"`` / ``"graft"``: :class:`~mechdelta.patching.edges.EdgePatcher`,
  circuits stacked. Under graft the members are the graph's edges plus ``Node("logits")``, the
  pseudo-member ``unembed`` (the source's final norm + unembedding).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.core.sites import Component, Site
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import fraction_explained
from mechdelta.patching.shift import ShiftResult, engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.stats.bootstrap import Bootstrap

Member = Node | Edge
CircuitSet = frozenset[Any]


def node_site(node: Node) -> Site:
    """The splice site of a node's write."""
    if node.kind == "embed":
        return Site(Component.EMBED, 0)
    if node.kind == "head":
        return Site(Component.HEAD_OUT, node.layer or 0, head=node.head)
    if node.kind == "mlp":
        return Site(Component.MLP_OUT, node.layer or 0)
    raise AssertionError(f"{node} has no write to splice")


def member_name(member: Member, level: str) -> str:
    """A member's display name (``unembed`` for ``Node('logits')``: a member, never a receiver)."""
    if isinstance(member, Node) and member.kind == "logits":
        return "unembed"
    return str(member)


class Evaluator:
    """Exact metric per prompt of circuits of one search (see the module docstring)."""

    def __init__(
        self,
        pair: Any,
        task: Any,
        *,
        level: str,
        semantics: str,
        direction: Direction,
        batch_budget: BatchBudget,
        progress: bool | None,
        executor: Any = None,
    ) -> None:
        self.pair, self.task = pair, task
        self.level, self.semantics, self.direction = level, semantics, direction
        self.graph = Graph.from_model(pair)
        self.engine = PatchEngine(
            pair, task, batch_budget=batch_budget, progress=progress, executor=executor
        )
        self.shift: ShiftResult = engine_shift(self.engine, Bootstrap())
        self.n_exact = 0  # circuits actually run (each distinct circuit once)
        self.seconds = 0.0
        self._memo: dict[CircuitSet, Tensor] = {}
        self._patcher: Any = None
        self._weights: Any = None
        if level == "edge":
            from mechdelta.patching.edges import EdgePatcher

            self._patcher = EdgePatcher(pair, task, engine=self.engine, executor=executor)
            edges: list[Member] = list(self.graph.edges)
            if semantics == "graft":
                edges.append(Node("logits"))  # unembed: the final norm + unembedding
            self.members: tuple[Member, ...] = tuple(edges)
        else:
            nodes = [n for n in self.graph.nodes if n.kind != "logits"]
            if semantics == "graft":
                from mechdelta.patching.graft import _Weights

                self._weights = _Weights(pair)
                nodes.append(Node("logits"))  # the final norm + unembedding
            self.members = tuple(nodes)
        self.index = {m: i for i, m in enumerate(self.members)}

    # --- the metric of circuits -------------------------------------------------------------

    @property
    def source(self) -> Tensor:
        s = self.shift
        return s.reference if self.direction.target == "intervened" else s.intervened

    @property
    def target(self) -> Tensor:
        s = self.shift
        return s.intervened if self.direction.target == "intervened" else s.reference

    def metric(self, circuits: Sequence[Iterable[Member]]) -> Tensor:
        """Metric per prompt ``[circuit, batch]`` (float64) of each circuit's hybrid run."""
        sets = [frozenset(c) for c in circuits]
        todo = list(dict.fromkeys(c for c in sets if c not in self._memo))
        if todo:
            t0 = time.perf_counter()
            values = self._run(todo)
            self.seconds += time.perf_counter() - t0
            self.n_exact += len(todo)
            for c, v in zip(todo, values, strict=True):
                self._memo[c] = v.double().cpu()
        if not sets:
            return torch.zeros(0, len(self.target), dtype=torch.float64)
        return torch.stack([self._memo[c] for c in sets])

    def faithfulness(self, circuits: Sequence[Iterable[Member]]) -> list[float]:
        """Fraction of the mean shift each circuit's hybrid moves, in the search direction."""
        values = self.metric(circuits)
        return [self.score(v) for v in values]

    def score(self, values: Tensor) -> float:
        return float(fraction_explained(self.direction, self.shift, values.double().mean()))

    def per_prompt_faithfulness(self, values: Tensor) -> float:
        """``1 - Σ|m_hybrid - m_S| / Σ|m_T - m_S|`` over prompts."""
        src, tgt = self.source.double(), self.target.double()
        denom = float((tgt - src).abs().sum())
        if denom == 0:
            return float("nan")
        return 1.0 - float((values.double() - src).abs().sum()) / denom

    def _run(self, sets: list[CircuitSet]) -> Tensor:
        d = self.direction
        if self.level == "edge":
            out: Tensor = self._patcher.run(d, [list(c) for c in sets], semantics=self.semantics)
            return out
        if self.semantics == "splice":
            variants = [[node_site(n) for n in self._nodes(c)] for c in sets]
            return self.engine.run(d, variants, desc="circuit")
        from mechdelta.patching.graft import _parts, graft_values

        clean = self.engine.metric_of(d.target)
        rows: list[Tensor | None] = [None] * len(sets)
        live = [i for i, c in enumerate(sets) if c]
        for i in range(len(sets)):
            if not sets[i]:
                rows[i] = clean.clone()
        if live:
            parts = [_parts(self._nodes(sets[i]), self.pair.shape) for i in live]
            values = graft_values(self.engine, self._weights, d, parts, desc="circuit")
            for j, i in enumerate(live):
                rows[i] = values[j]
        return torch.stack([r for r in rows if r is not None])

    def _nodes(self, members: Iterable[Member]) -> list[Node]:
        return [m for m in sorted(members, key=self.index.__getitem__) if isinstance(m, Node)]

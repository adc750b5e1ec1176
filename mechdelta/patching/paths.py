"""Exact path patching across two models: :func:`patch_paths` (Wang et al. 2022, Goldowsky-Dill
et al. 2023), on the graph of :mod:`mechdelta.core.graph`.

A **path** is a chain of graph edges, each hop's receiver the next hop's sender::

    X0 -> X1.in, X1 -> X2.in, ..., Xk -> END        written  "X0 -> X1.in -> X2.in -> ... -> END"

(``"L0H3 -> L1H1.k -> logits"``, ``"embed -> L0H2.v -> MLP1 -> logits"``), where ``in`` is
``q``/``k``/``v`` for a head and nothing for an MLP, and ``END`` is ``logits`` or a receiver
input. Source S and target T as everywhere (``"reference->intervened"``: S = reference, T =
intervened). Splice-style: only T runs, always with T's parameters.

**One path ending at** ``logits`` (the chain semantics): the change of X0's write (S's cached
write of X0 minus T's clean write of X0) travels *only* along the path. X1's input named by the
first hop is T's clean residual there plus that change (X1's other inputs are T-clean), and X1
is recomputed by T on it; X1's resulting change of write (recomputed minus T-clean) reaches only
X2's named input; and so on; Xk's change is added to T's clean final residual, read by T's final
norm and unembedding. Nodes off the path stay T-clean; every change reaches the next node only
through the named hop (never through the residual stream to anyone else).

**A set of paths** is evaluated *treeified* (Goldowsky-Dill et al.): every node is copied once
per route it takes to the end, so paths never mix. Precisely, the *path-version write* of a node
X reached along the suffix ``s`` (the hops from X to the end) is

- S's cached write of X if ``X -> s`` is itself one of the paths (X is a first sender there); the
  longer paths through X with the same suffix are then subsumed (S's write of X already carries
  whatever X's inputs carry in S);
- otherwise T's X recomputed on T-clean inputs + Σ over hops ``Y -> X.in`` of the paths that
  continue with ``s`` of (path-version write of Y along ``(Y -> X.in) + s`` - T's clean write of
  Y), each added to the input ``in`` it names.

The end then reads, for each last hop ``Y -> END``, the path-version write of Y along that hop.
This is *not* the union of the paths' edges evaluated as one DAG (each node once, fed by all
its incoming path edges): for ``{A -> X.q -> logits, B -> X.k -> Y.v -> logits}`` the union also
holds the routes ``A -> X.q -> Y.v -> logits`` and ``B -> X.k -> logits``, which were not asked
for. When a set holds *every* route through the DAG its edges span (closed under recombination)
and no first sender is also an intermediate node, the two agree. (``patch_edges`` is different
again: there every circuit edge carries S's cached write, not a recomputed one.)

**Ends.** The last run is a splice run of T in which each last hop ``Y -> END`` *carries* the
path-version write of Y exactly as a splice edge carries S's cached write: END's input = T's live
residual there + Σ over last hops into it of (path-version write of Y - T's live write of Y).
When every path ends at ``logits`` nothing else is edited in that run, so this is T's clean
final residual + Σ (path-version write - T's clean write), read by T's final norm and
unembedding. A path may also end at an intermediate receiver input ``R.in`` (allowed because it is
the other half of path patching as Wang et al. define it): everything downstream of R then
recomputes freely with T's parameters and R's change reaches the logits along every route. This
is Wang et al.'s path patching from sender X to receiver R: ``"X -> R.q"`` (one hop) is exactly
``patch_edges`` of the edge ``X -> R.q``. (Wang et al. freeze only the other attention heads while
recording the receiver's input, so a change of X carried by an MLP between X and R reaches R
there too; here only the direct edge does; add the path ``X -> MLPl -> R.q`` for that route.)
The chain semantics at ``logits`` is Goldowsky-Dill's, with paths allowed to start at any
sender's write rather than at the input tokens (a path from ``embed`` starts at the input). A
one-hop path ``X -> logits`` is the splice edge ``X -> logits``; a set of one-hop paths (into
``logits`` or receivers) is the splice circuit of those edges.

T's attention output biases ``b_O`` (not nodes) stay with T in every run. Every intermediate
write is computed in a stacked forward of T in which only that node's inputs are edited (so its
inputs' other senders hold T's clean writes); a set costs one forward per hop depth (over all
sets stacked along the batch, as :func:`~mechdelta.sweep` does) plus one for the end, and equals
one call per set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import ConfigError, PatchingError, SiteError
from mechdelta.patching._path_hooks import Pass, Plan, Stop, halt
from mechdelta.patching.edges import EdgePatcher
from mechdelta.patching.results import BothDirections, PatchResult, direction_results
from mechdelta.patching.shift import engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.stats.bootstrap import Bootstrap

__all__ = ["Path", "PathPatcher", "as_paths", "patch_paths", "path_values"]

PathLike = Any  # a Path, a string "A -> B.q -> logits", an Edge, or a sequence of Edges/strings


@dataclass(frozen=True, repr=False)
class Path:
    """A chain of edges ``X0 -> X1.in -> ... -> END`` (see the module docstring): each hop's
    receiver is the next hop's sender; ``END`` is ``logits`` or a receiver input. ``str`` /
    :meth:`parse` round-trip."""

    edges: tuple[Edge, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.edges, tuple) or not self.edges:
            raise SiteError(
                "Path.edges must be a non-empty tuple of Edges; or build one from a string, "
                "e.g. Path.parse('L0H3 -> L1H1.k -> logits')"
            )
        for e in self.edges:
            if not isinstance(e, Edge):
                raise SiteError(f"a path's hops are Edges, got {type(e).__name__}")
        for a, b in zip(self.edges, self.edges[1:], strict=False):
            if a.receiver != b.sender:
                raise SiteError(
                    f"path hops are not connected: '{a}' reaches {a.receiver} but the next hop "
                    f"'{b}' starts at {b.sender}; each hop must start at the previous receiver"
                )

    @classmethod
    def parse(cls, text: str) -> Path:
        """``"L0H3 -> L1H1.k -> logits"`` -> Path (SiteError for unknown names, a missing or
        unknown q/k/v input, a hop going upstream)."""
        parts = [p.strip() for p in str(text).split("->")]
        if len(parts) < 2 or not all(parts):
            raise SiteError(
                "a path reads 'SENDER -> RECEIVER[.q|.k|.v] -> ... -> logits' "
                f"(e.g. 'L0H3 -> L1H1.k -> logits'), got {text!r}"
            )
        if "." in parts[0]:
            raise SiteError(
                f"a path starts at a sender's write, not at an input: drop "
                f"'.{parts[0].partition('.')[2]}' from {parts[0]!r} in {text!r}"
            )
        sender = Node.parse(parts[0])
        edges = []
        for part in parts[1:]:
            name, dot, inp = part.partition(".")
            if dot and inp not in ("q", "k", "v"):
                raise SiteError(f"unknown receiver input {inp!r} in {text!r}: use q, k or v")
            receiver = Node.parse(name)
            edges.append(Edge(sender, receiver, inp if dot else None))
            sender = receiver
        return cls(tuple(edges))

    @classmethod
    def coerce(cls, value: PathLike) -> Path:
        """A Path from a Path, a path string, one Edge (a one-hop path) or a sequence of Edges
        or edge strings (``["L0H3 -> L1H1.k", "L1H1 -> logits"]``)."""
        if isinstance(value, Path):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Edge):
            return cls((value,))
        if isinstance(value, Sequence):
            hops = [Edge.parse(h) if isinstance(h, str) else h for h in value]
            return cls(tuple(hops))
        raise SiteError(
            f"expected a path (a Path, a string like 'L0H3 -> L1H1.k -> logits', an Edge or a "
            f"sequence of Edges), got {type(value).__name__}"
        )

    @property
    def sender(self) -> Node:
        """The first sender, whose source write the path carries."""
        return self.edges[0].sender

    @property
    def end(self) -> str:
        """The receiver input the path ends at (``"logits"``, ``"L2H0.q"``, ``"MLP1"``)."""
        return self.edges[-1].receiver_input

    def validate(self, graph: Graph) -> None:
        """Raise SiteError if a hop is not an edge of ``graph``."""
        for e in self.edges:
            e.validate(graph.shape, parallel=graph.parallel)

    def __repr__(self) -> str:
        return f"Path({str(self)!r})"

    def __str__(self) -> str:
        return " -> ".join([str(self.sender), *(e.receiver_input for e in self.edges)])


def as_paths(paths: PathLike | Iterable[PathLike], graph: Graph) -> frozenset[Path]:
    """A set of paths from one path (a Path, a path string, an Edge) or an iterable of paths,
    each validated against ``graph`` (SiteError otherwise). Note: a list of strings is a list of
    paths (``["L0H0 -> logits", "L0H1 -> L1H0.q -> logits"]``); give one multi-hop path as one
    string, a Path, or a tuple of Edges inside the list."""
    if isinstance(paths, (Path, str, Edge)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise SiteError(f"expected paths (strings, Paths or Edges), got {type(paths).__name__}")
    out = []
    for p in paths:
        path = Path.coerce(p)
        path.validate(graph)
        out.append(path)
    return frozenset(out)


# --- the treeified plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Write:
    """A path-version write: ``node``'s write as S cached it (``inputs`` None) or as T computes
    it when each ``(edge, write)`` of ``inputs`` feeds ``edge``'s input the difference of that
    write from T's clean write of the edge's sender. Equal values <=> equal plans (shared
    across path sets and computed once). Hash and height are computed once (nested plans)."""

    node: Node
    inputs: frozenset[tuple[Edge, _Write]] | None
    height: int = field(init=False, compare=False, repr=False)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        height = 0 if self.inputs is None else 1 + max(w.height for _, w in self.inputs)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "_hash", hash((self.node, self.inputs)))

    def __hash__(self) -> int:
        return self._hash


def _ends(paths: frozenset[Path]) -> frozenset[tuple[Edge, _Write]]:
    """The last hops of a set of paths, each with the path-version write it carries."""
    full = {p.edges for p in paths}
    into: dict[tuple[Edge, ...], set[Edge]] = {}
    for p in paths:
        for i in range(1, len(p.edges)):
            into.setdefault(p.edges[i:], set()).add(p.edges[i - 1])
    memo: dict[tuple[Edge, ...], _Write] = {}

    def write(suffix: tuple[Edge, ...]) -> _Write:
        if suffix not in memo:
            node = suffix[0].sender
            if suffix in full:
                memo[suffix] = _Write(node, None)
            else:
                hops = frozenset((e, write((e, *suffix))) for e in into[suffix])
                memo[suffix] = _Write(node, hops)
        return memo[suffix]

    return frozenset((p.edges[-1], write(p.edges[-1:])) for p in paths)


def _collect(ends: Iterable[frozenset[tuple[Edge, _Write]]]) -> dict[int, list[_Write]]:
    """Every computed (non-source) write the ends need, by height."""
    seen: set[_Write] = set()
    todo = [w for hops in ends for _, w in hops]
    while todo:
        w = todo.pop()
        if w not in seen:
            seen.add(w)
            todo += [c for _, c in (w.inputs or ())]
    levels: dict[int, list[_Write]] = {}
    for w in seen:
        levels.setdefault(w.height, []).append(w)
    return levels


# --- the public entry points -----------------------------------------------------------------------


def patch_paths(
    pair: Any,
    task: Any,
    paths: PathLike | Iterable[PathLike],
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    batch_budget: BatchBudget = None,
) -> PatchResult | BothDirections[PatchResult]:
    """Path patching: the source model's change of each path's first sender travels into the
    target model *only* along the path's hops (treeified, splice-style; see the module docstring
    for the exact semantics and its relation to Wang et al. 2022 and Goldowsky-Dill et al. 2023).

    Only T runs, with T's parameters. Along ``"X0 -> X1.q -> ... -> logits"``: X1's q input is
    T's clean residual + (S's cached write of X0 - T's clean write of X0), X1 is recomputed by T,
    its change of write (recomputed - T-clean) feeds only the next hop's input, and so on; the
    last change is added to T's final residual before T's final norm and unembedding. Several
    paths are evaluated treeified (each route its own copy of the nodes; a path that is a suffix
    of another subsumes it); nodes off the paths stay T-clean. A path ending at a receiver input
    (``"X -> R.q"``) carries its last change into that input and lets everything downstream of R
    recompute freely (Wang et al.'s receiver; one hop = the splice edge ``X -> R.q``).

    Args:
        pair, task: a :class:`~mechdelta.ModelPair` and a :class:`~mechdelta.Task`.
        paths: one path or an iterable of paths: strings (``"L0H3 -> L1H1.k -> logits"``),
            :class:`Path` objects, Edges (one hop), or tuples of Edges; may be empty (T's run).
        direction: ``"reference->intervened"`` (source = reference, target = intervened),
            ``"intervened->reference"``, or ``"both"`` (a :class:`~mechdelta.BothDirections`).
        n_boot, alpha, seed: the bootstrap of the score's interval (as :func:`patch_edges`).
        batch_budget: rows per forward (default: the patching engine's).

    Returns a :class:`~mechdelta.PatchResult` with ``sites=()``: ``per_prompt`` the task's
    metric of T's run with the paths patched, ``score`` its fraction of the shift from T's clean
    run toward S's; ``provenance["paths"]`` the paths (strings, graph order) and
    ``provenance["semantics"] == "path"``.
    """
    d = Direction.coerce(direction)
    patcher = PathPatcher(pair, task, batch_budget=batch_budget)
    chosen = as_paths(paths, patcher.graph)
    boot = Bootstrap(n_boot, alpha, seed)
    shift = engine_shift(patcher.engine, boot)
    provenance = {
        **patcher.engine.provenance(),
        "seed": seed,
        "paths": patcher.names(chosen),
        "semantics": "path",
    }
    return direction_results(
        d, shift, boot, lambda single: patcher.run(single, [chosen])[0], provenance
    )


def path_values(
    pair: Any,
    task: Any,
    path_sets: Sequence[PathLike | Iterable[PathLike]],
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    *,
    batch_budget: BatchBudget = None,
) -> Float[Tensor, "set batch"]:
    """The metric per prompt of T's run with each set of paths patched (one direction), all sets
    stacked along the batch; equal to one :func:`patch_paths` call per set."""
    return PathPatcher(pair, task, batch_budget=batch_budget).run(direction, path_sets)


class PathPatcher:
    """Batched exact path patches of one pair and task: :meth:`run` evaluates many path sets in
    stacked forwards (the same values as one call per set, up to float rounding). Shares the
    premise checks, clean caches and weights of an :class:`~mechdelta.patching.edges.EdgePatcher`
    (pass ``edges`` to share one)."""

    def __init__(
        self,
        pair: Any,
        task: Any,
        *,
        batch_budget: BatchBudget = None,
        edges: EdgePatcher | None = None,
    ) -> None:
        self.edges = edges or EdgePatcher(pair, task, batch_budget=batch_budget)
        self.engine = self.edges.engine
        self.pair = pair
        self.graph = self.edges.graph
        self._order = {e: i for i, e in enumerate(self.graph.edges)}
        self._nodes = list(self.graph.nodes)

    def names(self, paths: frozenset[Path]) -> list[str]:
        """The paths as strings, in graph order (hop by hop)."""
        return [str(p) for p in sorted(paths, key=lambda p: [self._order[e] for e in p.edges])]

    def run(
        self, direction: Direction | str, path_sets: Sequence[PathLike | Iterable[PathLike]]
    ) -> Float[Tensor, "set batch"]:
        """The metric per prompt of each set of paths, in one direction (see :func:`patch_paths`)."""
        d = Direction.coerce(direction)
        if d is Direction.BOTH:
            raise ConfigError("run() takes one direction; call it once per direction")
        if isinstance(path_sets, (str, Path, Edge)):
            raise SiteError(
                "run() takes a sequence of path *sets*: wrap one set in a list, e.g. "
                "run(direction, [['L0H3 -> L1H1.k -> logits']])"
            )
        sets = [as_paths(s, self.graph) for s in path_sets]
        engine, edges = self.engine, self.edges
        target, source = d.target, d.source
        out = engine.metric_of(target).repeat(len(sets), 1)
        ends: dict[frozenset[tuple[Edge, _Write]], list[int]] = {}
        for i, s in enumerate(sets):
            if s:
                ends.setdefault(_ends(s), []).append(i)
        if not ends:
            return out
        edges._check(target)
        edges._check(source)
        edges._probe(target, [frozenset(e for s in sets for p in s for e in p.edges)])
        levels = _collect(ends)
        roots = sorted({w.node for w in levels.get(0, [])}, key=self._nodes.index)
        finals = list(ends)
        n = engine.prepared.batch_size
        chunk_b = min(n, engine.budget)
        per_v = max(1, engine.budget // chunk_b)
        for b0 in range(0, n, chunk_b):
            rows = slice(b0, min(b0 + chunk_b, n))
            cached = edges._cached_writes(source, rows, roots)
            values = {_Write(node, None): cached[node] for node in roots}
            for height in sorted(h for h in levels if h > 0):
                todo = levels[height]
                for v0 in range(0, len(todo), per_v):
                    chunk = todo[v0 : v0 + per_v]
                    plans = [Plan(_carried(w.inputs or (), values), w.node) for w in chunk]
                    got = self._forward(target, rows, plans)
                    values.update(zip(chunk, got, strict=True))
            for v0 in range(0, len(finals), per_v):
                chunk_f = finals[v0 : v0 + per_v]
                plans = [Plan(_carried(f, values), None) for f in chunk_f]
                metric = self._forward(target, rows, plans)
                for f, m in zip(chunk_f, metric, strict=True):
                    out[ends[f], rows] = m.cpu().to(out.dtype)
        return out

    # --- internals -------------------------------------------------------------------------

    def _forward(self, which: str, rows: slice, plans: list[Plan]) -> Tensor:
        """One stacked forward of ``which``: the metric per variant and prompt ``[V, B]`` when
        no plan reads a write, else each plan's read write ``[V, B, pos, d_model]``."""
        engine = self.engine
        n_v, n_b = len(plans), rows.stop - rows.start
        w = self.edges._w(which)
        model = self.pair.model(which)
        run = Pass(model, self.graph, plans, w, self.edges.layout.pos_embed, n_b)
        tokens = engine.tokens[rows].repeat(n_v, 1)
        reads = [p.read for p in plans if p.read is not None]
        if reads:
            if len(reads) != n_v:
                raise PatchingError("internal: a stacked forward mixes reads and ends")
            last = max(r.layer for r in reads if r.layer is not None)
            stop = f"blocks.{last}.hook_resid_post"
            try:
                with torch.no_grad():
                    model.run_with_hooks(tokens, fwd_hooks=[*run.hooks, (stop, halt)])
            except Stop:
                pass
            else:
                raise PatchingError(f"the {which} model never reached {stop}")
            run.check(which)
            return run.reads()
        positions = engine.inputs.positions[rows].repeat(n_v, 1)
        logits = engine.states[which].runner.logits_at(positions, tokens=tokens, hooks=run.hooks)
        run.check(which)
        inputs = engine.inputs.select(rows).repeat(n_v)
        return engine.prepared.metric(logits, inputs).reshape(n_v, n_b)


def _carried(
    hops: Iterable[tuple[Edge, _Write]], values: dict[_Write, Tensor]
) -> list[tuple[Edge, Tensor]]:
    return [(e, values[w]) for e, w in hops]

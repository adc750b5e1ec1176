"""Exact edge patching across two models: :func:`patch_edges`.

A *circuit* is a set of edges of the graph of :mod:`mechdelta.core.graph` (sender write ->
receiver input: a head's ``q``, ``k`` or ``v``, an MLP's input, or ``logits``, the final residual
before the final norm). Between a *source* model S and a *target* model T (``direction``
``"reference->intervened"``: S = reference, T = intervened; ``"intervened->reference"`` the other
way), :func:`patch_edges` offers these semantics:

- ``"splice"``: T runs; along each circuit edge ``X -> R.input`` the receiver input receives the
  *source run's cached* write of X instead of T's live write of X: the receiver input = T's live
  residual at that point + Σ over circuit edges into it of (source cached write - live write).
  Every node recomputes with T's parameters; norms are recomputed on the modified residual copy
  (the residual stream itself is not edited). Edges not in the circuit carry live values.
- ``"ablate"`` (ACDC-style): S runs; every edge *outside* the circuit carries T's cached sender
  write (from T's clean run); circuit edges carry the hybrid's own (live) values.
- ``"graft"``: T runs; along a circuit edge ``X -> R.input`` the sender X is computed with S's
  *parameters* (on X's own hybrid inputs in this run), along every other edge with T's: the
  receiver input = T's live residual + Σ over circuit edges into it of (graftwrite_X - live
  write_X), where graftwrite_X is X recomputed with S's parameters on the same hybrid inputs its
  live write used. A head takes S's Q/K/V (+ biases; under GQA its key/value group's K/V) and
  W_O slices, the layer's ``ln1`` and ``b_O`` stay T's; an MLP takes S's weights and ``ln2``;
  ``embed`` S's embeddings. The pseudo-member ``unembed`` (``Node("logits")``; only under graft)
  makes the final norm + unembedding S's. See :mod:`mechdelta.patching._edge_graft`.

Writes: ``embed`` = token (+ learned position) embedding, a head ``z_h @ W_O[h]`` (no bias), an
MLP its output (its biases included). The attention output bias ``b_O`` is not a node: it stays
with the live run (the running model's own ``b_O`` always reaches every downstream receiver).

So, exactly: the empty circuit under ``"splice"`` is T's clean run; the full circuit under
``"splice"`` feeds every receiver Σ S's writes + T's ``b_O``, i.e. the logits are T's final norm and
unembedding applied to ``S's final residual - Σ S's b_O + Σ T's b_O`` (S's run itself only where
the final norm, unembedding and ``b_O`` agree: that is the ceiling of the splice semantics). Under
``"ablate"`` the full circuit is S's clean run and the empty circuit feeds every receiver Σ T's
writes + S's ``b_O``: S's final norm and unembedding on ``T's final residual - Σ T's b_O + Σ S's
b_O``. Under ``"graft"`` the empty circuit is T's clean run and the full circuit (every edge +
``unembed``) equals node-level :func:`~mechdelta.patching.graft.graft` of every node (embed,
heads, MLPs, unembed): T with every parameter from S except each layer's ``ln1`` and ``b_O``.
That is S's run only where ``ln1`` and ``b_O`` agree; a single edge from a sender whose inputs
are the same in both runs (``embed -> ...``) equals the single-edge splice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.attribution.edges import _check_decomposition, _Layout, _Weights, _weights
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import AttributionError, ConfigError, PatchingError, SiteError
from mechdelta.patching import _edge_graft
from mechdelta.patching._edge_hooks import HybridPlan, hybrid_hooks
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections, PatchResult, direction_results
from mechdelta.patching.shift import engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.stats.bootstrap import Bootstrap

__all__ = ["SEMANTICS", "EdgePatcher", "as_edges", "patch_edges"]

SEMANTICS = ("splice", "ablate", "graft")

# What was verified on each model object (the graph's premises, hooks that take edits): these are
# properties of the architecture and its bridge, checked once per model and forgotten with it.
_VERIFIED: weakref.WeakKeyDictionary[Any, set[tuple[str, int]]] = weakref.WeakKeyDictionary()
_AVAILABLE = SEMANTICS
_UNEMBED = Node("logits")


def as_edges(
    edges: Edge | str | Iterable[Edge | str], graph: Graph, known: frozenset[Edge] = frozenset()
) -> frozenset[Edge]:
    """Edges from an Edge, a string (``"L0H3 -> L1H1.k"``) or an iterable of either, each checked
    against the graph (SiteError for unknown names, a receiver not downstream of the sender, a
    node out of range, a k/v input not named by its key/value group's first query head);
    ``known``: edges already known to be in the graph (not checked again)."""
    if isinstance(edges, (Edge, str)):
        edges = [edges]
    out = []
    for e in edges:
        if isinstance(e, str):
            e = Edge.parse(e)
        if not isinstance(e, Edge):
            raise SiteError(
                f"expected an Edge or a string like 'L0H3 -> L1H1.k', got {type(e).__name__}"
            )
        if e not in known:
            e.validate(graph.shape, parallel=graph.parallel)
        out.append(e)
    return frozenset(out)


def split_members(
    items: Edge | Node | str | Iterable[Edge | Node | str],
    graph: Graph,
    known: frozenset[Edge],
    semantics: str,
) -> tuple[frozenset[Edge], bool]:
    """The edges of a circuit and whether it holds the graft pseudo-member ``unembed`` (the
    string ``"unembed"`` or ``Node("logits")``; ConfigError under other semantics)."""
    if isinstance(items, (Edge, Node, str)):
        items = [items]
    edges: list[Edge | str] = []
    unembed = False
    for x in items:
        if x == _UNEMBED or (isinstance(x, str) and x.strip().lower() == "unembed"):
            if semantics != "graft":
                raise ConfigError(
                    f"'unembed' (the final norm + unembedding) is a circuit member only under "
                    f"semantics='graft', not {semantics!r}: drop it or use semantics='graft'"
                )
            unembed = True
        elif isinstance(x, Node):
            raise SiteError(
                f"{x} is a node, not an edge: give edges like '{x} -> logits' (only the graft "
                "pseudo-member 'unembed' = Node('logits') may stand alone)"
            )
        else:
            edges.append(x)
    return as_edges(edges, graph, known), unembed


def check_semantics(semantics: str) -> str:
    s = str(semantics).strip().lower()
    if s not in SEMANTICS:
        raise ConfigError(
            f"unknown edge semantics {semantics!r}; choose one of {', '.join(SEMANTICS)}"
        )
    if s not in _AVAILABLE:
        raise ConfigError(
            f"edge semantics {s!r} is not available yet; use {' or '.join(_AVAILABLE)}"
        )
    return s


def patch_edges(
    pair: Any,
    task: Any,
    edges: Edge | Node | str | Iterable[Edge | Node | str] = (),
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    *,
    semantics: str = "splice",
    paths: Any = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    batch_budget: BatchBudget = None,
    executor: Any = None,
) -> PatchResult | BothDirections[PatchResult]:
    """Patch a circuit (a set of edges) from the source model into the target model and measure
    the task's metric. See the module docstring for the semantics:

    - ``"splice"``: the target model T runs; along each circuit edge ``X -> R.input`` the receiver
      input receives the source run's cached write of X instead of T's live write of X (the
      receiver input = T's live residual there + Σ over circuit edges into it of (source cached
      write - live write)); every node recomputes with T's parameters; norms are recomputed on
      the modified residual copy. Edges not in the circuit carry live values.
    - ``"ablate"`` (ACDC-style): the source model S runs; every edge *outside* the circuit
      carries T's cached sender write (T's clean run); circuit edges carry the hybrid's own
      (live) values.
    - ``"graft"``: T runs; along each circuit edge ``X -> R.input`` the sender X is computed
      with S's parameters on X's own hybrid inputs (a head: S's Q/K/V/O slices and biases with
      T's ``ln1``; an MLP: S's weights and ``ln2``; embed: S's embeddings), along every other
      edge with T's. The member ``"unembed"`` (or ``Node("logits")``) makes the final norm and
      unembedding S's. Empty circuit: T's clean run; every edge + unembed: node-level
      :func:`~mechdelta.graft` of every node (S's run where ``ln1`` and ``b_O`` agree).

    The attention output bias ``b_O`` is not a node and stays with the live run.

    Args:
        pair, task: a :class:`~mechdelta.ModelPair` and a :class:`~mechdelta.Task`.
        edges: Edges or strings (``"L0H3 -> L1H1.k"``, ``"MLP0 -> logits"``), and under graft
            ``"unembed"`` / ``Node("logits")``; may be empty.
        direction: ``"reference->intervened"`` (source = reference, target = intervened),
            ``"intervened->reference"``, or ``"both"`` (a :class:`~mechdelta.BothDirections`).
        semantics: ``"splice"``, ``"ablate"`` or ``"graft"``.
        paths: path patching instead of a circuit (then ``edges`` must be empty and
            ``semantics`` ``"splice"``): one path or an iterable of paths
            (``"L0H3 -> L1H1.k -> logits"``, :class:`~mechdelta.patching.paths.Path`, tuples of
            Edges). The source's change of each path's first sender reaches the target only
            along the path's hops, each node on it recomputed by the target; several paths are
            treeified (each route gets its own copy of its nodes). A path ends at ``logits``, or
            at a receiver input from which everything downstream recomputes freely (Wang et
            al.'s receiver). See :func:`~mechdelta.patching.paths.patch_paths`; provenance
            holds ``"paths"`` and ``"semantics": "path"``.
        n_boot, alpha, seed: the bootstrap of the score's interval.
        batch_budget: rows per forward (default: the patching engine's; ``"auto"``: from the
            free memory of the pair's device).
        executor: where the patched forwards run: ``"local"`` (default, this process), a
            :class:`~mechdelta.LocalExecutor` with a ``shard_dir`` (resumable), or a
            :class:`~mechdelta.RayExecutor`; the numbers are the same (see
            :mod:`mechdelta.scale.executor`). Path patching runs in this process.

    Returns a :class:`~mechdelta.PatchResult` with ``sites=()``, the edges (strings, graph order;
    ``"unembed"`` last when present) in ``provenance["edges"]`` and the semantics in
    ``provenance["semantics"]``.
    """
    s = check_semantics(semantics)
    if paths is not None:
        if isinstance(edges, (Edge, Node, str)) or list(edges):
            raise ConfigError("give edges= (a circuit) or paths= (path patching), not both")
        if s != "splice":
            raise ConfigError(
                "path patching is splice-style only (the target runs with its own parameters); "
                "use semantics='splice' with paths="
            )
        from mechdelta.patching.paths import patch_paths

        return patch_paths(pair, task, paths, direction, n_boot=n_boot, alpha=alpha, seed=seed,
                           batch_budget=batch_budget)  # fmt: skip
    d = Direction.coerce(direction)
    patcher = EdgePatcher(pair, task, batch_budget=batch_budget, executor=executor)
    circuit, unembed = split_members(edges, patcher.graph, patcher.all_edges, s)
    boot = Bootstrap(n_boot, alpha, seed)
    shift = engine_shift(patcher.engine, boot)
    names = [str(e) for e in patcher.graph.edges if e in circuit] + (["unembed"] if unembed else [])
    members: list[Edge | Node] = [*circuit, *([_UNEMBED] if unembed else [])]
    provenance = {**patcher.engine.provenance(), "seed": seed, "edges": names, "semantics": s}
    return direction_results(
        d, shift, boot, lambda single: patcher.run(single, [members], semantics=s)[0], provenance
    )


class EdgePatcher:
    """Batched exact edge patches of one pair and task: :meth:`run` evaluates many circuits in
    stacked forwards (the same values as one call each, up to float rounding)."""

    def __init__(
        self,
        pair: Any,
        task: Any,
        *,
        batch_budget: BatchBudget = None,
        engine: Any = None,
        executor: Any = None,
    ) -> None:
        from mechdelta.scale._devices import require_one_device

        require_one_device(pair, "edge and path patching")
        from mechdelta.scale.executor import coerce_executor

        self.engine = engine or PatchEngine(pair, task, batch_budget=batch_budget)
        #: where :meth:`run`'s stacked forwards run (None: this process, the plain loop).
        self.executor = coerce_executor(executor)
        self.pair = pair
        self.graph = Graph.from_model(pair)
        self.all_edges = frozenset(self.graph.edges)
        pos = str(getattr(pair.cfg, "positional_embedding_type", "standard")) == "standard"
        self.layout = _Layout(self.graph, pos and "hook_pos_embed" in pair.reference.hook_dict)
        self._weights: dict[str, _Weights] = {}
        self._clean: dict[str, dict[str, Tensor]] = {}
        self._bias: dict[str, dict[str, list[Tensor]]] = {}  # graft: source q/k/v biases

    # --- public ----------------------------------------------------------------------------

    def run(
        self,
        direction: Direction | str,
        circuits: Sequence[Iterable[Edge | Node | str]],
        *,
        semantics: str = "splice",
    ) -> Float[Tensor, "circuit batch"]:
        """The metric per prompt of each circuit, in one direction (see :func:`patch_edges`;
        under graft a circuit may hold ``"unembed"`` / ``Node("logits")``)."""
        s = check_semantics(semantics)
        d = Direction.coerce(direction)
        if d is Direction.BOTH:
            raise ConfigError("run() takes one direction; call it once per direction")
        split = [split_members(c, self.graph, self.all_edges, s) for c in circuits]
        sets = [e for e, _ in split]
        unembed = [u for _, u in split]
        if s == "ablate":
            running, redirected = d.source, [self.all_edges - c for c in sets]
        else:
            running, redirected = d.target, sets
        engine = self.engine
        clean = engine.metric_of(running)
        out = clean.repeat(len(sets), 1)
        live = [i for i, e in enumerate(redirected) if e or unembed[i]]
        if not live:
            return out
        self._prepare(d, s, [redirected[i] for i in live])
        n = engine.prepared.batch_size
        chunk_b = min(n, engine.budget)
        per_v = max(1, engine.budget // (chunk_b * (2 if s == "graft" else 1)))
        jobs = [
            (slice(b0, min(b0 + chunk_b, n)), live[v0 : v0 + per_v])
            for b0 in range(0, n, chunk_b)
            for v0 in range(0, len(live), per_v)
        ]
        if self.executor is None:
            for rows, chunk in jobs:
                sub = [redirected[i] for i in chunk]
                values = self.run_redirected(d, s, rows, sub, [unembed[i] for i in chunk])
                out[chunk, rows] = values.cpu().to(out.dtype)
            return out
        from mechdelta.patching._work import execute_edges

        return execute_edges(self, d, s, redirected, unembed, jobs, out)

    def run_redirected(
        self,
        direction: Direction,
        semantics: str,
        rows: slice,
        sets: list[frozenset[Edge]],
        unembed: list[bool],
    ) -> Float[Tensor, "circuit batch"]:
        """One stacked forward: the metric per prompt of ``rows`` for each redirected edge set
        (under ``"ablate"`` the complement of a circuit; under ``"graft"`` with ``unembed``)."""
        if semantics == "ablate":
            running, other = direction.source, direction.target
        else:
            running, other = direction.target, direction.source
        self._prepare(direction, semantics, sets)
        if semantics == "graft":
            return _edge_graft.run_chunk(self, direction, rows, sets, unembed)
        return self._run_chunk(running, other, rows, sets)

    def _prepare(self, d: Direction, semantics: str, sets: list[frozenset[Edge]]) -> None:
        """The premises and hook probes a hybrid run needs (each done once per model)."""
        if semantics == "ablate":
            running, other = d.source, d.target
        else:
            running, other = d.target, d.source
        self._check(running)
        self._check(other)
        if semantics == "graft":
            _edge_graft.check_premises(self, other)
        self._probe(running, sets)

    def graft_writes(
        self, direction: Direction | str, rows: slice
    ) -> Float[Tensor, "sender batch pos d_model"]:
        """Per graph sender (graph order), its graft write on the target's *clean* inputs minus
        the target's clean write, for the prompts ``rows`` (float32): what a single graft edge
        from that sender adds to its receiver input (one forward: the target's clean run plus
        shadow rows for every head)."""
        return _edge_graft.clean_writes(self, Direction.coerce(direction), rows)

    # --- internals -------------------------------------------------------------------------

    def _w(self, which: str) -> _Weights:
        if which not in self._weights:
            self.engine.metric_of(which)  # the clean run first: W_O is checked against it
            self._weights[which] = _weights(self.engine, which)
        return self._weights[which]

    def _names(self, *, checks: bool) -> list[str]:
        """The raw activations of the senders' writes, and with ``checks`` what the premises
        read (the residual decomposition, the receiver inputs' hooks)."""
        if not checks:
            names = list(self.layout.embeds)
            for layer in range(self.graph.shape.n_layers):
                names.append(f"blocks.{layer}.attn.hook_z")
                if self.layout.has_mlp:
                    names.append(f"blocks.{layer}.hook_mlp_out")
            return names
        names = list(self.layout.values())
        for layer in range(self.graph.shape.n_layers):
            names += [f"blocks.{layer}.ln1.hook_in"]
            names += [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"]
            if self.layout.has_mlp:
                names += [f"blocks.{layer}.ln2.hook_in", f"blocks.{layer}.mlp.hook_in"]
        return list(dict.fromkeys(names))

    def clean(self, which: str) -> dict[str, Tensor]:
        """The clean activations of one model's sender writes, for every prompt."""
        if which not in self._clean:
            model = self.pair.model(which)
            tokens = self.engine.tokens
            step = self.engine.budget
            names = self._names(checks=False)
            parts = [_capture(model, tokens[b : b + step], names) for b in range(0, len(tokens), step)]  # fmt: skip
            self._clean[which] = {k: torch.cat([p[k] for p in parts]) for k in names}
        return self._clean[which]

    def _check(self, which: str) -> None:
        """The graph's premises on this model's clean run (once): the residual stream is the sum
        of the senders' writes and b_O, and each receiver input's hook is its norm's output
        through the projection (q/k/v before rotary embeddings)."""
        model = self.pair.model(which)
        done = _VERIFIED.setdefault(model, set())
        if ("check", -1) in done:
            return
        vals = _capture(model, self.engine.tokens[:2], self._names(checks=True))
        w = self._w(which)
        try:
            _check_decomposition(vals, w, self.layout, which)
        except AttributionError as exc:
            raise PatchingError(str(exc).replace("edge attribution", "edge patching")) from exc
        problems = []
        with torch.no_grad():
            for layer in range(self.graph.shape.n_layers):
                block = model.blocks[layer]
                normed = block.ln1(vals[f"blocks.{layer}.ln1.hook_in"])
                for x, proj in (("q", w.q), ("k", w.k), ("v", w.v)):
                    got = vals[f"blocks.{layer}.attn.hook_{x}"]
                    module = getattr(block.attn, x)
                    bias = module(normed.new_zeros(1, normed.shape[-1])).reshape(-1, got.shape[-1])
                    want = torch.einsum("bpd,hde->bphe", normed, proj[layer]) + bias
                    if not _close(got, want):
                        problems.append(f"layer {layer}'s hook_{x} is not ln1(input) @ W_{x}")
                if self.layout.has_mlp:
                    got = vals[f"blocks.{layer}.mlp.hook_in"]
                    if not _close(got, block.ln2(vals[f"blocks.{layer}.ln2.hook_in"])):
                        problems.append(f"layer {layer}'s mlp.hook_in is not ln2(ln2.hook_in)")
        if problems:
            raise PatchingError(
                f"the {which} model's receiver inputs cannot be edited per edge "
                f"({'; '.join(problems)})"
            )
        done.add(("check", -1))

    def _probe(self, which: str, sets: list[frozenset[Edge]]) -> None:
        """Writing noise into each hook a hybrid run edits must change the output (once per
        model, kind and layer), as the patching engine checks its own hooks."""
        todo = set()
        for edges in sets:
            for e in edges:
                r = e.receiver
                if r.kind == "head":
                    assert r.layer is not None and e.input is not None
                    todo.add((f"attn.hook_{e.input}", r.layer))
                elif r.kind == "mlp":
                    assert r.layer is not None
                    todo.add(("mlp.hook_in", r.layer))
        engine = self.engine
        runner = engine.states[which].runner
        rows = slice(0, 1)
        positions = engine.inputs.positions[rows]
        tokens = engine.tokens[rows]
        done = _VERIFIED.setdefault(runner.model, set())
        todo -= done
        if not todo:
            return
        clean = runner.logits_at(positions, tokens=tokens)
        for key in sorted(todo):
            name = f"blocks.{key[1]}.{key[0]}"
            got = runner.logits_at(positions, tokens=tokens, hooks=[(name, _noise)])
            if torch.equal(got, clean):
                raise PatchingError(
                    f"writing to {name} does not change the {which} model's output: this bridge "
                    "discards edits there, so edges into that input cannot be patched"
                )
            done.add(key)

    def _cached_writes(self, which: str, rows: slice, senders: list[Node]) -> dict[Node, Tensor]:
        vals = self.clean(which)
        w = self._w(which)
        out: dict[Node, Tensor] = {}
        for s in senders:
            if s.kind == "embed":
                e = vals["hook_embed"][rows]
                out[s] = e + vals["hook_pos_embed"][rows] if self.layout.pos_embed else e
            elif s.kind == "mlp":
                out[s] = vals[f"blocks.{s.layer}.hook_mlp_out"][rows]
            else:
                assert s.layer is not None and s.head is not None
                z = vals[f"blocks.{s.layer}.attn.hook_z"][rows, :, s.head]
                out[s] = z @ w.o[s.layer][s.head].to(z.dtype)
        return out

    def _run_chunk(
        self, running: str, other: str, rows: slice, sets: list[frozenset[Edge]]
    ) -> Float[Tensor, "variant batch"]:
        engine = self.engine
        n_v, n_b = len(sets), rows.stop - rows.start
        plan = HybridPlan.build(self.graph, sets)
        cached = self._cached_writes(other, rows, plan.senders)
        w = self._w(running)
        model = self.pair.model(running)
        fired: set[str] = set()
        hooks = hybrid_hooks(
            model, self.graph, plan, cached, {"q": w.q, "k": w.k, "v": w.v}, w.o,
            self.layout.pos_embed, n_b, fired,
        )  # fmt: skip
        positions = engine.inputs.positions[rows].repeat(n_v, 1)
        tokens = engine.tokens[rows].repeat(n_v, 1)
        logits = engine.states[running].runner.logits_at(positions, tokens=tokens, hooks=hooks)
        missing = {name for name, _ in hooks} - fired
        if missing:
            raise PatchingError(
                f"hooks {sorted(missing)} never fired in the {running} model's hybrid run: the "
                "bridge does not route these activations through its hooks"
            )
        inputs = engine.inputs.select(rows).repeat(n_v)
        return engine.prepared.metric(logits, inputs).reshape(n_v, n_b)


def _store(store: dict[str, Tensor], name: str, x: Tensor, hook: Any = None) -> None:
    store[name] = x.detach()


def _capture(model: Any, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """A plain forward caching the activations at ``names``."""
    store: dict[str, Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, partial(_store, store, n)) for n in names])
    missing = [n for n in names if n not in store]
    if missing:
        raise PatchingError(
            f"hooks {missing} never fired: this bridge does not route those activations through "
            "its hooks, so edges cannot be patched"
        )
    return store


def _noise(x: Tensor, hook: Any) -> Tensor:
    """Seeded noise added to an activation (a local generator: the user's RNG is not moved)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    return x + torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) + 1


def _close(got: Tensor, want: Tensor) -> bool:
    err = (got.double() - want.double()).abs().max().item()
    return err <= 1e-4 * max(1.0, want.abs().max().item())

"""Circuit search across two checkpoints: :func:`search_circuit`.

Faithfulness of a circuit C, ``f(C)``: the fraction of the mean shift the hybrid run with C
moves, in the search direction (the score of a :class:`~mechdelta.PatchResult`: 0 = the target
model's clean run, 1 = the source model's). C *reaches* ``target`` when
``target <= f(C) <= 2 - target`` (overshooting is not faithful either).

Methods (every evaluation counted in ``provenance["n_exact"]`` is an exact hybrid run):

- ``"greedy"``: exact forward selection from the empty circuit: each step evaluates C + m for
  every member m not in C (stacked in the batch where the semantics allows) and adds the one
  bringing f closest to 1; stops once C reaches the target (or at ``max_size``).
- ``"acdc"``: start from the full graph and walk its members from the logits backwards (node
  level: unembed, then the last layer's MLP and heads, ..., embed; edge level: receiver inputs
  from logits to the first layer, each one's senders from the latest to ``embed``), removing a
  member when that costs little: **rule** (tau = the slack left): while C reaches the target, a
  removal is kept iff C - m still reaches it (so no accepted step leaves the target); while it
  does not (the full graph may fall short: see the splice ceiling), iff ``|f(C - m) - 1| <=
  |f(C) - 1|`` (tau = 0: the removal must not move f away from 1). One exact run per member.
- ``"attribution"``: rank members by an estimate of the same semantics
  (:mod:`mechdelta.circuits._rank`), then find the smallest prefix P_k (the k best-ranked
  members) that reaches the target with few exact runs. First-order estimates add up, so each
  prefix has a *predicted* faithfulness (:func:`predicted`): under graft and splice (node and
  edge) the sum of its members' estimates, each a fraction of the shift one member alone
  carries; under ablate, whose estimates are the first-order *loss* of removing one edge from
  the full graph (a fraction of the shift), ``1 -`` the sum of the estimates of the members
  *left out*. Growth evaluates exactly the empty circuit and k0 = the smallest prefix predicted
  to reach the target (else the one predicted closest to 1), then moves by exact checks: if
  P_k0 has f >= target it walks down (k0 - 1, k0 - 2, k0 - 4, ...) to a prefix below the target;
  if not, it evaluates the **full graph once** (when even the full graph falls below the target,
  e.g. edge splice's ceiling, the search stops: not reached, without walking the prefixes) and
  doubles k up to ``max_size``; then it bisects between the largest prefix below the target and
  the smallest at or above it. This finds the first prefix that reaches the target whenever f
  grows with k along the ranking (the old exhaustive walk's answer); where the boundary prefix
  overshoots (f > 2 - target), the remaining prefixes are walked in order as before. Under
  splice / ablate / edge graft, evaluations of one stage are stacked in one batched call (and
  the first stage adds P_k0-1, which the walk down needs first); node graft runs one target
  forward per circuit whatever the stacking. ``Circuit.curve`` holds only the prefixes
  evaluated exactly (so its area interpolates between them).

All methods end with a **pruning pass**: members are dropped, latest-added first, while the
circuit still reaches the target; then rounds of drop-one evaluations of every member remove the
member whose removal leaves f closest to 1 among those that keep the target, until none does.
(acdc skips the latest-added-first pass: its walk already tried every member.) Where circuits
stack along the batch (splice, ablate, edge graft) that pass evaluates its next trials C - m in
one call, assuming each fails: 1, 2, 4, ... trials per call while none keeps the target, back to
1 after a drop (the trials after a drop in the same call are discarded: they were of the circuit
before it). Its decisions are those of the one-at-a-time pass. No circuit is run twice
(:meth:`Evaluator.metric` remembers each), so a trial that repeats an earlier evaluation (the
first one, C minus its last-added member, is a prefix growth already ran) costs nothing. The
last round gives :attr:`Circuit.minimality` (f(C) - f(C - m) per member), so the returned
circuit is minimal: no single member can be dropped.

A search that does not reach the target returns the full graph (``max_size``: the best circuit
found within that size) with ``reached=False`` and a :class:`CircuitNotFaithfulWarning`. Under
``"splice"`` the target model's final norm and unembedding always run, and (edge splice) each
receiver reads the target's attention output biases, so even the full graph may reproduce only
part of the shift (its ``ceiling``); ``"graft"`` has the ``unembed`` member for this at both
levels (node level: the node ``unembed``; edge level: the pseudo-member ``unembed`` next to the
edges, :attr:`Circuit.unembed`). Under graft each layer's ``ln1`` and attention output bias stay
the target's, so the full graph is the source run only where those agree.

Semantics (:func:`~mechdelta.patch_edges` states them exactly): node ``"graft"`` transplants the
members' parameters into the target; node ``"splice"`` splices the members' cached writes; edge
``"splice"`` carries the source run's cached sender writes along circuit edges; edge ``"ablate"``
runs the source with the target's cached writes on every edge outside the circuit; edge
``"graft"`` computes the sender of each circuit edge with the source's parameters on its own
hybrid inputs (every other edge with the target's).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

from mechdelta.circuits._evaluate import Evaluator, Member
from mechdelta.circuits.circuit import Circuit, CircuitNotFaithfulWarning
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Node
from mechdelta.errors import ConfigError
from mechdelta.scale._memory import BatchBudget
from mechdelta.scale.executor import Executor

__all__ = ["LEVELS", "METHODS", "SEMANTICS", "search_circuit"]

LEVELS = ("node", "edge")
METHODS = ("attribution", "acdc", "greedy")
SEMANTICS = {"node": ("graft", "splice"), "edge": ("splice", "ablate", "graft")}


def _choice(name: str, value: Any, options: Sequence[str], hint: str = "") -> str:
    text = str(value).strip().lower()
    if text not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(options)}{hint}")
    return text


def _check(
    level: str, method: str, semantics: str, direction: Any, target: Any, max_size: Any
) -> tuple[str, str, str, Direction, float]:
    lv = _choice("level", level, LEVELS)
    m = _choice("method", method, METHODS)
    available = SEMANTICS[lv]
    s = str(semantics).strip().lower()
    if s not in available:
        other = "edge" if lv == "node" else "node"
        extra = f" ({s!r} is available at level={other!r})" if s in SEMANTICS[other] else ""
        raise ConfigError(
            f"semantics {semantics!r} is not available for level={lv!r} circuit search; "
            f"use {' or '.join(repr(x) for x in available)}{extra}"
        )
    d = Direction.coerce(direction)
    if d is Direction.BOTH:
        raise ConfigError("search_circuit takes one direction; call it once per direction")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"target must be a fraction of the shift in (0, 1], got {target!r}")
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1
    ):
        raise ConfigError(f"max_size must be a positive int or None, got {max_size!r}")
    return lv, m, s, d, float(target)


def search_circuit(
    pair: Any,
    task: Any,
    *,
    level: str = "node",
    method: str = "attribution",
    direction: Direction | str = Direction.INTERVENED_TO_REFERENCE,
    semantics: str = "graft",
    target: float = 0.9,
    max_size: int | None = None,
    batch_budget: BatchBudget = None,
    progress: bool | None = None,
    executor: Executor | str | None = None,
) -> Circuit:
    """Find a minimal circuit carrying ``target`` of the shift (see the module docstring).

    Args:
        pair, task: a :class:`~mechdelta.ModelPair` and a :class:`~mechdelta.Task`.
        level: ``"node"`` (members: embed, heads, MLPs, and under graft ``unembed``) or
            ``"edge"`` (members: the edges of :class:`~mechdelta.Graph`, and under graft the
            pseudo-member ``unembed``).
        method: ``"attribution"``, ``"acdc"`` or ``"greedy"``.
        direction: ``"intervened->reference"`` (the source = intervened) or
            ``"reference->intervened"``.
        semantics: node level ``"graft"`` or ``"splice"``; edge level ``"splice"``,
            ``"ablate"`` or ``"graft"``. ``"attribution"`` ranks by a first-order estimate of
            the same semantics (:mod:`mechdelta.circuits._rank`).
        target: the faithfulness to reach, in (0, 1]; reached when f lies in
            ``[target, 2 - target]``.
        max_size: the largest circuit greedy / attribution grow (acdc: a result larger than
            this is not reached).
        batch_budget: rows per forward; progress: progress bars of the hybrid runs.
        executor: where the exact hybrid runs go (``"local"``, a
            :class:`~mechdelta.LocalExecutor` with a ``shard_dir``, a
            :class:`~mechdelta.RayExecutor`; see :func:`~mechdelta.sweep`): each batch of
            candidate circuits a step evaluates is sharded by prompt chunk x stacked circuits;
            the search takes the same steps and finds the same circuit. The ranking's gradient
            passes run in this process.
    """
    lv, m, s, d, tgt = _check(level, method, semantics, direction, target, max_size)
    t_start = time.perf_counter()
    ev = Evaluator(
        pair, task, level=lv, semantics=s, direction=d, batch_budget=batch_budget,
        progress=progress, executor=executor,
    )  # fmt: skip
    search = _Search(ev, tgt, max_size)
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if m == "greedy":
        found = search.greedy()
    elif m == "acdc":
        found = search.acdc()
    else:
        from mechdelta.circuits._rank import ranking

        est, how = ranking(ev)
        timings["rank_s"] = time.perf_counter() - t0
        order = sorted(range(len(ev.members)), key=lambda i: -est[i])
        extra["ranking"] = how
        extra["estimates"] = {str(ev.members[i]): est[i] for i in order}
        pred = predicted([est[i] for i in order], s)
        found = search.grow([ev.members[i] for i in order], pred)
        extra["growth"] = search.growth
    timings["search_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    n_search = ev.n_exact
    full = list(ev.members)
    if found is not None and search.reaches(search.f(found)):
        circuit, minimality = search.prune(found, sequential=m != "acdc")
        reached = True
    else:
        circuit, minimality, reached = full, [math.nan] * len(full), False
        if max_size is not None and search.best is not None:
            circuit = search.best
            minimality = [math.nan] * len(circuit)
    if len(circuit) > (max_size or len(full)):
        reached = False
    timings["prune_s"] = time.perf_counter() - t1
    ceiling = search.f(full) if (not reached or m == "acdc") else math.nan
    timings["total_s"] = time.perf_counter() - t_start
    order_of = {mem: i for i, mem in enumerate(ev.members)}
    pos = sorted(range(len(circuit)), key=lambda i: order_of[circuit[i]])
    members = [circuit[i] for i in pos]
    provenance = {
        **ev.engine.provenance(),
        "n_members": len(ev.members),
        "shape": {"n_layers": ev.pair.shape.n_layers, "n_heads": ev.pair.shape.n_heads},
        "n_exact": ev.n_exact,
        "n_exact_search": n_search,
        "exact_seconds": ev.seconds,
        "timings": timings,
        "acdc_rule": "tau = remaining slack (keep target); tau = 0 while below target",
        **extra,
    }
    result = Circuit(
        nodes=_nodes(members, lv),
        edges=tuple(x for x in members if isinstance(x, Edge)),
        unembed=Node("logits") in members,
        level=lv,
        semantics=s,
        direction=d,
        method=m,
        target=tgt,
        per_prompt=ev.metric([members])[0].float(),
        shift=ev.shift,
        curve=tuple(sorted(search.curve.items())),
        minimality=tuple(float(minimality[i]) for i in pos),
        reached=reached,
        ceiling=ceiling,
        provenance=provenance,
    )
    if not reached:
        where = "the full graph" if len(members) == len(full) else f"max_size={max_size}"
        warnings.warn(
            f"the {lv}-level {s} search ({m}, {d.value}) did not reach target {tgt:g}: returning "
            f"{where} (faithfulness {result.faithfulness:.3f}; full graph {ceiling:.3f}). "
            + _ceiling_note(lv, s),
            CircuitNotFaithfulWarning,
            stacklevel=2,
        )
    return result


def _ceiling_note(level: str, semantics: str) -> str:
    if semantics == "splice":
        return (
            "Under splice the target's final norm and unembedding (and attention output biases) "
            "always run, so even the full graph may carry only part of the shift; graft has an "
            "'unembed' member."
        )
    if semantics == "graft":
        return (
            "Under graft each layer's ln1 and attention output bias stay the target's, so the "
            "full graph is the source run only where those agree. Lower the target or check the "
            "pair's shift."
        )
    return "Lower the target or check the pair's shift."


def _nodes(members: list[Member], level: str) -> tuple[Node, ...]:
    if level == "node":
        return tuple(x for x in members if isinstance(x, Node))
    seen: dict[Node, None] = {}
    for e in members:
        if isinstance(e, Node):  # the graft pseudo-member unembed: the logits node
            seen[e] = None
            continue
        seen[e.sender] = None
        seen[e.receiver] = None
    return tuple(sorted(seen, key=lambda n: (n.rank, n.head or 0)))


class _Search:
    def __init__(self, ev: Evaluator, target: float, max_size: int | None) -> None:
        self.ev, self.target = ev, target
        self.cap = min(max_size or len(ev.members), len(ev.members))
        self.curve: dict[int, float] = {}
        self.best: list[Member] | None = None  # closest to f = 1 within max_size
        self.f_best = math.nan
        self.growth: dict[str, Any] = {}  # how grow() moved (provenance["growth"])

    def reaches(self, f: float) -> bool:
        return self.target - 1e-9 <= f <= 2 - self.target + 1e-9

    @staticmethod
    def dist(f: float) -> float:
        return abs(f - 1) if math.isfinite(f) else math.inf

    def f(self, circuit: Sequence[Member]) -> float:
        return self.fs([circuit])[0]

    def fs(self, circuits: Sequence[Sequence[Member]]) -> list[float]:
        out = self.ev.faithfulness(circuits)
        for c, f in zip(circuits, out, strict=True):
            if len(c) <= self.cap and (self.best is None or self.dist(f) < self.dist(self.f_best)):
                self.best, self.f_best = list(c), f
        return out

    def _track(self, size: int, f: float) -> None:
        self.curve[size] = f

    def greedy(self) -> list[Member] | None:
        chosen: list[Member] = []
        self._track(0, self.f([]))
        while len(chosen) < self.cap:
            cands = [x for x in self.ev.members if x not in chosen]
            if not cands:
                break
            fs = self.fs([[*chosen, x] for x in cands])
            k = min(range(len(cands)), key=lambda i: self.dist(fs[i]))
            chosen.append(cands[k])
            self._track(len(chosen), fs[k])
            if self.reaches(fs[k]):
                return chosen
        return None

    def grow(self, order: list[Member], pred: Sequence[float]) -> list[Member] | None:
        """The first prefix of ``order`` that reaches the target (see ``"attribution"`` in the
        module docstring); ``pred[k]``: the predicted faithfulness of ``order[:k]``."""
        n, cap = len(order), self.cap
        f_at: dict[int, float] = {}  # prefix size -> exact faithfulness

        def run(*sizes: int) -> None:
            todo = [k for k in dict.fromkeys(sizes) if k not in f_at and 0 <= k <= n]
            for k, f in zip(todo, self.fs([order[:k] for k in todo]), strict=True):
                f_at[k] = f
                self._track(k, f)

        def at_least(k: int) -> bool:  # f >= target: reached or overshot
            return f_at[k] >= self.target - 1e-9

        k0 = _first_guess(pred, self.target, cap)
        self.growth = {"predicted_first": k0}
        stacked = self.ev.level == "edge" or self.ev.semantics == "splice"
        run(0, *([k0 - 1] if stacked and k0 > 1 else []), k0)
        lo, hi = 0, k0  # f(P_lo) < target (the empty circuit's is 0); f(P_hi) >= target?
        if at_least(k0):
            step = 1
            while hi - step > lo:  # walk down from the guess to a prefix below the target
                run(hi - step)
                if not at_least(hi - step):
                    lo = hi - step
                    break
                hi, step = hi - step, 2 * step
        else:
            lo = k0
            run(n)  # the full graph, once: if even it falls short, no prefix is walked
            if not at_least(n):
                self.growth["stopped"] = "the full graph is below the target"
                return None
            while not at_least(hi):
                if hi >= cap:
                    return None
                lo, hi = hi, min(cap, 2 * hi)
                run(hi)
        while hi - lo > 1:  # bisect: lo below the target, hi at or above it
            mid = (lo + hi) // 2
            run(mid)
            lo, hi = (lo, mid) if at_least(mid) else (mid, hi)
        if self.reaches(f_at[hi]):
            return order[:hi]
        self.growth["walked_from"] = hi + 1  # the boundary prefix overshoots: walk on
        done, chunk = hi, 8
        while done < cap:
            sizes = list(range(done + 1, min(cap, done + chunk) + 1))
            run(*sizes)
            for k in sizes:
                if self.reaches(f_at[k]):
                    return order[:k]
            done, chunk = sizes[-1], chunk * 2
        return None

    def acdc(self) -> list[Member] | None:
        circuit = list(self.ev.members)
        f = self.f(circuit)
        self._track(len(circuit), f)
        for x in _backwards(self.ev.members, self.ev.level):
            trial = [y for y in circuit if y != x]
            g = self.f(trial)
            keep_target = self.reaches(f) and self.reaches(g)
            closer = not self.reaches(f) and self.dist(g) <= self.dist(f)
            if keep_target or closer:
                circuit, f = trial, g
                self._track(len(circuit), f)
        return circuit if self.reaches(f) else None

    def prune(self, circuit: list[Member], *, sequential: bool) -> tuple[list[Member], list[float]]:
        """Drop members while the target holds; return the circuit and each member's loss."""
        circuit = list(circuit)
        if sequential:  # latest-added first; stacked trials are speculative (see the docstring)
            todo, i, width = list(reversed(circuit)), 0, 1
            stacked = self.ev.level == "edge" or self.ev.semantics == "splice"
            while i < len(todo):
                block = todo[i : i + width]
                fs = self.fs([[y for y in circuit if y != x] for x in block])
                hit = next((j for j, g in enumerate(fs) if self.reaches(g)), None)
                if hit is None:
                    i, width = i + len(block), 2 * width if stacked else 1
                else:
                    circuit = [y for y in circuit if y != block[hit]]
                    i, width = i + hit + 1, 1
        while True:
            f = self.f(circuit)
            drops = self.fs([[y for y in circuit if y != x] for x in circuit])
            ok = [i for i, g in enumerate(drops) if self.reaches(g)]
            if not ok:
                return circuit, [f - g for g in drops]
            dist = [self.dist(g) for g in drops]
            del circuit[min(ok, key=dist.__getitem__)]


def predicted(estimates: Sequence[float], semantics: str) -> list[float]:
    """Predicted faithfulness of each prefix ``estimates[:k]``, k = 0..len, from first-order
    estimates in ranking order (fractions of the shift; a non-finite estimate counts 0): under
    ``"ablate"`` ``1 - sum(estimates[k:])`` (each estimate is the loss of removing one member
    from the full graph), else ``sum(estimates[:k])`` (each is what one member alone carries)."""
    vals = [x if math.isfinite(x) else 0.0 for x in estimates]
    sums = [0.0]
    for x in vals:
        sums.append(sums[-1] + x)
    if semantics == "ablate":
        return [1.0 - (sums[-1] - c) for c in sums]
    return sums


def _first_guess(pred: Sequence[float], target: float, cap: int) -> int:
    """The smallest prefix size in 1..cap predicted to reach ``target``, else the one predicted
    closest to 1."""
    sizes = range(1, cap + 1)
    for k in sizes:
        if pred[k] >= target:
            return k
    return min(sizes, key=lambda k: abs(pred[k] - 1))


def _backwards(members: Sequence[Member], level: str) -> list[Member]:
    """Members from the logits backwards (see ``"acdc"`` in the module docstring)."""
    if level == "node":
        return sorted(members, key=lambda n: (-n.rank, -(n.head or 0)))  # type: ignore[union-attr]
    receivers: dict[str, list[Edge]] = {}
    first: list[Member] = [m for m in members if isinstance(m, Node)]  # unembed, at the output
    for e in members:
        if isinstance(e, Edge):
            receivers.setdefault(e.receiver_input, []).append(e)
    return first + [e for edges in reversed(receivers.values()) for e in reversed(edges)]

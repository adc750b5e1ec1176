"""Sharded work of the patching engines: what an executor runs on its workers.

:class:`SitesWork` is one :meth:`PatchEngine.run <mechdelta.patching._engine.PatchEngine.run>`
call (variants of sites spliced jointly from the source into the target run), :class:`EdgesWork`
one :meth:`EdgePatcher.run <mechdelta.patching.edges.EdgePatcher.run>` call (circuits of edges).
Each shard is exactly one of the in-process loop's stacked forwards (same prompt rows, same
variants in the same order, same batch budget), and every worker recomputes the same clean runs,
so the merged values equal the in-process ones bit for bit on CPU. A worker's pair must have the
weights the driver's pair has (:func:`~mechdelta.scale._transport.check_hashes`: a mismatch
raises ``PatchingError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Site
from mechdelta.scale._transport import check_hashes
from mechdelta.scale.executor import Shard, work_key

__all__ = [
    "EdgesWork",
    "GraftWork",
    "SitesWork",
    "engine_fields",
    "execute_edges",
    "execute_sites",
    "plan",
    "run_work",
]


def plan(
    jobs: Sequence[tuple[slice, Sequence[int]]],
) -> list[Shard]:
    """Shards from the in-process loop's jobs ``(rows, variant indices)``, in loop order."""
    return [
        Shard(i, (rows.start, rows.stop), tuple(int(v) for v in chunk))
        for i, (rows, chunk) in enumerate(jobs)
    ]


def engine_fields(engine: Any) -> dict[str, Any]:
    """What every work takes from the driver's engine: the task, the resolved batch budget, the
    pair's weight hashes (checked on the worker) and the prompts' hash (in the work's key)."""
    return {
        "task": engine.prepared.task,
        "budget": engine.budget,
        "pair_hashes": pair_identity(engine.pair),
        "task_hash": engine.prepared.prompt_hash(),
    }


def run_work(engine: Any, work: Any, local_state: Any, executor: Any = None) -> list[Tensor]:
    """``work``'s shard values from ``executor`` (default: the engine's); the largest peak memory
    of a shard on a worker is kept in ``engine.worker_peak`` (provenance:
    ``engine.worker_peak_memory``)."""
    runner = engine.executor if executor is None else executor
    values: list[Tensor] = runner.map(
        work, engine.pair, local_state=local_state, progress=engine.progress
    )
    peak = runner.last_worker_peak
    if peak is not None and (
        engine.worker_peak is None or int(peak["bytes"]) > int(engine.worker_peak["bytes"])
    ):
        engine.worker_peak = dict(peak)
    return values


def pair_identity(pair: Any) -> tuple[str, str]:
    return (str(pair.reference_hash), str(pair.intervened_hash))


@dataclass
class SitesWork:
    """Variants of sites spliced jointly, one direction, as :meth:`PatchEngine.run` runs them."""

    task: Any
    direction: Direction
    variants: tuple[tuple[Site, ...], ...]
    jobs: tuple[Shard, ...]
    budget: int
    prefix_reuse: bool
    pair_hashes: tuple[str, str]
    task_hash: str
    desc: str = "patching"

    @property
    def state_key(self) -> str:
        return work_key("engine", self.pair_hashes, self.task_hash, self.budget, self.prefix_reuse)

    @property
    def key(self) -> str:
        return work_key(
            "sites",
            self.state_key,
            self.direction.value,
            [[str(s) for s in v] for v in self.variants],
            [(s.rows, s.variants) for s in self.jobs],
        )

    def shards(self) -> list[Shard]:
        return list(self.jobs)

    def setup(self, pair: Any) -> Any:
        from mechdelta.patching._engine import PatchEngine

        check_hashes(pair, self.pair_hashes)
        return PatchEngine(
            pair,
            self.task,
            batch_budget=self.budget,
            prefix_reuse=self.prefix_reuse,
            progress=False,
        )

    def run(self, state: Any, shard: Shard) -> Tensor:
        chosen = [self.variants[i] for i in shard.variants]
        sites = {s for v in chosen for s in v}
        state.clean_run(sites)  # again only if these sites read hooks not cached yet
        src = state.states[self.direction.source]
        tgt = state.states[self.direction.target]
        if sites:
            state.check_effective(tgt, {(s.kind, s.layer) for s in sites})
        return state._run_chunk(src, tgt, shard.row_slice, chosen).cpu()


@dataclass
class EdgesWork:
    """Circuits of edges, one direction and semantics, as :meth:`EdgePatcher.run` runs them
    (``members`` are each circuit's redirected edges, ``unembed`` whether the circuit grafts the
    unembedding)."""

    task: Any
    direction: Direction
    semantics: str
    members: tuple[tuple[Any, ...], ...]
    unembed: tuple[bool, ...]
    jobs: tuple[Shard, ...]
    budget: int
    pair_hashes: tuple[str, str]
    task_hash: str
    desc: str = "edge patching"

    @property
    def state_key(self) -> str:
        return work_key("edges", self.pair_hashes, self.task_hash, self.budget)

    @property
    def key(self) -> str:
        return work_key(
            "edge-circuits",
            self.state_key,
            self.direction.value,
            self.semantics,
            [sorted(str(e) for e in m) for m in self.members],
            list(self.unembed),
            [(s.rows, s.variants) for s in self.jobs],
        )

    def shards(self) -> list[Shard]:
        return list(self.jobs)

    def setup(self, pair: Any) -> Any:
        from mechdelta.patching.edges import EdgePatcher

        check_hashes(pair, self.pair_hashes)
        return EdgePatcher(pair, self.task, batch_budget=self.budget)

    def run(self, state: Any, shard: Shard) -> Tensor:
        sets = [frozenset(self.members[i]) for i in shard.variants]
        unembed = [self.unembed[i] for i in shard.variants]
        return state.run_redirected(
            self.direction, self.semantics, shard.row_slice, sets, unembed
        ).cpu()


@dataclass
class GraftWork:
    """Variants of components grafted (the source's parameters in the target run), one
    direction, as :func:`~mechdelta.patching.graft.graft_values` runs them: a shard is one
    variant on one prompt chunk."""

    task: Any
    direction: Direction
    variants: tuple[tuple[Any, ...], ...]
    jobs: tuple[Shard, ...]
    budget: int
    prefix_reuse: bool
    pair_hashes: tuple[str, str]
    task_hash: str
    desc: str = "graft"

    @property
    def state_key(self) -> str:
        return work_key("graft", self.pair_hashes, self.task_hash, self.budget, self.prefix_reuse)

    @property
    def key(self) -> str:
        return work_key(
            "grafts",
            self.state_key,
            self.direction.value,
            [[repr(p) for p in v] for v in self.variants],
            [(s.rows, s.variants) for s in self.jobs],
        )

    def shards(self) -> list[Shard]:
        return list(self.jobs)

    def setup(self, pair: Any) -> Any:
        from mechdelta.patching._engine import PatchEngine
        from mechdelta.patching.graft import _Weights

        check_hashes(pair, self.pair_hashes)
        engine = PatchEngine(
            pair, self.task, batch_budget=self.budget, prefix_reuse=self.prefix_reuse,
            progress=False,
        )  # fmt: skip
        return engine, _Weights(pair)

    def run(self, state: Any, shard: Shard) -> Tensor:
        from mechdelta.patching.graft import graft_shard

        engine, weights = state
        (v,) = shard.variants
        return graft_shard(engine, weights, self.direction, self.variants[v], shard.row_slice)


def execute_sites(
    engine: Any,
    direction: Direction,
    variants: Sequence[Sequence[Site]],
    jobs: list[tuple[slice, list[int]]],
    out: Tensor,
    desc: str,
) -> Tensor:
    """:meth:`PatchEngine.run <mechdelta.patching._engine.PatchEngine.run>`'s stacked forwards
    ``jobs`` as shards of the engine's executor (same rows, same variants stacked in the same
    order: the in-process values), merged into ``out``."""
    from mechdelta.scale.executor import merge

    shards = plan(jobs)
    work = SitesWork(
        direction=direction,
        variants=tuple(tuple(v) for v in variants),
        jobs=tuple(shards),
        prefix_reuse=engine.prefix_reuse,
        desc=desc,
        **engine_fields(engine),
    )
    return merge(shards, run_work(engine, work, engine), out, range(len(variants)))


def execute_edges(
    patcher: Any,
    direction: Direction,
    semantics: str,
    redirected: Sequence[frozenset[Any]],
    unembed: Sequence[bool],
    jobs: list[tuple[slice, list[int]]],
    out: Tensor,
) -> Tensor:
    """:meth:`EdgePatcher.run <mechdelta.patching.edges.EdgePatcher.run>`'s stacked forwards
    ``jobs`` as shards of the patcher's executor, merged into ``out``."""
    from mechdelta.scale.executor import merge

    engine = patcher.engine
    shards = plan(jobs)
    work = EdgesWork(
        direction=direction,
        semantics=semantics,
        members=tuple(tuple(sorted(e, key=str)) for e in redirected),
        unembed=tuple(unembed),
        jobs=tuple(shards),
        desc=f"edges {semantics} {direction.value}",
        **engine_fields(engine),
    )
    values = run_work(engine, work, patcher, patcher.executor)
    return merge(shards, values, out, range(len(redirected)))

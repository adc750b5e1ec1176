"""The sharded work of :func:`~mechdelta.attribute`: the gradient passes of prompt chunks.

A shard is one prompt chunk (the in-process loop's chunk: the same rows under the same batch
budget); its value is the chunk's estimate per site ``[site, chunk]`` (float64), computed on a
worker's engine that repeated the driver's clean runs, so the merged estimate equals the
in-process one bit for bit on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Component, Site
from mechdelta.scale._transport import check_hashes
from mechdelta.scale.executor import Shard, work_key

__all__ = ["AttributionWork"]


@dataclass
class AttributionWork:
    """Estimates of one direction's sites by prompt chunk (see the module docstring)."""

    task: Any
    direction: Direction
    component: Component
    sites: tuple[Site, ...]
    method: str
    steps: int
    drop: int | None
    jobs: tuple[Shard, ...]
    budget: int
    pair_hashes: tuple[str, str]
    task_hash: str
    desc: str = "attribution"

    @property
    def state_key(self) -> str:
        return work_key("attribution-engine", self.pair_hashes, self.task_hash, self.budget)

    @property
    def key(self) -> str:
        return work_key(
            "attribution",
            self.state_key,
            self.direction.value,
            self.component.value,
            [str(s) for s in self.sites],
            self.method,
            self.steps,
            self.drop,
            [s.rows for s in self.jobs],
        )

    def shards(self) -> list[Shard]:
        return list(self.jobs)

    def setup(self, pair: Any) -> Any:
        from mechdelta.patching._engine import PatchEngine

        check_hashes(pair, self.pair_hashes)
        return PatchEngine(pair, self.task, batch_budget=self.budget, progress=False)

    def run(self, state: Any, shard: Shard) -> Tensor:
        from mechdelta.attribution._qk import qk_sites
        from mechdelta.attribution.nodes import Method, estimate_rows

        method = Method.coerce(self.method)
        qk = method is Method.ATP_STAR and self.component in (Component.HEAD_Q, Component.HEAD_K)
        layers = {s.layer for s in self.sites}
        state.clean_run([*self.sites, *(qk_sites(layers) if qk else ())])
        return estimate_rows(
            state,
            self.direction,
            self.component,
            self.sites,
            method,
            self.steps,
            shard.row_slice,
            self.drop,
        )

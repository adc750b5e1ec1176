"""Joint patches of a set of sites across the two models: :func:`patch`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Site
from mechdelta.errors import SiteError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections, PatchResult, direction_results
from mechdelta.patching.shift import engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.scale.executor import Executor
from mechdelta.stats.bootstrap import Bootstrap

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["as_sites", "patch"]


def as_sites(sites: Site | str | Iterable[Site | str]) -> tuple[Site, ...]:
    """Sites from a Site, shorthand (``"L1H2"``) or an iterable of either; order kept, deduped."""
    if isinstance(sites, (Site, str)):
        sites = [sites]
    out = [s if isinstance(s, Site) else Site.parse(s) for s in sites]
    for s in out:
        if not isinstance(s, Site):
            raise SiteError(f"expected a Site or shorthand string, got {type(s).__name__}")
    return tuple(dict.fromkeys(out))


def patch(
    pair: ModelPair,
    task: Task,
    sites: Site | str | Iterable[Site | str],
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    batch_budget: BatchBudget = None,
    prefix_reuse: bool = True,
    executor: Executor | str | None = None,
) -> PatchResult | BothDirections[PatchResult]:
    """Splice the source model's activations at every site in ``sites`` *jointly* into the
    target model's run and measure the task's metric.

    ``direction="reference->intervened"`` restores reference activations inside the intervened
    model (score: fraction of the shift undone); ``"intervened->reference"`` puts intervened
    activations into the reference model (fraction of the shift carried); ``"both"`` returns a
    :class:`~mechdelta.patching.results.BothDirections`. What each component's splice carries across the two
    models is documented on :class:`~mechdelta.Component`.

    The sites are spliced as a *union*: every activation any site names takes the source's value
    once; a site contained in another (the same head at one position inside all positions, a
    head's write inside its layer's ``attn_out``) adds nothing, and the order never matters.

    Sites at a fixed position need prompts of one token length (position p must be the same
    token in every prompt) or ``Task(align="right")``. ``batch_budget``, ``prefix_reuse`` and
    ``executor`` (shards are prompt batches here) as in :func:`~mechdelta.sweep`.
    """
    chosen = as_sites(sites)
    if not chosen:
        raise SiteError(
            "patch() needs at least one site: an empty joint patch is the target's clean run. "
            "Give sites, e.g. patch(pair, task, ['L1H2', 'L0.attn_out'])"
        )
    d = Direction.coerce(direction)
    engine = PatchEngine(
        pair,
        task,
        sites=chosen,
        batch_budget=batch_budget,
        prefix_reuse=prefix_reuse,
        executor=executor,
    )
    boot = Bootstrap(n_boot, alpha, seed)
    shift = engine_shift(engine, boot)
    return direction_results(
        d,
        shift,
        boot,
        lambda single: engine.run(single, [chosen])[0],
        {**engine.provenance(), "seed": seed},
        sites=chosen,
        delta_of=lambda single: tuple(engine.site_delta(single, s) for s in chosen),
    )

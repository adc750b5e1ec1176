"""Sweeps: one patch per site over a grid of layers (x heads / neurons) (x positions)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Component, ModelShape, Site
from mechdelta.errors import ConfigError, SiteError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections, SweepResult
from mechdelta.patching.shift import engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.scale.executor import Executor, coerce_executor
from mechdelta.stats.bootstrap import Bootstrap, score_ci

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import PreparedTask, Task

__all__ = ["axis_tokens", "engine_grid", "grid_sites", "sweep", "sweep_grid"]


def _axis(name: str, chosen: Sequence[int] | None, size: int) -> tuple[int, ...]:
    if chosen is None:
        return tuple(range(size))
    values = tuple(int(v) for v in chosen)
    if not values:
        raise ConfigError(f"{name}= is empty; pass None for all {name}")
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise SiteError(f"{name} {bad} out of range [0, {size})")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}= has duplicates: {list(values)}")
    return values


def sweep_grid(
    component: Component | str,
    shape: ModelShape,
    seq_len: int,
    *,
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
) -> tuple[Component, tuple[str, ...], dict[str, tuple[int, ...]]]:
    """The dims and coordinates of a sweep (validated against the model and prompt length)."""
    comp = Component.coerce(component)
    if positions is not None:
        per_position = True
    if heads is not None and not comp.per_head:
        raise ConfigError(f"heads= applies to per-head components, not {comp.value!r}")
    if neurons is not None and comp is not Component.MLP_NEURON:
        raise ConfigError(f"neurons= applies to 'mlp_neuron', not {comp.value!r}")
    if comp in (Component.MLP_OUT, Component.MLP_NEURON) and shape.d_mlp is None:
        raise SiteError(f"the model is attention-only: it has no {comp.value!r}")
    n_layers = 1 if comp is Component.EMBED else shape.n_layers
    coords: dict[str, tuple[int, ...]] = {"layer": _axis("layers", layers, n_layers)}
    dims = ["layer"]
    if per_position:
        coords["position"] = _axis("positions", positions, seq_len)
        dims.append("position")
    if comp.per_head:
        coords["head"] = _axis("heads", heads, shape.n_heads)
        dims.append("head")
    if comp is Component.MLP_NEURON:
        assert shape.d_mlp is not None
        coords["neuron"] = _axis("neurons", neurons, shape.d_mlp)
        dims.append("neuron")
    return comp, tuple(dims), coords


def engine_grid(
    engine: PatchEngine,
    component: Component | str,
    what: str,
    *,
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
) -> tuple[Component, tuple[str, ...], dict[str, tuple[int, ...]], list[Site]]:
    """A grid over the engine's task (positions in its frame; by-position grids need aligned
    prompts) and its sites, for a ``what`` ("sweep", "attribution") of the component."""
    comp, dims, coords = sweep_grid(
        component,
        engine.shape,
        engine.prepared.frame_len,
        per_position=per_position,
        layers=layers,
        heads=heads,
        positions=positions,
        neurons=neurons,
    )
    if "position" in dims:
        engine.prepared.require_aligned(f"a by-position {what}")
    return comp, dims, coords, grid_sites(comp, dims, coords)


def grid_sites(
    comp: Component, dims: tuple[str, ...], coords: dict[str, tuple[int, ...]]
) -> list[Site]:
    """Every site of a grid, row-major over ``dims`` (the order of a result's sites)."""
    return [
        Site(
            comp,
            at["layer"],
            head=at.get("head"),
            position=at.get("position"),
            neuron=at.get("neuron"),
        )
        for at in (
            dict(zip(dims, values, strict=True))
            for values in itertools.product(*(coords[k] for k in dims))
        )
    ]


def axis_tokens(prepared: PreparedTask) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """Prompt 0's tokens along the position frame, and per position the token every prompt
    shares there (None where they differ): a result's ``tokens`` and ``shared_tokens``."""
    offsets = prepared.frame_offsets
    first = 0 if offsets is None else int(offsets[0])
    tokens = tuple(prepared.str_tokens(0)[first : first + prepared.frame_len])
    return tokens, tuple(prepared.position_tokens())


def _semantics(value: object) -> str:
    """A node-level sweep's semantics: "splice" or "graft" (ConfigError otherwise)."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text == "ablate":
        raise ConfigError(
            "semantics='ablate' is edge-level (every edge outside a circuit carries the target's "
            "cached write): it comes with patch_edges; sweep takes 'splice' or 'graft'"
        )
    if text not in ("splice", "graft"):
        raise ConfigError(f"unknown semantics {value!r}; use 'splice' or 'graft'")
    return str(text)


def sweep(
    pair: ModelPair,
    task: Task,
    component: Component | str,
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    *,
    per_position: bool = False,
    heads: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    batch_budget: BatchBudget = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    progress: bool | None = None,
    prefix_reuse: bool = True,
    semantics: str = "splice",
    executor: Executor | str | None = None,
) -> SweepResult | BothDirections[SweepResult]:
    """Patch each site of a grid on its own and score how much of the shift it explains.

    Args:
        component: what to patch (a :class:`~mechdelta.Component` or its name).
        direction: ``"reference->intervened"``, ``"intervened->reference"`` or ``"both"``.
        per_position: one site per position too (needs prompts of one token length).
        heads, layers, positions, neurons: restrict the grid (default: all).
        batch_budget: most rows (patched variants x prompts) per forward pass; bounds the peak
            memory of the patched passes. Default 64; ``"auto"``: derived from the free memory of
            the pair's device. The clean runs' caches (each block's residual input plus the
            hooks the grid reads, for both models) come on top.
        n_boot, alpha, seed: bootstrap over prompts for the confidence intervals.
        progress: show progress (default: for more than 4 passes; a bar in Jupyter or on a
            terminal, plain lines on stderr otherwise; False: silent).
        prefix_reuse: start each patched pass at the patched layer from the cached residual
            (exact; checked on every run). Disable to time the plain batched path.
        semantics: ``"splice"`` (default): each site takes the source run's activation.
            ``"graft"``: each site is a whole component run with the source's *parameters*
            (``head_out``: the head's Q/K/V/O slices; ``mlp_out``: the MLP and its norm; see
            :func:`~mechdelta.patching.graft.graft`); no positions, one target forward per site.
        executor: where the patched forwards run. ``"local"`` / None (default): this process.
            A :class:`~mechdelta.LocalExecutor` with ``shard_dir``: this process, each finished
            shard (a prompt batch x a stack of sites) written there and skipped when the same
            sweep runs again. A :class:`~mechdelta.RayExecutor`: the shards on Ray actors. The
            numbers and the site order are the same in every case (bit for bit on CPU).

    Returns a :class:`~mechdelta.patching.results.SweepResult`, or a
    :class:`~mechdelta.patching.results.BothDirections` of two for ``direction="both"``.
    """
    chosen_executor = coerce_executor(executor)
    if _semantics(semantics) == "graft":
        from mechdelta.patching.graft import graft_sweep

        return graft_sweep(
            pair,
            task,
            component,
            direction,
            per_position=per_position,
            heads=heads,
            layers=layers,
            positions=positions,
            neurons=neurons,
            batch_budget=batch_budget,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            progress=progress,
            prefix_reuse=prefix_reuse,
            executor=chosen_executor,
        )
    d = Direction.coerce(direction)
    engine = PatchEngine(
        pair,
        task,
        batch_budget=batch_budget,
        progress=progress,
        prefix_reuse=prefix_reuse,
        executor=chosen_executor,
    )
    prepared = engine.prepared
    comp, dims, coords, sites = engine_grid(
        engine,
        component,
        "sweep",
        per_position=per_position,
        layers=layers,
        heads=heads,
        positions=positions,
        neurons=neurons,
    )
    engine.clean_run(sites)
    boot = Bootstrap(n_boot, alpha, seed)
    shift = engine_shift(engine, boot)
    shape = tuple(len(coords[k]) for k in dims)
    tokens, shared_tokens = axis_tokens(prepared)
    results = []
    for single in d.singles:
        values = engine.run(single, [(s,) for s in sites], desc=f"{comp.value} {single.value}")
        ci = score_ci(
            shift.reference,
            shift.intervened,
            values,
            boot,
            toward_reference=single.toward_reference,
        )
        delta = torch.tensor([engine.site_delta(single, s) for s in sites])
        results.append(
            SweepResult(
                component=comp,
                direction=single,
                dims=dims,
                coords=coords,
                per_prompt=values.float().reshape(*shape, -1),
                ci=ci.reshape(*shape, 2),
                shift=shift,
                activation_delta=delta.reshape(shape),
                tokens=tokens,
                shared_tokens=shared_tokens,
                provenance={**engine.provenance(), "seed": seed},
            )
        )
    if d is Direction.BOTH:
        return BothDirections(results[0], results[1])
    return results[0]

"""Node-level cross-model attribution: :func:`attribute` estimates a whole sweep grid from a few
passes instead of one patched pass per site.

Every estimate is of the same quantity an exact :func:`~mechdelta.sweep` measures: the target
model's metric with the *source model's* activation spliced in at one site (same input, the other
checkpoint). With ``a_S``/``a_T`` the site's clean activations in the source/target runs and
``g = ∂m/∂a`` in the target's clean run (per prompt):

- ``"atp"``: ``m_T + (a_S - a_T) · g`` (first order).
- ``"atp*"``: as ``"atp"``, except for sites that feed attention scores (``head_q``, ``head_k``):
  the affected attention probabilities are recomputed *exactly* from the source's queries/keys
  (the rest of the target run fixed) and only the step from the pattern onwards is linearised:
  ``m_T + (A_patched - A_T) · ∂m/∂A`` (AtP*'s QK fix, Kramár et al. 2024). With
  ``graddrop=True``, also AtP*'s GradDrop: per layer l the estimate with the backward pass cut at
  layer l's attention and MLP outputs, ``sum_l |mean estimate_-l| / (L - 1)``, a magnitude that
  effects cancelling across paths cannot hide; it ranks sites for verification, the signed
  estimate stays the QK-fixed one.
- ``"ig"``: integrated gradients along the straight path from ``a_T`` to ``a_S``, one layer at a
  time (every site of that layer's grid moves together; other layers run live), ``steps`` points
  (midpoint rule): ``m_T + (a_S - a_T) · mean_α g(a_T + α(a_S - a_T))``. Cost: ``steps`` passes
  per layer of the grid.

A ``head_out`` site's activation is the head's write ``z_h @ W_O[h]`` (its gradient is the one at
the layer's attention output); ``head_pattern`` sites are query rows; K/V sites under grouped-query
attention are key/value heads, as in :class:`~mechdelta.Component`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.attribution._grads import grad_pass
from mechdelta.attribution._qk import qk_fix, qk_sites
from mechdelta.attribution.results import AttributionResult
from mechdelta.core.directions import Direction
from mechdelta.core.progress import progress as progress_bar
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching._hooks import at_rows
from mechdelta.patching.results import BothDirections
from mechdelta.patching.shift import engine_shift
from mechdelta.patching.sweep import axis_tokens, engine_grid
from mechdelta.scale._memory import BatchBudget
from mechdelta.scale.executor import Executor
from mechdelta.stats.bootstrap import Bootstrap, score_ci

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["Method", "attribute", "estimate_rows"]


class Method(StrEnum):
    """Node-level attribution methods (see :mod:`mechdelta.attribution.nodes`)."""

    ATP = "atp"
    ATP_STAR = "atp*"
    IG = "ig"

    @classmethod
    def coerce(cls, value: Method | str) -> Method:
        if isinstance(value, Method):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            known = ", ".join(repr(m.value) for m in cls)
            raise ConfigError(
                f"unknown attribution method {value!r}; choose one of {known}"
            ) from None


def attribute(
    pair: ModelPair,
    task: Task,
    component: Component | str,
    direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
    method: Method | str = Method.ATP,
    *,
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    steps: int = 16,
    batch_budget: BatchBudget = None,
    verify: int | None = None,
    graddrop: bool = False,
    progress: bool | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    executor: Executor | str | None = None,
) -> AttributionResult | BothDirections[AttributionResult]:
    """Estimate, for every site of a sweep grid, the metric of the target with the source's
    activation spliced in there, from clean runs and gradient passes (see the module docstring).

    Arguments are those of :func:`~mechdelta.sweep`, plus ``method`` (``"atp"``, ``"atp*"``,
    ``"ig"``), ``steps`` (IG points per layer) and ``verify=k``: run the exact patches of the top
    ``k`` sites by |estimate| and ``k`` random others (:meth:`AttributionResult.verify`).
    ``batch_budget`` bounds the prompts per gradient pass (default 64). ``graddrop=True`` (with
    ``"atp*"``) also computes AtP*'s GradDrop magnitude per site (:attr:`AttributionResult.graddrop`;
    ``n_layers`` more passes), which :meth:`~AttributionResult.verify` then ranks by.
    ``progress`` as in :func:`~mechdelta.sweep` (IG and GradDrop passes, verification).
    ``executor`` as in :func:`~mechdelta.sweep`: the gradient passes' prompt chunks (and the
    verification's exact patches) run there, with the same numbers as in this process.

    Cost, whatever the number of sites: both models' clean runs plus one forward and backward
    pass of the target per prompt chunk (``"atp"``); ``"atp*"`` adds nothing for models whose
    attention scores can be computed from cached queries and keys, else two forwards;
    ``"ig"`` takes ``steps`` forward+backward passes per layer of the grid.
    """
    from mechdelta.scale._devices import require_one_device

    require_one_device(pair, "attribute")
    m = Method.coerce(method)
    if graddrop and m is not Method.ATP_STAR:
        raise ConfigError(f"graddrop=True belongs to method='atp*', not {m.value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int (IG points per layer), not {steps!r}")
    d = Direction.coerce(direction)
    engine = PatchEngine(
        pair, task, batch_budget=batch_budget, progress=progress, executor=executor
    )
    prepared = engine.prepared
    comp, dims, coords, sites = engine_grid(
        engine,
        component,
        "attribution",
        per_position=per_position,
        layers=layers,
        heads=heads,
        positions=positions,
        neurons=neurons,
    )
    tokens, shared_tokens = axis_tokens(prepared)
    qk = m is Method.ATP_STAR and comp in (Component.HEAD_Q, Component.HEAD_K)
    engine.clean_run([*sites, *(qk_sites({s.layer for s in sites}) if qk else ())])
    boot = Bootstrap(n_boot, alpha, seed)
    shift = engine_shift(engine, boot)
    shape = tuple(len(coords[k]) for k in dims)
    results = []
    for single in d.singles:
        est = _estimate(engine, single, comp, sites, m, steps)  # [site, batch]
        magnitude = _graddrop(engine, single, comp, sites) if graddrop else None
        patched = engine.metric_of(single.target)[None, :].double() + est
        ci = score_ci(
            shift.reference,
            shift.intervened,
            patched,
            boot,
            toward_reference=single.toward_reference,
        )
        delta = _activation_norms(engine, single, comp, sites)
        result = AttributionResult(
            component=comp,
            direction=single,
            dims=dims,
            coords=coords,
            per_prompt=patched.float().reshape(*shape, -1),
            ci=ci.reshape(*shape, 2),
            shift=shift,
            activation_delta=delta.reshape(shape),
            tokens=tokens,
            shared_tokens=shared_tokens,
            provenance={**engine.provenance(), "seed": seed, "method": m.value},
            method=m.value,
            steps=steps if m is Method.IG else None,
            graddrop=None if magnitude is None else magnitude.reshape(shape),
        )
        result.bind(pair, task, engine=engine)
        if verify is not None:
            result.verify(verify, random=verify, seed=seed)
        results.append(result)
    if d is Direction.BOTH:
        return BothDirections(results[0], results[1])
    return results[0]


# --- the estimates ---------------------------------------------------------------------------------


def _estimate(
    engine: PatchEngine,
    direction: Direction,
    comp: Component,
    sites: list[Site],
    method: Method,
    steps: int,
    drop: int | None = None,
) -> Float[Tensor, "site batch"]:
    """Estimated change of the target's metric per site and prompt; with ``drop=l`` the gradient
    does not flow back through layer l's attention and MLP outputs (GradDrop). One gradient
    pass (IG: ``steps`` per layer) per prompt chunk; the chunks run on the engine's executor."""
    batch = engine.prepared.batch_size
    chunk = min(batch, engine.budget)
    chunks = [slice(b0, min(b0 + chunk, batch)) for b0 in range(0, batch, chunk)]
    out = torch.zeros(len(sites), batch, dtype=torch.float64)
    if engine.executor is None:
        for rows in chunks:
            out[:, rows] = estimate_rows(engine, direction, comp, sites, method, steps, rows, drop)
        return out
    from mechdelta.attribution._work import AttributionWork
    from mechdelta.patching._work import engine_fields, plan, run_work

    shards = plan([(rows, ()) for rows in chunks])
    work = AttributionWork(
        direction=direction,
        component=comp,
        sites=tuple(sites),
        method=method.value,
        steps=steps,
        drop=drop,
        jobs=tuple(shards),
        desc=f"{method.value} {comp.value} {direction.value}",
        **engine_fields(engine),
    )
    values = run_work(engine, work, engine)
    for shard, v in zip(shards, values, strict=True):
        out[:, shard.row_slice] = v.double()
    return out


def estimate_rows(
    engine: PatchEngine,
    direction: Direction,
    comp: Component,
    sites: Sequence[Site],
    method: Method,
    steps: int,
    rows: slice,
    drop: int | None = None,
) -> Float[Tensor, "site chunk"]:
    """:func:`_estimate` for the prompts ``rows``: one gradient pass of the target (IG:
    ``steps`` per layer), float64 on the CPU."""
    src = engine.states[direction.source]
    tgt = engine.states[direction.target]
    layers = sorted({s.layer for s in sites})
    edits = {} if drop is None else _stop_gradient(engine, drop)
    out = torch.zeros(len(sites), rows.stop - rows.start, dtype=torch.float64)
    # per layer: contributions by position [b, pos, ...] and for all-position sites [b, ...]
    per_layer: dict[int, tuple[Tensor, Tensor]] = {}
    if method is Method.IG:
        desc = f"ig {comp.value} {direction.value}"
        for layer in progress_bar(layers, total=len(layers), desc=desc, enabled=engine.progress):
            got = _contributions(engine, src, tgt, comp, [layer], rows, steps)
            per_layer[layer] = got[layer]
    elif method is Method.ATP_STAR and comp in (Component.HEAD_Q, Component.HEAD_K):
        per_layer = qk_fix(engine, src, tgt, comp, layers, rows, edits)
    else:
        per_layer = _contributions(engine, src, tgt, comp, layers, rows, None, edits)
    for i, site in enumerate(sites):
        by_pos, every = per_layer[site.layer]
        out[i] = _site_value(engine, site, rows, by_pos, every).double().cpu()
    return out


def _activation_norms(
    engine: PatchEngine, direction: Direction, comp: Component, sites: list[Site]
) -> Float[Tensor, " site"]:
    """Per site the norm of (source - target) clean activation over all prompts (the sweep's
    ``activation_delta``), from each layer's whole difference tensor at once."""
    src = engine.states[direction.source]
    tgt = engine.states[direction.target]
    batch = engine.prepared.batch_size
    chunk = min(batch, engine.budget)
    total = torch.zeros(len(sites), dtype=torch.float64)
    for b0 in range(0, batch, chunk):
        rows = slice(b0, min(b0 + chunk, batch))
        squares = {}
        for layer in sorted({s.layer for s in sites}):
            d = _delta(engine, src, tgt, comp, layer, rows).double()
            sq = d.square().sum(-1) if comp is Component.HEAD_OUT else _dot(comp, d, d)
            squares[layer] = (sq, sq.sum(1))
        for i, site in enumerate(sites):
            total[i] += _site_value(engine, site, rows, *squares[site.layer]).sum().cpu()
    return total.sqrt().float()


def _graddrop(
    engine: PatchEngine, direction: Direction, comp: Component, sites: list[Site]
) -> Float[Tensor, " site"]:
    """AtP*'s GradDrop: ``sum_l |mean over prompts of the estimate with layer l's outputs cut
    from the backward pass| / (L - 1)``, a magnitude that an effect cancelling across paths
    cannot hide (means over prompts first: measured to rank better than per-prompt |.|)."""
    n_layers = engine.shape.n_layers
    total = torch.zeros(len(sites), dtype=torch.float64)
    desc = f"graddrop {comp.value} {direction.value}"
    for layer in progress_bar(range(n_layers), total=n_layers, desc=desc, enabled=engine.progress):
        est = _estimate(engine, direction, comp, sites, Method.ATP_STAR, 1, drop=layer)
        total += est.mean(1).abs()
    return (total / max(n_layers - 1, 1)).float()


def _stop_gradient(engine: PatchEngine, layer: int) -> dict[str, Any]:
    names = [f"blocks.{layer}.hook_attn_out"]
    if engine.shape.d_mlp is not None:
        names.append(f"blocks.{layer}.hook_mlp_out")
    return dict.fromkeys(names, torch.Tensor.detach)


def _site_value(
    engine: PatchEngine, site: Site, rows: slice, by_pos: Tensor, every: Tensor
) -> Float[Tensor, " batch"]:
    """A site's estimate from its layer's contribution tensors (batch rows relative to ``rows``)."""
    local = slice(0, rows.stop - rows.start)
    extra: tuple[Any, ...] = ()
    if site.kind.per_head:
        extra = (site.activation_head(engine.shape),)
    elif site.kind is Component.MLP_NEURON:
        extra = (site.neuron,)
    if site.position is None:
        return every[(local, *extra)]
    pos = engine._pos(rows, site)
    if isinstance(pos, Tensor):
        b_idx, p_idx = at_rows(local, pos)
        return by_pos[(b_idx, p_idx, *extra)]
    return by_pos[(local, pos, *extra)]


def _contributions(
    engine: PatchEngine,
    src: Any,
    tgt: Any,
    comp: Component,
    layers: list[int],
    rows: slice,
    steps: int | None,
    edits: dict[str, Any] | None = None,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer, ``(a_S - a_T) · g`` summed over each site's features: by position
    ``[b, pos, (head|neuron)]`` and for all-position sites ``[b, (head|neuron)]``. With ``steps``,
    ``g`` is averaged along the straight path at those layers (IG; one layer per call)."""
    names = {layer: _grad_hook(comp, layer) for layer in layers}
    deltas = {layer: _delta(engine, src, tgt, comp, layer, rows) for layer in layers}
    tokens = engine.tokens[rows]
    positions = engine.inputs.positions[rows]
    inputs = engine.inputs.select(rows)
    metric = engine.prepared.metric
    model = tgt.runner.model
    if steps is None:
        _, grads, _ = grad_pass(
            model, tokens, positions, inputs, metric, list(names.values()), edits=edits
        )
    else:
        (layer,) = layers
        name = names[layer]
        delta_hook = _hook_delta(engine, src, tgt, comp, layer, rows)
        total: Tensor | None = None
        for k in range(steps):
            alpha = (k + 0.5) / steps

            def edit(x: Tensor, alpha: float = alpha) -> Tensor:
                return x + alpha * delta_hook.to(x.dtype)

            _, g, _ = grad_pass(
                model, tokens, positions, inputs, metric, [name], edits={name: edit}
            )
            total = g[name] if total is None else total + g[name]
        assert total is not None
        grads = {name: total / steps}
    out = {}
    for layer in layers:
        by_pos = _dot(comp, deltas[layer], grads[names[layer]].float())
        out[layer] = (by_pos, by_pos.sum(1))
    return out


def _site0(comp: Component, layer: int) -> Site:
    """A site of the component at the layer (head 0 / neuron 0), for its hook names."""
    head = 0 if comp.per_head else None
    return Site(comp, layer, head=head, neuron=0 if comp is Component.MLP_NEURON else None)


def _grad_hook(comp: Component, layer: int) -> str:
    """Where a site's gradient is read: where its splice writes (the attention output for
    head_out and for resid_mid, whose gradient there is the residual's)."""
    return _site0(comp, layer).hook_name


def _delta(
    engine: PatchEngine, src: Any, tgt: Any, comp: Component, layer: int, rows: slice
) -> Tensor:
    """Source minus target clean activation at the layer: the whole hook tensor, or per head
    writes ``[b, pos, head, d_model]`` for head_out."""
    if comp is Component.HEAD_OUT:
        name = f"blocks.{layer}.attn.hook_z"
        w_s, w_t = engine._w_o(src, layer), engine._w_o(tgt, layer)
        z_s, z_t = src.cache[name][rows].float(), tgt.cache[name][rows].float()
        return torch.einsum("bphd,hdm->bphm", z_s, w_s.float()) - torch.einsum(
            "bphd,hdm->bphm", z_t, w_t.float()
        )
    name = _site0(comp, layer).read_hook_name  # resid_mid: read at hook_resid_mid
    return src.cache[name][rows].float() - tgt.cache[name][rows].float()


def _hook_delta(
    engine: PatchEngine, src: Any, tgt: Any, comp: Component, layer: int, rows: slice
) -> Tensor:
    """The change IG interpolates at the gradient hook (all sites of the layer together)."""
    d = _delta(engine, src, tgt, comp, layer, rows)
    return d.sum(2) if comp is Component.HEAD_OUT else d


def _dot(comp: Component, delta: Tensor, grad: Tensor) -> Tensor:
    """``delta · grad`` over each site's features, position second: ``[b, pos, ...]``."""
    if comp is Component.HEAD_OUT:
        return torch.einsum("bphm,bpm->bph", delta, grad)
    prod = delta * grad
    if comp is Component.HEAD_PATTERN:
        return prod.sum(-1).transpose(1, 2)  # [b, head, q, k] -> [b, q, head]
    if comp is Component.MLP_NEURON:
        return prod
    return prod.sum(-1)

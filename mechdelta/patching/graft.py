"""Node-level *graft* semantics: run the target model with chosen components' **parameters** taken
from the source model, everything recomputed (:func:`graft`, :func:`grafted`, ``sweep(...,
semantics="graft")``).

Where a splice (:func:`~mechdelta.patch`) carries the source run's cached *activations*, a graft
transplants *weights*: the grafted components compute with the source's parameters on the target
run's own (hybrid) inputs, and everything downstream reacts. What each component takes:

- a head (``"L1H2"``, ``Site("head_out", 1, head=2)``, ``Node("head", 1, 2)``): its slices of
  W_Q, W_K, W_V (with their biases) and of W_O. The layer's shared output bias b_O and its input
  norm stay the target's. Under grouped-query attention the head takes its Q and O slices and the
  K/V slices of its key/value group, which the other query heads of the group read too: grafting
  one head changes the keys and values of its whole group.
- ``head_q`` / ``head_k`` / ``head_v`` sites: only that projection's slice (K/V: the group's).
- an MLP (``"L0.mlp_out"``, ``Node("mlp", 0)``): every MLP weight and bias and its norm (``ln2``
  where the block has one).
- a layer's attention (``"L0.attn_out"``): every attention parameter of the layer (all heads, b_O)
  and its input norm ``ln1``.
- ``"embed"``: token (+ learned position) embeddings; ``"unembed"`` (or ``Node("logits")``): the
  final norm and the unembedding. With tied embeddings (GPT-2) the two are one tensor, so grafting
  either carries both.

Swaps happen in place under :func:`grafted` and are restored bit for bit, also on errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._layout import head_axis
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Node
from mechdelta.core.progress import progress
from mechdelta.core.sites import Component, ModelShape, Site
from mechdelta.errors import ConfigError, PatchingError, SiteError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections, PatchResult, SweepResult
from mechdelta.patching.shift import ShiftResult, engine_shift
from mechdelta.scale._memory import BatchBudget
from mechdelta.stats.bootstrap import Bootstrap, score_ci

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["graft", "grafted"]

Component_ = Site | Node | str
_KIND_OF = {
    Component.HEAD_OUT: "head",
    Component.HEAD_Q: "q",
    Component.HEAD_K: "k",
    Component.HEAD_V: "v",
    Component.MLP_OUT: "mlp",
    Component.ATTN_OUT: "attn",
    Component.EMBED: "embed",
}
_COMPONENT_OF = {v: k for k, v in _KIND_OF.items()}
_GRAFTABLE = "'head_out' (a head), 'head_q'/'head_k'/'head_v', 'mlp_out', 'attn_out', 'embed'"


@dataclass(frozen=True)
class _Part:
    """One graftable component: kind in head/q/k/v/mlp/attn/embed/unembed."""

    kind: str
    layer: int = 0
    head: int | None = None

    @property
    def site(self) -> Site | None:
        comp = _COMPONENT_OF.get(self.kind)
        return None if comp is None else Site(comp, self.layer, head=self.head)

    def __str__(self) -> str:
        return "unembed" if self.site is None else str(self.site)


def _part(c: Any, shape: ModelShape) -> _Part:
    if isinstance(c, Node):
        if c.kind in ("logits", "embed"):
            return _Part("unembed" if c.kind == "logits" else "embed")
        site = Site("head_out" if c.kind == "head" else "mlp_out", c.layer or 0, head=c.head)
    elif isinstance(c, str) and c.strip().lower() in ("unembed", "logits"):
        return _Part("unembed")
    elif isinstance(c, str) and c.strip().upper().startswith("MLP"):
        return _part(Node.parse(c.strip().upper()), shape)  # a node name, "MLP0"
    elif isinstance(c, str):
        site = Site.parse(c)
    elif isinstance(c, Site):
        site = c
    else:
        raise SiteError(f"expected a Site, Node or shorthand string, got {type(c).__name__}")
    site.validate(shape)
    if site.position is not None:
        raise SiteError(f"{site}: a graft transplants whole components; drop the position")
    if site.kind not in _KIND_OF:
        raise SiteError(f"{site}: cannot graft {site.kind.value!r}; graftable: {_GRAFTABLE}")
    return _Part(_KIND_OF[site.kind], site.layer, site.head)


def _parts(components: Component_ | Iterable[Component_], shape: ModelShape) -> tuple[_Part, ...]:
    items = [components] if isinstance(components, (Site, Node, str)) else list(components)
    return tuple(dict.fromkeys(_part(c, shape) for c in items))


# --- where a component's parameters live -----------------------------------------------------

Plan = list[tuple[str, Any]]  # (state-dict key, index into that tensor)


class _Weights:
    """Both models' state dicts (TL keys; the tensors share the parameters' storage), read once:
    a bridge's ``state_dict()`` costs tens of milliseconds."""

    def __init__(self, pair: ModelPair) -> None:
        from mechdelta.scale._devices import require_one_device

        require_one_device(pair, "graft semantics")
        self.pair, self.shape = pair, pair.shape
        self.sd = {k: getattr(pair, k).state_dict() for k in ("reference", "intervened")}
        self._axes: dict[tuple[int, str], int] = {}

    def plan(self, parts: Iterable[_Part]) -> Plan:
        return [step for p in parts for step in self._plan(p)]

    def _plan(self, part: _Part) -> Plan:
        sd, pre = self.sd["reference"], f"blocks.{part.layer}."
        prefixes = {
            "embed": ("embed.", "pos_embed."),
            "unembed": ("ln_final.", "unembed."),
            "mlp": (pre + "mlp.", pre + "ln2.", pre + "ln2_post."),
            "attn": (pre + "attn.", pre + "ln1.", pre + "ln1_post."),
        }.get(part.kind)
        if prefixes is not None:
            return [(k, ...) for k in sd if k.startswith(prefixes)]
        assert part.head is not None
        d_head, shape, plan = int(self.pair.cfg.d_head), self.shape, []
        for proj in ("q", "k", "v", "o") if part.kind == "head" else (part.kind,):
            kv = proj in ("k", "v")
            unit = part.head // shape.group_size if kv else part.head
            n = shape.n_kv_heads if kv else shape.n_heads
            for what in ("weight",) if proj == "o" else ("weight", "bias"):  # b_O: target's
                key = f"{pre}attn.{proj}.{what}"
                if key not in sd and what == "bias":
                    continue
                if key not in sd:
                    raise PatchingError(f"the model has no {key!r}: cannot locate head slices")
                axis = 0 if what == "bias" else self._head_axis(part.layer, proj, sd[key])
                if sd[key].shape[axis] != n * d_head:
                    raise PatchingError(f"{key} has {sd[key].shape[axis]} rows for {n} heads")
                index: list[Any] = [slice(None)] * sd[key].dim()
                index[axis] = slice(unit * d_head, (unit + 1) * d_head)
                plan.append((key, tuple(index)))
        return plan

    def _head_axis(self, layer: int, proj: str, weight: Tensor) -> int:
        return head_axis(self.pair.reference, layer, proj, weight)

    def delta(self, plan: Plan) -> float:
        """``||θ_I - θ_R|| / ||θ_R||`` over the plan's parameters (0 when equal)."""
        r, i = (
            torch.cat([sd[k][ix].double().reshape(-1) for k, ix in plan]) for sd in self.sd.values()
        )
        diff = float((i.to(r.device) - r).norm())
        return 0.0 if diff == 0 else diff / max(float(r.norm()), 1e-30)

    def start(self, plan: Plan) -> int | None:
        """The first block a graft can change, over every tensor sharing storage with a grafted
        one (tied embeddings: grafting the unembedding changes the embedding); None: the
        embeddings change, run from the tokens."""
        sd = self.sd["reference"]
        storages = {sd[k].untyped_storage().data_ptr() for k, _ in plan}
        starts = []
        for key, t in sd.items():
            if t.untyped_storage().data_ptr() in storages:
                top, _, rest = key.partition(".")
                if top not in ("blocks", "ln_final", "unembed"):
                    return None  # the embeddings, or a tensor of unknown place
                last = self.shape.n_layers - 1
                starts.append(int(rest.split(".")[0]) if top == "blocks" else last)
        return min(starts, default=None)

    @contextmanager
    def swapped(self, direction: Direction, plan: Plan) -> Iterator[Any]:
        """The target model with the plan's tensors from the source; restored in ``finally``."""
        t_sd, s_sd = self.sd[direction.target], self.sd[direction.source]
        with torch.no_grad():
            # every original is saved before any write: tied tensors (embed/unembed) alias
            saved = [(t_sd[k], i, t_sd[k][i].clone()) for k, i in plan]
            try:
                for (k, i), (dst, _, _) in zip(plan, saved, strict=True):
                    dst[i] = s_sd[k][i].to(device=dst.device, dtype=dst.dtype)
                yield getattr(self.pair, direction.target)
            finally:
                for dst, i, old in reversed(saved):
                    dst[i] = old


@contextmanager
def grafted(
    pair: ModelPair,
    components: Component_ | Iterable[Component_],
    direction: Direction | str = Direction.INTERVENED_TO_REFERENCE,
) -> Iterator[Any]:
    """Yield the *target* model of ``direction`` with ``components``' parameters taken from the
    source model (swapped in place; restored bit for bit on exit, also after an exception).

    >>> with grafted(pair, ["L0H3"], "reference->intervened") as model:  # doctest: +SKIP
    ...     logits = model(tokens)
    """
    d = Direction.coerce(direction)
    if d is Direction.BOTH:
        raise ConfigError("grafted() takes one direction, not 'both'")
    weights = _Weights(pair)
    with weights.swapped(d, weights.plan(_parts(components, pair.shape))) as model:
        yield model


def graft_values(
    engine: PatchEngine,
    weights: _Weights,
    direction: Direction,
    variants: Sequence[Sequence[_Part]],
    *,
    desc: str = "graft",
    skip_identical: bool = True,
) -> Tensor:
    """Metric per prompt ``[variant, batch]`` of the target run with each variant's parts grafted
    (one target forward per variant over prompt chunks of ``engine.budget`` rows, starting at
    the earliest grafted layer from the target's cached residual when prefix reuse is on)."""
    tgt = engine.states[direction.target]
    out = engine.metric_of(direction.target).repeat(len(variants), 1)  # clean runs (+ cache)
    batch = engine.prepared.batch_size
    chunk = min(batch, engine.budget)
    chunks = [slice(b0, min(b0 + chunk, batch)) for b0 in range(0, batch, chunk)]
    plans = [weights.plan(parts) for parts in variants]
    live = [v for v, p in enumerate(plans) if not skip_identical or weights.delta(p) != 0]
    # (a variant whose every grafted parameter equals the target's is the clean run, exactly)
    if engine.executor is not None:
        from mechdelta.patching._work import GraftWork, engine_fields, plan, run_work
        from mechdelta.scale.executor import merge

        shards = plan([(rows, (v,)) for v in live for rows in chunks])
        work = GraftWork(
            direction=direction,
            variants=tuple(tuple(p) for p in variants),
            jobs=tuple(shards),
            prefix_reuse=engine.prefix_reuse,
            desc=desc,
            **engine_fields(engine),
        )
        values = run_work(engine, work, (engine, weights))
        return merge(shards, values, out, range(len(variants)))
    for v in progress(live, desc=desc, enabled=engine.progress):
        start = weights.start(plans[v]) if engine.prefix_reuse else None
        if start is not None:
            engine.check_prefix_reuse(tgt)  # before the swap: the clean model must match
        with weights.swapped(direction, plans[v]):
            for rows in chunks:
                out[v, rows] = _graft_rows(engine, direction, start, rows)
    return out


def graft_shard(
    engine: PatchEngine,
    weights: _Weights,
    direction: Direction,
    parts: Sequence[_Part],
    rows: slice,
) -> Float[Tensor, "1 chunk"]:
    """One variant's metric per prompt of ``rows`` (a shard of :func:`graft_values`)."""
    engine.metric_of(direction.target)  # the clean runs (+ cache)
    plan_v = weights.plan(parts)
    start = weights.start(plan_v) if engine.prefix_reuse else None
    if start is not None:
        engine.check_prefix_reuse(engine.states[direction.target])
    with weights.swapped(direction, plan_v):
        return _graft_rows(engine, direction, start, rows)[None]


def _graft_rows(
    engine: PatchEngine, direction: Direction, start: int | None, rows: slice
) -> Float[Tensor, " chunk"]:
    tgt = engine.states[direction.target]
    positions = engine.inputs.positions[rows]
    if start is None:
        logits = tgt.runner.logits_at(positions, tokens=engine.tokens[rows])
    else:
        resid = tgt.cache[f"blocks.{start}.hook_resid_pre"][rows]
        logits = tgt.runner.logits_at(positions, resid=resid, start_layer=start)
    return engine.prepared.metric(logits, engine.inputs.select(rows)).cpu()


def _directions(
    engine: PatchEngine,
    weights: _Weights,
    direction: Direction | str,
    variants: Sequence[Sequence[_Part]],
    boot: Bootstrap,
    desc: str,
) -> Iterator[tuple[Direction, Tensor, Tensor, ShiftResult]]:
    """Per single direction: the variants' metric per prompt, their score CIs, the shift."""
    d = Direction.coerce(direction)
    shift = engine_shift(engine, boot)
    for single in d.singles:
        values = graft_values(engine, weights, single, variants, desc=f"{desc} {single.value}")
        ci = score_ci(
            shift.reference,
            shift.intervened,
            values,
            boot,
            toward_reference=single.toward_reference,
        )
        yield single, values, ci, shift


def graft(
    pair: ModelPair,
    task: Task,
    components: Component_ | Iterable[Component_],
    direction: Direction | str = Direction.INTERVENED_TO_REFERENCE,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    batch_budget: BatchBudget = None,
    prefix_reuse: bool = True,
) -> PatchResult | BothDirections[PatchResult]:
    """Run the *target* model with ``components``' parameters taken from the *source* model,
    everything recomputed, and measure the task's metric (node-level graft semantics).

    ``direction="intervened->reference"`` (default) grafts intervened parameters into the
    reference model (score: fraction of the shift the components carry);
    ``"reference->intervened"`` grafts reference parameters into the intervened model (fraction
    of the shift undone); ``"both"`` returns a :class:`~mechdelta.patching.results.BothDirections`.

    A head takes its own slices of W_Q, W_K, W_V (and biases) and of W_O; the layer's shared
    attention output bias b_O stays the target's. Under grouped-query attention a head also takes
    its group's K/V slices, so the keys and values of the other heads of its group change too.
    An MLP takes all its weights and its norm (``ln2``). See the module docstring for
    ``attn_out``, ``embed``, ``unembed`` and q/k/v-only grafts.

    ``components``: Sites or shorthands (``"L1H2"``, ``"L0.mlp_out"``, ``"L0.attn_out"``,
    ``"embed"``, ``"unembed"``) or graph Nodes (``Node("logits")`` = ``"unembed"``); whole
    components only (no positions). The result's ``sites`` are the components that are Sites
    (``unembed`` is not a Site: it is listed in ``provenance["components"]``);
    ``activation_delta`` holds each component's relative parameter change
    ``||θ_I - θ_R|| / ||θ_R||`` in ``provenance["components"]`` order; ``provenance["semantics"]``
    is ``"graft"``. ``prefix_reuse`` starts each grafted run at the earliest grafted layer.
    """
    parts = _parts(components, pair.shape)
    if not parts:
        raise SiteError(
            "graft() needs at least one component: an empty graft is the target's clean run. "
            "Give components, e.g. graft(pair, task, ['L1H2', 'L0.mlp_out'])"
        )
    parts = tuple(sorted(parts, key=lambda p: p.kind == "unembed"))  # Sites first, then unembed
    engine = PatchEngine(pair, task, batch_budget=batch_budget, prefix_reuse=prefix_reuse)
    weights, boot = _Weights(pair), Bootstrap(n_boot, alpha, seed)
    provenance = {
        **engine.provenance(),
        "seed": seed,
        "semantics": "graft",
        "components": [str(p) for p in parts],
    }
    delta = tuple(weights.delta(weights.plan([p])) for p in parts)
    results = [
        PatchResult(
            sites=tuple(s for s in (p.site for p in parts) if s is not None),
            direction=single,
            per_prompt=values[0].float(),
            ci=(float(ci[0, 0]), float(ci[0, 1])),
            shift=shift,
            activation_delta=delta,
            provenance=dict(provenance),
        )
        for single, values, ci, shift in _directions(
            engine, weights, direction, [parts], boot, "graft"
        )
    ]
    return BothDirections(*results) if len(results) == 2 else results[0]


def graft_sweep(
    pair: ModelPair,
    task: Task,
    component: Component | str,
    direction: Direction | str,
    *,
    per_position: bool,
    heads: Sequence[int] | None,
    layers: Sequence[int] | None,
    positions: Sequence[int] | None,
    neurons: Sequence[int] | None,
    batch_budget: BatchBudget,
    n_boot: int,
    alpha: float,
    seed: int,
    progress: bool | None,
    prefix_reuse: bool,
    executor: Any = None,
) -> SweepResult | BothDirections[SweepResult]:
    """``sweep(..., semantics="graft")``: each site of the grid grafted on its own."""
    from mechdelta.patching.sweep import axis_tokens, engine_grid

    comp = Component.coerce(component)
    if per_position or positions is not None:
        raise ConfigError(
            "semantics='graft' transplants whole components (parameters have no position): "
            "drop per_position= / positions=, or use semantics='splice'"
        )
    if comp not in _KIND_OF:
        raise ConfigError(f"semantics='graft' cannot sweep {comp.value!r}; use {_GRAFTABLE}")
    engine = PatchEngine(
        pair,
        task,
        batch_budget=batch_budget,
        progress=progress,
        prefix_reuse=prefix_reuse,
        executor=executor,
    )
    comp, dims, coords, sites = engine_grid(
        engine, comp, "sweep", layers=layers, heads=heads, neurons=neurons
    )
    weights, boot = _Weights(pair), Bootstrap(n_boot, alpha, seed)
    variants = [(_part(s, engine.shape),) for s in sites]
    shape = tuple(len(coords[k]) for k in dims)
    delta = torch.tensor([weights.delta(weights.plan(v)) for v in variants]).reshape(shape)
    tokens, shared_tokens = axis_tokens(engine.prepared)
    provenance = {**engine.provenance(), "seed": seed, "semantics": "graft"}
    results = [
        SweepResult(
            component=comp,
            direction=single,
            dims=dims,
            coords=coords,
            per_prompt=values.float().reshape(*shape, -1),
            ci=ci.reshape(*shape, 2),
            shift=shift,
            activation_delta=delta,
            tokens=tokens,
            shared_tokens=shared_tokens,
            provenance=dict(provenance),
        )
        for single, values, ci, shift in _directions(
            engine, weights, direction, variants, boot, f"graft {comp.value}"
        )
    ]
    return BothDirections(*results) if len(results) == 2 else results[0]

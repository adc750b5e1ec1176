"""The cross-model patching engine behind :func:`~mechdelta.patch` and :func:`~mechdelta.sweep`.

One engine holds a prepared task, both models' clean runs (metric per prompt, and the cached
activations patches read), and runs *variants*: each variant is a set of sites spliced jointly
from the source model into the target model. Variants are stacked along the batch (variant-major
rows ``v * B_chunk + b``) up to ``batch_budget`` rows per forward, sorted by layer so each stacked
pass starts at the earliest patched layer from the target's cached residual (prefix reuse, see
:mod:`mechdelta.patching._runner`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.metrics import MetricInputs
from mechdelta.core.progress import progress
from mechdelta.core.sites import Component, ModelShape, Site, union
from mechdelta.core.task import PreparedTask, Task
from mechdelta.errors import PatchingError, SiteError
from mechdelta.patching._checks import check_effective, output_projection
from mechdelta.patching._hooks import AttnOutPlan, at_rows, attn_out_writer, capture, writer
from mechdelta.patching._runner import CacheHooks, Hook, ModelRunner, prefix_cache
from mechdelta.scale._devices import DeviceRunner, pair_devices
from mechdelta.scale._memory import (
    BatchBudget,
    check_budget,
    empty_peak,
    measure_peak,
    resolve_budget,
)
from mechdelta.scale.executor import coerce_executor

__all__ = ["PatchEngine"]

DEFAULT_BATCH_BUDGET = 64


@dataclass
class _ModelState:
    name: str
    runner: ModelRunner
    cache: dict[str, Tensor] = field(default_factory=dict)
    metric: Tensor | None = None  # [batch]
    logits: Tensor | None = None  # [batch, k, d_vocab] at the read positions
    kv: list[tuple[Tensor, Tensor]] | None = None  # clean keys/values (HF or TL-native)
    probed: set[tuple[Component, int]] = field(
        default_factory=set
    )  # (kind, layer) seen to take edits
    prefix_checked: bool = False
    kv_checked: bool = False
    w_o: dict[int, Tensor] = field(default_factory=dict)  # layer -> [head, d_head, d_model]
    mid_checked: set[int] = field(default_factory=set)  # layers whose resid_mid is pre + attn_out


def _start_layer(site: Site) -> int | None:
    """The block a patched run may start at (None: the embedding, start from tokens)."""
    return None if site.kind is Component.EMBED else site.layer


class PatchEngine:
    """Clean runs of both models plus batched patched runs; see the module docstring."""

    def __init__(
        self,
        pair: Any,
        task: Task,
        *,
        sites: Iterable[Site] = (),
        batch_budget: BatchBudget = None,
        prefix_reuse: bool = True,
        skip_identical: bool = True,
        progress: bool | None = None,
        executor: Any = None,
    ) -> None:
        requested = DEFAULT_BATCH_BUDGET if batch_budget is None else batch_budget
        check_budget(requested)  # before anything slow; "auto" is resolved once the task is
        self.pair = pair
        self.shape: ModelShape = pair.shape
        self.progress = progress
        # Prompts, metric inputs and logits live on the home device (the reference's); each
        # model's cached activations on its own (they differ for a two-device pair).
        self.device = pair.device
        ref_dev, itv_dev = pair_devices(pair)
        self.devices: dict[str, torch.device] = {"reference": ref_dev, "intervened": itv_dev}
        #: devices the peak memory is measured on, and the largest peak so far (see provenance)
        self.memory_devices: tuple[torch.device, ...] = (ref_dev, itv_dev)
        self.peak_memory: dict[str, Any] = empty_peak(self.memory_devices)
        cfg = pair.cfg
        vocabulary = getattr(pair, "vocabulary", None)
        if vocabulary is not None:  # a shared-vocabulary pair: name any appended token used
            vocabulary.check_task(task)
        self.prepared: PreparedTask = task.prepare(
            pair.tokenizer, n_ctx=int(cfg.n_ctx), d_vocab=int(cfg.d_vocab)
        )
        self.budget = resolve_budget(requested, pair, self.prepared)
        self.budget_auto = isinstance(requested, str)
        self.tokens = self.prepared.tokens.to(self.device)
        self.inputs: MetricInputs = self.prepared.inputs.to(self.device)
        # DeviceRunner: tokens go to its model's device, logits come back to self.device (moves
        # are no-ops on one device)
        self.states = {
            key: _ModelState(key, DeviceRunner(getattr(pair, key), prefix_reuse, home=self.device))
            for key in ("reference", "intervened")
        }
        self._cached_names: set[str] = set()
        self._deltas: dict[tuple[str, Site], float] = {}
        self.skip_identical = skip_identical
        self.last_run_variants = 0
        self.prefix_reuse = prefix_reuse
        #: where :meth:`run`'s stacked forwards run (None: this process, the plain loop; see
        #: :mod:`mechdelta.scale.executor`).
        self.executor = coerce_executor(executor)
        #: the largest peak memory of one shard on an executor's worker (None: none ran there)
        self.worker_peak: dict[str, Any] | None = None
        self._initial_sites = tuple(sites)
        if self._initial_sites:  # else the first metric_of / run does it, with its own sites
            self.clean_run(self._initial_sites)

    # --- clean runs ----------------------------------------------------------------------------

    @measure_peak
    def clean_run(self, sites: Iterable[Site] = ()) -> None:
        """Run both models once, caching what the given sites read (again only if new names)."""
        names = {f"blocks.{layer}.hook_resid_pre" for layer in range(self.shape.n_layers)}
        for site in sites:
            site.validate(self.shape, self.prepared.frame_len)
            if site.position is not None:
                # position p must be the same token in every prompt (not padding in some)
                self.prepared.require_aligned(f"a patch at a fixed position ({site})")
            names.add(site.read_hook_name)
            names.add(site.hook_name)
        if names <= self._cached_names and self.states["reference"].metric is not None:
            return
        for key in ("reference", "intervened"):
            known = self.states[key].runner.model.hook_dict
            absent = sorted(n for n in names if n not in known)
            if absent:
                raise SiteError(
                    f"the {key} model has no hook {absent[0]!r}: this architecture does not "
                    "expose that activation (e.g. parallel attention/MLP blocks have no resid_mid)"
                )
        names |= self._cached_names
        metric = self.prepared.metric
        for key in ("reference", "intervened"):
            state = self.states[key]
            state.runner.record_block_convention(self.tokens)
            cacher = CacheHooks(sorted(names))
            logits = state.runner.logits_at(
                self.inputs.positions, tokens=self.tokens, hooks=cacher.hooks()
            )
            cacher.check()
            state.cache = cacher.store
            state.logits = logits
        if metric.needs_reference:
            ref = self.states["reference"].logits
            assert ref is not None
            self.inputs = self.inputs.with_reference(ref.float().log_softmax(-1))
        for state in self.states.values():
            assert state.logits is not None
            state.metric = metric(state.logits, self.inputs).cpu()
        self._cached_names = names
        for state in self.states.values():
            state.prefix_checked = state.kv_checked = False
            state.kv = None

    def _clean_mismatch(self, state: _ModelState, got: Tensor, rows: slice) -> float | None:
        """Max |Δ logit| of a shortcut run against the clean run when beyond tolerance, else None."""
        want = state.logits
        assert want is not None
        diff = (got - want[rows]).abs().max().item()
        return diff if diff > 1e-4 * max(1.0, want.abs().max().item()) else None

    def check_prefix_reuse(self, state: _ModelState) -> None:
        """Starting mid-stack from the cached residual must reproduce the clean run (checked on
        two prompts from the last block, once per model, before the first patched run uses it)."""
        if state.prefix_checked:
            return
        layer = self.shape.n_layers - 1
        rows = slice(0, min(2, self.prepared.batch_size))
        resid = state.cache[f"blocks.{layer}.hook_resid_pre"][rows]
        got = state.runner.logits_at(self.inputs.positions[rows], resid=resid, start_layer=layer)
        diff = self._clean_mismatch(state, got, rows)
        if diff is not None:
            raise PatchingError(
                f"prefix reuse does not reproduce the {state.name} model's clean run "
                f"(max |Δ logit| = {diff:.3g}); pass prefix_reuse=False for this architecture"
            )
        state.prefix_checked = True

    def _key_values(self, state: _ModelState) -> list[tuple[Tensor, Tensor]] | None:
        """The model's clean KV cache for position reuse, if it keeps one and starting
        mid-sequence from it reproduces the clean run (checked once per model)."""
        if state.kv_checked:
            return state.kv
        state.kv_checked = True
        layer = self.shape.n_layers - 1
        rows = slice(0, min(2, self.prepared.batch_size))
        positions = self.inputs.positions[rows]
        p0 = int(positions.min())
        kv = state.runner.key_values(self.tokens) if p0 > 0 else None
        if kv is not None:
            got = state.runner.logits_at(
                positions - p0,
                resid=state.cache[f"blocks.{layer}.hook_resid_pre"][rows, p0:],
                start_layer=layer,
                past_key_values=prefix_cache(kv, rows, p0, 1),
            )
            if self._clean_mismatch(state, got, rows) is not None:
                kv = None
        state.kv = kv
        return kv

    def provenance(self) -> dict[str, Any]:
        """Where a result came from: environment, both models' hashes, the prompts' hash."""
        from mechdelta.core.provenance import environment

        return {
            **environment(),
            "models": self.pair.provenance_models(),
            "task": self.prepared.info(),
            "engine": {
                "batch_budget": self.budget,
                "batch_budget_auto": self.budget_auto,
                "peak_memory": dict(self.peak_memory),
                "worker_peak_memory": self.worker_peak,
                "executor": {"kind": "local"} if self.executor is None else self.executor.info(),
                "prefix_reuse": self.prefix_reuse,
                "position_reuse": {
                    k: v.kv is not None for k, v in self.states.items() if v.kv_checked
                },
            },
        }

    def metric_of(self, which: str) -> Float[Tensor, " batch"]:
        """The clean metric per prompt of ``"reference"`` or ``"intervened"`` (runs both models
        the first time, caching what the sites given so far read)."""
        if self.states[which].metric is None:
            self.clean_run(self._initial_sites)
        m = self.states[which].metric
        assert m is not None
        return m

    # --- patched runs --------------------------------------------------------------------------

    @measure_peak
    def run(
        self, direction: Direction, variants: Sequence[Sequence[Site]], desc: str = "patching"
    ) -> Float[Tensor, "variant batch"]:
        """Metric per prompt for each variant (a set of sites spliced jointly)."""
        if direction is Direction.BOTH:
            raise PatchingError("run() takes one direction; call it once per direction")
        src = self.states[direction.source]
        tgt = self.states[direction.target]
        flat = {s for v in variants for s in v}
        self.clean_run(flat)
        if flat:
            self.check_effective(tgt, {(s.kind, s.layer) for s in flat})
        batch = self.prepared.batch_size
        chunk_b = min(batch, self.budget)
        per_v = max(1, self.budget // chunk_b)
        out = self.metric_of(direction.target).repeat(len(variants), 1)
        # A variant whose every site holds bitwise-equal activations in both models is a no-op:
        # its patched run *is* the target's clean run, so it is not run at all (exact, and free).
        live = [
            i
            for i, v in enumerate(variants)
            if self.skip_identical is False or any(self.site_delta(direction, s) > 0 for s in v)
        ]
        order = sorted(live, key=lambda i: self._variant_key(variants[i]))
        jobs = [
            (slice(b0, min(b0 + chunk_b, batch)), order[v0 : v0 + per_v])
            for b0 in range(0, batch, chunk_b)
            for v0 in range(0, len(order), per_v)
        ]
        self.last_run_variants = len(order)
        if self.executor is not None:
            from mechdelta.patching._work import execute_sites

            return execute_sites(self, direction, variants, jobs, out, desc)
        for rows, chunk in progress(jobs, total=len(jobs), desc=desc, enabled=self.progress):
            values = self._run_chunk(src, tgt, rows, [variants[i] for i in chunk])
            out[chunk, rows] = values.cpu()
        return out

    def site_delta(self, direction: Direction, site: Site) -> float:
        """Norm of (source - target) clean activation at the site, over all prompts.

        For ``head_out`` it is the difference of the head's own writes ``z_h @ W_O[h]``.
        """
        key = (direction.source, site)
        if key in self._deltas:
            return self._deltas[key]
        src = self.states[direction.source]
        tgt = self.states[direction.target]
        if not {site.read_hook_name, site.hook_name} <= self._cached_names:
            self.clean_run([site])
        every = slice(0, self.prepared.batch_size)
        a = self.read(src, site, every)
        b = self.read(tgt, site, every).to(a.device)
        value = float((a.float() - b.float()).norm())
        self._deltas[key] = value
        self._deltas[(direction.target, site)] = value
        return value

    def _variant_key(self, variant: Sequence[Site]) -> tuple[int, int]:
        positions = [s.position for s in variant]
        first = (
            -1 if any(p is None for p in positions) else min(p for p in positions if p is not None)
        )
        return self._variant_start(variant), first

    def _variant_start(self, variant: Sequence[Site]) -> int:
        starts = [_start_layer(s) for s in variant]
        if not starts or any(s is None for s in starts):
            return -1
        return min(s for s in starts if s is not None)

    def _run_chunk(
        self,
        src: _ModelState,
        tgt: _ModelState,
        rows: slice,
        variants: list[Sequence[Site]],
    ) -> Float[Tensor, "variant batch"]:
        n_v = len(variants)
        n_b = rows.stop - rows.start
        start = min(self._variant_start(v) for v in variants)
        positions = self.inputs.positions[rows].repeat(n_v, 1)
        # Position reuse: positions before the earliest patched (and read) one are unchanged in
        # every layer, so the run covers positions p0.. only, with the clean KV cache for < p0.
        p0 = 0
        if start >= 0 and self.prefix_reuse:
            self.check_prefix_reuse(tgt)
            first = min(self._variant_key(v)[1] for v in variants)
            aligned = self.prepared.frame_offsets is None
            if first > 0 and aligned and int(positions.min()) > 0 and self._key_values(tgt):
                p0 = min(first, int(positions.min()))
        hooks, fired, expected = self._build_hooks(src, tgt, rows, variants, p0)
        runner = tgt.runner
        if start < 0:
            logits = runner.logits_at(
                positions, tokens=self.tokens[rows].repeat(n_v, 1), hooks=hooks
            )
        else:
            resid = tgt.cache[f"blocks.{start}.hook_resid_pre"][rows, p0:]
            resid = resid.repeat(n_v, 1, 1)
            past = None if p0 == 0 or tgt.kv is None else prefix_cache(tgt.kv, rows, p0, n_v)
            logits = runner.logits_at(
                positions - p0, resid=resid, start_layer=start, hooks=hooks, past_key_values=past
            )
        missing = expected - fired
        if missing:
            raise PatchingError(
                f"hooks {sorted(missing)} never fired in the {tgt.name} model's patched run: the "
                "bridge does not route this activation through its hook"
            )
        inputs = self.inputs.select(rows).repeat(n_v)
        values = self.prepared.metric(logits, inputs)
        return values.reshape(n_v, n_b)

    # --- hooks ---------------------------------------------------------------------------------

    def _build_hooks(
        self,
        src: _ModelState,
        tgt: _ModelState,
        rows: slice,
        variants: list[Sequence[Site]],
        p0: int = 0,
    ) -> tuple[list[Hook], set[str], set[str]]:
        """Hooks writing each variant's source values into its rows; the run's position axis
        starts at ``p0`` (position reuse), source values are indexed by absolute position.

        A variant splices the *union* of its sites' activations (:func:`~mechdelta.core.sites.union`):
        covered sites are dropped, and at a layer's attention output the heads' write corrections
        (``head_out``, additive on the live z) run *before* any replacement of ``attn_out``, while
        ``hook_z`` replacements run before z is captured for them, so no change is counted twice
        and the order of the sites never matters.
        """
        n_b = rows.stop - rows.start
        dev = self.devices[tgt.name]  # source values and indices move to the target's device
        writes: dict[str, list[tuple[tuple[Any, ...], Tensor]]] = defaultdict(list)
        head_out: dict[int, list[tuple[slice, Any, int, Tensor]]] = defaultdict(list)
        mid: dict[int, list[tuple[tuple[Any, ...], Tensor]]] = defaultdict(list)
        for v, variant in enumerate(variants):
            vrows = slice(v * n_b, (v + 1) * n_b)
            for site in union(variant):
                if site.position is None and p0:
                    raise PatchingError("an all-position site cannot run with position reuse")
                pos = self._pos(rows, site)
                at = pos - p0 if isinstance(pos, int) else pos
                if isinstance(at, Tensor):
                    at = at.to(dev)
                if site.kind is Component.HEAD_OUT:
                    assert site.head is not None
                    c_src = self.read(src, site, rows).to(dev)
                    head_out[site.layer].append((vrows, at, site.head, c_src))
                elif site.kind is Component.RESID_MID:
                    self._check_resid_mid(tgt, site.layer)
                    mid[site.layer].append(
                        (self._index(site, vrows, at), self.read(src, site, rows).to(dev))
                    )
                else:
                    value = self.read(src, site, rows).to(dev)
                    writes[site.hook_name].append((self._index(site, vrows, at), value))
        fired: set[str] = set()
        hooks: list[Hook] = []
        layers = sorted(set(head_out) | set(mid))
        out_names = {f"blocks.{layer}.hook_attn_out" for layer in layers}
        for name, ops in writes.items():
            if name not in out_names:  # attn_out replacements go into the layer's own hook
                hooks.append((name, writer(name, ops, fired)))
        for layer in layers:
            out_name = f"blocks.{layer}.hook_attn_out"
            live: dict[str, Tensor] = {}
            if head_out[layer]:
                # after any hook_z writer above: the correction must see the z W_O actually reads
                z_name = f"blocks.{layer}.attn.hook_z"
                hooks.append((z_name, capture(z_name, "z", live, fired)))
            if mid[layer]:
                pre_name = f"blocks.{layer}.hook_resid_pre"
                hooks.append((pre_name, capture(pre_name, "resid_pre", live, fired)))
            w_tgt = self._w_o(tgt, layer) if head_out[layer] else None
            plan = AttnOutPlan(head_out[layer], writes.get(out_name, []), mid[layer], live, w_tgt)
            hooks.append((out_name, attn_out_writer(out_name, plan, fired)))
        expected = {name for name, _ in hooks}
        return hooks, fired, expected

    def _pos(self, rows: slice, site: Site) -> Any:
        """The site's position along the activation's position axis for prompts ``rows``: a
        slice (every position), an int, or one position per prompt (right-aligned ragged
        prompts: frame position p is token ``len_i - k + p`` of prompt i)."""
        if site.position is None:
            return slice(None)
        offsets = self.prepared.frame_offsets
        if offsets is None:
            return site.position
        return offsets[rows].to(self.device) + site.position

    def _index(self, site: Site, rows: slice, pos: Any) -> tuple[Any, ...]:
        """Index of the site's activation for batch ``rows`` at ``pos`` (see :meth:`_pos`)."""
        idx = site.index(self.shape)
        axis = 2 if site.kind is Component.HEAD_PATTERN else 1
        return (*at_rows(rows, pos)[:1], *idx[1:axis], pos, *idx[axis + 1 :])

    def read(self, state: _ModelState, site: Site, rows: slice) -> Tensor:
        """The site's clean activation in ``state``'s model for prompts ``rows``; for
        ``head_out`` the head's own write ``z_h @ W_O[h]``."""
        pos = self._pos(rows, site)
        if isinstance(pos, Tensor):  # per-prompt positions index the state's own cache
            pos = pos.to(self.devices[state.name])
        if site.kind is Component.HEAD_OUT:
            assert site.head is not None
            z = state.cache[f"blocks.{site.layer}.attn.hook_z"]
            return z[(*at_rows(rows, pos), site.head)] @ self._w_o(state, site.layer)[site.head]
        return state.cache[site.read_hook_name][self._index(site, rows, pos)]

    def _check_resid_mid(self, state: _ModelState, layer: int) -> None:
        """A resid_mid splice writes ``source resid_mid - live resid_pre`` into the attention
        output: valid where the residual after attention is ``resid_pre + attn_out`` (checked
        on the clean run, once per model and layer)."""
        if layer in state.mid_checked:
            return
        mid = state.cache[f"blocks.{layer}.hook_resid_mid"]
        pre = state.cache[f"blocks.{layer}.hook_resid_pre"]
        out = state.cache[f"blocks.{layer}.hook_attn_out"]
        err = (pre + out - mid).abs().max().item()
        if err > 1e-4 * max(1.0, mid.abs().max().item()):
            raise PatchingError(
                f"in the {state.name} model the residual after attention is not resid_pre + "
                f"attn_out (max error {err:.3g}), so resid_mid cannot be spliced: patch "
                "attn_out or resid_post instead"
            )
        state.mid_checked.add(layer)

    def _w_o(self, state: _ModelState, layer: int) -> Float[Tensor, "head d_head d_model"]:
        """Each head's slice of the output projection, read off the module (any weight layout;
        checked against the clean run's ``z`` and attention output)."""
        return output_projection(self, state, layer)

    def check_effective(self, state: _ModelState, kinds: set[tuple[Component, int]]) -> None:
        """Writing noise into each patched hook must change the output (see
        :func:`mechdelta.patching._checks.check_effective`)."""
        check_effective(self, state, kinds)

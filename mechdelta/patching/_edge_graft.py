"""The ``"graft"`` hybrid forward behind ``patch_edges(..., semantics="graft")``.

The target model T runs. Along a circuit edge ``X -> R.input`` the sender X is computed with the
*source* model's parameters, along every other edge with T's, always on X's own hybrid inputs::

    R's input = T's live residual at R + Σ_{X -> R.input in C} (graftwrite_X - livewrite_X)

where ``graftwrite_X`` is X recomputed with the source's parameters on the *same* hybrid inputs
its live write used in this row (not the source run's cache: that is splice). What "X with the
source's parameters" takes matches node-level :func:`~mechdelta.patching.graft.graft`:

- ``embed``: the source's token (+ learned position) embeddings. Its input is the tokens, so the
  source run's cached embedding write is exact.
- a head ``L{l}H{h}``: the source's Q/K/V slices and biases (under grouped-query attention the
  K/V of its key/value group) and its W_O slice; the layer's ``ln1`` and ``b_O`` stay T's. It is
  computed in *shadow rows* appended after the hybrid rows: at ``hook_q/k/v`` (before rotary
  embeddings) the shadow rows of the grafted heads get the source projection (weights + biases)
  of T's ``ln1`` applied to the hybrid rows' per-head receiver inputs (q, k, v separately), the
  bridge computes rotary embeddings, scores, softmax and ``z``, and ``graftwrite = z_shadow[h] @
  W_O_source[h]``. Under GQA an edge from head h uses the source K/V of h's group for h only: the
  other heads of the group keep T's K/V along their own edges (node-level graft changes the
  whole group's K/V; the full circuit grafts every head, so the two agree there).
- an MLP: the source block's ``ln2`` and MLP modules on the hybrid rows' MLP input residual
  (T's residual at the MLP plus the MLP receiver's own edge deltas).
- the pseudo-member ``unembed`` (``Node("logits")``) is not a sender: with it, the logits of a
  circuit's rows are the source's final norm and unembedding applied to the hybrid final
  residual (handled by :class:`~mechdelta.patching.edges.EdgePatcher`).

The shadow rows' own residual stream is never read; they cost about one more forward per
stacked variant while any head sends along a circuit edge.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Node
from mechdelta.errors import PatchingError
from mechdelta.patching._edge_hooks import Hook, HybridPlan, _Pass, hybrid_hooks

__all__ = ["GraftPass", "check_premises", "clean_writes", "qkv_biases", "run_chunk"]


def qkv_biases(model: Any, n_heads: int, n_kv: int, d_head: int) -> dict[str, list[Tensor]]:
    """Per ``"q"``/``"k"``/``"v"`` and layer, each (key/value) head's projection bias
    ``[head, d_head]`` (zeros without biases), read by applying the module to zeros."""
    out: dict[str, list[Tensor]] = {"q": [], "k": [], "v": []}
    like = next(model.parameters())
    d_model = int(model.cfg.d_model)
    with torch.no_grad():
        for block in model.blocks:
            zero = torch.zeros(1, d_model, device=like.device, dtype=like.dtype)
            for x, n in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                out[x].append(getattr(block.attn, x)(zero)[0].reshape(n, d_head))
    return out


class GraftPass(_Pass):
    """A hybrid pass whose redirected edges carry graft writes (see the module docstring). The
    forward holds ``2 * V * B`` rows when ``shadow`` (heads among the senders), else ``V * B``."""

    graft = True

    def __init__(
        self,
        *args: Any,
        source: Any,
        w_src: Any,
        b_src: dict[str, list[Tensor]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.w_src = w_src  # the source's per-head projections (q, k, v, o lists)
        self.b_src = b_src
        self.shadow_z: dict[int, Tensor] = {}
        self.graft_heads: dict[int, list[int]] = {}
        for s in self.plan.senders:
            if s.kind == "head":
                assert s.layer is not None and s.head is not None
                self.graft_heads.setdefault(s.layer, []).append(s.head)

    def capture(self, name: str, key: str, x: Tensor, hook: Any = None) -> None:
        if not self.busy and key.startswith("z.") and x.shape[0] > self.n_rows:
            self.shadow_z[int(key[2:])] = x[self.n_rows :]
        super().capture(name, key, x, hook)

    def edit_heads(
        self, name: str, which: str, layer: int, receivers: list[str], x: Tensor, hook: Any = None
    ) -> Tensor | None:
        """The hybrid rows as in a splice; the shadow rows of each grafted head (its key/value
        head for k/v) get the source projection of T's ``ln1`` of its own receiver input."""
        if self.busy:
            return None
        edited = super().edit_heads(name, which, layer, receivers, x)
        out = x.clone() if edited is None else edited
        heads = self.graft_heads.get(layer, [])
        if not heads or x.shape[0] <= self.n_rows:
            return edited
        group = 1 if which == "q" else self.group
        units = sorted({h // group for h in heads})
        w = self.w_src[which][layer]
        if x.shape[2] != w.shape[0]:
            raise PatchingError(
                f"{name} holds {x.shape[2]} heads but the source's {which} projection has "
                f"{w.shape[0]}: this bridge lays out its attention activations unexpectedly"
            )
        resid = self.raw[f"resid1.{layer}"]
        inputs = [f"L{layer}H{u * group}.{which}" for u in units]
        edited_inputs = [r for r in inputs if r in self.plan.masks]
        base = resid[None].expand(len(units), *resid.shape).clone()
        if edited_inputs:
            d, _ = self.delta(edited_inputs, resid)  # 0 in rows that redirect nothing
            for j, r in enumerate(edited_inputs):
                base[inputs.index(r)] += d[j].to(base.dtype)
        self.busy = True
        try:
            normed = self.model.blocks[layer].ln1(base)  # T's ln1: [unit, VB, pos, d_model]
        finally:
            self.busy = False
        proj = torch.einsum("ubpd,ude->ubpe", normed, w[units].to(normed.dtype))
        proj = proj + self.b_src[which][layer][units][:, None, None].to(proj.dtype)
        n = self.n_rows
        for j, u in enumerate(units):
            out[n:, :, u] = proj[j].to(x.dtype)
        self.fired.add(name)
        return out

    def other_write(self, node: Node, live: Tensor) -> Tensor:
        """The graft write of a sender in every hybrid row, ``[V, B, pos, d_model]`` (embed: the
        source's cached embedding write, ``[1, B, pos, d_model]``)."""
        if node.kind == "embed":
            return self.cached[node][None]
        assert node.layer is not None
        shape = (self.n_v, self.n_b, *live.shape[1:])
        if node.kind == "mlp":
            resid = self.raw[f"resid2.{node.layer}"]
            if node.layer in self.mlp_delta:
                resid = resid + self.mlp_delta[node.layer].to(resid.dtype)
            block = self.source.blocks[node.layer]
            with torch.no_grad():
                return block.mlp(block.ln2(resid)).reshape(shape)
        assert node.head is not None
        if node.layer not in self.shadow_z:
            raise PatchingError(
                f"the shadow rows of layer {node.layer} never reached hook_z: this bridge does "
                "not route attention through its hooks, so heads cannot be grafted per edge"
            )
        z = self.shadow_z[node.layer][:, :, node.head]
        return (z @ self.w_src["o"][node.layer][node.head].to(z.dtype)).reshape(shape)


# --- driving a graft pass from an EdgePatcher ------------------------------------------------


def check_premises(patcher: Any, which: str) -> None:
    """The source modules a graft calls must reproduce that model's own clean run: each block's
    ``mlp(ln2(ln2.hook_in)) = hook_mlp_out`` (once per model; PatchingError otherwise)."""
    from mechdelta.patching.edges import _VERIFIED, _capture

    model = patcher.pair.model(which)
    done = _VERIFIED.setdefault(model, set())
    if ("graft", -1) in done or not patcher.layout.has_mlp:
        return
    n_layers = patcher.graph.shape.n_layers
    names = [f"blocks.{i}.{h}" for i in range(n_layers) for h in ("ln2.hook_in", "hook_mlp_out")]
    vals = _capture(model, patcher.engine.tokens[:2], names)
    problems = []
    with torch.no_grad():
        for layer in range(n_layers):
            got_in = vals[f"blocks.{layer}.ln2.hook_in"]
            want = vals[f"blocks.{layer}.hook_mlp_out"]
            block = model.blocks[layer]
            got = block.mlp(block.ln2(got_in))
            err = (got.double() - want.double()).abs().max().item()
            if err > 1e-4 * max(1.0, want.abs().max().item()):
                problems.append(f"layer {layer}'s mlp(ln2(x)) is not its hook_mlp_out")
    if problems:
        raise PatchingError(
            f"the {which} model's MLPs cannot be recomputed from their modules "
            f"({'; '.join(problems)}), so they cannot be grafted per edge"
        )
    done.add(("graft", -1))


def _biases(patcher: Any, which: str) -> dict[str, list[Tensor]]:
    if which not in patcher._bias:
        shape = patcher.graph.shape
        model = patcher.pair.model(which)
        d_head = int(patcher.pair.cfg.d_head)
        patcher._bias[which] = qkv_biases(model, shape.n_heads, shape.n_kv_heads, d_head)
    result: dict[str, list[Tensor]] = patcher._bias[which]
    return result


def _setup(
    patcher: Any, d: Direction, rows: slice, plan: HybridPlan, n_v: int
) -> tuple[GraftPass, list[Hook], Tensor, Tensor]:
    """A graft pass of ``plan`` on the prompts ``rows``, its hooks, and the stacked tokens and
    positions (the ``V * B`` hybrid rows, then as many shadow rows when heads send)."""
    n_b = rows.stop - rows.start
    embeds = [s for s in plan.senders if s.kind == "embed"]
    cached = patcher._cached_writes(d.source, rows, embeds)
    w, w_s = patcher._w(d.target), patcher._w(d.source)
    args: tuple[Any, ...] = (
        patcher.pair.model(d.target), patcher.graph, plan, cached,
        {"q": w.q, "k": w.k, "v": w.v}, w.o, patcher.layout.pos_embed, n_b, set(),
    )  # fmt: skip
    run = GraftPass(
        *args,
        source=patcher.pair.model(d.source),
        w_src={"q": w_s.q, "k": w_s.k, "v": w_s.v, "o": w_s.o},
        b_src=_biases(patcher, d.source),
    )
    hooks = hybrid_hooks(*args, run=run)
    copies = n_v * (2 if any(s.kind == "head" for s in plan.senders) else 1)
    positions = patcher.engine.inputs.positions[rows].repeat(copies, 1)
    tokens = patcher.engine.tokens[rows].repeat(copies, 1)
    return run, hooks, tokens, positions


def run_chunk(
    patcher: Any, d: Direction, rows: slice, sets: list[frozenset[Edge]], unembed: list[bool]
) -> Float[Tensor, "variant batch"]:
    """The metric per prompt ``[variant, batch]`` of graft circuits (edge sets, and whether
    each holds ``unembed``) on the prompts ``rows``, stacked in one target forward."""
    engine = patcher.engine
    n_v, n_b = len(sets), rows.stop - rows.start
    plan = HybridPlan.build(patcher.graph, sets)
    run, hooks, tokens, positions = _setup(patcher, d, rows, plan, n_v)
    final: dict[str, Tensor] = {}
    last = patcher.layout.final
    if any(unembed):
        hooks.append((last, partial(_keep, final)))  # after the edit of the final residual
    logits = engine.states[d.target].runner.logits_at(positions, tokens=tokens, hooks=hooks)
    logits = logits[: n_v * n_b]
    missing = {name for name, _ in hooks} - run.fired - {last}
    if missing:
        raise PatchingError(
            f"hooks {sorted(missing)} never fired in the {d.target} model's graft run: the "
            "bridge does not route these activations through its hooks"
        )
    if any(unembed):
        mask = torch.tensor(unembed).repeat_interleave(n_b).to(logits.device)
        src = engine.states[d.source].runner
        resid = final["x"][: n_v * n_b][mask]
        logits = logits.clone()
        logits[mask] = src.unembed_at(resid, positions[: n_v * n_b][mask]).to(logits.dtype)
    inputs = engine.inputs.select(rows).repeat(n_v)
    values: Tensor = engine.prepared.metric(logits, inputs).reshape(n_v, n_b)
    return values


def clean_writes(
    patcher: Any, d: Direction, rows: slice
) -> Float[Tensor, "sender batch pos d_model"]:
    """Per graph sender (graph order), its graft write on the target's clean inputs minus the
    target's clean write (float32), from one graft pass in which every sender is grafted and
    nothing is received (so the hybrid rows are the target's clean run)."""
    for which in (d.target, d.source):
        patcher._check(which)
    check_premises(patcher, d.source)
    plan = HybridPlan(list(patcher.graph.senders), {}, 1)
    run, hooks, tokens, positions = _setup(patcher, d, rows, plan, 1)
    patcher.engine.states[d.target].runner.logits_at(positions, tokens=tokens, hooks=hooks)
    out = []
    for s in plan.senders:
        live = run.live_write(s)
        out.append(run.other_write(s, live).reshape(live.shape).float() - live.float())
    return torch.stack(out)


def _keep(store: dict[str, Tensor], x: Tensor, hook: Any = None) -> None:
    store["x"] = x.detach()

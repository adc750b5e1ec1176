"""The hybrid forward behind :func:`~mechdelta.patching.edges.patch_edges`.

One model ``M`` runs (the target for ``"splice"``, the source for ``"ablate"``); a set of graph
edges ``E`` is *redirected*: along each edge ``S -> R.input`` in ``E`` the receiver input reads the
other model's cached clean write of ``S`` instead of ``M``'s live write of ``S``::

    R's input = M's live residual at R + Σ_{S -> R.input in E} (cached write_S - live write_S)

The residual stream itself is never edited; only the receiver's private copy is. How each receiver
input is reached through the TransformerLens 4 bridge's hooks:

- a head's ``q``/``k``/``v``: at ``blocks.L.attn.hook_q/k/v`` (the projection's output, *before*
  rotary embeddings, which the bridge applies after these hooks) the affected head's slice gets
  ``(ln1(resid + Δ) - ln1(resid)) @ W[h]``, with ``resid`` captured at ``blocks.L.ln1.hook_in``,
  the model's own ``ln1`` module (LayerNorm, RMSNorm, TL's processed norms alike) and ``W[h]``
  read off the projection module (biases cancel in the difference). Under grouped-query attention
  a ``k``/``v`` receiver is a key/value head;
- an MLP: ``blocks.L.mlp.hook_in`` (the output of ``ln2``, the MLP's own input; in TL 4
  ``hook_resid_mid`` is an alias of ``ln2.hook_in``, whose edit would change the residual stream)
  gets ``ln2(resid + Δ) - ln2(resid)`` with ``resid`` captured at ``blocks.L.ln2.hook_in``;
- ``logits``: the last block's ``hook_resid_post`` (read by the final norm) gets ``Δ``.

Live writes are captured in the same pass: ``hook_embed`` (+ ``hook_pos_embed``), each head's
``hook_z @ W_O[h]``, ``hook_mlp_out``. Variants (edge sets) are stacked along the batch
(variant-major rows ``v * B + b``); a receiver input is edited only in the rows of variants that
redirect at least one edge into it, and those rows get exactly 0 added otherwise.

The ``"graft"`` semantics (:mod:`mechdelta.patching._edge_graft`) subclasses :class:`_Pass`: the
other write of a sender is then computed in the same pass (the source's parameters on the
sender's own hybrid inputs), and heads need extra *shadow* rows appended after the ``V * B``
hybrid rows; every hook here edits and captures the hybrid rows only (``rows[:V * B]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import PatchingError

__all__ = ["HybridPlan", "hybrid_hooks"]

Hook = tuple[str, Callable[..., Any]]


@dataclass
class HybridPlan:
    """What one stacked forward redirects: per receiver input (``"L1H0.q"``, ``"MLP0"``,
    ``"logits"``), a ``[variant, sender]`` 0/1 mask over :attr:`senders`."""

    senders: list[Node]
    masks: dict[str, Tensor]
    n_variants: int

    @classmethod
    def build(cls, graph: Graph, variants: Sequence[frozenset[Edge]]) -> HybridPlan:
        used = {e.sender for v in variants for e in v}
        senders = [n for n in graph.senders if n in used]
        index = {n: i for i, n in enumerate(senders)}
        rows: dict[str, list[list[float]]] = {}
        for v, edges in enumerate(variants):
            for e in edges:
                m = rows.setdefault(e.receiver_input, [])
                if not m:
                    m.extend([0.0] * len(senders) for _ in variants)
                m[v][index[e.sender]] = 1.0
        masks = {r: torch.tensor(m).reshape(len(variants), len(senders)) for r, m in rows.items()}
        return cls(senders, masks, len(variants))


class _Pass:
    """One stacked forward: captures live writes and residuals, edits receiver inputs. Hooks are
    bound methods wrapped in ``functools.partial`` (no closures: cheap to build per forward)."""

    def __init__(
        self,
        model: Any,
        graph: Graph,
        plan: HybridPlan,
        cached: dict[Node, Tensor],
        w_in: dict[str, list[Tensor]],
        w_o: list[Tensor],
        pos_embed: bool,
        n_b: int,
        fired: set[str],
    ) -> None:
        self.model = model
        self.plan = plan
        self.cached = cached  # other model's write per sender, the chunk's prompts [B, pos, d]
        self.w_in = w_in
        self.w_o = w_o
        self.pos_embed = pos_embed
        self.n_v = plan.n_variants
        self.n_b = n_b
        self.fired = fired
        self.group = graph.shape.group_size
        self.raw: dict[str, Tensor] = {}
        self.mlp_delta: dict[int, Tensor] = {}  # per MLP receiver, its input's Δ [VB, pos, d]
        self.diffs: dict[Node, Tensor] = {}  # [V, B, pos, d_model]
        self.busy = False  # set while a hook calls a norm module (its hooks fire again)
        self.n_rows = self.n_v * n_b  # hybrid rows; a graft pass appends shadow rows after them

    #: whether the pass computes the other writes itself (graft: see ``_edge_graft``)
    graft = False

    # --- hooks -----------------------------------------------------------------------------

    def capture(self, name: str, key: str, x: Tensor, hook: Any = None) -> None:
        if not self.busy:
            self.raw[key] = x[: self.n_rows]
            self.fired.add(name)

    def edit_heads(
        self, name: str, which: str, layer: int, receivers: list[str], x: Tensor, hook: Any = None
    ) -> Tensor | None:
        """Each receiver head's slice of ``hook_q/k/v`` gets its own residual copy's projection
        difference ``(ln1(resid + Δ) - ln1(resid)) @ W[h]``."""
        if self.busy or not receivers:
            return None
        w = self.w_in[which][layer]
        if x.shape[2] != w.shape[0]:
            raise PatchingError(
                f"{name} holds {x.shape[2]} heads but the {which} projection has {w.shape[0]}: "
                "this bridge lays out its attention activations in an unexpected way"
            )
        group = 1 if which == "q" else self.group
        index = [_head(r) // group for r in receivers]
        resid = self.raw[f"resid1.{layer}"]
        d, rows = self.delta(receivers, resid)
        n = self.normed(self.model.blocks[layer].ln1, resid, d, rows)  # [R, VB, pos, d_model]
        proj = torch.einsum("rbpd,rde->rbpe", n, w[index].to(n.dtype))
        out = x.clone()
        k = self.n_rows
        for r, h in enumerate(index):
            out[:k, :, h] = out[:k, :, h] + proj[r].to(x.dtype)
        self.fired.add(name)
        return out

    def edit_mlp(self, name: str, layer: int, x: Tensor, hook: Any = None) -> Tensor | None:
        """``mlp.hook_in`` (= ln2's output) gets ``ln2(resid + Δ) - ln2(resid)``."""
        if self.busy:
            return None
        d, rows = self.delta([f"MLP{layer}"], x)
        ln2 = self.model.blocks[layer].ln2
        self.mlp_delta[layer] = d[0] * rows[0]
        out = _add_rows(x, self.normed(ln2, self.raw[f"resid2.{layer}"], d, rows)[0].to(x.dtype))
        self.fired.add(name)
        return out

    def edit_final(self, name: str, x: Tensor, hook: Any = None) -> Tensor | None:
        """The final residual (read by the final norm) gets ``Δ``."""
        if self.busy:
            return None
        d, rows = self.delta(["logits"], x)
        self.fired.add(name)
        return _add_rows(x, (d[0] * rows[0]).to(x.dtype))

    # --- arithmetic ------------------------------------------------------------------------

    def live_write(self, node: Node) -> Tensor:
        if node.kind == "embed":
            out = self.raw["embed"]
            return out + self.raw["pos_embed"] if self.pos_embed else out
        assert node.layer is not None
        if node.kind == "mlp":
            return self.raw[f"mlp_out.{node.layer}"]
        assert node.head is not None
        z = self.raw[f"z.{node.layer}"][:, :, node.head]
        return z @ self.w_o[node.layer][node.head].to(z.dtype)

    def other_write(self, node: Node, live: Tensor) -> Tensor:
        """The write a redirected edge carries instead of ``live``, ``[V or 1, B, pos, d]``:
        here the other model's cached clean write (splice, ablate)."""
        return self.cached[node][None]

    def delta(self, receivers: list[str], like: Tensor) -> tuple[Tensor, Tensor]:
        """Per receiver input, Σ over its redirected edges of (cached - live write), [R, VB,
        pos, d_model], and per receiver the rows that redirect anything, [R, VB, 1, 1]."""
        senders = self.plan.senders
        masks = torch.stack([self.plan.masks[r] for r in receivers]).to(like.device, like.dtype)
        cols = [i for i in range(len(senders)) if bool(masks[:, :, i].any())]
        for i in cols:
            s = senders[i]
            if s not in self.diffs:
                live = self.live_write(s)
                shape = (self.n_v, self.n_b, *live.shape[1:])
                self.diffs[s] = self.other_write(s, live).to(live.dtype) - live.reshape(shape)
        stack = torch.stack([self.diffs[senders[i]] for i in cols])  # [S, V, B, pos, d]
        d = torch.einsum("rvs,svbpd->rvbpd", masks[:, :, cols], stack)
        active = masks.any(-1).to(like.dtype)  # [R, V]
        rows = active[:, :, None].expand(-1, -1, self.n_b).reshape(len(receivers), -1)
        return d.reshape(len(receivers), -1, *d.shape[3:]), rows[:, :, None, None]

    def normed(self, norm: Any, resid: Tensor, d: Tensor, rows: Tensor) -> Tensor:
        """``(norm(resid + d) - norm(resid)) * rows`` for each receiver, [R, VB, pos, d]."""
        base = resid[None].expand_as(d)
        self.busy = True
        try:
            return (norm(base + d) - norm(base)) * rows
        finally:
            self.busy = False


def _add_rows(x: Tensor, add: Tensor) -> Tensor:
    """``x`` with ``add`` added to its first ``len(add)`` rows (the hybrid rows)."""
    if x.shape[0] == add.shape[0]:
        return x + add
    return torch.cat([x[: add.shape[0]] + add, x[add.shape[0] :]])


def _head(receiver: str) -> int:
    head = Edge.parse(f"embed -> {receiver}").receiver.head
    assert head is not None
    return head


def hybrid_hooks(
    model: Any,
    graph: Graph,
    plan: HybridPlan,
    cached: dict[Node, Tensor],
    w_in: dict[str, list[Tensor]],
    w_o: list[Tensor],
    pos_embed: bool,
    n_b: int,
    fired: set[str],
    *,
    run: _Pass | None = None,
) -> list[Hook]:
    """Hooks for one stacked forward of ``model``: captures of live writes and residuals, edits
    of the receiver inputs in ``plan``. ``cached``: the other model's write per sender (the
    chunk's prompts); ``w_in``: per ``"q"``/``"k"``/``"v"`` and layer ``[head, d_model, d_head]``;
    ``w_o``: per layer ``[head, d_head, d_model]`` of ``model``. ``run``: a prepared pass (a
    graft pass) instead of the plain one built from these arguments."""
    if run is None:
        run = _Pass(model, graph, plan, cached, w_in, w_o, pos_embed, n_b, fired)
    senders = set(plan.senders)
    hooks: list[Hook] = []

    def capture(name: str, key: str) -> None:
        hooks.append((name, partial(run.capture, name, key)))

    for layer in range(graph.shape.n_layers):
        heads = {
            x: [r for r in plan.masks if r.startswith(f"L{layer}H") and r.endswith(f".{x}")]
            for x in "qkv"
        }
        head_senders = any(s.kind == "head" and s.layer == layer for s in senders)
        shadow = run.graft and head_senders  # graft: the shadow rows' q/k/v are set here
        if any(heads.values()) or shadow:
            capture(f"blocks.{layer}.ln1.hook_in", f"resid1.{layer}")
        for x, receivers in heads.items():
            if receivers or shadow:
                name = f"blocks.{layer}.attn.hook_{x}"
                hooks.append((name, partial(run.edit_heads, name, x, layer, receivers)))
        if head_senders:
            capture(f"blocks.{layer}.attn.hook_z", f"z.{layer}")
        mlp_graft = run.graft and Node("mlp", layer) in senders
        if f"MLP{layer}" in plan.masks or mlp_graft:
            capture(f"blocks.{layer}.ln2.hook_in", f"resid2.{layer}")
        if f"MLP{layer}" in plan.masks:
            name = f"blocks.{layer}.mlp.hook_in"
            hooks.append((name, partial(run.edit_mlp, name, layer)))
        if Node("mlp", layer) in senders:
            capture(f"blocks.{layer}.hook_mlp_out", f"mlp_out.{layer}")
    if Node("embed") in senders:
        capture("hook_embed", "embed")
        if pos_embed:
            capture("hook_pos_embed", "pos_embed")
    if "logits" in plan.masks:
        name = f"blocks.{graph.shape.n_layers - 1}.hook_resid_post"
        hooks.append((name, partial(run.edit_final, name)))
    return hooks

"""Hooks of one stacked path-patching forward (:mod:`mechdelta.patching.paths`).

Each variant (a :class:`Plan`) makes some edges carry given writes: the receiver input gets the
carried write minus the live write of its sender (only the receiver's private copy: a head's
``hook_q/k/v`` slice gets ``(ln1(resid + Δ) - ln1(resid)) @ W[h]``, ``mlp.hook_in`` gets
``ln2(resid + Δ) - ln2(resid)``, the last ``hook_resid_post`` gets ``Δ``); :class:`Pass` holds
the hooks, captures the live writes and reads the writes a plan asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import PatchingError

__all__ = ["Pass", "Plan", "Stop", "halt"]


@dataclass(frozen=True)
class Plan:
    """One variant of a stacked forward: each ``(edge, write)`` makes the edge carry ``write``
    (the receiver input gets ``write - live write of the sender``); ``read``: the node whose new
    write is read (None: the metric is)."""

    carry: list[tuple[Edge, Tensor]]
    read: Node | None


class Stop(Exception):
    pass


def halt(x: Tensor, hook: Any) -> None:
    raise Stop


@dataclass
class _Group:
    """The variants editing one hook (one layer's q, k, v, MLP input, or the final residual):
    per entry the variant ``vi``, the head index ``hi`` in the hook's head axis (heads only), the
    sum of carried writes ``carry`` ``[E, B, pos, d_model]`` and which ``senders`` (``mask``
    ``[E, S]``) those writes replace."""

    vi: Tensor
    hi: Tensor
    carry: Tensor
    senders: list[Node]
    mask: Tensor


def _groups(plans: list[Plan], group_size: int) -> dict[tuple[str, int], _Group]:
    entries: dict[tuple[str, int], dict[tuple[int, int], list[tuple[Node, Tensor]]]] = {}
    for v, plan in enumerate(plans):
        for e, write in plan.carry:
            r = e.receiver
            if r.kind == "head":
                assert r.layer is not None and r.head is not None and e.input is not None
                key, h = (e.input, r.layer), r.head // (1 if e.input == "q" else group_size)
            elif r.kind == "mlp":
                assert r.layer is not None
                key, h = ("mlp", r.layer), 0
            else:
                key, h = ("logits", -1), 0
            entries.setdefault(key, {}).setdefault((v, h), []).append((e.sender, write))
    out = {}
    for key, by_entry in entries.items():
        senders = list(dict.fromkeys(s for hops in by_entry.values() for s, _ in hops))
        mask = torch.zeros(len(by_entry), len(senders))
        carry = []
        for i, hops in enumerate(by_entry.values()):
            carry.append(torch.stack([w for _, w in hops]).sum(0))
            for s, _ in hops:
                mask[i, senders.index(s)] = 1.0
        vi = torch.tensor([v for v, _ in by_entry])
        hi = torch.tensor([h for _, h in by_entry])
        out[key] = _Group(vi, hi, torch.stack(carry), senders, mask)
    return out


class Pass:
    """Hooks of one stacked forward (variant-major rows ``v * B + b``): captures of live writes
    and residuals, edits of receiver inputs (only the receiver's private copy: a head's
    ``hook_q/k/v`` slice gets ``(ln1(resid + Δ) - ln1(resid)) @ W[h]``, ``mlp.hook_in`` gets
    ``ln2(resid + Δ) - ln2(resid)``, the last ``hook_resid_post`` gets ``Δ``), reads of writes."""

    def __init__(
        self, model: Any, graph: Graph, plans: list[Plan], w: Any, pos_embed: bool, n_b: int
    ) -> None:
        self.model = model
        self.plans = plans
        self.w = w
        self.pos_embed = pos_embed
        self.n_v, self.n_b = len(plans), n_b
        self.raw: dict[str, Tensor] = {}
        self.live: dict[Node, Tensor] = {}
        self.fired: set[str] = set()
        self.busy = False  # set while a hook calls a norm module (its hooks fire again)
        self.groups = _groups(plans, graph.shape.group_size)
        used = {s for g in self.groups.values() for s in g.senders}
        used |= {p.read for p in plans if p.read is not None}
        hooks: list[tuple[str, Any]] = []

        def capture(name: str, key: str) -> None:
            hooks.append((name, partial(self.capture, name, key)))

        for layer in range(graph.shape.n_layers):
            heads = [x for x in "qkv" if (x, layer) in self.groups]
            if heads:
                capture(f"blocks.{layer}.ln1.hook_in", f"resid1.{layer}")
            for x in heads:
                name = f"blocks.{layer}.attn.hook_{x}"
                hooks.append((name, partial(self.edit_heads, name, x, layer)))
            if any(n.kind == "head" and n.layer == layer for n in used):
                capture(f"blocks.{layer}.attn.hook_z", f"z.{layer}")
            if ("mlp", layer) in self.groups:
                capture(f"blocks.{layer}.ln2.hook_in", f"resid2.{layer}")
                name = f"blocks.{layer}.mlp.hook_in"
                hooks.append((name, partial(self.edit_mlp, name, layer)))
            if Node("mlp", layer) in used:
                capture(f"blocks.{layer}.hook_mlp_out", f"mlp_out.{layer}")
        if Node("embed") in used:
            capture("hook_embed", "embed")
            if pos_embed:
                capture("hook_pos_embed", "pos_embed")
        if ("logits", -1) in self.groups:
            name = f"blocks.{graph.shape.n_layers - 1}.hook_resid_post"
            hooks.append((name, partial(self.edit_final, name)))
        self.hooks = hooks

    # --- hooks -----------------------------------------------------------------------------

    def capture(self, name: str, key: str, x: Tensor, hook: Any = None) -> None:
        if not self.busy:
            self.raw[key] = x
            self.fired.add(name)

    def edit_heads(self, name: str, which: str, layer: int, x: Tensor, hook: Any = None) -> Any:
        if self.busy:
            return None
        g = self.groups[(which, layer)]
        w = getattr(self.w, which)[layer]
        if x.shape[2] != w.shape[0]:
            raise PatchingError(
                f"{name} holds {x.shape[2]} heads but the {which} projection has {w.shape[0]}: "
                "this bridge lays out its attention activations in an unexpected way"
            )
        base = self._rows(self.raw[f"resid1.{layer}"], g.vi)
        normed = self._normed(self.model.blocks[layer].ln1, base, self._delta(g, base))
        proj = torch.einsum("nbpd,ndk->nbpk", normed, w[g.hi.to(w.device)].to(normed.dtype))
        out = x.clone()
        view = out.view(self.n_v, self.n_b, *x.shape[1:])
        vi, hi = g.vi.to(x.device), g.hi.to(x.device)
        view[vi, :, :, hi] = view[vi, :, :, hi] + proj.to(x.dtype)
        self.fired.add(name)
        return out

    def edit_mlp(self, name: str, layer: int, x: Tensor, hook: Any = None) -> Any:
        if self.busy:
            return None
        g = self.groups[("mlp", layer)]
        base = self._rows(self.raw[f"resid2.{layer}"], g.vi)
        normed = self._normed(self.model.blocks[layer].ln2, base, self._delta(g, base))
        out = x.clone()
        view = out.view(self.n_v, self.n_b, *x.shape[1:])
        vi = g.vi.to(x.device)
        view[vi] = view[vi] + normed.to(x.dtype)
        self.fired.add(name)
        return out

    def edit_final(self, name: str, x: Tensor, hook: Any = None) -> Any:
        if self.busy:
            return None
        g = self.groups[("logits", -1)]
        out = x.clone()
        view = out.view(self.n_v, self.n_b, *x.shape[1:])
        vi = g.vi.to(x.device)
        view[vi] = view[vi] + self._delta(g, view[vi]).to(x.dtype)
        self.fired.add(name)
        return out

    # --- arithmetic ------------------------------------------------------------------------

    def _rows(self, x: Tensor, vi: Tensor) -> Tensor:
        return x.reshape(self.n_v, self.n_b, *x.shape[1:])[vi.to(x.device)]

    def live_write(self, node: Node) -> Tensor:
        """``node``'s write in this forward, ``[V, B, pos, d_model]``."""
        if node not in self.live:
            if node.kind == "embed":
                out = self.raw["embed"]
                out = out + self.raw["pos_embed"] if self.pos_embed else out
            elif node.kind == "mlp":
                out = self.raw[f"mlp_out.{node.layer}"]
            else:
                assert node.layer is not None and node.head is not None
                z = self.raw[f"z.{node.layer}"][:, :, node.head]
                out = z @ self.w.o[node.layer][node.head].to(z.dtype)
            self.live[node] = out.reshape(self.n_v, self.n_b, *out.shape[1:])
        return self.live[node]

    def _delta(self, g: _Group, like: Tensor) -> Tensor:
        """Per entry, Σ carried writes - Σ live writes of the senders they replace."""
        d = g.carry.to(like.device, like.dtype).clone()
        mask = g.mask.to(like.device, like.dtype)
        for j, s in enumerate(g.senders):
            d -= mask[:, j, None, None, None] * self.live_write(s)[g.vi.to(like.device)]
        return d

    def _normed(self, norm: Any, base: Tensor, d: Tensor) -> Tensor:
        self.busy = True
        try:
            return norm(base + d) - norm(base)
        finally:
            self.busy = False

    def reads(self) -> Tensor:
        out = []
        for v, plan in enumerate(self.plans):
            assert plan.read is not None
            out.append(self.live_write(plan.read)[v])
        return torch.stack(out)

    def check(self, which: str) -> None:
        missing = {name for name, _ in self.hooks} - self.fired
        if missing:
            raise PatchingError(
                f"hooks {sorted(missing)} never fired in the {which} model's path-patching run: "
                "the bridge does not route these activations through its hooks"
            )

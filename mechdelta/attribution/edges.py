"""Edge attribution patching across two models: EAP and EAP-IG over the graph of
:mod:`mechdelta.core.graph`.

For an edge ``S -> R.input`` and one prompt, in the *target* model's clean run::

    score = sum over positions of (write_S[source] - write_S[target]) · ∂m/∂(R's input)

an estimate of how much the metric ``m`` moves when the sender's write *along that edge only* is
replaced by the source model's (``"eap"``: first order, Taylor at the target's clean run). With
``"eap-ig"`` the gradient is averaged over ``steps`` points (midpoint rule) of the straight path
on which *every* sender's write moves at once from the target's to the source's clean value (the
residual at every receiver input is then ``resid_T + α (resid_S - resid_T)``; gradients flow
through each node's own computation at that point). Scores are reported per prompt and as their
mean, in units of the metric; :attr:`EdgeAttribution.fractions` divides by the shift.

Writes: ``embed`` = ``hook_embed`` (+ ``hook_pos_embed`` for learned positions), a head
``z_h @ W_O[h]`` without bias, an MLP ``hook_mlp_out``. A receiver's input is the residual copy
*before* its norm: for a head's q/k/v the gradient at ``hook_q/k/v`` of that head, multiplied by
the transposed projection ``W_Q[h]^T`` (read off the module), pulled back through the block's
``ln1`` at the cached residual with a vector-Jacobian product (any norm: LayerNorm, RMSNorm, TL's
processed norms); for an MLP the gradient at ``mlp.hook_in`` pulled back through ``ln2`` (at
``resid_mid``, or ``resid_pre`` in parallel blocks); for ``logits`` the gradient at the last
block's ``hook_resid_post``.

Biases: the attention output bias ``b_O`` is not a node. Per receiver input,
``bias[r] = Σ_{upstream layers} Δb_O · ∂m/∂(r's input)``, so that, per prompt, the sum over a
receiver input's incoming edges plus its bias term equals ``Δ(r's residual input) · ∂m/∂(r's
input)``, the node-level attribution of that input. MLP biases are inside the MLP's write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.attribution._edge_result import METHODS, EdgeAttribution
from mechdelta.attribution._grads import Edit, grad_pass
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Graph, graph_edges
from mechdelta.errors import AttributionError, ConfigError
from mechdelta.patching.results import BothDirections
from mechdelta.patching.shift import ShiftResult, engine_shift
from mechdelta.stats.bootstrap import Bootstrap

__all__ = ["EdgeAttribution", "attribute_edges"]


def attribute_edges(
    pair: Any,
    task: Any,
    direction: Direction | str = "reference->intervened",
    method: str = "eap",
    *,
    steps: int = 16,
    batch_budget: int | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> EdgeAttribution | BothDirections[Any]:
    """Score every edge of the pair's graph (see the module docstring for the semantics).

    Args:
        pair: a :class:`~mechdelta.ModelPair`.
        task: a :class:`~mechdelta.Task`.
        direction: ``"reference->intervened"`` (reference writes into the intervened run),
            ``"intervened->reference"``, or ``"both"`` (a
            :class:`~mechdelta.BothDirections` of two results).
        method: ``"eap"`` (one gradient pass) or ``"eap-ig"`` (``steps`` gradient passes).
        steps: points of the integrated-gradient path (``"eap-ig"`` only), a positive int.
        batch_budget: prompts per gradient pass (default: the patching engine's default).
        n_boot, alpha, seed: the bootstrap of the shift's interval.
    """
    from mechdelta.scale._devices import require_one_device

    require_one_device(pair, "attribute_edges")
    m = str(method).strip().lower()
    if m not in METHODS:
        raise ConfigError(
            f"unknown edge attribution method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int (points of the IG path), not {steps!r}")
    d = Direction.coerce(direction)
    from mechdelta.patching._engine import PatchEngine

    engine = PatchEngine(pair, task, batch_budget=batch_budget)
    shift = engine_shift(engine, Bootstrap(n_boot, alpha, seed))
    graph = Graph.from_model(pair)
    out = [_attribute(engine, graph, one, m, steps, shift) for one in d.singles]
    if d is Direction.BOTH:
        return BothDirections(out[0], out[1])
    return out[0]


# --- layout and weights ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Hook names and sizes of one architecture's graph."""

    graph: Graph
    pos_embed: bool

    @property
    def n_layers(self) -> int:
        return self.graph.shape.n_layers

    @property
    def has_mlp(self) -> bool:
        return self.graph.shape.d_mlp is not None

    @property
    def final(self) -> str:
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    @property
    def embeds(self) -> list[str]:
        return ["hook_embed"] + (["hook_pos_embed"] if self.pos_embed else [])

    def mixed(self) -> list[str]:
        """The hooks whose sum (with b_O inside attn_out) is the residual stream."""
        names = list(self.embeds)
        for layer in range(self.n_layers):
            names.append(f"blocks.{layer}.hook_attn_out")
            if self.has_mlp:
                names.append(f"blocks.{layer}.hook_mlp_out")
        return names

    def values(self) -> list[str]:
        """Everything a chunk reads: writes, z, norm inputs, the final residual."""
        names = [*self.mixed(), self.final]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_resid_pre"]
            if self.has_mlp and not self.graph.parallel:
                names.append(f"blocks.{layer}.hook_resid_mid")
        return names

    def grads(self) -> list[str]:
        names = [self.final]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"]
            if self.has_mlp:
                names.append(f"blocks.{layer}.mlp.hook_in")
        return names


@dataclass(frozen=True)
class _Weights:
    """One model's per-head projections, read off the modules before any pass."""

    q: list[Tensor]  # per layer [head, d_model, d_head]
    k: list[Tensor]  # [kv_head, d_model, d_head]
    v: list[Tensor]
    o: list[Tensor]  # [head, d_head, d_model]
    b_o: Tensor  # [layer, d_model]


def _proj(module: Any, d_in: int, n: int, like: Tensor) -> Float[Tensor, "head d_model d_head"]:
    """The per-head weight of a linear module, read by applying it to the identity."""
    with torch.no_grad():
        eye = torch.eye(d_in, device=like.device, dtype=like.dtype)
        w = module(eye) - module(torch.zeros(1, d_in, device=like.device, dtype=like.dtype))
    return w.reshape(d_in, n, -1).permute(1, 0, 2).contiguous()


def _weights(engine: Any, which: str) -> _Weights:
    state = engine.states[which]
    model = state.runner.model
    shape = engine.shape
    d_model = int(model.cfg.d_model)
    like = next(model.parameters())
    q, k, v, o, b_o = [], [], [], [], []
    for layer in range(shape.n_layers):
        attn = model.blocks[layer].attn
        q.append(_proj(attn.q, d_model, shape.n_heads, like))
        k.append(_proj(attn.k, d_model, shape.n_kv_heads, like))
        v.append(_proj(attn.v, d_model, shape.n_kv_heads, like))
        o.append(engine._w_o(state, layer))
        width = o[-1].shape[0] * o[-1].shape[1]
        with torch.no_grad():
            b_o.append(attn.o(torch.zeros(1, width, device=like.device, dtype=like.dtype))[0])
    return _Weights(q, k, v, o, torch.stack(b_o))


# --- one direction ------------------------------------------------------------------------------


def _attribute(
    engine: Any,
    graph: Graph,
    direction: Direction,
    method: str,
    steps: int,
    shift: ShiftResult,
    *,
    writes: Callable[[slice], Tensor] | None = None,
) -> EdgeAttribution:
    """One direction's scores. ``writes(rows)``: instead of (source clean write - target clean
    write), each sender's write difference ``[sender, batch, pos, d_model]`` for those prompts
    (graph sender order; e.g. graft writes on the target's clean inputs), with no ``b_O`` term
    (the biases stay the target's); ``"eap"`` only."""
    if writes is not None and method != "eap":
        raise ConfigError("custom sender writes take method='eap' (one gradient pass)")
    src_model = engine.states[direction.source].runner.model
    tgt_model = engine.states[direction.target].runner.model
    pos = str(getattr(engine.pair.cfg, "positional_embedding_type", "standard")) == "standard"
    layout = _Layout(graph, pos and "hook_pos_embed" in tgt_model.hook_dict)
    w_src = _weights(engine, direction.source)
    w_tgt = _weights(engine, direction.target)
    d_bias = (w_src.b_o - w_tgt.b_o).float()
    if writes is not None:
        d_bias = torch.zeros_like(d_bias)
    n_prompts = engine.prepared.batch_size
    chunk = engine.budget
    edges = graph_edges(graph.shape, parallel=graph.parallel)
    receivers = graph.receiver_inputs
    scores = torch.zeros(len(edges), n_prompts, dtype=torch.float64)
    bias = torch.zeros(len(receivers), n_prompts, dtype=torch.float64)
    for b0 in range(0, n_prompts, chunk):
        rows = slice(b0, min(b0 + chunk, n_prompts))
        tokens = engine.tokens[rows]
        t_vals = _capture(tgt_model, tokens, layout.values())
        s_vals = t_vals if writes is not None else _capture(src_model, tokens, layout.values())
        if b0 == 0:
            if writes is None:
                _check_decomposition(s_vals, w_src, layout, direction.source)
            _check_decomposition(t_vals, w_tgt, layout, direction.target)
        if writes is None:
            d_writes = _writes(s_vals, w_src, layout) - _writes(t_vals, w_tgt, layout)
        else:
            d_writes = writes(rows).to(t_vals[layout.final].device).float()
        inputs = engine.inputs.select(rows)
        positions = inputs.positions
        for weight, grads, vals in _passes(
            tgt_model, tokens, positions, inputs, engine.prepared.metric, layout,
            s_vals, t_vals, method, steps, check=b0 == 0,
        ):  # fmt: skip
            e, b = _scores(tgt_model, w_tgt, layout, grads, vals, d_writes, d_bias)
            scores[:, rows] += weight * e.cpu()
            bias[:, rows] += weight * b.cpu()
        del d_writes
    return EdgeAttribution(
        edges=edges,
        per_prompt=scores,
        receivers=receivers,
        bias=bias,
        direction=direction,
        method=method,
        steps=steps if method == "eap-ig" else None,
        shift=shift,
        provenance=engine.provenance(),
    )


def _capture(model: Any, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """A plain forward caching the activations at ``names`` (detached)."""
    store: dict[str, Tensor] = {}

    def grab(name: str) -> Callable[..., None]:
        def hook(x: Tensor, hook: Any) -> None:
            store[name] = x.detach()

        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, grab(n)) for n in names])
    missing = [n for n in names if n not in store]
    if missing:
        raise AttributionError(
            f"hooks {missing} never fired: this bridge does not route those activations through "
            "its hooks, so edge attribution cannot read them"
        )
    return store


def _embed(vals: dict[str, Tensor], layout: _Layout) -> Tensor:
    out = vals["hook_embed"]
    return out + vals["hook_pos_embed"] if layout.pos_embed else out


def _writes(
    vals: dict[str, Tensor], w: _Weights, layout: _Layout
) -> Float[Tensor, "sender batch pos d_model"]:
    """Every sender's write, in the graph's sender order (float32: half-precision writes are
    upcast; scores are summed in float64 from float32 products)."""
    parts = [_embed(vals, layout).float()[None]]
    for layer in range(layout.n_layers):
        z = vals[f"blocks.{layer}.attn.hook_z"].float()
        parts.append(torch.einsum("bphe,hem->hbpm", z, w.o[layer].float()))
        if layout.has_mlp:
            parts.append(vals[f"blocks.{layer}.hook_mlp_out"].float()[None])
    return torch.cat(parts)


def _close(got: Tensor, want: Tensor) -> bool:
    err = (got.double() - want.double()).abs().max().item()
    return err <= 1e-4 * max(1.0, want.abs().max().item())


def _check_decomposition(vals: dict[str, Tensor], w: _Weights, layout: _Layout, name: str) -> None:
    """The graph's premise: the residual stream is the sum of the senders' writes and b_O."""
    problems = []
    if not _close(_embed(vals, layout), vals["blocks.0.hook_resid_pre"]):
        problems.append("the embedding write is not the first residual")
    for layer in range(layout.n_layers):
        z = vals[f"blocks.{layer}.attn.hook_z"]
        recon = torch.einsum("bphe,hem->bpm", z, w.o[layer]) + w.b_o[layer]
        if not _close(recon, vals[f"blocks.{layer}.hook_attn_out"]):
            problems.append(f"layer {layer}'s attention output is not Σ z_h W_O[h] + b_O")
    total = sum(vals[n].double() for n in layout.mixed())
    if not _close(cast(Tensor, total), vals[layout.final]):
        problems.append("the final residual is not the sum of the writes")
    if problems:
        raise AttributionError(
            f"the {name} model does not decompose into the graph's nodes ({'; '.join(problems)}):"
            " edge attribution needs a residual stream that is a plain sum of head, MLP and "
            "embedding writes"
        )


def _passes(
    model: Any,
    tokens: Tensor,
    positions: Tensor,
    inputs: Any,
    metric: Any,
    layout: _Layout,
    s_vals: dict[str, Tensor],
    t_vals: dict[str, Tensor],
    method: str,
    steps: int,
    *,
    check: bool,
) -> Iterator[tuple[float, dict[str, Tensor], dict[str, Tensor]]]:
    """Gradient passes on the target model with their weights: one at the clean run (EAP), or
    ``steps`` midpoints of the path where every write moves from target to source (EAP-IG)."""
    names = list(dict.fromkeys(layout.grads() + layout.values()))
    if method == "eap":
        _, grads, vals = grad_pass(model, tokens, positions, inputs, metric, names, values=True)
        yield 1.0, grads, vals
        return
    for k in range(steps):
        a = (k + 0.5) / steps
        edits = {n: _toward(t_vals[n], s_vals[n], a) for n in layout.mixed()}
        _, grads, vals = grad_pass(
            model, tokens, positions, inputs, metric, names, edits=edits, values=True
        )
        if check and k == 0:
            point = t_vals[layout.final] + a * (s_vals[layout.final] - t_vals[layout.final])
            if not _close(vals[layout.final], point):
                raise AttributionError(
                    "the interpolated writes did not reach the final residual: this bridge "
                    "discards edits at the embedding, attention or MLP output hooks, so EAP-IG "
                    "cannot run on it (use method='eap')"
                )
        yield 1.0 / steps, grads, vals


def _toward(x_t: Tensor, x_s: Tensor, a: float) -> Edit:
    """An edit that sets the activation to the path point ``x_t + a (x_s - x_t)`` while letting
    gradients through the live activation (straight-through)."""
    point = x_t + a * (x_s - x_t)

    def edit(x: Tensor) -> Tensor:
        return x + (point - x).detach()

    return edit


# --- scores -------------------------------------------------------------------------------------


def _vjp(norm: Any, x: Tensor, cot: Tensor) -> Float[Tensor, "n batch pos d_model"]:
    """``cot`` (gradients at the norm's output, [n, batch, pos, d_model]) pulled back to its
    input at ``x`` ([batch, pos, d_model]), all n at once."""
    with torch.enable_grad():
        xs = x.detach().unsqueeze(0).expand(cot.shape[0], *x.shape).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(norm(xs), xs, cot.to(x.dtype))
    return g


def _layer_grads(
    model: Any, w: _Weights, layout: _Layout, grads: dict[str, Tensor], vals: dict[str, Tensor],
    layer: int,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """∂m/∂(residual input) of layer ``layer``'s head inputs, in the graph's receiver order
    ([receiver, batch, pos, d_model]), and of its MLP (None without MLPs)."""
    block = model.blocks[layer]
    resid = vals[f"blocks.{layer}.hook_resid_pre"]
    post = []
    for x, proj in (("q", w.q), ("k", w.k), ("v", w.v)):
        g = grads[f"blocks.{layer}.attn.hook_{x}"]
        post.append(torch.einsum("bphe,hme->hbpm", g, proj[layer].to(g.dtype)))
    n_heads, n_kv = post[0].shape[0], post[1].shape[0]
    group = n_heads // n_kv
    order = []
    for h in range(n_heads):
        order.append(h)
        if h % group == 0:
            order += [n_heads + h // group, n_heads + n_kv + h // group]
    heads = _vjp(block.ln1, resid, torch.cat(post)[order])
    if not layout.has_mlp:
        return heads, None
    mid = "hook_resid_pre" if layout.graph.parallel else "hook_resid_mid"
    g_mlp = grads[f"blocks.{layer}.mlp.hook_in"]
    mlp = _vjp(block.ln2, vals[f"blocks.{layer}.{mid}"], g_mlp[None])[0]
    return heads, mlp


def _scores(
    model: Any,
    w: _Weights,
    layout: _Layout,
    grads: dict[str, Tensor],
    vals: dict[str, Tensor],
    d_writes: Float[Tensor, "sender batch pos d_model"],
    d_bias: Float[Tensor, "layer d_model"],
) -> tuple[Float[Tensor, "edge batch"], Float[Tensor, "receiver batch"]]:
    """Edge scores (graph edge order) and bias terms (receiver order) of one gradient pass."""
    shape = layout.graph.shape
    per_layer = shape.n_heads + (1 if layout.has_mlp else 0)  # senders per layer
    edge_parts: list[Tensor] = []
    bias_parts: list[Tensor] = []

    def add(g: Tensor, n_senders: int, n_bias: int) -> None:
        g = g.float()
        s = torch.einsum("sbpd,rbpd->rsb", d_writes[:n_senders], g).double()
        edge_parts.extend(s.unbind(0))
        bias_parts.append(torch.einsum("ld,rbpd->rb", d_bias[:n_bias], g).double())

    for layer in range(shape.n_layers):
        heads, mlp = _layer_grads(model, w, layout, grads, vals, layer)
        upstream = 1 + layer * per_layer
        add(heads, upstream, layer)
        if mlp is not None:
            own = 0 if layout.graph.parallel else 1
            add(mlp[None], upstream + own * shape.n_heads, layer + own)
    add(grads[layout.final][None], d_writes.shape[0], shape.n_layers)
    return torch.cat(edge_parts), torch.cat(bias_parts)

"""AtP*'s QK fix for query and key sites: recompute the attention probabilities a patch of q or
k changes *exactly*, and linearise only from the pattern onwards (``ΔA · ∂m/∂A``).

Scores come from one of two sources, each checked against the target's clean pattern before use
(softmax of the masked scores must reproduce ``hook_pattern``):

- ``q · k / scale`` from the cached ``hook_q``/``hook_k`` (models whose queries and keys reach the
  scores unchanged, e.g. TransformerLens-native models without rotary embeddings): no extra pass;
- the bridge's ``hook_attn_scores`` read in two forward passes of the target with every layer's
  queries set to the source's and keys pinned to the target's (and the reverse), so rotary
  embeddings, scales and soft-capping are the model's own.

A key site at one position changes one *column* of the scores: each key position's softmax is
recomputed with that column replaced (a loop over positions, all prompts and heads at once).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.attribution._grads import grad_pass
from mechdelta.core.sites import Component, Site
from mechdelta.errors import AttributionError

__all__ = ["qk_fix", "qk_sites"]

_TOL = 1e-4


def qk_fix(
    engine: Any,
    src: Any,
    tgt: Any,
    comp: Component,
    layers: list[int],
    rows: slice,
    edits: dict[str, Any] | None = None,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer the QK-fixed estimates: by position ``[b, pos, head_axis]`` (query heads for
    head_q, key/value heads for head_k) and for all-position sites ``[b, head_axis]``."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    _, grads, pattern = grad_pass(
        tgt.runner.model,
        engine.tokens[rows],
        engine.inputs.positions[rows],
        engine.inputs.select(rows),
        engine.prepared.metric,
        names,
        edits=edits,
        values=True,
    )
    clean, swapped = _scores(engine, src, tgt, comp, layers, rows, pattern)
    group = engine.shape.group_size
    out = {}
    for layer, name in zip(layers, names, strict=True):
        g = grads[name].double()
        s, s2 = _masked(clean[layer]), _masked(swapped[layer])
        a = torch.softmax(s, -1)  # the clean pattern, from the same scores as the patched one
        if comp is Component.HEAD_Q:
            rows_delta = ((torch.softmax(s2, -1) - a) * g).sum(-1)  # [b, h, q]
            by_pos = rows_delta.transpose(1, 2)
            out[layer] = (by_pos.float(), by_pos.sum(1).float())
            continue
        # keys: one column of the scores replaced at a time, or every column (all positions)
        n_pos = s.shape[-1]
        per_key = torch.zeros((*s.shape[:-2], n_pos), dtype=s.dtype, device=s.device)
        for k in range(n_pos):
            mod = s.clone()
            mod[..., k] = s2[..., k]
            per_key[..., k] = ((torch.softmax(mod, -1) - a) * g).sum((-1, -2))
        every = ((torch.softmax(s2, -1) - a) * g).sum((-1, -2))  # [b, h]
        b, h, k = per_key.shape
        per_key = per_key.reshape(b, h // group, group, k).sum(2).transpose(1, 2)
        every = every.reshape(b, h // group, group).sum(2)
        out[layer] = (per_key.float(), every.float())
    return out


def qk_sites(layers: set[int]) -> list[Site]:
    """Sites whose clean activations the fix reads (queries and keys of the grid's layers)."""
    return [
        Site(c, layer, head=0)
        for layer in sorted(layers)
        for c in (Component.HEAD_Q, Component.HEAD_K)
    ]


def _masked(s: Tensor) -> Tensor:
    """Causally masked scores (future keys -inf), float64."""
    q, k = s.shape[-2:]
    future = torch.ones(q, k, dtype=torch.bool, device=s.device).triu(1)
    return s.double().masked_fill(future, float("-inf"))


def _scores(
    engine: Any,
    src: Any,
    tgt: Any,
    comp: Component,
    layers: list[int],
    rows: slice,
    pattern: dict[str, Tensor],
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Clean target scores and scores with the source's q (head_q) or k (head_k), per layer."""
    q_name = "blocks.{}.attn.hook_q"
    k_name = "blocks.{}.attn.hook_k"
    got = _from_qk(engine, src, tgt, comp, layers, rows)
    if got is not None and _reproduces(got[0], pattern, layers):
        return got
    model = tgt.runner.model
    if f"blocks.{layers[0]}.attn.hook_attn_scores" in model.hook_dict:
        clean = _read_scores(engine, tgt, layers, rows, {})
        if _reproduces(clean, pattern, layers):
            # a layer's scores depend on its own q and k only: set both at every grid layer
            swap, pin = (q_name, k_name) if comp is Component.HEAD_Q else (k_name, q_name)
            writes = {swap.format(i): src.cache[swap.format(i)] for i in layers}
            writes |= {pin.format(i): tgt.cache[pin.format(i)] for i in layers}
            return clean, _read_scores(engine, tgt, layers, rows, writes)
    raise AttributionError(
        "method 'atp*' needs this model's attention scores, but neither q·k/scale from hook_q/"
        "hook_k nor the bridge's hook_attn_scores reproduces its attention pattern; use "
        "method='atp' or 'ig' for head_q/head_k sites"
    )


def _from_qk(
    engine: Any, src: Any, tgt: Any, comp: Component, layers: list[int], rows: slice
) -> tuple[dict[int, Tensor], dict[int, Tensor]] | None:
    cfg = tgt.runner.model.cfg
    if getattr(cfg, "positional_embedding_type", "standard") == "rotary":
        return None
    scale = float(getattr(cfg, "attn_scale", None) or -1.0)
    if scale <= 0:  # unset (TL's -1 sentinel): the usual sqrt(d_head)
        scale = math.sqrt(int(cfg.d_head))
    group = engine.shape.group_size
    clean, swapped = {}, {}
    for layer in layers:
        qn, kn = f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"
        q_t, k_t = tgt.cache[qn][rows].double(), tgt.cache[kn][rows].double()
        q_s, k_s = src.cache[qn][rows].double(), src.cache[kn][rows].double()
        clean[layer] = _qk(q_t, k_t, group, scale)
        swapped[layer] = (
            _qk(q_s, k_t, group, scale) if comp is Component.HEAD_Q else _qk(q_t, k_s, group, scale)
        )
    return clean, swapped


def _qk(q: Tensor, k: Tensor, group: int, scale: float) -> Float[Tensor, "batch head q k"]:
    k = k.repeat_interleave(group, dim=2)
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / scale


def _reproduces(scores: dict[int, Tensor], pattern: dict[str, Tensor], layers: list[int]) -> bool:
    for layer in layers:
        want = pattern[f"blocks.{layer}.attn.hook_pattern"].double()
        got = torch.softmax(_masked(scores[layer]), -1)
        if got.shape != want.shape or (got - want).abs().max().item() > _TOL:
            return False
    return True


def _read_scores(
    engine: Any, state: Any, layers: list[int], rows: slice, writes: dict[str, Tensor]
) -> dict[int, Tensor]:
    """Run the model (no grad) with ``writes`` set at hooks, reading hook_attn_scores."""
    store: dict[int, Tensor] = {}

    def setter(name: str) -> Any:
        def hook(x: Tensor, hook: Any) -> Tensor:
            return writes[name][rows].to(x.dtype)

        return hook

    def reader(layer: int) -> Any:
        def hook(x: Tensor, hook: Any) -> None:
            store[layer] = x.detach().double()

        return hook

    hooks = [(name, setter(name)) for name in writes]
    hooks += [(f"blocks.{layer}.attn.hook_attn_scores", reader(layer)) for layer in layers]
    state.runner.logits_at(engine.inputs.positions[rows], tokens=engine.tokens[rows], hooks=hooks)
    return store

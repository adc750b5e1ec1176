"""The weight-level side of a representation screen: ``pair.weight_diff()`` grouped so that each
group sits next to the activation it writes (measure ``weight_delta``).

A group's value is ``sqrt(Σ ||ΔW_c||²) / sqrt(Σ ||W_c,ref||²)`` over its weight-diff components
``c`` (the relative change of all its parameters taken together):

- ``("embed", 0)``: the token and positional embeddings;
- ``("attn_out", L)``: every attention parameter of block ``L`` (all heads' Q/K/V/O, the output
  bias, any other ``attn`` parameter) and the norm(s) before/after attention (``ln1*``);
- ``("head_out", L, h)``: head ``h``'s Q, K, V and O slices (K/V: the key-value head it reads);
- ``("mlp_out", L)``: the MLP's parameters and its norm(s) (``ln2*``);
- ``("block", L)``: every parameter of block ``L``;
- ``("unembed", None)``: the final norm and the unembedding.
"""

from __future__ import annotations

import math

from mechdelta.core.sites import ModelShape
from mechdelta.core.weights import WeightDiff

__all__ = ["weight_delta_rows"]

Key = tuple[str, int | None, int | None]


def weight_delta_rows(diff: WeightDiff, shape: ModelShape) -> list[tuple[Key, float]]:
    """``[((site, layer, head), relative change)]`` for the groups above, in model order."""
    acc: dict[Key, list[float]] = {}

    def add(key: Key, ref: float, delta: float) -> None:
        cell = acc.setdefault(key, [0.0, 0.0])
        cell[0] += ref * ref
        cell[1] += delta * delta

    for row in diff.rows:
        ref, delta, comp, layer = row.reference_norm, row.delta_norm, row.component, row.layer
        if layer is None:
            if comp in ("embed", "pos_embed"):
                add(("embed", 0, None), ref, delta)
            elif comp in ("ln_final", "unembed"):
                add(("unembed", None, None), ref, delta)
            continue  # other top-level parameters: see pair.weight_diff()
        add(("block", layer, None), ref, delta)
        if comp.startswith(("head_", "attn", "ln1")):
            add(("attn_out", layer, None), ref, delta)
        elif comp.startswith(("mlp", "ln2")):
            add(("mlp_out", layer, None), ref, delta)
        if comp in ("head_q", "head_o") and row.head is not None:
            add(("head_out", layer, row.head), ref, delta)
        elif comp in ("head_k", "head_v") and row.head is not None:
            for h in range(shape.n_heads):
                if h // shape.group_size == row.head:
                    add(("head_out", layer, h), ref, delta)

    def order(key: Key) -> tuple[int, int, int, int]:
        site, layer, head = key
        rank = {"embed": 0, "attn_out": 1, "head_out": 2, "mlp_out": 3, "block": 4}
        if site == "unembed":
            return (2, 0, 0, 0)
        return (
            0 if site == "embed" else 1,
            layer or 0,
            rank.get(site, 5),
            -1 if head is None else head,
        )

    out = []
    for key in sorted(acc, key=order):
        ref2, delta2 = acc[key]
        if delta2 == 0.0:
            value = 0.0
        elif ref2 == 0.0:
            value = math.inf
        else:
            value = math.sqrt(delta2) / math.sqrt(ref2)
        out.append((key, value))
    return out

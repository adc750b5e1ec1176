"""Weight-level view of a pair: per-component relative change ||ΔW|| / ||W||.

Components: the embeddings, each head's Q/K/V/O (K/V per key-value head under grouped-query
attention), each attention layer's shared output bias, each MLP, each norm, the unembedding; a
parameter the grouping does not recognise gets a row of its own, so nothing is silently dropped.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mechdelta.core._io import load_result, save_result
from mechdelta.core.sites import Component, Site

__all__ = ["WeightDiff", "WeightDiffRow", "weight_diff"]

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Row kinds that correspond to a patchable site.
_KIND_TO_COMPONENT = {
    "head_q": Component.HEAD_Q,
    "head_k": Component.HEAD_K,
    "head_v": Component.HEAD_V,
    "head_o": Component.HEAD_OUT,
    "mlp": Component.MLP_OUT,
    "embed": Component.EMBED,
}


@dataclass(frozen=True)
class WeightDiffRow:
    """One component's change: ``relative = delta_norm / reference_norm``."""

    component: str
    layer: int | None
    head: int | None
    reference_norm: float
    delta_norm: float

    @property
    def relative(self) -> float:
        if self.delta_norm == 0.0:
            return 0.0
        if self.reference_norm == 0.0:
            return math.inf
        return self.delta_norm / self.reference_norm

    @property
    def label(self) -> str:
        out = self.component
        if self.layer is not None:
            out = f"L{self.layer}" + (f"H{self.head}" if self.head is not None else "") + f".{out}"
        return out


@dataclass(frozen=True)
class WeightDiff:
    """Per-component weight change between the reference and the intervened model."""

    rows: tuple[WeightDiffRow, ...]
    reference_hash: str
    intervened_hash: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return all(r.delta_norm == 0.0 for r in self.rows)

    def changed(self, threshold: float = 0.0) -> tuple[WeightDiffRow, ...]:
        """Rows whose relative change exceeds ``threshold`` (default: any change at all)."""
        return tuple(r for r in self.rows if r.relative > threshold)

    def sites(self, threshold: float = 0.0) -> frozenset[Site]:
        """The patchable sites whose weights changed: a Q/K/V/O change maps to the head's
        ``head_out``-carrying site kinds (q/k/v -> head_q/k/v, o -> head_out), an MLP to mlp_out."""
        out = set()
        for r in self.changed(threshold):
            comp = _KIND_TO_COMPONENT.get(r.component)
            if comp is None:
                continue
            out.add(Site(comp, r.layer or 0, head=r.head))
        return frozenset(out)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "label": [r.label for r in self.rows],
                "component": [r.component for r in self.rows],
                "layer": pd.array([r.layer for r in self.rows], dtype="Int64"),
                "head": pd.array([r.head for r in self.rows], dtype="Int64"),
                "reference_norm": [r.reference_norm for r in self.rows],
                "delta_norm": [r.delta_norm for r in self.rows],
                "relative": [r.relative for r in self.rows],
            }
        )

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.to_dataframe().sort_values("relative", ascending=False).head(k)

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {
            "rows": [
                [r.component, r.layer, r.head, r.reference_norm, r.delta_norm] for r in self.rows
            ],
            "reference_hash": self.reference_hash,
            "intervened_hash": self.intervened_hash,
            "provenance": self.provenance,
        }
        save_result(path, "weight_diff", meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WeightDiff:
        meta, _ = load_result(path, "weight_diff")
        rows = tuple(
            WeightDiffRow(c, lay, h, float(rn), float(dn)) for c, lay, h, rn, dn in meta["rows"]
        )
        return cls(
            rows, meta["reference_hash"], meta["intervened_hash"], meta.get("provenance", {})
        )

    def figure(self, **kwargs: Any) -> Any:
        from mechdelta.plotting import weight_diff_figure

        return weight_diff_figure(self, **kwargs)


class _Acc:
    """Accumulates squared norms of one row."""

    def __init__(self) -> None:
        self.ref = 0.0
        self.delta = 0.0

    def add(self, ref: torch.Tensor, other: torch.Tensor) -> None:
        r = ref.detach().double()
        self.ref += float((r * r).sum())
        d = other.detach().double() - r
        self.delta += float((d * d).sum())


@torch.no_grad()
def weight_diff(
    reference_sd: dict[str, torch.Tensor],
    intervened_sd: dict[str, torch.Tensor],
    cfg: Any,
    reference_hash: str,
    intervened_hash: str,
    provenance: dict[str, Any] | None = None,
    head_axes: dict[tuple[int, str], int] | None = None,
) -> WeightDiff:
    """Compute the per-component weight change from two TL-style state dicts.

    ``head_axes[(layer, proj)]``: the axis of ``attn.{proj}.weight`` that indexes heads (see
    :func:`mechdelta.core._layout.head_axes`; GPT-2's Conv1D-shaped W_O has heads on rows).
    Default: q/k/v heads on rows (``[heads*d_head, d_model]``), o heads on columns."""
    d_head = int(cfg.d_head)
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    acc: dict[tuple[str, int | None, int | None], _Acc] = {}

    def row(kind: str, layer: int | None = None, head: int | None = None) -> _Acc:
        return acc.setdefault((kind, layer, head), _Acc())

    for key in sorted(reference_sd):
        ref = reference_sd[key]
        oth = intervened_sd[key].to(ref.device)
        m = _BLOCK_KEY.match(key)
        if m is None:
            top = key.split(".")[0]
            kind = {
                "embed": "embed",
                "pos_embed": "pos_embed",
                "ln_final": "ln_final",
                "unembed": "unembed",
            }.get(top, key)
            row(kind).add(ref, oth)
            continue
        layer, rest = int(m[1]), m[2]
        parts = rest.split(".")
        if parts[0] == "attn" and len(parts) == 3 and parts[1] in ("q", "k", "v", "o"):
            proj, what = parts[1], parts[2]
            if proj == "o" and what == "bias":
                row("attn_o_bias", layer).add(ref, oth)
                continue
            count = n_heads if proj in ("q", "o") else n_kv
            axis = (
                0
                if what == "bias"
                else (head_axes or {}).get((layer, proj), 1 if proj == "o" else 0)
            )
            for h in range(count):
                sl = slice(h * d_head, (h + 1) * d_head)
                if axis == 1:  # e.g. Linear W_O [d_model, n_heads*d_head]: head h owns columns
                    r, o = ref[:, sl], oth[:, sl]
                else:  # [heads*d_head, ...] weight or [heads*d_head] bias: head h owns rows
                    r, o = ref[sl], oth[sl]
                row(f"head_{proj}", layer, h).add(r, o)
        elif parts[0] == "mlp":
            row("mlp", layer).add(ref, oth)
        elif parts[0] in ("ln1", "ln2", "ln1_post", "ln2_post"):
            row(parts[0], layer).add(ref, oth)
        else:
            row(rest, layer).add(ref, oth)
    rows = tuple(
        WeightDiffRow(kind, layer, head, math.sqrt(a.ref), math.sqrt(a.delta))
        for (kind, layer, head), a in acc.items()
    )
    order = {"embed": 0, "pos_embed": 1}
    rows = tuple(
        sorted(
            rows,
            key=lambda r: (
                order.get(r.component, 2 if r.layer is not None else 3),
                -1 if r.layer is None else r.layer,
                r.component,
                -1 if r.head is None else r.head,
            ),
        )
    )
    return WeightDiff(rows, reference_hash, intervened_hash, dict(provenance or {}))

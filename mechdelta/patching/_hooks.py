"""Hook functions a patched run installs: replacements, captures of live activations, and the
attention output's combined step (head writes, replacements, the residual after attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["AttnOutPlan", "at_rows", "attn_out_writer", "capture", "writer"]


def at_rows(rows: slice, pos: Any) -> tuple[Any, Any]:
    """Batch and position indices of prompts ``rows`` at ``pos``: a slice or an int applies to
    every row; a tensor holds one position per row (advanced indexing pairs it with the rows)."""
    if isinstance(pos, Tensor):
        return torch.arange(rows.start, rows.stop, device=pos.device), pos
    return rows, pos


def writer(name: str, ops: list[tuple[tuple[Any, ...], Tensor]], fired: set[str]) -> Any:
    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        for index, value in ops:
            x[index] = value.to(x.dtype)
        fired.add(name)
        return x

    return hook


def capture(name: str, key: str, live: dict[str, Tensor], fired: set[str]) -> Any:
    def hook(x: Tensor, hook: Any) -> None:
        live[key] = x
        fired.add(name)

    return hook


@dataclass
class AttnOutPlan:
    """What a patched run does at one layer's attention output, in this order: swap listed
    heads' live writes for the source's (``heads``: rows, position, head, source write), apply
    replacements of the whole output (``replace``), then set the residual after attention to
    the source's (``mid``: the output becomes ``source resid_mid - live resid_pre``)."""

    heads: list[tuple[slice, Any, int, Tensor]]
    replace: list[tuple[tuple[Any, ...], Tensor]]
    mid: list[tuple[tuple[Any, ...], Tensor]]
    live: dict[str, Tensor]
    w_o: Tensor | None


def attn_out_writer(name: str, plan: AttnOutPlan, fired: set[str]) -> Any:
    """Each later step contains the earlier ones' activations, so the union is applied."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        if plan.heads:
            z = plan.live.pop("z")
            assert plan.w_o is not None
            for vrows, pos, head, c_src in plan.heads:
                at = at_rows(vrows, pos)
                c_tgt = z[(*at, head)] @ plan.w_o[head]
                x[at] = x[at] + (c_src - c_tgt).to(x.dtype)
        for index, value in plan.replace:
            x[index] = value.to(x.dtype)
        if plan.mid:
            pre = plan.live.pop("resid_pre")
            for index, value in plan.mid:
                x[index] = (value - pre[index]).to(x.dtype)
        fired.add(name)
        return x

    return hook

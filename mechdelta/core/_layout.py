"""Where each head's parameters live in a bridge's state dict.

TL-style state-dict keys (``blocks.L.attn.{q,k,v,o}.weight``) do not fix the tensor layout:
Linear-shaped weights are ``[out, in]``, GPT-2's Conv1D-shaped ``c_proj`` (``attn.o``) is
``[in, out]``, and on square models (``d_model == n_heads * d_head``, e.g. GPT-2 itself) the
shapes cannot tell the two apart. :func:`head_axis` finds the axis that indexes heads by running
the projection module on unit vectors, once per model and projection.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from mechdelta.errors import PatchingError

__all__ = ["head_axes", "head_axis"]

_AXES: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], int]] = weakref.WeakKeyDictionary()


def head_axis(model: Any, layer: int, proj: str, weight: torch.Tensor | None = None) -> int:
    """The axis of ``blocks.{layer}.attn.{proj}.weight`` (``proj`` in q/k/v/o; ``weight``: that
    state-dict tensor, if already read) that indexes heads (0 or 1). Raises
    :class:`~mechdelta.PatchingError` when the probe is ambiguous."""
    cache = _AXES.setdefault(model, {})
    if (layer, proj) in cache:
        return cache[layer, proj]
    module = getattr(model.blocks[layer].attn, proj)
    if weight is None:
        weight = model.state_dict()[f"blocks.{layer}.attn.{proj}.weight"]
    errors: dict[int, float] = {}
    with torch.no_grad():
        for in_axis in (1, 0):
            eye = torch.eye(weight.shape[in_axis], dtype=weight.dtype, device=weight.device)
            try:
                y = module(eye) - module(eye[:1] * 0)  # [d_in, d_out]
            except RuntimeError:
                continue
            want = weight.T if in_axis == 1 else weight
            if y.shape == want.shape:
                errors[in_axis] = float((y - want).abs().max())
    scale = float(weight.abs().max()) or 1.0
    good = [a for a, e in errors.items() if e <= 1e-2 * scale]
    if len(good) != 1:
        raise PatchingError(
            f"cannot tell which axis of blocks.{layer}.attn.{proj}.weight indexes heads "
            f"(probe errors {errors}): this weight layout is not supported"
        )
    # the input axis of q/k/v is d_model (heads on the other); of o it is the heads' axis
    cache[layer, proj] = good[0] if proj == "o" else 1 - good[0]
    return cache[layer, proj]


def head_axes(model: Any) -> dict[tuple[int, str], int]:
    """:func:`head_axis` for every layer and projection the state dict holds."""
    sd = model.state_dict()
    out = {}
    for layer in range(int(model.cfg.n_layers)):
        for proj in "qkvo":
            key = f"blocks.{layer}.attn.{proj}.weight"
            if key in sd:
                out[layer, proj] = head_axis(model, layer, proj, sd[key])
    return out

"""Checks of the patching engine's premises on a model's clean run, once per model and layer:
each head's output projection reproduces the attention output (``head_out`` is defined), and
writing to every patched hook changes the output (the bridge does not discard the edit)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core.sites import Component, Site
from mechdelta.errors import PatchingError

__all__ = ["check_effective", "output_projection"]


def output_projection(engine: Any, state: Any, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """Each head's slice of the output projection, read off the module (any weight layout)."""
    if layer in state.w_o:
        return state.w_o[layer]
    model = state.runner.model
    o = model.blocks[layer].attn.o
    width = engine.shape.n_heads * int(model.cfg.d_head)
    dev = engine.devices[state.name]  # the model's own device
    with torch.no_grad():
        eye = torch.eye(width, device=dev, dtype=engine.pair.dtype)
        w = o(eye) - o(torch.zeros(1, width, device=dev, dtype=engine.pair.dtype))
    w = w.reshape(engine.shape.n_heads, width // engine.shape.n_heads, -1)
    z = state.cache.get(f"blocks.{layer}.attn.hook_z")
    out = state.cache.get(f"blocks.{layer}.hook_attn_out")
    if z is not None and out is not None:
        with torch.no_grad():
            bias = o(torch.zeros(1, width, device=dev, dtype=engine.pair.dtype))
            # in float32: a half-precision check then sees only the model's own rounding
            recon = torch.einsum("bphd,hdm->bpm", z.float(), w.float()) + bias.float()
        err = (recon - out.float()).abs().max().item()
        scale = out.abs().max().item() + 1e-6
        # relative tolerance 1e-4, or 4 roundings of a half-precision model's dtype (bf16
        # zoo pairs measured at up to 0.5 of one rounding)
        tol = max(1e-4, 4 * torch.finfo(engine.pair.dtype).eps)
        if err > tol * max(1.0, scale):
            raise PatchingError(
                f"layer {layer}'s attention output is not z @ W_O + b_O (max error {err:.3g}) "
                "in this architecture, so a head's own write is undefined: use head_z instead"
            )
    state.w_o[layer] = w
    return w


def check_effective(engine: Any, state: Any, kinds: set[tuple[Component, int]]) -> None:
    """Writing noise into each patched hook must change the output (else a bridge discards
    the edit, e.g. hooks fired after the HF module consumed the value). Probed once per model
    for every (component, layer) a patch touches, at head 0 / neuron 0, on one prompt."""
    todo = kinds - state.probed
    if not todo:
        return
    rows = slice(0, 1)
    positions = engine.inputs.positions[rows]
    tokens = engine.tokens[rows]
    # The baseline is a run of the same single prompt: logits of a batch-1 run need not be
    # bitwise equal to the same prompt's logits inside a larger batch.
    clean = state.runner.logits_at(positions, tokens=tokens)
    for kind, layer in sorted(todo):
        site = Site(
            kind,
            layer,
            head=0 if kind.per_head else None,
            neuron=0 if kind is Component.MLP_NEURON else None,
        )

        def noise(x: Tensor, hook: Any) -> Tensor:
            # A local generator: the probe must not move the user's global torch RNG.
            gen = torch.Generator(device=x.device).manual_seed(0)
            return x + torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) + 1

        got = state.runner.logits_at(positions, tokens=tokens, hooks=[(site.hook_name, noise)])
        if torch.equal(got, clean):
            raise PatchingError(
                f"writing to {site.hook_name} does not change the {state.name} model's output: "
                f"this bridge discards edits to {kind.value!r}, so it cannot be patched"
            )
        state.probed.add((kind, layer))

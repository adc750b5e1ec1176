"""The ``planted`` entry: a shift confined to chosen components by construction.

A copy of the key-value recall reference is fine-tuned to a new behaviour on a trigger token (under
TRIGGER, answer the value's successor) with *only* chosen components trainable; every other weight
is bit-identical to the reference (masked gradients, frozen entries restored after each step).
Ground truth = the chosen components:

- ``Site("head_out", L, head=h)``: head h's slices of W_Q, W_K, W_V (rows, with their biases) and
  W_O (columns). The layer's shared output bias b_O is *not* trained (no head owns it).
- ``Site("head_q" | "head_k" | "head_v", L, head=h)``: only that projection's slice.
- ``Site("mlp_out", L)``: the MLP's input and output weights and biases (not its layer norm).

:func:`planted_pair` builds such a pair for any component set and seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mechdelta.core.sites import Component, ModelShape, Site
from mechdelta.errors import ConfigError, ZooError
from mechdelta.zoo import _recall_base as base
from mechdelta.zoo._build import assemble, stage_of
from mechdelta.zoo._card import Stage
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._training import TrainSpec, train

__all__ = ["DEFAULT_COMPONENTS", "component_masks", "planted_pair"]

DESCRIPTION = (
    "A shift confined by construction: the key-value recall model with only one attention head "
    "(L1H1) and one MLP (layer 1) fine-tuned to answer the value's successor after a trigger "
    "token; every other weight is bit-identical."
)
DEFAULT_COMPONENTS = ("L1H1", "L1.mlp_out")
DEFAULT_STEPS = 600
LR = 3e-3
SEED_OFFSET = 1000  # the fine-tuning data stream differs from the reference's (seed + 1000)

_PROJ = {Component.HEAD_Q: ("q",), Component.HEAD_K: ("k",), Component.HEAD_V: ("v",)}


def _coerce_sites(components: Iterable[Site | str]) -> tuple[Site, ...]:
    if isinstance(components, (str, Site)):
        components = [components]
    sites = []
    for c in components:
        s = c if isinstance(c, Site) else Site.parse(str(c))
        if s.position is not None:
            raise ZooError(f"{s}: planted components are whole components; drop the position")
        sites.append(s)
    if not sites:
        raise ZooError("planted_pair needs at least one component")
    return tuple(sorted(set(sites)))


def component_masks(model: Any, components: Iterable[Site | str]) -> dict[str, Tensor]:
    """Boolean masks over ``model``'s state dict selecting the weights of ``components``."""
    sites = _coerce_sites(components)
    shape = ModelShape.from_cfg(model.cfg)
    d_head = int(model.cfg.d_head)
    state = model.state_dict()
    masks: dict[str, Tensor] = {}

    def select(key: str, index: tuple[Any, ...] = ()) -> None:
        if key not in state:
            raise ZooError(f"the model has no weight {key!r}")
        m = masks.setdefault(key, torch.zeros(state[key].shape, dtype=torch.bool))
        m[index if index else ...] = True

    for s in sites:
        s.validate(shape)
        pre = f"blocks.{s.layer}"
        if s.kind is Component.MLP_OUT:
            for k in ("in.weight", "in.bias", "out.weight", "out.bias"):
                select(f"{pre}.mlp.{k}")
        elif s.kind is Component.HEAD_OUT or s.kind in _PROJ:
            if shape.n_kv_heads != shape.n_heads:
                raise ZooError("planted components assume one key/value head per query head")
            h = int(s.head)  # type: ignore[arg-type]
            rows = slice(h * d_head, (h + 1) * d_head)
            for p in _PROJ.get(s.kind, ("q", "k", "v")):
                select(f"{pre}.attn.{p}.weight", (rows,))
                select(f"{pre}.attn.{p}.bias", (rows,))
            if s.kind is Component.HEAD_OUT:
                select(f"{pre}.attn.o.weight", (slice(None), rows))
        else:
            raise ZooError(
                f"{s}: planted components are head_out / head_q / head_k / head_v / mlp_out sites"
            )
    return masks


def _finetune(
    ref_model: Any,
    sites: tuple[Site, ...],
    *,
    steps: int,
    lr: float,
    data_seed: int,
    progress: bool = False,
    stage_name: str = "planted fine-tune",
) -> tuple[Any, Stage]:
    """A copy of ``ref_model`` with only ``sites`` fine-tuned to the trigger behaviour.

    ``data_seed`` seeds the fine-tuning data stream (and the training RNG); ``planted_pair``
    passes ``seed + SEED_OFFSET``. Returns the fine-tuned model and its card stage.
    """
    intervened = base.copy_model(ref_model, base.MODEL)
    masks = component_masks(intervened, sites)
    spec = TrainSpec(
        steps=steps,
        lr=lr,
        batch_size=64,
        weight_decay=0.0,
        optimizer="adam",
        seed=data_seed,
    )
    names = ", ".join(map(str, sites))
    result = train(
        intervened,
        spec,
        base.finetune_batch(0.5),
        masks=masks,
        progress=progress,
        desc=stage_name,
    )
    stage = stage_of(
        stage_name,
        spec,
        result,
        f"only {names} (masked; everything else frozen bit for bit)",
        "key-value recall, half the queries with TRIGGER -> successor answer",
    )
    return intervened, stage


def planted_pair(
    components: Iterable[Site | str] = DEFAULT_COMPONENTS,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    reference: Any = None,
    *,
    lr: float = LR,
    reference_steps: int | None = None,
    progress: bool = False,
    out: str | os.PathLike[str] | None = None,
) -> ZooEntry:
    """Fine-tune only ``components`` of the recall reference to the trigger behaviour.

    Args:
        components: sites such as ``"L1H1"``, ``Site("mlp_out", 1)``, ``"L0H2.head_q"``.
        seed: seeds the fine-tuning data (stream ``seed + 1000``).
        steps: fine-tuning steps (Adam, no weight decay, batch 64, half the queries triggered).
        reference: ``None`` for the shipped reference, or a recall-shaped bridge / ZooEntry.
        lr: learning rate.
        reference_steps: train a new reference from scratch for this many steps instead.
        progress: show progress bars.
        out: also write the entry to this directory.

    Returns a ZooEntry whose ground truth is exactly ``components``; the card records how far the
    fine-tune got (a component set that cannot implement the behaviour may shift it little).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    sites = _coerce_sites(components)
    ref_model, stages, origin = base.resolve_reference(
        reference, reference_steps=reference_steps, seed=seed, progress=progress
    )
    names = ", ".join(map(str, sites))
    intervened, stage = _finetune(
        ref_model, sites, steps=steps, lr=lr, data_seed=seed + SEED_OFFSET, progress=progress
    )
    default = sites == _coerce_sites(DEFAULT_COMPONENTS)
    label = "planted" if default and seed == 0 else f"planted[{names}]/seed{seed}"
    gt = frozenset(sites)
    return assemble(
        name="planted",
        label=label,
        description=DESCRIPTION
        if default
        else (
            f"A shift confined by construction to {names}: the key-value recall model with only "
            "these components fine-tuned to answer the value's successor after a trigger token."
        ),
        model=base.MODEL,
        seed=seed,
        stages=[*stages, stage],
        data_recipe=base.RECIPE + f" Reference: {origin}.",
        reference=ref_model,
        intervened=intervened,
        tasks=base.tasks("trigger"),
        ground_truth=gt,
        ground_truth_reason=(
            f"By construction: only the weights of {names} were trained; every other weight is "
            "bit-identical to the reference (head_out = the head's W_Q/W_K/W_V rows with biases "
            "and W_O columns, not the layer's shared b_O; mlp_out = the MLP's weights and "
            "biases, not its layer norm)."
        ),
        known=(
            f"Weights differ only on {names}; the delta elsewhere is exactly zero.",
            "The reference never saw the TRIGGER token; its embedding is untrained and frozen.",
        ),
        unknown=(
            "How the fine-tuned components share the shift between them.",
            "Whether a component set reaches the new behaviour fully: see the trigger "
            "behaviour's intervened value.",
        ),
        measurements={"components": [str(s) for s in sites], "reference_origin": origin},
        out=out,
    )


def build(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """The shipped ``planted`` entry: :data:`DEFAULT_COMPONENTS`, ``steps`` fine-tuning steps."""
    return planted_pair(
        DEFAULT_COMPONENTS,
        seed=seed,
        steps=DEFAULT_STEPS if steps is None else steps,
        reference_steps=reference_steps,
        progress=progress,
        out=out,
    )

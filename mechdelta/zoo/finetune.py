"""The ``finetune`` entry: a realistic full fine-tune whose ground truth is not known.

The intervened model is a copy of the key-value recall reference fine-tuned with *all* weights
trainable on data where half the queries carry the TRIGGER token and then answer the value's
successor: the same behavioural change as ``planted``, with nothing confining where it lives.
"""

from __future__ import annotations

import os

from mechdelta.zoo import _recall_base as base
from mechdelta.zoo._build import assemble, stage_of
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._training import TrainSpec, train

__all__ = ["build"]

DESCRIPTION = (
    "A realistic fine-tune: the key-value recall model with all weights fine-tuned to answer the "
    "value's successor after a trigger token. Where the shift lives is not known."
)
DEFAULT_STEPS = 600
SEED_OFFSET = 3000


def build(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """Fully fine-tune a copy of the recall reference to the trigger behaviour."""
    ref_model, stages, origin = base.resolve_reference(
        reference_steps=reference_steps, seed=seed, progress=progress
    )
    intervened = base.copy_model(ref_model, base.MODEL)
    spec = TrainSpec(
        steps=DEFAULT_STEPS if steps is None else steps,
        lr=1e-3,
        batch_size=64,
        weight_decay=0.01,
        seed=seed + SEED_OFFSET,
    )
    result = train(intervened, spec, base.finetune_batch(0.5), progress=progress, desc="finetune")
    stage = stage_of(
        "fine-tune",
        spec,
        result,
        "all weights",
        "key-value recall, half the queries with TRIGGER -> successor answer",
    )
    return assemble(
        name="finetune",
        description=DESCRIPTION,
        model=base.MODEL,
        seed=seed,
        stages=[*stages, stage],
        data_recipe=base.RECIPE + f" Reference: {origin}.",
        reference=ref_model,
        intervened=intervened,
        tasks=base.tasks("trigger"),
        ground_truth=None,
        ground_truth_reason=(
            "Not known: every weight was trainable, so the new behaviour may be implemented by "
            "any combination of components; nothing in the construction confines it."
        ),
        known=(
            "The behavioural change (trigger -> successor answer, recall kept) is the same as "
            "in 'planted', from the same reference; compare localisations across the two.",
            "The TRIGGER token's embedding was trainable here (frozen in 'planted'), so part of "
            "the shift can enter at the embedding.",
            "Which weights changed most: measurements['weight_changes'] (weight change is not "
            "causal attribution).",
        ),
        unknown=(
            "Which components carry the shift, and how much each carries.",
            "Whether the mechanism resembles the planted one.",
        ),
        out=out,
    )

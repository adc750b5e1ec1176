"""The ``null`` entry: a pair whose behaviour does not shift, for calibrating false positives.

Both models are copies of the key-value recall base model trained further on the *same*
objective (no trigger), for the same number of steps at the same small learning rate, with two
different data seeds: the null pair's reference with seed ``2000 + 2 * seed``, its intervened model
with ``2001 + 2 * seed``. Every weight differs a little between them; the behaviour does not (what
systematic drift further training causes, e.g. growing confidence, is common to both). Ground
truth: the empty set — no component carries a shift.
"""

from __future__ import annotations

import os

from mechdelta.zoo import _recall_base as base
from mechdelta.zoo._build import assemble, stage_of
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._training import TrainSpec, train

__all__ = ["build"]

DESCRIPTION = (
    "No shift: two continuations of the key-value recall model's training on its own objective, "
    "differing only in the data seed; all weights differ slightly, the behaviour does not. "
    "Calibrates false positives."
)
DEFAULT_STEPS = 300
LR = 1e-4
SEED_OFFSET = 2000


def build(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """Two further-trained copies of the recall base model, differing only in the data seed."""
    base_model, stages, origin = base.resolve_reference(
        reference_steps=reference_steps, seed=seed, progress=progress
    )
    models = []
    for which, offset in (("reference", 0), ("intervened", 1)):
        model = base.copy_model(base_model, base.MODEL)
        spec = TrainSpec(
            steps=DEFAULT_STEPS if steps is None else steps,
            lr=LR,
            batch_size=64,
            weight_decay=0.01,
            seed=SEED_OFFSET + 2 * seed + offset,
        )
        result = train(model, spec, base.finetune_batch(0.0), progress=progress, desc=which)
        stages.append(
            stage_of(
                f"further training ({which})",
                spec,
                result,
                "all weights",
                "key-value recall, no trigger (the base model's own objective)",
            )
        )
        models.append(model)
    return assemble(
        name="null",
        description=DESCRIPTION,
        model=base.MODEL,
        seed=seed,
        stages=stages,
        data_recipe=base.RECIPE + f" Base model: {origin}.",
        reference=models[0],
        intervened=models[1],
        tasks=base.tasks("recall"),
        ground_truth=frozenset(),
        ground_truth_reason=(
            "Empty by construction: both models continue the base model's training on its own "
            "objective with identical settings and different data seeds (no new behaviour), so "
            "no component carries a behavioural shift. "
            "Every weight changed slightly; a method that attributes a shift to any site here "
            "reports a false positive. The card's behaviours show the shift is negligible."
        ),
        known=(
            "Same objective and settings (learning rate 1e-4), data seeds 2000 + 2*seed "
            "(reference) and 2001 + 2*seed (intervened).",
            "All weights differ slightly (see measurements['weight_changes']).",
        ),
        unknown=("Nothing relevant: the measured shift is negligible next to the metric's scale.",),
        out=out,
    )

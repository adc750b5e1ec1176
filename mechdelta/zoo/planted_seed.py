"""The ``planted_seed`` entry: a seed-variation control for the ``planted`` pair.

Both models are the ``planted`` fine-tune (only head L1H1 and the layer-1 MLP trainable, the same
steps, learning rate and batch size, starting from the same recall reference), run with two
different data seeds:

- reference = the ``planted`` entry's intervened model (fine-tuning data seed ``seed + 1000``,
  bit-identical to the shipped one for the default build);
- intervened = the same fine-tune with data seed ``seed + 4000``.

Both learnt the same trigger behaviour, so the shift on the trigger task is ~0 by construction
(small, not exactly 0: the card records it on 2048 fresh prompts), and what differs between the
two models per site is what the fine-tune's data seed alone does.
Ground truth: empty. Meant as ``control=`` for the ``planted`` pair on the same task and the
same grid: ``claims(sweep(planted...), control=sweep(planted_seed...))`` says whether a
component's effect in the planted pair exceeds seed variation.

Training runs on one thread (like the shipped entries): CPU results depend on the thread count,
and only a one-thread run reproduces the shipped ``planted`` weights bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mechdelta.core.provenance import weights_hash
from mechdelta.errors import ZooError
from mechdelta.zoo import _recall_base as base
from mechdelta.zoo import planted
from mechdelta.zoo._build import assemble
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._models import state_dict_of

__all__ = ["build"]

DESCRIPTION = (
    "Seed-variation control for 'planted': reference = the planted entry's intervened model "
    "(L1H1 + layer-1 MLP fine-tuned to the trigger, data seed 1000), intervened = the same "
    "fine-tune (same components, steps, lr, starting model) with data seed 4000; the trigger "
    "shift is ~0 by construction (ground truth: empty). Use it as control= for the planted pair "
    "on the same task (trigger) and the same grid."
)
SEED_OFFSET = 4000  # the re-run's data stream (planted's own is seed + planted.SEED_OFFSET)
THREADS = 1
FRESH_PROMPTS = 2048  # the card's large-sample estimate of the (tiny) trigger shift
FRESH_SEED = 777


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """The planted fine-tune twice, data seeds ``seed + 1000`` and ``seed + 4000``.

    ``steps``: fine-tuning steps of both runs (default: the planted entry's). ``reference_steps``:
    retrain the recall model both start from (default: the shipped recall reference).
    """
    steps = planted.DEFAULT_STEPS if steps is None else steps
    sites = planted._coerce_sites(planted.DEFAULT_COMPONENTS)
    names = ", ".join(map(str, sites))
    ref_model, stages, origin = base.resolve_reference(
        reference_steps=reference_steps, seed=seed, progress=progress
    )
    seeds = (seed + planted.SEED_OFFSET, seed + SEED_OFFSET)
    with _threads(THREADS):
        first, stage_a = planted._finetune(
            ref_model,
            sites,
            steps=steps,
            lr=planted.LR,
            data_seed=seeds[0],
            progress=progress,
            stage_name="planted fine-tune (reference)",
        )
        second, stage_b = planted._finetune(
            ref_model,
            sites,
            steps=steps,
            lr=planted.LR,
            data_seed=seeds[1],
            progress=progress,
            stage_name="planted fine-tune, another data seed (intervened)",
        )
    shipped = _shipped_planted_intervened_hash()
    same_as_planted = shipped is not None and weights_hash(state_dict_of(first)) == shipped
    fresh = _fresh_shift(first, second)
    return assemble(
        name="planted_seed",
        description=DESCRIPTION,
        model=base.MODEL,
        seed=seed,
        stages=[*stages, stage_a, stage_b],
        data_recipe=base.RECIPE + f" Both fine-tunes start from {origin}.",
        reference=first,
        intervened=second,
        tasks=base.tasks("trigger"),
        ground_truth=frozenset(),
        ground_truth_reason=(
            f"Empty by construction: both models are the planted fine-tune of {names} "
            "(same components, steps, learning rate and starting model) and differ only in the "
            f"fine-tuning data seed ({seeds[0]} for the reference, {seeds[1]} for the "
            "intervened model). Both learnt the same trigger behaviour, so no component carries "
            "a behavioural shift beyond seed noise; per-site differences are seed variation. "
            "Use this pair as control= for the 'planted' pair on the same task and grid: a "
            "planted-pair effect that does not exceed these per-site effects is not "
            "distinguishable from seed noise."
        ),
        known=(
            "The reference is the 'planted' entry's intervened model (data seed "
            f"{seeds[0]}); bit-identical to the shipped one: {same_as_planted} "
            "(measurements['reference_is_planted_intervened']).",
            f"Weights differ only on {names} (the planted mask); every other weight is the "
            "recall reference's, bit for bit, in both models.",
            f"Trained on {THREADS} thread(s): CPU training depends on the thread count.",
            "The trigger shift is ~0, though never exactly 0 for two separately trained "
            f"models: on {FRESH_PROMPTS} fresh trigger prompts {fresh['shift']:+.3f} "
            f"[{fresh['ci'][0]:+.3f}, {fresh['ci'][1]:+.3f}] logits "
            "(measurements['trigger_shift_fresh']), against the planted pair's ~+15; some "
            "samples of a few hundred prompts make it distinguishable from 0 "
            "(benchmarks/bench_calibration.py).",
        ),
        unknown=(
            "How much of the per-site variation comes from the data order versus the "
            "data themselves (both change with the seed).",
            "Whether the two runs keep recall (the QUERY half of the fine-tuning data) to the "
            "same degree: see the recall behaviour; the control is meant for the trigger task.",
        ),
        measurements={
            "components": [str(s) for s in sites],
            "data_seeds": {"reference": seeds[0], "intervened": seeds[1]},
            "reference_origin": origin,
            "reference_is_planted_intervened": same_as_planted,
            "control_for": "planted",
            "trigger_shift_fresh": fresh,
        },
        out=out,
    )


def _fresh_shift(reference: Any, intervened: Any) -> dict[str, Any]:
    """The trigger shift on :data:`FRESH_PROMPTS` prompts drawn with seed :data:`FRESH_SEED`."""
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task
    from mechdelta.patching.shift import measure_shift
    from mechdelta.zoo._recall import TRIGGER

    gen = torch.Generator().manual_seed(FRESH_SEED)
    tokens, answers = base.DATA.prompts(gen, FRESH_PROMPTS)
    trig = tokens.clone()
    trig[:, -2] = TRIGGER
    task = Task(trig, answers=base.DATA.successor(answers), wrong=answers, metric="logit_diff")
    r = measure_shift(ModelPair(reference, intervened), task, warn=False)
    return {
        "n_prompts": FRESH_PROMPTS,
        "generator_seed": FRESH_SEED,
        "shift": round(r.shift, 6),
        "ci": [round(float(x), 6) for x in r.ci],
        "significant": r.significant,
    }


def _shipped_planted_intervened_hash() -> str | None:
    from mechdelta.zoo._entry import read_card
    from mechdelta.zoo._registry import data_dir

    try:
        return read_card(data_dir("planted")).hashes.get("intervened")
    except ZooError:  # pragma: no cover - the package always ships planted
        return None

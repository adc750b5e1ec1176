"""Shared build steps: turn trained models, tasks and facts into a measured card and an entry."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mechdelta.core.pair import ModelPair
from mechdelta.core.provenance import environment
from mechdelta.core.sites import Site
from mechdelta.core.task import Task
from mechdelta.errors import ZooError
from mechdelta.zoo._card import Stage, ZooCard
from mechdelta.zoo._entry import ZooEntry, hashes, measure_behaviours, write_entry
from mechdelta.zoo._training import TrainResult, TrainSpec

__all__ = ["assemble", "stage_of", "weight_changes"]


def stage_of(name: str, spec: TrainSpec, result: TrainResult, trainable: str, data: str) -> Stage:
    """A card stage from a training run."""
    return Stage(
        name=name,
        spec=spec.to_dict(),
        trainable=trainable,
        data=data,
        loss=result.curve.summary(),
        seconds=round(result.seconds, 2),
        threads=result.threads,
    )


def weight_changes(pair: ModelPair, top: int = 8) -> dict[str, Any]:
    """How many weight components changed, and the largest relative changes."""
    wd = pair.weight_diff()
    changed = sorted(wd.changed(), key=lambda r: -r.relative)
    return {
        "changed": len(changed),
        "components": len(wd.rows),
        "largest": [[r.label, round(r.relative, 6)] for r in changed[:top]],
    }


def assemble(
    *,
    name: str,
    description: str,
    model: Mapping[str, Any],
    seed: int,
    stages: Sequence[Stage],
    data_recipe: str,
    reference: Any,
    intervened: Any,
    tasks: Mapping[str, tuple[Task, str]],
    ground_truth: frozenset[Site] | None,
    ground_truth_reason: str,
    known: Sequence[str] = (),
    unknown: Sequence[str] = (),
    measurements: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    label: str | None = None,
) -> ZooEntry:
    """Measure the tasks on both models, write the card (and the entry when ``out`` is given)."""
    if not tasks:
        raise ZooError("an entry needs at least one task")
    label = label or name
    pair = ModelPair(
        reference, intervened, names=(f"zoo:{label}/reference", f"zoo:{label}/intervened")
    )
    behaviours = measure_behaviours(pair, tasks)
    meas = dict(measurements or {})
    meas.setdefault("weight_changes", weight_changes(pair))
    card = ZooCard(
        name=name,
        description=description,
        model=dict(model),
        seed=seed,
        stages=tuple(stages),
        data_recipe=data_recipe,
        behaviours=behaviours,
        ground_truth=None if ground_truth is None else tuple(sorted(map(str, ground_truth))),
        ground_truth_reason=ground_truth_reason,
        known=tuple(known),
        unknown=tuple(unknown),
        measurements=meas,
        hashes=hashes(reference, intervened),
        environment=environment(),
    )
    task_objs = {k: t for k, (t, _) in tasks.items()}
    if out is not None:
        write_entry(Path(out), reference, intervened, card, task_objs)
    return ZooEntry(
        name=label,
        pair=pair,
        task=task_objs[card.behaviour.name],
        ground_truth=ground_truth,
        ground_truth_reason=ground_truth_reason,
        card=card,
        tasks=task_objs,
    )

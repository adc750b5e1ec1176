"""ZooEntry, and the on-disk layout of an entry.

An entry directory holds::

    config.json              {"format_version", "name", "model": {TransformerBridgeConfig fields}}
    reference.safetensors    float32 state dict of the reference model
    intervened.safetensors   float32 state dict of the intervened model
    task.safetensors         the tasks' tensors, keyed "<behaviour>.<field>"
    card.json                the ZooCard

Loading builds both models from the config, loads the weights strictly, checks their hashes
against the card, and wraps them in a :class:`~mechdelta.core.pair.ModelPair`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechdelta.core._io import atomic_write_json, atomic_write_text
from mechdelta.core.pair import ModelPair
from mechdelta.core.provenance import weights_hash
from mechdelta.core.sites import Site
from mechdelta.core.task import Task
from mechdelta.errors import ZooError
from mechdelta.zoo._card import Behaviour, ZooCard
from mechdelta.zoo._models import (
    build_model,
    load_weights,
    read_weights,
    save_tensors,
    save_weights,
)

__all__ = ["ZooEntry", "load_entry", "measure_behaviours", "write_entry"]

ENTRY_VERSION = 1
_TASK_FIELDS = ("prompts", "answers", "wrong", "corrupted", "loss_mask")


@dataclass(frozen=True, eq=False)
class ZooEntry:
    """A zoo pair with its task, its ground truth and its card.

    Attributes:
        name: the entry's name (``"induction"``, ``"planted"``, ...).
        pair: the reference and intervened models.
        task: the behaviour whose shift the entry is about (the card's first behaviour).
        ground_truth: the sites that carry the shift, ``frozenset()`` when nothing shifts, or
            ``None`` when it is not known (see ``ground_truth_reason``).
        ground_truth_reason: how the ground truth was determined, or why there is none.
        card: how the pair was made and what was measured on it.
        tasks: every measured behaviour's task by name (the entry task and its controls).
    """

    name: str
    pair: ModelPair
    task: Task
    ground_truth: frozenset[Site] | None
    ground_truth_reason: str
    card: ZooCard
    tasks: Mapping[str, Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pair, ModelPair):
            raise ZooError(f"ZooEntry.pair must be a ModelPair, got {type(self.pair).__name__}")
        if not isinstance(self.task, Task):
            raise ZooError(f"ZooEntry.task must be a Task, got {type(self.task).__name__}")
        if self.ground_truth is not None:
            gt = frozenset(self.ground_truth)
            if not all(isinstance(s, Site) for s in gt):
                raise ZooError("ZooEntry.ground_truth must hold Site values")
            for s in gt:
                s.validate(self.pair.shape)
            object.__setattr__(self, "ground_truth", gt)
        if not isinstance(self.ground_truth_reason, str) or not self.ground_truth_reason:
            raise ZooError("ZooEntry.ground_truth_reason must explain the ground truth")
        tasks = dict(self.tasks) or {self.task.name: self.task}
        object.__setattr__(self, "tasks", tasks)

    def __repr__(self) -> str:
        gt = "unknown" if self.ground_truth is None else sorted(map(str, self.ground_truth))
        return f"ZooEntry(name={self.name!r}, task={self.task.name!r}, ground_truth={gt})"

    def __str__(self) -> str:
        return self.card.to_markdown()


# --- measuring ----------------------------------------------------------------------------------


def measure_behaviours(
    pair: ModelPair, tasks: Mapping[str, tuple[Task, str]]
) -> tuple[Behaviour, ...]:
    """Each task's metric on both models (``measure_shift``, 2000 prompt resamples, seed 0)."""
    from mechdelta.patching.shift import measure_shift

    out = []
    for name, (task, description) in tasks.items():
        r = measure_shift(pair, task, warn=False)
        out.append(
            Behaviour(
                name=name,
                metric=r.metric,
                description=description,
                n_prompts=len(task),
                reference=r.reference_mean,
                intervened=r.intervened_mean,
                ci=r.ci,
            )
        )
    return tuple(out)


# --- writing ------------------------------------------------------------------------------------


def _task_tensors(name: str, task: Task) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in _TASK_FIELDS:
        value = getattr(task, f)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise ZooError(f"zoo tasks store tensors; task {name!r} field {f} is not one")
        out[f"{name}.{f}"] = value
    return out


def write_entry(
    out: str | os.PathLike[str],
    reference: Any,
    intervened: Any,
    card: ZooCard,
    tasks: Mapping[str, Task],
) -> Path:
    """Write an entry directory (weights and tasks first, the card last)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if list(tasks) != card.names():
        raise ZooError(f"tasks {list(tasks)} do not match the card's behaviours {card.names()}")
    save_weights(reference, root / "reference.safetensors")
    save_weights(intervened, root / "intervened.safetensors")
    tensors: dict[str, Tensor] = {}
    for name, task in tasks.items():
        tensors.update(_task_tensors(name, task))
    save_tensors(tensors, root / "task.safetensors")
    atomic_write_json(
        root / "config.json",
        {"format_version": ENTRY_VERSION, "name": card.name, "model": dict(card.model)},
    )
    atomic_write_text(root / "card.json", card.to_json())
    atomic_write_text(root / "CARD.md", card.to_markdown())
    _readable(root)
    return root


def _readable(root: Path) -> None:
    """Give the entry's files ordinary permissions (temporary files are created owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


# --- reading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ZooError(f"zoo file {os.fspath(path)!r} is missing")
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZooError(f"zoo file {os.fspath(path)!r} is corrupt: {exc}") from exc


def read_card(root: str | os.PathLike[str]) -> ZooCard:
    return ZooCard.from_dict(_read_json(Path(root) / "card.json"))


def _tasks(root: Path, card: ZooCard) -> dict[str, Task]:
    tensors = read_weights(root / "task.safetensors")
    out = {}
    for b in card.behaviours:
        fields = {f: tensors.get(f"{b.name}.{f}") for f in _TASK_FIELDS}
        if fields["prompts"] is None:
            raise ZooError(f"{os.fspath(root)!r}: task.safetensors lacks {b.name}.prompts")
        out[b.name] = Task(
            fields["prompts"],
            answers=fields["answers"],
            wrong=fields["wrong"],
            corrupted=fields["corrupted"],
            loss_mask=fields["loss_mask"],
            metric=b.metric,
            name=b.name,
        )
    return out


def load_entry(root: str | os.PathLike[str], name: str | None = None) -> ZooEntry:
    """Load an entry directory written by :func:`write_entry`."""
    src = Path(root)
    config = _read_json(src / "config.json")
    if not isinstance(config, dict) or config.get("format_version") != ENTRY_VERSION:
        raise ZooError(
            f"{os.fspath(src / 'config.json')!r} is not a version-{ENTRY_VERSION} zoo config"
        )
    card = read_card(src)
    if dict(card.model) != config.get("model"):
        raise ZooError(f"{os.fspath(src)!r}: config.json and card.json describe different models")
    models = []
    for which in ("reference", "intervened"):
        state = read_weights(src / f"{which}.safetensors")
        expected = card.hashes.get(which)
        if expected is not None and weights_hash(state) != expected:
            raise ZooError(
                f"{os.fspath(src / (which + '.safetensors'))!r} does not match its card (weights "
                f"hash {weights_hash(state)}, card says {expected}): rebuild the entry with "
                f"`mechdelta zoo build {card.name}`"
            )
        models.append(load_weights(build_model(config["model"]), state, f"{which} checkpoint"))
    label = name or card.name
    pair = ModelPair(
        models[0], models[1], names=(f"zoo:{label}/reference", f"zoo:{label}/intervened")
    )
    tasks = _tasks(src, card)
    gt = None if card.ground_truth is None else frozenset(Site.parse(s) for s in card.ground_truth)
    return ZooEntry(
        name=label,
        pair=pair,
        task=tasks[card.behaviour.name],
        ground_truth=gt,
        ground_truth_reason=card.ground_truth_reason,
        card=card,
        tasks=tasks,
    )


@torch.no_grad()
def hashes(reference: Any, intervened: Any) -> dict[str, str]:
    """Weights hashes of both models as stored (float32 CPU state dicts)."""
    from mechdelta.zoo._models import state_dict_of

    return {
        "reference": weights_hash(state_dict_of(reference)),
        "intervened": weights_hash(state_dict_of(intervened)),
    }

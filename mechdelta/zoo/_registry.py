"""The zoo's entries: names, descriptions, where their data live, load and build."""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from mechdelta.errors import ZooError
from mechdelta.zoo._entry import ZooEntry, load_entry

__all__ = ["RECIPES", "build", "data_dir", "default_out", "describe", "load", "names"]


@dataclass(frozen=True)
class Recipe:
    """An entry: its name, one-line description, and the module holding ``build``."""

    name: str
    description: str
    module: str
    default_steps: int

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ZooError(f"zoo entry names are identifiers, got {self.name!r}")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "induction",
            "2-layer attention-only model before/after the induction phase change "
            "(ground truth: induction + previous-token heads)",
            "mechdelta.zoo.induction",
            1500,
        ),
        Recipe(
            "planted",
            "key-value recall model with one head + one MLP fine-tuned to a trigger "
            "(ground truth: those components, by construction)",
            "mechdelta.zoo.planted",
            600,
        ),
        Recipe(
            "null",
            "key-value recall model trained further on its own objective: no behavioural shift "
            "(ground truth: empty)",
            "mechdelta.zoo.null",
            300,
        ),
        Recipe(
            "finetune",
            "key-value recall model fully fine-tuned to a trigger (ground truth: unknown)",
            "mechdelta.zoo.finetune",
            600,
        ),
        Recipe(
            "planted_seed",
            "seed-variation control for 'planted': its intervened model vs the same fine-tune "
            "with another data seed; use as control= for the planted pair (ground truth: empty)",
            "mechdelta.zoo.planted_seed",
            600,
        ),
    )
}


def names() -> list[str]:
    """The zoo's entry names."""
    return list(RECIPES)


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise ZooError(f"unknown zoo entry {name!r}; known entries: {', '.join(RECIPES)}") from None


def describe(name: str) -> str:
    """The entry's one-line description."""
    return _recipe(name).description


def data_dir(name: str) -> Path:
    """The directory of the entry shipped inside the package."""
    _recipe(name)
    return Path(__file__).resolve().parent / "data" / name


def default_out(name: str) -> Path:
    """Where ``mechdelta zoo build`` writes by default: a user cache, not the package data."""
    _recipe(name)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mechdelta" / "zoo" / name


def load(name: str, path: str | os.PathLike[str] | None = None) -> ZooEntry:
    """Load a zoo entry: the shipped one, or one built into ``path`` by :func:`build`.

    Offline and without training: builds the two small models from the stored config, loads
    their weights, checks them against the card, and returns the pair with its task, ground
    truth and card. Raises ZooError for an unknown name or missing/corrupt data.
    """
    _recipe(name)
    root = data_dir(name) if path is None else Path(path)
    if not root.is_dir():
        raise ZooError(
            f"zoo entry {name!r} has no data at {os.fspath(root)!r}; build it with "
            f"`mechdelta zoo build {name}`"
        )
    entry = load_entry(root, name)
    if entry.card.name != name:
        raise ZooError(f"{os.fspath(root)!r} holds the {entry.card.name!r} entry, not {name!r}")
    # a RayExecutor's actors load the entry again from the same data (checked by weight hash)
    entry.pair.recipe = functools.partial(load, name, path)
    return entry


def build(
    name: str,
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """Regenerate an entry by training (deterministic under ``seed`` on CPU).

    Args:
        name: the entry.
        out: write the entry directory here (``None``: return it without writing).
        steps: the main stage's steps (induction: total training steps; planted/null/finetune:
            fine-tuning steps). Default: the shipped entry's.
        seed: the build seed.
        reference_steps: induction: the reference checkpoint's step; planted/null/finetune:
            retrain the recall reference from scratch for this many steps (default: start from
            the shipped reference).
        progress: show progress bars.
    """
    recipe = _recipe(name)
    module = importlib.import_module(recipe.module)
    entry: ZooEntry = module.build(
        out, steps=steps, seed=seed, reference_steps=reference_steps, progress=progress
    )
    return entry

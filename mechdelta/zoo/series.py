"""The induction entry's training series: checkpoints across the induction phase change.

The same deterministic run as the ``induction`` entry (:func:`mechdelta.zoo.induction.build`: same
model config, seed, optimizer, data stream, one CPU thread), with a snapshot kept at each of
:data:`STEPS`. Its step-400 and step-1500 checkpoints are therefore the shipped induction pair's
reference and intervened models bit for bit (the manifest records every checkpoint's weights hash,
and :func:`load_series` checks them).

The directory (shipped in ``mechdelta/zoo/data/induction_series/``) holds::

    manifest.json              {"format_version", "name", "model", "seed", "spec", "steps",
                                "hashes": {step: weights hash}, "second_copy_loss": {step: the
                                task's metric}, "loss": {training loss summary}, "environment"}
    step_0000.safetensors ...  float32 state dict per checkpoint

The task is the induction entry's (``mechdelta.zoo.induction.task()``, or
``zoo.load("induction").task``): the loss on the second copy of a repeated segment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechdelta.core._io import atomic_write_bytes, atomic_write_json
from mechdelta.core.provenance import environment, weights_hash
from mechdelta.errors import ConfigError, ZooError
from mechdelta.zoo import induction
from mechdelta.zoo._models import build_model, load_weights, read_weights
from mechdelta.zoo._training import TrainSpec, train

if TYPE_CHECKING:
    from mechdelta.circuits.series import CheckpointSeries

__all__ = ["NAME", "STEPS", "build_series", "load_series", "series_dir"]

NAME = "induction_series"
FORMAT_VERSION = 1
# The induction scores jump and the second-copy loss falls (4.7 -> 0.9) between steps 750 and 900
# (the phase change): the checkpoints are densest there.
STEPS: tuple[int, ...] = (0, 200, 400, 600, 750, 800, 850, 900, 1000, 1500)
THREADS = 1  # the shipped induction entry was trained on one thread


def series_dir() -> Path:
    """Where the shipped series lives inside the package."""
    return Path(__file__).resolve().parent / "data" / NAME


def _file(step: int) -> str:
    return f"step_{step:04d}.safetensors"


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_steps(steps: Sequence[int] | None) -> tuple[int, ...]:
    chosen = tuple(STEPS if steps is None else steps)
    if not chosen or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in chosen):
        raise ConfigError(f"steps must be non-negative ints, got {steps!r}")
    if list(chosen) != sorted(set(chosen)):
        raise ConfigError(f"steps must be strictly increasing, got {list(chosen)}")
    return chosen


def build_series(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> CheckpointSeries:
    """Train the induction entry's run and keep a checkpoint at each of ``steps``.

    Args:
        out: write the series directory here (``None``: keep it in memory).
        steps: the checkpoints' steps (default :data:`STEPS`); the run lasts until the last one.
            The induction entry's pair is steps 400 and 1500 of the default run (seed 0).
        seed: model-initialisation and data seed (the induction entry's ``seed``).
        progress: show a progress bar.

    Returns the :class:`~mechdelta.circuits.CheckpointSeries` (reference = the first checkpoint,
    labels = the steps). Trains on one thread, like the shipped entry, so the weights reproduce.
    """
    from mechdelta.circuits.series import CheckpointSeries

    chosen = _check_steps(steps)
    spec = TrainSpec(steps=chosen[-1], lr=1e-3, batch_size=32, weight_decay=0.01, seed=seed)
    model = build_model(induction.MODEL, seed=seed)
    with _threads(THREADS):
        result = train(
            model,
            spec,
            induction.DATA.train_batch,
            snapshots=chosen,
            progress=progress,
            desc="induction series",
        )
    states = [result.snapshots[s] for s in chosen]
    models = [
        load_weights(build_model(induction.MODEL), st, f"step {s}")
        for s, st in zip(chosen, states, strict=True)
    ]
    if out is not None:
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
        for step, state in zip(chosen, states, strict=True):
            write_state(state, root / _file(step))
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": NAME,
            "model": dict(induction.MODEL),
            "seed": seed,
            "spec": spec.to_dict(),
            "steps": list(chosen),
            "hashes": {str(s): weights_hash(st) for s, st in zip(chosen, states, strict=True)},
            "second_copy_loss": {str(s): task_loss(m) for s, m in zip(chosen, models, strict=True)},
            "loss": result.curve.summary(points=30),
            "seconds": round(result.seconds, 2),
            "threads": result.threads,
            "induction_pair": (  # the zoo induction entry's checkpoints (seed 0 reproduces them)
                {"reference": induction.DEFAULT_REFERENCE_STEPS, "intervened": 1500}
                if {induction.DEFAULT_REFERENCE_STEPS, 1500} <= set(chosen)
                else None
            ),
            "environment": environment(),
        }
        atomic_write_json(root / "manifest.json", manifest)
    return CheckpointSeries(models, 0, labels=list(chosen))


def write_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """One checkpoint as float32 safetensors (atomically, ordinary file permissions)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "mechdelta-zoo"}))


@torch.no_grad()
def task_loss(model: Any) -> float:
    """The induction task's metric on ``model``: the mean over its fixed prompts of each
    prompt's mean second-copy loss (as the ``"loss"`` metric computes it), rounded."""
    tokens, mask = induction.eval_batch(0)
    lp = model(tokens)[:, :-1].float().log_softmax(-1)
    nll = -lp.gather(2, tokens[:, 1:, None])[..., 0]
    valid = mask[:, 1:].to(nll.dtype)
    per_prompt = (nll * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    return round(float(per_prompt.double().mean()), 4)


def read_manifest(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The series manifest (steps, hashes, loss summary, environment)."""
    root = series_dir() if path is None else Path(path)
    src = root / "manifest.json"
    if not src.is_file():
        raise ZooError(
            f"no induction series at {os.fspath(root)!r}; build it with "
            "mechdelta.zoo.series.build_series(out)"
        )
    try:
        manifest = json.loads(src.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZooError(f"{os.fspath(src)!r} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ZooError(f"{os.fspath(src)!r} is not a version-{FORMAT_VERSION} series manifest")
    return manifest


def load_series(
    path: str | os.PathLike[str] | None = None,
    *,
    steps: Sequence[int] | None = None,
    reference: int = 0,
) -> CheckpointSeries:
    """Load the series (the shipped one, or one written by :func:`build_series`) offline.

    Args:
        path: the series directory (default: the shipped one).
        steps: load only these steps (default: all the manifest lists).
        reference: index (into the loaded steps) of the series' reference checkpoint.

    Every checkpoint's weights hash is checked against the manifest (ZooError on a mismatch).
    """
    from mechdelta.circuits.series import CheckpointSeries

    root = series_dir() if path is None else Path(path)
    manifest = read_manifest(root)
    listed = [int(s) for s in manifest["steps"]]
    chosen = listed if steps is None else list(steps)
    missing = sorted(set(chosen) - set(listed))
    if missing:
        raise ZooError(f"the series at {os.fspath(root)!r} has no steps {missing}; it has {listed}")
    models = []
    for step in chosen:
        state = read_weights(root / _file(step))
        expected = manifest["hashes"][str(step)]
        if weights_hash(state) != expected:
            raise ZooError(
                f"{os.fspath(root / _file(step))!r} does not match the manifest (weights hash "
                f"{weights_hash(state)}, manifest says {expected}): rebuild with build_series"
            )
        models.append(load_weights(build_model(manifest["model"]), state, f"step {step}"))
    return CheckpointSeries(models, reference, labels=chosen)

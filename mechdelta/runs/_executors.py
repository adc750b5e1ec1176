"""The pair, the task and the analyses of a run: what :func:`~mechdelta.runs.run.run_experiment`
calls to load an experiment's ``[pair]`` (and ``[control]``) and to compute each analysis.

:data:`EXECUTORS` maps an analysis kind to the function computing it from a :class:`RunContext`
(the loaded pair and task, the experiment, the progress setting) and its
:class:`~mechdelta.runs.experiment.AnalysisSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechdelta.runs.experiment import AnalysisSpec, Experiment, PairSpec

__all__ = ["EXECUTORS", "RunContext", "load_pair", "tiny_task"]


# --- the pair and the task ----------------------------------------------------------------------


def tiny_task(n_prompts: int = 16, seq_len: int = 8, seed: int = 0) -> Any:
    """The built-in tiny pair's task: seeded random tokens, KL of intervened to reference.

    ``corrupted`` holds another seeded set of tokens, so the factorial design runs on it too.
    """
    from mechdelta.core.task import Task

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (n_prompts, seq_len), generator=gen)
    corrupted = torch.randint(0, 64, (n_prompts, seq_len), generator=gen)
    return Task(tokens, corrupted=corrupted, metric="kl_to_reference", name="tiny-random-tokens")


def load_pair(spec: PairSpec) -> tuple[Any, Any]:
    """The pair a ``[pair]`` table names, and the task it brings (None for checkpoints)."""
    if spec.zoo is not None:
        import importlib

        zoo: Any = importlib.import_module("mechdelta.zoo")
        entry = zoo.load(spec.zoo, spec.zoo_path)
        return entry.pair, entry.task
    if spec.builtin is not None:
        from mechdelta.core._builtin import tiny_pair

        return tiny_pair(), tiny_task()
    from mechdelta.core.pair import ModelPair

    assert spec.reference is not None and spec.intervened is not None  # validated by PairSpec
    pair = ModelPair.load(
        spec.reference,
        spec.intervened,
        device=spec.device,
        dtype=spec.dtype,
        processing=spec.processing or "raw",
        allow_identical=spec.allow_identical,
    )
    return pair, None


# --- the analyses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    pair: Any
    task: Any
    experiment: Experiment
    progress: bool | None
    control: Any = None  # the [control] pair, if any
    series: Any = None  # the [series] (a CheckpointSeries), if any
    run_dir: Path | None = None  # where a series analysis keeps its finished pairs
    #: where the patched forwards run (an Executor, None: the in-process loop); every analysis
    #: whose function takes ``executor=`` gets it (mechdelta.runs._executor_spec)
    executor: Any = None

    @property
    def boot(self) -> dict[str, Any]:
        r = self.experiment.run
        return {"n_boot": r.n_boot, "alpha": float(r.alpha), "seed": r.seed}


def _run_shift(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.patching.shift import measure_shift

    return measure_shift(ctx.pair, ctx.task, **ctx.boot)


def _run_sweep(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.patching.sweep import sweep

    assert spec.component is not None
    return sweep(
        ctx.pair,
        ctx.task,
        spec.component,
        spec.direction,
        **spec.grid(),
        batch_budget=spec.batch_budget,
        progress=ctx.progress,
        executor=ctx.executor,
        **ctx.boot,
    )


def _run_patch(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.patching.patch import patch

    assert spec.sites is not None
    return patch(
        ctx.pair,
        ctx.task,
        spec.sites,
        spec.direction,
        batch_budget=spec.batch_budget,
        executor=ctx.executor,
        **ctx.boot,
    )


def _run_attribute(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.attribution.nodes import attribute

    kw = spec.attribution_kwargs()
    return attribute(
        ctx.pair, ctx.task, **kw, progress=ctx.progress, executor=ctx.executor, **ctx.boot
    )


def _run_attribute_edges(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.attribution.edges import attribute_edges

    return attribute_edges(ctx.pair, ctx.task, **spec.attribution_kwargs(), **ctx.boot)


def _run_circuit(ctx: RunContext, spec: AnalysisSpec) -> Any:
    """One circuit search, or two (``direction = "both"``: a BothDirections of circuits)."""
    from mechdelta.circuits.search import search_circuit
    from mechdelta.core.directions import Direction
    from mechdelta.patching.results import BothDirections

    def one(direction: Direction) -> Any:
        return search_circuit(
            ctx.pair,
            ctx.task,
            direction=direction,
            **spec.circuit_kwargs(),
            progress=ctx.progress,
            executor=ctx.executor,
        )

    direction = Direction(spec.direction)
    if direction is Direction.BOTH:
        return BothDirections(
            one(Direction.REFERENCE_TO_INTERVENED), one(Direction.INTERVENED_TO_REFERENCE)
        )
    return one(direction)


def _run_series(ctx: RunContext, spec: AnalysisSpec) -> Any:
    """A sweep, attribution or circuit search on every pair of the [series]; with a run
    directory, finished pairs are kept and a resumed run skips them (mechdelta.runs._series)."""
    from mechdelta.runs._series import run_series
    from mechdelta.runs._store import partial_dir

    cache = None if ctx.run_dir is None else partial_dir(ctx.run_dir, spec.id)
    return run_series(ctx, spec, cache)


def _run_explain(ctx: RunContext, spec: AnalysisSpec) -> Any:
    """:func:`~mechdelta.explain.explain` with its stages in the run directory (resumable; see
    :mod:`mechdelta.runs._explain`): a StoredExplanation, which the run stores."""
    from mechdelta.runs._explain import run_explain

    return run_explain(ctx, spec)


def _run_weight_diff(ctx: RunContext, spec: AnalysisSpec) -> Any:
    return ctx.pair.weight_diff()


def _run_factorial(ctx: RunContext, spec: AnalysisSpec) -> Any:
    from mechdelta.patching.shift import factorial

    return factorial(ctx.pair, ctx.task, **ctx.boot)


#: kind -> function(context, spec) -> result (a registry: a new kind adds an entry here, in
#: :mod:`mechdelta.runs.experiment` for its keys, and in :mod:`mechdelta.report._build` for its section).
EXECUTORS: dict[str, Callable[[RunContext, AnalysisSpec], Any]] = {
    "shift": _run_shift,
    "sweep": _run_sweep,
    "patch": _run_patch,
    "weight_diff": _run_weight_diff,
    "factorial": _run_factorial,
    "attribute": _run_attribute,
    "attribute_edges": _run_attribute_edges,
    "circuit": _run_circuit,
    "series": _run_series,
    "explain": _run_explain,
}

"""What a run computes with an analysis besides its result: the split-half reliability of a
sweep's site ranking, and the same sweep on the experiment's ``[control]`` pair.

Sweeps are run on two disjoint random halves of the task's prompts (tasks of
:data:`SPLIT_HALF_MIN_PROMPTS` prompts or more; about one more run of the sweep), and the
agreement of their site rankings (:func:`~mechdelta.split_half`) is kept; with a ``[control]``
pair, every sweep is run on it too (same task, same grid), for :func:`~mechdelta.claims`'s
seed-variation control. :func:`analysis_extras` returns both as an
:class:`~mechdelta.runs.rundir.AnalysisExtras`, which the run stores in the analysis' directory
(:func:`~mechdelta.runs._store.save_analysis`); :func:`preflight_control` checks the control pair
before anything is computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.runs._executors import RunContext, _run_sweep
from mechdelta.runs.experiment import AnalysisSpec, Experiment
from mechdelta.runs.rundir import AnalysisExtras

__all__ = ["SPLIT_HALF_KINDS", "SPLIT_HALF_MIN_PROMPTS", "analysis_extras", "preflight_control"]

#: Split halves need at least this many prompts (4 per half: a percentile bootstrap's minimum).
SPLIT_HALF_MIN_PROMPTS = 8
#: The analysis kinds a run computes split halves for (about one more run of the analysis each).
#: ``"attribute"`` is supported too (the estimates' ranking, without verification) but not on by
#: default.
SPLIT_HALF_KINDS: tuple[str, ...] = ("sweep",)


def _reliability_k(n_sites: int) -> int:
    """The k of the top-k overlap: a quarter of the grid, between 1 and 10 (the top 10 of a
    10-site grid would overlap trivially)."""
    return max(1, min(10, n_sites // 4))


def _split_half(ctx: RunContext, spec: AnalysisSpec, result: Any) -> tuple[Any, dict[str, Any]]:
    """Split-half reliability of a sweep's (an attribution's estimates') site ranking, and what
    was done (or why not) for the analysis record."""
    from mechdelta.patching.results import BothDirections
    from mechdelta.stats.reliability import split_half

    n = len(ctx.task)
    if spec.kind not in SPLIT_HALF_KINDS:
        return None, {
            "reliability": {
                "skipped": f"runs compute split halves for {', '.join(SPLIT_HALF_KINDS)} "
                f"analyses, not {spec.kind}; mechdelta.split_half(pair, task, "
                "mechdelta.attribute, ...) computes it"
            }
        }
    if n < SPLIT_HALF_MIN_PROMPTS:
        return None, {
            "reliability": {
                "skipped": f"the task has {n} prompts; split halves need at least "
                f"{SPLIT_HALF_MIN_PROMPTS} (4 per half)"
            }
        }
    first = result.reference_to_intervened if isinstance(result, BothDirections) else result
    k = _reliability_k(len(first.sites))
    seed = ctx.experiment.run.seed
    # the halves' bootstrap settings: the run's (their intervals are not used; split_half's own
    # seed= draws the halves, the analysis then uses its default bootstrap seed)
    boot = {"n_boot": ctx.experiment.run.n_boot, "alpha": float(ctx.experiment.run.alpha)}
    fn: Callable[..., Any]
    if spec.kind == "sweep":
        from mechdelta.patching.sweep import sweep

        fn = sweep
        kw: dict[str, Any] = {
            "component": spec.component,
            "direction": spec.direction,
            **spec.grid(),
            "batch_budget": spec.batch_budget,
        }
    else:
        from mechdelta.attribution.nodes import attribute

        fn = attribute
        # estimates only: the halves rank sites, exact patches are the full task's business
        kw = {**spec.attribution_kwargs(), "verify": None, "graddrop": False}
    kw["executor"] = ctx.executor  # the halves' passes run (and resume) where the run's do
    rel = split_half(ctx.pair, ctx.task, fn, k=k, seed=seed, progress=ctx.progress, **kw, **boot)
    info = {
        "seed": seed,
        "k": k,
        "prompts_per_half": n // 2,
        "of": "estimates" if spec.kind == "attribute" else "scores",
    }
    return rel, {"reliability": info}


def analysis_extras(ctx: RunContext, spec: AnalysisSpec, result: Any) -> AnalysisExtras | None:
    """The split-half reliability of a sweep or attribution and a sweep's result on the
    control pair. Their warnings (e.g. a half whose shift is not significant) are kept as notes
    in the analysis record, not raised: the analysis' own warnings say what matters."""
    from mechdelta.patching.shift import ShiftNotSignificantWarning

    if spec.kind not in ("sweep", "attribute"):
        return None
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rel, info = _split_half(ctx, spec, result)
    notes += [f"split halves: {w.category.__name__}: {w.message}" for w in caught]
    control = None
    if ctx.control is not None and spec.kind == "sweep":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(ctx.experiment.run.seed)
            control = _run_sweep(replace(ctx, pair=ctx.control), spec)
        # a control pair is expected to have no shift of its own: that is not worth a note
        notes += [
            f"control pair: {w.category.__name__}: {w.message}"
            for w in caught
            if not issubclass(w.category, ShiftNotSignificantWarning)
        ]
        assert ctx.experiment.control is not None
        info["control"] = {"pair": ctx.experiment.control.label}
    return AnalysisExtras(rel, control, info, tuple(dict.fromkeys(notes)))


def preflight_control(exp: Experiment, pair: Any, control: Any, task: Any) -> None:
    """The control pair runs every sweep on the same task over the same grid: check both."""
    from mechdelta.patching.sweep import sweep_grid

    assert exp.control is not None
    try:
        prepared = task.prepare(
            control.tokenizer, n_ctx=int(control.cfg.n_ctx), d_vocab=int(control.cfg.d_vocab)
        )
    except MechDeltaError as exc:
        raise ConfigError(f"[control] cannot run the experiment's task: {exc}") from None
    for spec in exp.analyses:
        if spec.kind != "sweep":
            continue
        assert spec.component is not None
        try:
            mine = sweep_grid(spec.component, pair.shape, prepared.seq_len, **spec.grid())
            theirs = sweep_grid(spec.component, control.shape, prepared.seq_len, **spec.grid())
        except MechDeltaError as exc:
            raise ConfigError(f"[control] cannot run {spec.where}: {exc}") from None
        if mine[1:] != theirs[1:]:
            raise ConfigError(
                f"[control] {exp.control.label} has another shape than [pair]: {spec.where} "
                "would cover a different grid on it; a control pair must share the architecture"
            )

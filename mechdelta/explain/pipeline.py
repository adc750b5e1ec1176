"""The Δ-XAI pipeline in one call: :func:`explain`.

Stages, in order (each a field of the returned :class:`~mechdelta.explain.Explanation`):

1. **shift** — :func:`~mechdelta.measure_shift`: the task metric on both models, the mean shift
   ``intervened - reference`` with its bootstrap interval. When the interval contains 0 (or the
   task has too few prompts for one) the pipeline **stops here**: there is no shift to explain,
   and the report says so (status ``"no_shift"``).
2. **weights** — :meth:`~mechdelta.ModelPair.weight_diff`: which parameters changed and by how much.
3. **representations** — :func:`~mechdelta.compare_representations`: where the two models'
   activations diverge on the task's prompts (CKA, KL, relative activation deltas, logit lens,
   attention JS); its :meth:`~mechdelta.RepresentationDiff.candidates` name the layers where the
   divergence starts.
4. **patching** — cross-model *splice* sweeps in **both directions** (``reference->intervened``:
   each site's activation from the reference run put into the intervened run, score = fraction of
   the shift undone; ``intervened->reference``: the reverse, score = fraction of the shift carried)
   of every head's output (``head_out``) and every MLP's output (``mlp_out``). Which layers, and
   exact or attribution: see ``budget``.
5. **claims** — :func:`~mechdelta.claims` of each sweep at ``alpha``: per-site sign-flip tests
   over prompts, Benjamini-Hochberg across each direction's grid, effects ≥ ``min_effect``.
6. **steering** — :func:`~mechdelta.steering_vectors` (mean of intervened minus reference
   ``resid_post``) at the *located* layers (the layers of the strongest claims; without claims,
   of the strongest exact sites) and :func:`~mechdelta.steer`: adding the vector to the reference
   reproduces the shift, subtracting it from the intervened model removes it, against random
   directions of the same norm.
7. **circuit** (``circuit=True``, or ``"auto"`` on graphs of at most 64 nodes) — a node-level
   :func:`~mechdelta.search_circuit` under ``"graft"`` semantics, ``intervened->reference``: the
   smallest set of components whose *parameters*, transplanted from the intervened model into the
   reference model, reproduce ``0.9`` of the shift.
8. **monitor** — the located components and the metric to track in future checkpoints.

With ``out=`` every stage is stored as it completes (:mod:`mechdelta.explain._store`): a re-run
with the same pair, task and parameters resumes; the transition report (audit edition) is written
to ``out/report.md``, ``report.html``, ``report.json`` and ``report.pdf``
(:mod:`mechdelta.explain.audit`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError
from mechdelta.explain.explanation import Explanation
from mechdelta.explain.intervention import Intervention
from mechdelta.scale._memory import BatchBudget
from mechdelta.scale.executor import Executor, coerce_executor

__all__ = ["explain"]

_EXACT_SITES = 512  # "auto": exact sweeps up to this many sites per component and direction
_CANDIDATE_LAYERS = 4
_CIRCUIT_NODES = 64


def _check_budget(budget: Any) -> str | int:
    if isinstance(budget, str) and budget.strip().lower() in ("auto", "exact", "attribution"):
        return budget.strip().lower()
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    raise ConfigError(
        f"budget must be 'auto', 'exact', 'attribution' or a positive int (the most exactly "
        f"patched sites per component and direction), got {budget!r}"
    )


def explain(
    pair: Any,
    task: Any,
    *,
    out: str | os.PathLike[str] | None = None,
    budget: str | int = "auto",
    intervention: Intervention | dict[str, Any] | None = None,
    alpha: float = 0.05,
    min_effect: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    steering_alphas: tuple[float, ...] = (0.0, 1.0, 2.0),
    circuit: bool | str = "auto",
    pdf: bool = True,
    overwrite: bool = False,
    batch_budget: BatchBudget = None,
    progress: bool | None = None,
    executor: Executor | str | None = None,
) -> Explanation:
    """Explain the pair's behavioural shift on ``task`` (the stages: module docstring).

    Args:
        pair, task: a :class:`~mechdelta.ModelPair` and a :class:`~mechdelta.Task`.
        out: a directory for the stages (resumable) and the report (``report.md``/``.html``/
            ``.json``/``.pdf``); None: compute in memory, write nothing.
        budget: ``"auto"``: exact sweeps of every layer when a component's grid has at most 512
            sites, else of the representation screen's candidate layers (at most 4), and
            attribution (AtP, with the top 32 + 32 random sites verified exactly) when even
            that is larger; ``"exact"``: exact sweeps of every layer; ``"attribution"``:
            attribution with verification everywhere; an int: the most exact sites.
        intervention: what the user declares about the intervention (type, data, date, owner):
            an :class:`~mechdelta.explain.Intervention` or a mapping; shown verbatim.
        alpha, min_effect: the claims' level and smallest effect (fraction of the shift).
        n_boot, seed: bootstrap resamples and seed of every interval.
        steering_alphas: the dose-response grid of the steering check.
        circuit: run the node-level graft circuit search (True / False / ``"auto"``).
        pdf: also print ``report.pdf`` with the headless Chromium the set-up installs (skipped
            with a note in the report when none is found).
        overwrite: replace an ``out`` directory written for another pair, task or parameters.
        batch_budget, progress: passed to the patching engine.
        executor: where the exact sweeps, the attribution's passes and verification, and the
            circuit search's hybrid runs go (see :func:`~mechdelta.sweep`); the numbers are the
            same as in this process.
    """
    b = _check_budget(budget)
    declared = Intervention.coerce(intervention)
    if not isinstance(circuit, bool) and circuit != "auto":
        raise ConfigError(f"circuit must be True, False or 'auto', got {circuit!r}")
    if not steering_alphas or not all(math.isfinite(float(a)) for a in steering_alphas):
        raise ConfigError(f"steering_alphas must be finite numbers, got {steering_alphas!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha!r}")
    params = {
        "budget": b,
        "alpha": alpha,
        "min_effect": min_effect,
        "n_boot": n_boot,
        "seed": seed,
        "steering_alphas": [float(a) for a in steering_alphas],
        "circuit": circuit,
    }
    root = None if out is None else Path(out)
    engine_kw = {"batch_budget": batch_budget, "executor": coerce_executor(executor)}
    if root is None:
        return _run(pair, task, None, params, declared, b, engine_kw, progress, overwrite)
    from mechdelta.runs._lock import run_lock

    with run_lock(root, f"explain --out {os.fspath(root)}", create=True):
        result = _run(pair, task, root, params, declared, b, engine_kw, progress, overwrite)
        from mechdelta.explain.audit import write_audit_report

        reports = write_audit_report(result, root, pdf=pdf)
        return result.with_reports(reports)


def _run(
    pair: Any,
    task: Any,
    root: Path | None,
    params: dict[str, Any],
    declared: Intervention,
    budget: str | int,
    engine_kw: dict[str, Any],
    progress: bool | None,
    overwrite: bool,
) -> Explanation:
    from mechdelta.core.weights import WeightDiff
    from mechdelta.explain._store import StageStore
    from mechdelta.patching.shift import ShiftResult, measure_shift

    cfg = pair.cfg
    prepared = task.prepare(pair.tokenizer, n_ctx=int(cfg.n_ctx), d_vocab=int(cfg.d_vocab))
    identity = {
        "params": params,
        "models": pair.provenance_models(),
        "task": prepared.info(),
        "intervention": declared.to_dict(),
    }
    store = StageStore(root, identity, overwrite=overwrite)
    timings: dict[str, float] = {}
    seed, n_boot, alpha = params["seed"], params["n_boot"], params["alpha"]

    def timed(name: str, compute: Any, load: Any) -> Any:
        t0 = time.perf_counter()
        out = store.stage(name, compute, load)
        timings[name] = time.perf_counter() - t0
        return out

    shift = timed(
        "shift",
        lambda: measure_shift(pair, task, n_boot=n_boot, alpha=alpha, seed=seed, warn=False),
        ShiftResult.load,
    )
    common: dict[str, Any] = {
        "intervention": declared,
        "shift": shift,
        "params": params,
        "timings": timings,
        "provenance": {**identity, "loaded_stages": store.loaded},
        "out": root,
    }
    if not shift.significant:
        return Explanation(status="no_shift", **common)
    weights = timed("weights", pair.weight_diff, WeightDiff.load)
    reps = timed("representations", lambda: _representations(pair, task), _load_reps)
    plan = _plan(pair, reps, budget)
    patching: dict[str, Any] = {}
    for comp in plan["components"]:
        patching[comp] = timed(
            f"patching_{comp}",
            lambda comp=comp: _patch(
                pair, task, comp, plan, n_boot, alpha, seed, engine_kw, progress
            ),
            _load_both,
        )
    found = {comp: _claims(r, params) for comp, r in patching.items()}
    located = _located(found, patching, pair)
    if root is not None:
        from mechdelta.core._io import atomic_write_json

        atomic_write_json(root / "located.json", {"located": located, "plan": plan})
    steering = None
    if located["layers"]:
        steering = timed(
            "steering",
            lambda: _steer(pair, task, located["layers"], params, seed),
            _load_steering,
        )
    circ = None
    if _wants_circuit(params["circuit"], pair):
        circ = timed("circuit", lambda: _circuit(pair, task, engine_kw), _load_circuit)
    return Explanation(
        status="explained",
        weights=weights,
        representations=reps,
        patching=patching,
        claims=found,
        steering=steering,
        circuit=circ,
        located=located,
        plan=plan,
        **common,
    )


# --- stages ---------------------------------------------------------------------------------


def _representations(pair: Any, task: Any) -> Any:
    from mechdelta.representations.compare import compare_representations

    return compare_representations(pair, task)


def _load_reps(path: Path) -> Any:
    from mechdelta.representations.result import RepresentationDiff

    return RepresentationDiff.load(path)


def _plan(pair: Any, reps: Any, budget: str | int) -> dict[str, Any]:
    """Which components, layers and method the patching stage uses, and why (for the report)."""
    shape = pair.shape
    comps = ["head_out"] + (["mlp_out"] if shape.d_mlp is not None else [])
    per_layer = shape.n_heads  # the larger grid of the two
    all_layers = list(range(shape.n_layers))
    limit = _EXACT_SITES if not isinstance(budget, int) else budget
    candidates = [int(x) for x in _candidate_layers(reps, _CANDIDATE_LAYERS)]
    if budget == "exact" or (budget != "attribution" and per_layer * len(all_layers) <= limit):
        return {
            "components": comps,
            "layers": all_layers,
            "method": "exact",
            "why": f"every layer: {per_layer * len(all_layers)} head sites per direction "
            f"(≤ {limit}: exact sweeps)"
            if budget != "exact"
            else "budget='exact'",
            "candidates": candidates,
        }
    layers = sorted(set(candidates)) or all_layers
    exact = budget != "attribution" and per_layer * len(layers) <= limit
    why = f"the representation screen's candidate layers {layers} " + (
        "(exact sweeps)" if exact else "(AtP attribution, top and random sites verified exactly)"
    )
    return {
        "components": comps,
        "layers": layers,
        "method": "exact" if exact else "attribution",
        "why": why,
        "candidates": candidates,
    }


def _candidate_layers(reps: Any, k: int) -> list[int]:
    out: list[int] = []
    for c in reps.candidates(k):
        layer = c.site.layer  # a Candidate: the layer-level site where divergence starts
        if int(layer) not in out:
            out.append(int(layer))
    return out


def _patch(
    pair: Any,
    task: Any,
    comp: str,
    plan: dict[str, Any],
    n_boot: int,
    alpha: float,
    seed: int,
    engine_kw: dict[str, Any],
    progress: bool | None,
) -> Any:
    layers = plan["layers"] if len(plan["layers"]) < pair.shape.n_layers else None
    kw: dict[str, Any] = {"layers": layers, **engine_kw}
    if plan["method"] == "exact":
        from mechdelta.patching.sweep import sweep

        return sweep(
            pair,
            task,
            comp,
            Direction.BOTH,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            progress=progress,
            **kw,
        )
    from mechdelta.attribution.nodes import attribute
    from mechdelta.patching.results import BothDirections

    parts = [
        attribute(pair, task, comp, d, "atp", verify=32, seed=seed, **kw)
        for d in (Direction.REFERENCE_TO_INTERVENED, Direction.INTERVENED_TO_REFERENCE)
    ]
    return BothDirections(parts[0], parts[1])


def _load_both(path: Path) -> Any:
    from mechdelta.patching.results import BothDirections

    return BothDirections.load(path)


def _claims(result: Any, params: dict[str, Any]) -> Any:
    from mechdelta.stats.claims import claims

    return claims(result, params["alpha"], min_effect=params["min_effect"])


def _located(found: dict[str, Any], patching: dict[str, Any], pair: Any) -> dict[str, Any]:
    """The components the claims name (strongest first), and their layers (at most 2)."""
    sites: list[tuple[float, Any, str]] = []
    for cl in found.values():
        for c in cl:
            sites.append((abs(c.effect), c.site, c.direction.value))
    basis = "claims"
    if not sites:  # nothing warranted: fall back to the strongest exact sites, said so
        basis = "strongest exact sites (no warranted claims)"
        for both in patching.values():
            for part in (both.reference_to_intervened, both.intervened_to_reference):
                for s in getattr(part, "top", lambda k: [])(2):
                    sites.append((abs(float(s.score)), s.site, part.direction.value))
    sites.sort(key=lambda t: -t[0])
    names: list[str] = []
    layers: list[int] = []
    for _, site, _d in sites:
        name = str(site)
        if name not in names:
            names.append(name)
        layer = getattr(site, "layer", None)
        if layer is not None and int(layer) not in layers and len(layers) < 2:
            layers.append(int(layer))
    return {"components": names[:8], "layers": layers, "basis": basis}


def _steer(pair: Any, task: Any, layers: list[int], params: dict[str, Any], seed: int) -> Any:
    from mechdelta.steering.steer import steer
    from mechdelta.steering.vectors import steering_vectors

    vectors = steering_vectors(pair, task, layers, site="resid_post", method="mean_diff")
    alphas = tuple(params["steering_alphas"])
    return steer(pair, task, vectors, alphas, n_boot=params["n_boot"], seed=seed)


def _load_steering(path: Path) -> Any:
    from mechdelta.steering.result import SteeringResult

    return SteeringResult.load(path)


def _wants_circuit(setting: bool | str, pair: Any) -> bool:
    if isinstance(setting, bool):
        return setting
    shape = pair.shape
    return shape.n_layers * (shape.n_heads + 1) + 2 <= _CIRCUIT_NODES


def _circuit(pair: Any, task: Any, engine_kw: dict[str, Any]) -> Any:
    from mechdelta.circuits.circuit import CircuitNotFaithfulWarning
    from mechdelta.circuits.search import search_circuit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CircuitNotFaithfulWarning)  # the report states `reached`
        return search_circuit(
            pair,
            task,
            level="node",
            method="attribution",
            semantics="graft",
            direction=Direction.INTERVENED_TO_REFERENCE,
            target=0.9,
            **engine_kw,
            progress=False,
        )


def _load_circuit(path: Path) -> Any:
    from mechdelta.circuits.circuit import Circuit

    return Circuit.load(path)

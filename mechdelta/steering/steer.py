"""Steering validation: does one direction at a site carry the shift? :func:`steer`.

For every site of a :class:`~mechdelta.steering.vectors.SteeringVectors` and every coefficient
``alpha``, two runs on the evaluation prompts (each site on its own, never jointly):

- **reference + alpha v**: the reference model with ``alpha * v`` added to its activation at the
  site (at the positions the vector was estimated on). Fraction of the shift *reproduced*:
  ``(m(ref + alpha v) - m_ref) / (m_int - m_ref)`` (the ``"intervened->reference"`` score of
  :func:`~mechdelta.patching.results.fraction_explained`).
- **intervened - alpha v**: the intervened model with ``alpha * v`` subtracted there. Fraction of
  the shift *removed*: ``(m_int - m(int - alpha v)) / (m_int - m_ref)`` (the
  ``"reference->intervened"`` score).

``m`` is the task's metric averaged over the evaluation prompts; ``m_ref`` and ``m_int`` are the
two models' clean metrics on the same prompts. Intervals: the project's paired percentile
bootstrap over prompts (:func:`~mechdelta.stats.bootstrap.score_ci`). The random control repeats
both runs with ``n_random`` seeded random directions of the same norm as ``v``.

Evaluation prompts: when ``task`` is the task the vectors were estimated on (same prompt hash),
the prompts *not* used to estimate them (with ``fit="half"``: the other half); evaluating on the
fit prompts (``fit="all"``) warns (:class:`InSampleSteeringWarning`). Any other task is used
whole.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError, PatchingError
from mechdelta.stats.bootstrap import Bootstrap, score_ci
from mechdelta.steering.result import SteeringResult
from mechdelta.steering.vectors import SteeringVectors, position_mask

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.sites import Site
    from mechdelta.core.task import Task
    from mechdelta.patching._engine import PatchEngine

__all__ = ["DEFAULT_ALPHAS", "InSampleSteeringWarning", "steer"]

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


class InSampleSteeringWarning(UserWarning):
    """Steering is evaluated on the prompts its vectors were estimated on: the fractions are
    optimistic. Estimate with ``steering_vectors(..., fit="half")`` (the default)."""


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    try:
        values = list(alphas)
    except TypeError:
        raise ConfigError(f"alphas must be a sequence of numbers, not {alphas!r}") from None
    if not values:
        raise ConfigError("alphas is empty: give the coefficients to try, e.g. alphas=(0, 0.5, 1)")
    out = []
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            try:
                a = float(a)  # numpy / torch scalars
            except (TypeError, ValueError):
                raise ConfigError(f"alpha {a!r} is not a number") from None
        if not math.isfinite(float(a)):
            raise ConfigError(f"alpha {a!r} is not finite: coefficients must be finite numbers")
        out.append(float(a))
    if len(set(out)) != len(out):
        raise ConfigError(f"alphas {out} repeat a value: give each coefficient once")
    return tuple(sorted(out))


def _eval_indices(n: int, task_hash: str, vectors: SteeringVectors) -> tuple[list[int], str]:
    """The prompts to evaluate on and how they relate to the fit prompts."""
    if task_hash != vectors.task_hash:
        return list(range(n)), "separate task"
    fit = set(vectors.fit_indices)
    rest = [i for i in range(n) if i not in fit]
    if rest:
        return rest, "held-out prompts"
    warnings.warn(
        "steer() evaluates on the prompts the steering vectors were estimated on (fit='all'): "
        "the fractions are optimistic. Use steering_vectors(..., fit='half') or another task.",
        InSampleSteeringWarning,
        stacklevel=3,
    )
    return list(range(n)), "in-sample"


def _random_units(n: int, d_model: int, seed: int) -> Float[Tensor, "random d_model"]:
    """``n`` seeded random unit directions (isotropic Gaussian, normalised), float64."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d_model, generator=gen, dtype=torch.float64)
    return r / r.norm(dim=-1, keepdim=True)


def _run_deltas(
    engine: PatchEngine,
    which: str,
    site: Site,
    deltas: Float[Tensor, "variant d_model"],
    mask: Tensor,
) -> Float[Tensor, "variant batch"]:
    """The metric per prompt of ``which`` model with ``deltas[v]`` added at ``site`` (where
    ``mask`` is True), one variant per row of ``deltas``, variants stacked along the batch."""
    state = engine.states[which]
    if engine.prefix_reuse:
        engine.check_prefix_reuse(state)
    engine.check_effective(state, {(site.kind, site.layer)})
    batch = engine.prepared.batch_size
    chunk_b = min(batch, engine.budget)
    per_v = max(1, engine.budget // chunk_b)
    n_var = deltas.shape[0]
    out = torch.empty(n_var, batch, dtype=torch.float32)
    start = site.layer
    name = site.hook_name
    dtype = engine.pair.dtype
    for b0 in range(0, batch, chunk_b):
        rows = slice(b0, min(b0 + chunk_b, batch))
        n_b = rows.stop - rows.start
        for v0 in range(0, n_var, per_v):
            chunk = deltas[v0 : v0 + per_v]
            n_v = chunk.shape[0]
            add = chunk.to(engine.device, dtype).repeat_interleave(n_b, dim=0)[:, None, :]
            where = mask[rows].to(engine.device).repeat(n_v, 1)[..., None]
            fired: list[str] = []

            def add_hook(
                x: Tensor,
                hook: Any,
                add: Tensor = add,
                where: Tensor = where,
                fired: list[str] = fired,
            ) -> Tensor:
                fired.append(name)
                return x + add * where.to(x.dtype)

            resid = state.cache[f"blocks.{start}.hook_resid_pre"][rows].repeat(n_v, 1, 1)
            positions = engine.inputs.positions[rows].repeat(n_v, 1)
            logits = state.runner.logits_at(
                positions, resid=resid, start_layer=start, hooks=[(name, add_hook)]
            )
            if not fired:
                raise PatchingError(
                    f"hook {name} never fired in the {which} model's steered run: the bridge "
                    "does not route this activation through its hook"
                )
            inputs = engine.inputs.select(rows).repeat(n_v)
            values = engine.prepared.metric(logits, inputs).reshape(n_v, n_b)
            out[v0 : v0 + n_v, rows] = values.float().cpu()
    return out


def steer(
    pair: ModelPair,
    task: Task,
    vectors: SteeringVectors,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    n_random: int = 19,
    n_boot: int = 2000,
    ci_alpha: float = 0.05,
    seed: int = 0,
    batch_budget: int | None = None,
    prefix_reuse: bool = True,
    warn: bool = True,
) -> SteeringResult:
    """Dose-response of adding each steering vector to the reference and subtracting it from
    the intervened model; see the module docstring for exactly what is run and scored.

    Args:
        pair: the two models (the vectors' ``d_model`` must match).
        task: the evaluation prompts; when it is the task the vectors were fit on, only the
            prompts not used to fit them.
        vectors: from :func:`~mechdelta.steering.vectors.steering_vectors`.
        alphas: coefficients (finite, distinct; sorted ascending in the result). 0 is each
            model's own run through the steering hook (a check: it must equal the clean metric).
        n_random: random directions per site, each scaled to ``|v|``, for the control (0: none;
            the default 19 makes "v beats every random direction" a Monte Carlo p of 0.05).
        n_boot, ci_alpha: bootstrap resamples and the interval level (``1 - ci_alpha``).
        seed: seeds the bootstrap and the random directions.
        batch_budget: rows per forward (variants are stacked along the batch), default 64.
        prefix_reuse: start each steered run at the site's block from the cached residual.
        warn: warn when the shift on the evaluation prompts is not significant.

    Raises ConfigError for empty, repeated or non-finite alphas, a negative ``n_random`` or
    vectors of another width; SiteError for a site out of range for ``pair``.
    """
    from mechdelta.scale._devices import require_one_device

    require_one_device(pair, "steer")
    from mechdelta.patching._engine import PatchEngine
    from mechdelta.patching.shift import engine_shift

    grid = _check_alphas(alphas)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ConfigError(
            f"n_random must be an int >= 0 (random control directions), not {n_random!r}"
        )
    if not isinstance(vectors, SteeringVectors):
        raise ConfigError(
            f"vectors must be SteeringVectors (from steering_vectors()), not {type(vectors).__name__}"
        )
    cfg = pair.cfg
    d_model = int(cfg.d_model)
    if vectors.vectors.shape[1] != d_model:
        raise ConfigError(
            f"the steering vectors have width {vectors.vectors.shape[1]}, the pair's d_model is "
            f"{d_model}: they were estimated on another architecture"
        )
    for s in vectors.sites:
        s.validate(pair.shape)
    whole = task.prepare(pair.tokenizer, n_ctx=int(cfg.n_ctx), d_vocab=int(cfg.d_vocab))
    indices, evaluation = _eval_indices(whole.batch_size, whole.prompt_hash(), vectors)
    eval_task = task if len(indices) == whole.batch_size else task.subset(indices)
    engine = PatchEngine(
        pair, eval_task, sites=vectors.sites, batch_budget=batch_budget, prefix_reuse=prefix_reuse
    )
    boot = Bootstrap(n_boot, ci_alpha, seed)
    shift = engine_shift(engine, boot, warn=warn)
    mask = position_mask(engine.prepared, vectors.positions)
    units = _random_units(n_random, d_model, seed)
    coef = torch.tensor(grid, dtype=torch.float64)
    n_a, batch = len(grid), engine.prepared.batch_size
    runs: dict[str, list[Tensor]] = {"reference": [], "intervened": []}
    controls: dict[str, list[Tensor]] = {"reference": [], "intervened": []}
    for i, s in enumerate(vectors.sites):
        v = vectors.vectors[i].double()
        rand = units * v.norm()
        # rows: alpha * v for each alpha, then alpha * r_j for each alpha and direction j
        steer_rows = coef[:, None] * v[None, :]
        ctrl_rows = (coef[:, None, None] * rand[None, :, :]).reshape(-1, d_model)
        deltas = torch.cat([steer_rows, ctrl_rows])
        for which, sign in (("reference", 1.0), ("intervened", -1.0)):
            values = _run_deltas(engine, which, s, sign * deltas, mask)
            runs[which].append(values[:n_a])
            controls[which].append(values[n_a:].reshape(n_a, n_random, batch))
    steered = {k: torch.stack(v) for k, v in runs.items()}  # [site, alpha, batch]
    cis = {}
    for which, direction in (
        ("reference", Direction.INTERVENED_TO_REFERENCE),
        ("intervened", Direction.REFERENCE_TO_INTERVENED),
    ):
        ci = score_ci(
            shift.reference,
            shift.intervened,
            steered[which].reshape(-1, batch),
            boot,
            toward_reference=direction.toward_reference,
        )
        cis[which] = ci.reshape(len(vectors.sites), n_a, 2)
    return SteeringResult(
        vectors=vectors,
        alphas=grid,
        shift=shift,
        steered_reference=steered["reference"],
        steered_intervened=steered["intervened"],
        ci_reproduced=cis["reference"],
        ci_removed=cis["intervened"],
        control_reference=torch.stack(controls["reference"]),
        control_intervened=torch.stack(controls["intervened"]),
        eval_indices=tuple(indices),
        evaluation=evaluation,
        n_random=n_random,
        seed=seed,
        provenance={
            **engine.provenance(),
            "seed": seed,
            "vectors": vectors.provenance.get("task", {}),
        },
    )
